//! Running requests through a compiled plan. Each item (image) of a request walks the
//! plan on the async runtime, starting a node as soon as its inputs are ready; the work
//! itself runs elsewhere: ops on their CPU pool's threads, models on their batcher and
//! instance threads, where items from every in-flight request share batches.

use super::compile::{Choice, NodeKind, Plan, PlanNode, Rebuild, Src, When};
use super::cond::{Operand, Scalar};
use super::params::scalar_at;
use super::schema::Layout;
use crate::error::Error;
use crate::model::check::{self, Expected};
use crate::model::LoadedModel;
use crate::request::{InferRequest, InferResponse, NamedTensor, Origin, StepTiming, DEFAULT_VERSION};
use crate::sched::pool::CpuPool;
use crate::telemetry::metrics::{BranchMetrics, Metrics, ModelMetrics, NodeMetrics};
use crate::telemetry::stats::ModelStats;
use futures::stream::{FuturesUnordered, StreamExt};
use sluice_ops::tensor::{fits, Dims};
use sluice_ops::{Op, OpError, Tensor, Value};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tracing::Instrument;

/// What every step of one request shares: its deadline and, when the client asked for
/// it, where its time goes.
#[derive(Clone, Copy)]
struct ItemCx<'a> {
    deadline: Option<Instant>,
    timing: Option<&'a Timing>,
    /// Every parameter's value for this request, in the plan's order.
    params: &'a [Scalar],
    /// Per node: the branch a split node takes for this request.
    picks: &'a [usize],
    /// The request's id and trace, for the batches its items join.
    origin: &'a Arc<Origin>,
}

impl ItemCx<'_> {
    /// Records one node run in the node's metrics and the request's timing.
    fn record(&self, i: usize, m: &NodeMetrics, queue: Duration, compute: Duration) {
        m.queue.observe(queue.as_secs_f64());
        m.compute.observe(compute.as_secs_f64());
        if let Some(t) = self.timing {
            let mut steps = t.0.lock();
            let s = &mut steps[i];
            s.queue += queue;
            s.compute += compute;
            s.items += 1;
        }
    }
}

/// One request's time per node.
struct Timing(parking_lot::Mutex<Vec<StepTiming>>);

impl Timing {
    fn new(plan: &Plan) -> Timing {
        Timing(parking_lot::Mutex::new(
            plan.nodes.iter().map(|n| StepTiming { step: n.name.clone(), ..Default::default() }).collect(),
        ))
    }

    /// The nodes that ran, in plan order.
    fn steps(&self) -> Vec<StepTiming> {
        self.0.lock().iter().filter(|s| s.items > 0).cloned().collect()
    }
}

/// One run of a node on one item, as its metrics see it: in flight while it lives, then
/// its duration and, if it failed, why. The same for the split and the fused layout.
struct NodeRun<'a> {
    m: &'a NodeMetrics,
    start: Instant,
}

impl<'a> NodeRun<'a> {
    fn begin(m: &'a NodeMetrics) -> NodeRun<'a> {
        m.in_flight.inc();
        NodeRun { m, start: Instant::now() }
    }

    fn finish(self, result: Result<Vec<Value>, Error>) -> Result<Vec<Value>, Error> {
        self.m.duration.observe(self.start.elapsed().as_secs_f64());
        if let Err(e) = &result {
            self.m.failure(e.error_type());
        }
        result
    }
}

impl Drop for NodeRun<'_> {
    fn drop(&mut self) {
        self.m.in_flight.dec();
    }
}

enum Target {
    Op { op: Arc<dyn Op>, pool: Arc<CpuPool> },
    Model(Arc<LoadedModel>),
}

struct Runner {
    /// One per branch of a route or split node; one otherwise.
    targets: Vec<Target>,
    /// Per branch of a route or split node (empty otherwise).
    branches: Vec<BranchMetrics>,
    metrics: NodeMetrics,
    limit: Option<Arc<Semaphore>>,
    /// Requests a non-sticky split has chosen for.
    splits: AtomicU64,
}

/// A node of a bound pipeline, for views of it (the dashboard).
pub struct NodeView<'a> {
    pub node: &'a PlanNode,
    pub metrics: &'a NodeMetrics,
    /// The model it runs (a route's or split's first).
    pub model: Option<&'a Arc<LoadedModel>>,
    pub pool: Option<&'a Arc<CpuPool>>,
    /// A route's or split's branches: label, model, series.
    pub branches: Vec<(&'a str, &'a Arc<LoadedModel>, &'a BranchMetrics)>,
}

/// What a node does once everything it reads is done.
enum Ready {
    /// Its condition does not hold, or something it reads is absent.
    Skip,
    /// Its arguments, and a route's `by` value.
    Run(Vec<Value>, Option<Value>),
}

/// A node's outcome for one item.
#[derive(Clone)]
enum Done {
    Ran(Vec<Value>),
    Skipped,
}

/// A plan bound to the loaded models and CPU pools it runs on.
pub struct Pipeline {
    pub plan: Plan,
    runners: Vec<Runner>,
    /// Where a fused pipeline's items run; `None` for split pipelines.
    fused_pool: Option<Arc<CpuPool>>,
    pub stats: Arc<ModelStats>,
    pub metrics: ModelMetrics,
    /// The file's text it was compiled from: a reload keeps the pipeline while this and
    /// the models it is bound to stay the same.
    pub source: String,
}

impl Pipeline {
    /// Binds `plan` (compiled from `source`) to loaded models, found by name and
    /// version, and to the engine's pools.
    pub fn bind(
        plan: Plan,
        source: String,
        models: &dyn Fn(&str, u64) -> Option<Arc<LoadedModel>>,
        pools: &HashMap<String, Arc<CpuPool>>,
        metrics: &Metrics,
    ) -> Result<Pipeline, String> {
        let runners = plan
            .nodes
            .iter()
            .map(|n| {
                let model = |model: &str, version: u64| {
                    models(model, version)
                        .map(Target::Model)
                        .ok_or_else(|| format!("node '{}': model '{model}' version {version} is not loaded", n.name))
                };
                let (targets, branches) = match &n.kind {
                    NodeKind::Op(op) => {
                        let pool =
                            pools.get(&n.pool).ok_or_else(|| format!("node '{}': no pool '{}'", n.name, n.pool))?;
                        (vec![Target::Op { op: op.clone(), pool: pool.clone() }], vec![])
                    }
                    NodeKind::Model { model: m, sig, .. } => (vec![model(m, sig.version)?], vec![]),
                    NodeKind::Branches { arms, .. } => (
                        arms.iter().map(|a| model(&a.model, a.sig.version)).collect::<Result<Vec<_>, _>>()?,
                        arms.iter().map(|a| metrics.for_branch(&plan.name, &n.name, &a.label)).collect(),
                    ),
                };
                Ok(Runner {
                    targets,
                    branches,
                    metrics: metrics.for_node(&plan.name, &n.name),
                    limit: (n.concurrency > 0).then(|| Arc::new(Semaphore::new(n.concurrency))),
                    splits: AtomicU64::new(0),
                })
            })
            .collect::<Result<_, String>>()?;
        let fused_pool = match plan.layout {
            Layout::Split => None,
            Layout::Fused => Some(pools.get(&plan.pool).ok_or_else(|| format!("no pool '{}'", plan.pool))?.clone()),
        };
        let model_metrics = metrics.for_model(&plan.name);
        Ok(Pipeline { plan, runners, fused_pool, stats: Arc::default(), metrics: model_metrics, source })
    }

    /// Each node with its live metrics and what it runs on, in plan order.
    pub fn nodes(&self) -> impl Iterator<Item = NodeView<'_>> {
        self.plan.nodes.iter().zip(&self.runners).map(|(node, r)| {
            let branches = match &node.kind {
                NodeKind::Branches { arms, .. } => arms
                    .iter()
                    .zip(&r.targets)
                    .zip(&r.branches)
                    .filter_map(|((a, t), m)| match t {
                        Target::Model(model) => Some((a.label.as_str(), model, m)),
                        Target::Op { .. } => None,
                    })
                    .collect(),
                _ => vec![],
            };
            match &r.targets[0] {
                Target::Op { pool, .. } => {
                    NodeView { node, metrics: &r.metrics, model: None, pool: Some(pool), branches }
                }
                Target::Model(m) => NodeView { node, metrics: &r.metrics, model: Some(m), pool: None, branches },
            }
        })
    }

    /// The loaded models the pipeline runs, with the version each names (`None`:
    /// whichever is the latest).
    pub fn models(&self) -> impl Iterator<Item = (&Arc<LoadedModel>, Option<u64>)> {
        self.plan.nodes.iter().zip(&self.runners).flat_map(|(n, r)| {
            n.models().into_iter().zip(&r.targets).filter_map(|((_, _, pinned), t)| match t {
                Target::Model(m) => Some((m, pinned)),
                Target::Op { .. } => None,
            })
        })
    }

    /// Runs one request: checks and splits its inputs into items, walks every item
    /// through the plan concurrently, and stacks the items' outputs back. (The engine
    /// records the request's outcome.)
    pub async fn infer(self: &Arc<Self>, req: InferRequest, deadline: Option<Instant>) -> Result<InferResponse, Error> {
        let start = Instant::now();
        let result = match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), self.run(req, deadline))
                .await
                .unwrap_or_else(|_| Err(Error::DeadlineExceeded { model: self.plan.name.clone() })),
            None => self.run(req, None).await,
        };
        if result.is_ok() {
            // A pipeline has no queue of its own (its nodes' waits are in the per-node
            // metrics): its compute is the whole walk. Clients such as perf_analyzer look
            // for these counts to move.
            self.stats.queue.add(Duration::ZERO);
            self.stats.compute_input.add(Duration::ZERO);
            self.stats.compute_infer.add(start.elapsed());
            self.stats.compute_output.add(Duration::ZERO);
        }
        result
    }

    async fn run(self: &Arc<Self>, req: InferRequest, deadline: Option<Instant>) -> Result<InferResponse, Error> {
        let outputs = self.plan.outputs.iter().map(|o| o.name.as_str());
        let wanted = check::select_outputs(&self.plan.name, "pipeline", outputs, &req.outputs)?;
        let origin = req.origin();
        let items = self.split_items(req.inputs)?;
        let params = Arc::new(self.request_params(&req.parameters)?);
        let picks = Arc::new(self.split_picks(&req.id));
        let timing = req.timing.then(|| Arc::new(Timing::new(&self.plan)));
        let cx = ItemCx { deadline, timing: timing.as_deref(), params: &params, picks: &picks, origin: &origin };
        let per_item = match &self.fused_pool {
            None => futures::future::try_join_all(items.into_iter().map(|values| self.walk(values, cx))).await?,
            Some(pool) => {
                let jobs = items
                    .into_iter()
                    .map(|values| {
                        let (this, timing) = (self.clone(), timing.clone());
                        let (params, picks, origin) = (params.clone(), picks.clone(), origin.clone());
                        pool.spawn(deadline, move || {
                            let timing = timing.as_deref();
                            this.walk_fused(
                                values,
                                ItemCx { deadline, timing, params: &params, picks: &picks, origin: &origin },
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, Error>>()?;
                let mut per_item = Vec::with_capacity(jobs.len());
                for rx in jobs {
                    match rx.await {
                        Err(_) => return Err(Error::DeadlineExceeded { model: self.plan.name.clone() }),
                        Ok(Err(panic)) => {
                            return Err(Error::Internal(format!("pipeline '{}': {panic}", self.plan.name)))
                        }
                        Ok(Ok(t)) => per_item.push(t.value?),
                    }
                }
                per_item
            }
        };
        // As Triton counts ensembles: inferences are items, executions are requests.
        self.stats.inference_count.fetch_add(per_item.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.stats.execution_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut outputs = Vec::new();
        for (oi, o) in self.plan.outputs.iter().enumerate() {
            if !wanted.contains(&oi) {
                continue;
            }
            let parts: Vec<&Tensor> = per_item.iter().map(|outs| &outs[oi]).collect();
            let tensor = if self.plan.max_batch_size > 0 {
                stack_items(&parts)
                    .map_err(|e| Error::Internal(format!("pipeline '{}': output '{}': {e}", self.plan.name, o.name)))?
            } else {
                parts[0].clone()
            };
            outputs.push(NamedTensor { name: o.name.clone(), tensor });
        }
        Ok(InferResponse {
            model_name: self.plan.name.clone(),
            model_version: DEFAULT_VERSION.to_string(),
            id: req.id,
            outputs,
            timing: timing.map(|t| t.steps()),
        })
    }

    fn invalid(&self, message: String) -> Error {
        Error::InvalidInput { model: self.plan.name.clone(), message }
    }

    /// Every declared parameter's value for a request: what it gives, checked, or the
    /// default. Parameters it gives that the pipeline does not declare are not its
    /// business (protocol options, other tools' keys) and are ignored.
    fn request_params(&self, given: &[(String, Scalar)]) -> Result<Vec<Scalar>, Error> {
        self.plan
            .params
            .iter()
            .map(|d| match given.iter().find(|(k, _)| *k == d.name) {
                None => Ok(d.default.clone()),
                Some((_, v)) => d.accept(v.clone()).map_err(|e| self.invalid(format!("parameter '{}': {e}", d.name))),
            })
            .collect()
    }

    /// The branch each split node takes for this request: by a hash of the request id
    /// when sticky (the same on every replica and across restarts), else spread by the
    /// node's request count so that weights hold closely over any stretch of requests.
    fn split_picks(&self, id: &str) -> Vec<usize> {
        self.plan
            .nodes
            .iter()
            .zip(&self.runners)
            .map(|(n, r)| match &n.kind {
                NodeKind::Branches { choice: Choice::Split { weights, sticky }, .. } => {
                    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
                    let at = if *sticky && !id.is_empty() {
                        stable_hash(id.as_bytes()) % total
                    } else {
                        // The golden-ratio sequence: evenly spread, no lock.
                        let c = r.splits.fetch_add(1, Relaxed);
                        ((c as f64 * 0.618_033_988_749_894_9).fract() * total as f64) as u64
                    };
                    let mut acc = 0;
                    weights
                        .iter()
                        .position(|&w| {
                            acc += u64::from(w);
                            at < acc
                        })
                        .unwrap_or(0)
                }
                _ => 0,
            })
            .collect()
    }

    /// The request's inputs as one value list per item, in the plan's input order.
    fn split_items(&self, given: Vec<NamedTensor>) -> Result<Vec<Vec<Value>>, Error> {
        let plan = &self.plan;
        let batched = plan.max_batch_size > 0;
        let expected: Vec<Expected> = plan
            .inputs
            .iter()
            .map(|p| Expected { name: &p.name, dtype: p.dtype, dims: &p.dims, batch_dim: batched })
            .collect();
        let tensors = check::bind_inputs(&plan.name, "pipeline", &expected, given)?;
        let mut n_items = None;
        let mut columns: Vec<Vec<Value>> = Vec::new();
        for ((p, e), t) in plan.inputs.iter().zip(&expected).zip(tensors) {
            let item_shape = if batched { t.shape.get(1..).unwrap_or(&[]) } else { &t.shape[..] };
            if !fits(item_shape, &p.dims) || (batched && t.shape.is_empty()) {
                let want = e.shown_dims();
                return Err(self.invalid(format!("input '{}': shape {:?} does not match {want}", p.name, t.shape)));
            }
            if batched {
                check::batch_rows(&plan.name, &p.name, t.shape[0], plan.max_batch_size, &mut n_items)?;
            } else {
                n_items = Some(1);
            }
            let n = n_items.unwrap_or(1);
            let values = if p.blob {
                let elems = t.bytes_elements().map_err(|e| self.invalid(format!("input '{}': {e}", p.name)))?;
                elems.into_iter().map(Value::Bytes).collect()
            } else if batched {
                let rows = t.split_batch(&vec![1; n]).map_err(|e| self.invalid(format!("input '{}': {e}", p.name)))?;
                rows.into_iter().map(|r| Value::Tensor(reshape(r, t.shape[1..].to_vec()))).collect()
            } else {
                vec![Value::Tensor(t)]
            };
            columns.push(values);
        }
        let n = n_items.unwrap_or(0);
        Ok((0..n).map(|k| columns.iter().map(|c| c[k].clone()).collect()).collect())
    }

    /// Walks one item through the plan; returns its pipeline outputs.
    async fn walk(&self, inputs: Vec<Value>, cx: ItemCx<'_>) -> Result<Vec<Tensor>, Error> {
        let plan = &self.plan;
        let mut values: Vec<Option<Done>> = vec![None; plan.nodes.len()];
        let mut waiting = plan.dep_counts.clone();
        let launch =
            |i: usize, args: Vec<Value>, by: Option<Value>| async move { (i, self.run_node(i, args, by, cx).await) };
        let mut running = FuturesUnordered::new();
        // Nodes whose inputs are all done: started, or skipped (which may make more ready).
        let mut ready: Vec<usize> = (0..plan.nodes.len()).filter(|&i| waiting[i] == 0).collect();
        loop {
            while let Some(i) = ready.pop() {
                match self.prepare(i, &|s| self.value_of(&inputs, &values, s, cx), cx)? {
                    Ready::Run(args, by) => running.push(launch(i, args, by)),
                    Ready::Skip => {
                        self.runners[i].metrics.skipped.inc();
                        values[i] = Some(Done::Skipped);
                        self.done(i, &mut waiting, &mut ready);
                    }
                }
            }
            let Some((i, result)) = running.next().await else { break };
            // The first failure fails the item; dropping `running` cancels the rest.
            values[i] = Some(Done::Ran(result?));
            self.done(i, &mut waiting, &mut ready);
        }
        self.outputs_of(|src| self.value_of(&inputs, &values, src, cx))
    }

    /// Node `i` is done: its dependents wait for one node less.
    fn done(&self, i: usize, waiting: &mut [usize], ready: &mut Vec<usize>) {
        for &d in &self.plan.dependents[i] {
            waiting[d] -= 1;
            if waiting[d] == 0 {
                ready.push(d);
            }
        }
    }

    /// A value for one item; `None`: absent (its node was skipped).
    fn value_of(&self, inputs: &[Value], values: &[Option<Done>], s: &Src, cx: ItemCx<'_>) -> Option<Value> {
        match *s {
            Src::Input(i) => Some(inputs[i].clone()),
            Src::Param(p) => Some(self.plan.params[p].to_value(&cx.params[p])),
            Src::Node { node, output } => match values[node].as_ref().expect("a ready node's inputs are computed") {
                Done::Ran(v) => Some(v[output].clone()),
                Done::Skipped => None,
            },
        }
    }

    /// Node `i`'s arguments, or that it is skipped: something it reads is absent (and
    /// has no default), or its condition does not hold.
    fn prepare(&self, i: usize, value_of: &dyn Fn(&Src) -> Option<Value>, cx: ItemCx<'_>) -> Result<Ready, Error> {
        let node = &self.plan.nodes[i];
        let mut args = Vec::with_capacity(node.inputs.len());
        for (k, s) in node.inputs.iter().enumerate() {
            // The compiler let a node read what may be absent only with a default or
            // `on_absent: skip`.
            match value_of(s).or_else(|| node.defaults.get(k).cloned().flatten()) {
                Some(v) => args.push(v),
                None => return Ok(Ready::Skip),
            }
        }
        let by = match &node.kind {
            NodeKind::Branches { choice: Choice::Route { by, .. }, .. } => match value_of(by) {
                Some(v) => Some(v),
                None => return Ok(Ready::Skip),
            },
            _ => None,
        };
        if let Some(w) = &node.when {
            let mut read = Vec::with_capacity(w.reads.len());
            for (_, s) in &w.reads {
                match value_of(s) {
                    Some(v) => read.push(v),
                    None => return Ok(Ready::Skip),
                }
            }
            let holds = w
                .expr
                .eval(&|o| self.operand(o, w, &read, cx))
                .map_err(|e| self.node_failed(node, format!("when {}: {e}", w.text)))?;
            if !holds {
                return Ok(Ready::Skip);
            }
        }
        Ok(Ready::Run(args, by))
    }

    /// An operand of a condition, for one item.
    fn operand(&self, o: &Operand, w: &When, read: &[Value], cx: ItemCx<'_>) -> Result<Scalar, String> {
        let read_of = |r: &str| {
            w.reads.iter().position(|(n, _)| n == r).map(|i| &read[i]).ok_or_else(|| format!("'{r}' is not read"))
        };
        match o {
            Operand::Lit(s) => Ok(s.clone()),
            Operand::Param(p) => {
                let i = self.plan.params.iter().position(|d| d.name == *p).ok_or("an undeclared parameter")?;
                Ok(cx.params[i].clone())
            }
            Operand::Ref(r) => one_value(read_of(r)?).map_err(|e| format!("'{r}' {e}")),
            Operand::Len(r) => match read_of(r)? {
                Value::List(l) => Ok(Scalar::Num(l.len() as f64)),
                Value::Tensor(t) if !t.shape.is_empty() => Ok(Scalar::Num(t.shape[0] as f64)),
                other => Err(format!("len({r}): it is a {} without dimensions", other.kind())),
            },
        }
    }

    /// What a route node routes by, read once per run: one value per element of a
    /// mapped node when its `by` is per element, else one value for the item. Empty for
    /// other nodes.
    fn route_keys(&self, i: usize, by: Option<&Value>, cx: ItemCx<'_>) -> Result<Vec<Scalar>, Error> {
        let node = &self.plan.nodes[i];
        let NodeKind::Branches { choice: Choice::Route { by: by_src, per_element, .. }, .. } = &node.kind else {
            return Ok(vec![]);
        };
        let by = by.ok_or_else(|| self.node_failed(node, "route: no `by` value".into()))?;
        let keys = match (by_src, by) {
            // A parameter's own value: not rounded through a tensor's dtype.
            (Src::Param(p), _) => Ok(vec![cx.params[*p].clone()]),
            (_, Value::List(l)) if *per_element => l.iter().map(one_value).collect(),
            (_, Value::Tensor(t)) if *per_element && t.dtype == sluice_ops::DataType::Bytes => t
                .bytes_elements()
                .map(|els| els.iter().map(|b| Scalar::Str(String::from_utf8_lossy(b).into_owned())).collect())
                .map_err(|e| e.to_string()),
            (_, Value::Tensor(t)) if *per_element => (0..t.shape.first().copied().unwrap_or(0))
                .map(|k| scalar_at(t, k).ok_or_else(|| format!("is a {} tensor, which routes do not read", t.dtype)))
                .collect(),
            (_, v) => one_value(v).map(|k| vec![k]),
        };
        keys.map_err(|e| self.node_failed(node, format!("route: by {e}")))
    }

    /// The branch node `i` sends one item (element `k` of a mapped node) to: a split's
    /// pick for the request, or the case of its route key.
    fn arm(&self, i: usize, keys: &[Scalar], k: usize, cx: ItemCx<'_>) -> Result<usize, Error> {
        let node = &self.plan.nodes[i];
        let NodeKind::Branches { choice, arms } = &node.kind else { return Ok(0) };
        let (by_src, cases, default) = match choice {
            Choice::Split { .. } => return Ok(cx.picks[i]),
            Choice::Route { by, cases, default, .. } => (by, cases, default),
        };
        // One key for the item stands for every element.
        let key = keys
            .get(k)
            .or(keys.first().filter(|_| keys.len() == 1))
            .ok_or_else(|| self.node_failed(node, "route: fewer `by` values than elements".into()))?;
        match cases.iter().find(|(c, _)| c == key).map(|(_, a)| *a).or(*default) {
            Some(a) => Ok(a),
            None => {
                let known: Vec<String> = cases.iter().map(|(c, a)| format!("{c} -> {}", arms[*a].label)).collect();
                let message = format!("route: no case for {key} ({}) and no `default:`", known.join(", "));
                // Routed by a request's parameter, the request chose it; by a computed
                // value, the pipeline lacks the case.
                Err(match by_src {
                    Src::Param(_) => self.node_invalid(node, message),
                    _ => self.node_failed(node, message),
                })
            }
        }
    }

    /// The pipeline's outputs for one item, from its computed values; an absent value
    /// gives the output's default.
    fn outputs_of(&self, value_of: impl Fn(&Src) -> Option<Value>) -> Result<Vec<Tensor>, Error> {
        self.plan
            .outputs
            .iter()
            .map(|o| match value_of(&o.src).or_else(|| o.default.clone()) {
                Some(Value::Tensor(t)) => Ok(t),
                Some(other) => Err(Error::Internal(format!("output '{}' is {}, not a tensor", o.name, other.kind()))),
                None => Err(Error::Internal(format!("output '{}' is absent and has no default", o.name))),
            })
            .collect()
    }

    async fn run_node(
        &self,
        i: usize,
        inputs: Vec<Value>,
        by: Option<Value>,
        cx: ItemCx<'_>,
    ) -> Result<Vec<Value>, Error> {
        let node = &self.plan.nodes[i];
        let keys = self.route_keys(i, by.as_ref(), cx)?;
        if !node.mapped {
            let arm = self.arm(i, &keys, 0, cx)?;
            return self.run_item(i, arm, inputs, cx).await;
        }
        let len = self.mapped_len(node, &inputs, &keys)?;
        self.runners[i].metrics.fanout.observe(len as f64);
        let elements = (0..len)
            .map(|k| {
                let arm = self.arm(i, &keys, k, cx)?;
                Ok(self.run_item(i, arm, element(node, &inputs, k), cx))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let results = futures::future::try_join_all(elements).await?;
        Ok(transpose(node, results))
    }

    /// How many elements a mapped node runs over: its lists (and a route's per-element
    /// `by`) must agree.
    fn mapped_len(&self, node: &PlanNode, inputs: &[Value], keys: &[Scalar]) -> Result<usize, Error> {
        let lists: Vec<&Arc<Vec<Value>>> = inputs
            .iter()
            .zip(&node.mapped_inputs)
            .filter(|(_, m)| **m)
            .map(|(v, _)| {
                v.as_list().ok_or_else(|| self.node_failed(node, format!("expected a list, got {}", v.kind())))
            })
            .collect::<Result<_, _>>()?;
        let len = lists[0].len();
        if lists.iter().any(|l| l.len() != len) {
            let lens: Vec<usize> = lists.iter().map(|l| l.len()).collect();
            return Err(self.node_failed(node, format!("the lists it is mapped over differ in length: {lens:?}")));
        }
        let per_element =
            matches!(node.kind, NodeKind::Branches { choice: Choice::Route { per_element: true, .. }, .. });
        if per_element && keys.len() != len {
            return Err(self.node_failed(node, format!("route: by holds {} values for {len} elements", keys.len())));
        }
        Ok(len)
    }

    fn node_failed(&self, node: &PlanNode, message: String) -> Error {
        Error::NodeFailed { pipeline: self.plan.name.clone(), node: node.name.clone(), message }
    }

    fn node_invalid(&self, node: &PlanNode, message: String) -> Error {
        Error::NodeInvalid { pipeline: self.plan.name.clone(), node: node.name.clone(), message }
    }

    /// Runs node `i` (its branch `arm`) on one set of (element) inputs.
    async fn run_item(&self, i: usize, arm: usize, inputs: Vec<Value>, cx: ItemCx<'_>) -> Result<Vec<Value>, Error> {
        let node = &self.plan.nodes[i];
        let runner = &self.runners[i];
        self.check_deadline(cx)?;
        let m = &runner.metrics;
        let run = NodeRun::begin(m);
        let _permit = match &runner.limit {
            Some(s) => Some(s.acquire().await.map_err(|_| Error::ShuttingDown)?),
            None => None,
        };
        m.items.inc();
        let span = tracing::debug_span!("node", pipeline = %self.plan.name, node = %node.name);
        let result = match &runner.targets[arm] {
            Target::Op { op, pool } => self.run_op(i, m, op.clone(), pool, inputs, cx).instrument(span).await,
            Target::Model(model) => self.run_model(i, m, model, inputs, cx).instrument(span).await,
        };
        branch_record(runner, arm, run.start, &result);
        run.finish(result)
    }

    /// Work not yet started for a request past its deadline is skipped.
    fn check_deadline(&self, cx: ItemCx<'_>) -> Result<(), Error> {
        match cx.deadline {
            Some(d) if Instant::now() >= d => Err(Error::DeadlineExceeded { model: self.plan.name.clone() }),
            _ => Ok(()),
        }
    }

    /// What an op node needs to build its op for this request's parameters, when they
    /// differ from the defaults it was compiled with.
    fn rebuild_for(&self, node: &PlanNode, cx: ItemCx<'_>) -> Option<RebuildFor> {
        let rb = node.rebuild.as_ref()?;
        let params = &self.plan.params;
        rb.uses.iter().any(|&p| cx.params[p] != params[p].default).then(|| (rb.clone(), cx.params.to_vec()))
    }

    async fn run_op(
        &self,
        i: usize,
        m: &NodeMetrics,
        op: Arc<dyn Op>,
        pool: &CpuPool,
        inputs: Vec<Value>,
        cx: ItemCx<'_>,
    ) -> Result<Vec<Value>, Error> {
        // Building for other parameter values runs on the pool too: builds read files.
        let rebuild = self.rebuild_for(&self.plan.nodes[i], cx);
        let rx = pool.spawn(cx.deadline, move || op_for(op, rebuild)?.run(&inputs))?;
        let outcome = match rx.await {
            Err(_) => return Err(Error::DeadlineExceeded { model: self.plan.name.clone() }),
            Ok(Err(panic)) => Err(panic),
            Ok(Ok(t)) => {
                cx.record(i, m, t.queued, t.ran);
                Ok(t.value)
            }
        };
        self.op_outcome(&self.plan.nodes[i], outcome)
    }
    async fn run_model(
        &self,
        i: usize,
        m: &NodeMetrics,
        model: &LoadedModel,
        inputs: Vec<Value>,
        cx: ItemCx<'_>,
    ) -> Result<Vec<Value>, Error> {
        let node = &self.plan.nodes[i];
        let tensors = self.model_inputs(node, model, inputs)?;
        let rx = model.submit(tensors, 1, cx.deadline, node.batching, cx.origin.clone())?;
        let computed = rx.await.map_err(|_| model.stopped())??;
        Ok(model_outputs(model, m, computed, i, cx))
    }

    /// Checks one item's tensors against the model's inputs; adds the batch dimension.
    fn model_inputs(&self, node: &PlanNode, model: &LoadedModel, inputs: Vec<Value>) -> Result<Vec<Tensor>, Error> {
        let spec = &model.spec;
        let batched = spec.config.max_batch_size > 0;
        let mut tensors = Vec::with_capacity(inputs.len());
        for (v, info) in inputs.into_iter().zip(&spec.inputs) {
            let Value::Tensor(t) = v else {
                return Err(
                    self.node_failed(node, format!("model input '{}' got {}, not a tensor", info.name, v.kind()))
                );
            };
            let dims = if batched { &info.dims[1..] } else { &info.dims[..] };
            if t.dtype != info.dtype || !fits(&t.shape, dims) {
                return Err(self.node_invalid(
                    node,
                    format!(
                        "model '{}' input '{}' takes {} {} per item, got {} {:?}",
                        spec.name,
                        info.name,
                        info.dtype,
                        Dims(dims),
                        t.dtype,
                        t.shape
                    ),
                ));
            }
            crate::model::check::within_max_dim(spec, &info.name, &t.shape, dims, usize::from(batched))
                .map_err(|e| Error::TooLarge(format!("pipeline '{}', node '{}': {e}", self.plan.name, node.name)))?;
            tensors.push(if batched { with_batch_dim(t) } else { t });
        }
        Ok(tensors)
    }

    /// Maps an op's outcome (or its panic) to the node's result.
    fn op_outcome(
        &self,
        node: &PlanNode,
        outcome: Result<sluice_ops::op::OpResult, String>,
    ) -> Result<Vec<Value>, Error> {
        match outcome {
            Err(panic) => {
                tracing::error!(pipeline = %self.plan.name, node = %node.name, "op panicked: {panic}");
                Err(self.node_failed(node, format!("op panicked: {panic}")))
            }
            // An op (a user's own too) must give what it declares: the nodes after it
            // index its outputs by port and trust their kinds.
            Ok(Ok(v)) if v.len() != node.output_names.len() => Err(self.node_failed(
                node,
                format!(
                    "op returned {} outputs, but declares {} ({})",
                    v.len(),
                    node.output_names.len(),
                    node.output_names.join(", ")
                ),
            )),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(OpError::Invalid(msg))) => Err(self.node_invalid(node, msg)),
            Ok(Err(OpError::Internal(msg))) => Err(self.node_failed(node, msg)),
            Ok(Err(OpError::TooLarge(msg))) => {
                Err(Error::TooLarge(format!("pipeline '{}', node '{}': {msg}", self.plan.name, node.name)))
            }
            Ok(Err(OpError::Busy(msg))) => {
                Err(Error::Busy(format!("pipeline '{}', node '{}': {msg}", self.plan.name, node.name)))
            }
        }
    }

    /// The fused layout: every step of one item in turn on the calling pool thread,
    /// which blocks while its model runs. Kept to measure what the split layout gains.
    fn walk_fused(&self, inputs: Vec<Value>, cx: ItemCx<'_>) -> Result<Vec<Tensor>, Error> {
        let plan = &self.plan;
        let mut values: Vec<Option<Done>> = Vec::with_capacity(plan.nodes.len());
        for (i, node) in plan.nodes.iter().enumerate() {
            let done = match self.prepare(i, &|s| self.value_of(&inputs, &values, s, cx), cx)? {
                Ready::Skip => {
                    self.runners[i].metrics.skipped.inc();
                    Done::Skipped
                }
                Ready::Run(args, by) if node.mapped => {
                    let keys = self.route_keys(i, by.as_ref(), cx)?;
                    let len = self.mapped_len(node, &args, &keys)?;
                    self.runners[i].metrics.fanout.observe(len as f64);
                    let mut results = Vec::with_capacity(len);
                    for k in 0..len {
                        let arm = self.arm(i, &keys, k, cx)?;
                        results.push(self.run_item_blocking(i, arm, element(node, &args, k), cx)?);
                    }
                    Done::Ran(transpose(node, results))
                }
                Ready::Run(args, by) => {
                    let keys = self.route_keys(i, by.as_ref(), cx)?;
                    let arm = self.arm(i, &keys, 0, cx)?;
                    Done::Ran(self.run_item_blocking(i, arm, args, cx)?)
                }
            };
            values.push(Some(done));
        }
        self.outputs_of(|src| self.value_of(&inputs, &values, src, cx))
    }

    fn run_item_blocking(&self, i: usize, arm: usize, inputs: Vec<Value>, cx: ItemCx<'_>) -> Result<Vec<Value>, Error> {
        let node = &self.plan.nodes[i];
        let runner = &self.runners[i];
        self.check_deadline(cx)?;
        let m = &runner.metrics;
        let run = NodeRun::begin(m);
        m.items.inc();
        let result = match &runner.targets[arm] {
            Target::Op { op, .. } => {
                let rebuild = self.rebuild_for(node, cx);
                let outcome = catch_unwind(AssertUnwindSafe(|| op_for(op.clone(), rebuild)?.run(&inputs)))
                    .map_err(crate::error::panic_message);
                cx.record(i, m, Duration::ZERO, run.start.elapsed());
                self.op_outcome(node, outcome)
            }
            Target::Model(model) => self.model_inputs(node, model, inputs).and_then(|tensors| {
                let rx = model.submit(tensors, 1, cx.deadline, node.batching, cx.origin.clone())?;
                let computed = rx.blocking_recv().map_err(|_| model.stopped())??;
                Ok(model_outputs(model, m, computed, i, cx))
            }),
        };
        branch_record(runner, arm, run.start, &result);
        run.finish(result)
    }
}

/// What building an op for a request's parameters takes: how, and the request's values.
type RebuildFor = (Arc<Rebuild>, Vec<Scalar>);

/// The op to run: the compiled one, or the one built for the request's parameters.
fn op_for(op: Arc<dyn Op>, rebuild: Option<RebuildFor>) -> Result<Arc<dyn Op>, OpError> {
    match rebuild {
        None => Ok(op),
        Some((rb, values)) => rb.op_for(&values).map_err(|e| {
            let given: Vec<String> = rb.uses.iter().map(|&p| format!("{}={}", rb.decls[p].name, values[p])).collect();
            OpError::Invalid(format!("with parameters {}: {e}", given.join(", ")))
        }),
    }
}

/// Counts an item on its branch of a route or split node.
fn branch_record(runner: &Runner, arm: usize, start: Instant, result: &Result<Vec<Value>, Error>) {
    if let Some(b) = runner.branches.get(arm) {
        b.items.inc();
        b.duration.observe(start.elapsed().as_secs_f64());
        if result.is_err() {
            b.failures.inc();
        }
    }
}

/// Element `k` of a mapped node's arguments: its lists' `k`th items, its other inputs whole.
fn element(node: &PlanNode, args: &[Value], k: usize) -> Vec<Value> {
    args.iter()
        .zip(&node.mapped_inputs)
        .map(|(v, &m)| match (m, v) {
            (true, Value::List(l)) => l[k].clone(),
            _ => v.clone(),
        })
        .collect()
}

/// Per element outputs -> per output lists, in element order.
fn transpose(node: &PlanNode, results: Vec<Vec<Value>>) -> Vec<Value> {
    let mut outs: Vec<Vec<Value>> = vec![Vec::with_capacity(results.len()); node.output_names.len()];
    for r in results {
        for (o, v) in outs.iter_mut().zip(r) {
            o.push(v);
        }
    }
    outs.into_iter().map(|o| Value::List(Arc::new(o))).collect()
}

/// The one value a tensor holds, for conditions and routes.
fn one_value(v: &Value) -> Result<Scalar, String> {
    match v {
        Value::Tensor(t) if t.element_count() == 1 => {
            scalar_at(t, 0).ok_or_else(|| format!("is a {} tensor, which conditions do not read", t.dtype))
        }
        Value::Tensor(t) => Err(format!("holds {} values (shape {:?}), not one", t.element_count(), t.shape)),
        other => Err(format!("is a {}, not one value", other.kind())),
    }
}

/// FNV-1a with a final mix: a hash that is the same in every process, so a sticky
/// split sends a request id to the same branch on every replica.
fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// A model's outputs for one item, without the batch dimension; records the node's
/// queue, compute and batch metrics.
fn model_outputs(
    model: &LoadedModel,
    m: &NodeMetrics,
    computed: crate::sched::Computed,
    i: usize,
    cx: ItemCx<'_>,
) -> Vec<Value> {
    cx.record(i, m, computed.queued, computed.compute);
    m.batch_size.observe(computed.batch_rows as f64);
    let batched = model.spec.config.max_batch_size > 0;
    computed
        .outputs
        .into_iter()
        .map(|t| {
            if batched {
                let shape = t.shape[1..].to_vec();
                Value::Tensor(reshape(t, shape))
            } else {
                Value::Tensor(t)
            }
        })
        .collect()
}

fn reshape(t: Tensor, shape: Vec<usize>) -> Tensor {
    Tensor { dtype: t.dtype, shape, data: t.data }
}

fn with_batch_dim(t: Tensor) -> Tensor {
    let mut shape = Vec::with_capacity(t.shape.len() + 1);
    shape.push(1);
    shape.extend(&t.shape);
    reshape(t, shape)
}

/// Stacks per-item outputs along a new first dimension. Items whose first dimension
/// differs (a different number of detections per image) are padded with zero rows (empty
/// strings for BYTES) up to the longest; give a `count` output to tell the real lengths.
pub fn stack_items(parts: &[&Tensor]) -> Result<Tensor, String> {
    let first = parts.first().ok_or("no items")?;
    let same = parts.iter().all(|p| p.shape == first.shape);
    let padded: Vec<Tensor>;
    let parts: Vec<&Tensor> = if same || first.shape.is_empty() {
        parts.to_vec()
    } else {
        if parts.iter().any(|p| p.shape.len() != first.shape.len() || p.shape[1..] != first.shape[1..]) {
            let shapes: Vec<&Vec<usize>> = parts.iter().map(|p| &p.shape).collect();
            return Err(format!("items' shapes differ beyond the first dimension: {shapes:?}"));
        }
        let rows = parts.iter().filter_map(|p| p.shape.first()).copied().max().unwrap_or(0);
        padded = parts.iter().map(|p| pad_rows(p, rows)).collect();
        padded.iter().collect()
    };
    let with_dim: Vec<Tensor> = parts.iter().map(|t| with_batch_dim((*t).clone())).collect();
    let refs: Vec<&Tensor> = with_dim.iter().collect();
    Tensor::concat_batch(&refs).map_err(|e| e.to_string())
}

fn pad_rows(t: &Tensor, rows: usize) -> Tensor {
    let have = t.shape[0];
    if have == rows {
        return t.clone();
    }
    let mut shape = t.shape.clone();
    shape[0] = rows;
    let per_row: usize = t.shape[1..].iter().product();
    let extra = (rows - have) * per_row;
    let mut data = t.data.to_vec();
    match t.dtype.size() {
        Some(size) => data.resize(data.len() + extra * size, 0),
        None => data.extend(std::iter::repeat_n(0u8, extra * 4)), // empty BYTES elements
    }
    Tensor { dtype: t.dtype, shape, data: data.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ragged_items_are_padded_to_the_longest() {
        let a = Tensor::from_f32(vec![2, 2], &[1.0, 2.0, 3.0, 4.0]);
        let b = Tensor::from_f32(vec![0, 2], &[]);
        let s = stack_items(&[&a, &b]).unwrap();
        assert_eq!(s.shape, vec![2, 2, 2]);
        assert_eq!(s.to_f32().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]);
        let l = Tensor::from_bytes_elements(vec![1], &["x"]);
        let e = Tensor::from_bytes_elements::<&str>(vec![0], &[]);
        let s = stack_items(&[&e, &l]).unwrap();
        assert_eq!(s.shape, vec![2, 1]);
        assert_eq!(s.bytes_elements().unwrap(), vec![&b""[..], &b"x"[..]]);
        let c = Tensor::from_f32(vec![1, 3], &[0.0; 3]);
        assert!(stack_items(&[&a, &c]).unwrap_err().contains("beyond the first dimension"));
        // A scalar beside rows (an output default of another rank) is an error, not a panic.
        let scalar = Tensor::from_f32(vec![], &[0.0]);
        assert!(stack_items(&[&a, &scalar]).is_err());
        assert!(stack_items(&[&scalar, &a]).is_err());
    }
}
