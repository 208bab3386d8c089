//! Compiling a pipeline file into a [`Plan`]: every node built, every reference resolved,
//! the graph checked for cycles and type-checked edge by edge. All errors are collected,
//! not just the first, each with file:line and the node it is about.

use super::schema::{Layout, Locator, NodeYaml, PipelineYaml};
use crate::onnx::signature::TensorInfo;
use crate::repository::ModelSpec;
use crate::sched::pool::PoolConfig;
use petgraph::graph::{DiGraph, NodeIndex};
use sluice_ops::{BuildContext, DataType, Op, OpRegistry, ValueType};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a pipeline may refer to: the repository's models and the server's CPU pools.
pub trait Catalog {
    /// The signature of the model's `version` (`None`: its latest served version), or why
    /// it cannot be used; `None` if there is no such model.
    fn model(&self, name: &str, version: Option<u64>) -> Option<Result<ModelSig, String>>;
    fn pools(&self) -> Vec<String>;
    /// The ops nodes may name.
    fn ops(&self) -> &OpRegistry;
}

#[derive(Debug, Clone)]
pub struct ModelSig {
    /// The version the signature is of.
    pub version: u64,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    pub max_batch_size: usize,
    /// The ONNX file's metadata (key, value), for ops configured from a model.
    pub metadata: Vec<(String, String)>,
}

impl From<&ModelSpec> for ModelSig {
    /// What a pipeline node sees of the model.
    fn from(spec: &ModelSpec) -> ModelSig {
        ModelSig {
            version: spec.version,
            inputs: spec.inputs.clone(),
            outputs: spec.outputs.clone(),
            max_batch_size: spec.config.max_batch_size,
            metadata: spec.metadata.clone(),
        }
    }
}

/// One problem in a pipeline file.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub line: Option<usize>,
    pub node: Option<String>,
    pub message: String,
}

/// A diagnostic rendered with its file: `pipelines/p.yaml:12: node 'crop': ...`.
pub struct Located<'a>(pub &'a Path, pub &'a Diagnostic);

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Located(file, d) = self;
        write!(f, "{}", file.display())?;
        if let Some(l) = d.line {
            write!(f, ":{l}")?;
        }
        write!(f, ": ")?;
        if let Some(n) = &d.node {
            write!(f, "node '{n}': ")?;
        }
        write!(f, "{}", d.message)
    }
}

/// All the errors of one file, one per line.
#[derive(Debug, Clone)]
pub struct CompileError {
    pub file: PathBuf,
    pub errors: Vec<Diagnostic>,
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.errors.iter().map(|d| Located(&self.file, d).to_string()).collect();
        write!(f, "{}", lines.join("\n"))
    }
}

impl std::error::Error for CompileError {}

/// Where a node input's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Src {
    Input(usize),
    /// Output `output` of the node at position `node` of [`Plan::nodes`].
    Node {
        node: usize,
        output: usize,
    },
}

#[derive(Clone)]
pub enum NodeKind {
    Op(Arc<dyn Op>),
    /// `pinned`: the version the node names (`None`: the latest, `sig.version` when compiled).
    Model {
        model: String,
        pinned: Option<u64>,
        sig: ModelSig,
    },
}

#[derive(Clone)]
pub struct PlanNode {
    pub name: String,
    /// What it runs as written: the op's name, or the model's.
    pub what: String,
    pub kind: NodeKind,
    /// In the order of the op's (or model's) inputs.
    pub inputs: Vec<Src>,
    pub input_names: Vec<String>,
    pub output_names: Vec<String>,
    /// Types of the outputs (lists when mapped).
    pub output_types: Vec<ValueType>,
    /// Runs once per element of its list input(s): a fan-out.
    pub mapped: bool,
    /// Which inputs are the lists it is mapped over (the others are passed whole).
    pub mapped_inputs: Vec<bool>,
    pub pool: String,
    pub concurrency: usize,
    /// A model node's overrides of its model's batching.
    pub batching: crate::sched::ItemLimits,
}

#[derive(Debug, Clone)]
pub struct PlanInput {
    pub name: String,
    pub dtype: DataType,
    /// Dims of one item.
    pub dims: Vec<i64>,
    /// A BYTES [1] input: each item is one encoded blob.
    pub blob: bool,
}

#[derive(Debug, Clone)]
pub struct PlanOutput {
    pub name: String,
    pub src: Src,
    pub dtype: DataType,
    /// Dims of one item, -1 where they vary.
    pub dims: Vec<i64>,
}

/// A compiled pipeline: nodes in topological order, each input wired to its source.
#[derive(Clone)]
pub struct Plan {
    pub name: String,
    pub max_batch_size: usize,
    pub layout: Layout,
    /// The pool a fused pipeline's items run on.
    pub pool: String,
    pub inputs: Vec<PlanInput>,
    pub outputs: Vec<PlanOutput>,
    pub nodes: Vec<PlanNode>,
    /// For each node, the nodes that consume its outputs.
    pub dependents: Vec<Vec<usize>>,
    /// For each node, how many distinct nodes it waits for.
    pub dep_counts: Vec<usize>,
    /// Nodes dropped because no output depends on them, and other non-fatal findings.
    pub warnings: Vec<Diagnostic>,
}

struct Draft {
    yaml: NodeYaml,
    line: Option<usize>,
    /// Whether the op or model was found and built.
    ok: bool,
    op: Option<Box<dyn Op>>,
    model: Option<(String, ModelSig)>,
    in_ports: Vec<(String, ValueType)>,
    out_ports: Vec<(String, ValueType)>,
}

/// Why a reference does not resolve.
enum Unresolved {
    /// It names a node whose own error is already reported: nothing more to say.
    Reported,
    Error(String),
}

/// The references of every node resolved, as a graph for the cycle check.
struct Wiring {
    graph: DiGraph<usize, ()>,
    idx: Vec<NodeIndex>,
    /// Per draft, per in-port: where its value comes from.
    srcs: Vec<Vec<Option<RawSrc>>>,
}

/// A pipeline output before type checking: name, source, line.
struct RawOutput {
    name: String,
    src: RawSrc,
    line: Option<usize>,
}

/// The most nodes a pipeline may have: compile and run time grow with it, and a file
/// must not be able to stall the reload thread.
pub const MAX_NODES: usize = 1000;

/// Compiles the pipeline `name` from `text` (the contents of `file`), in phases; each
/// phase adds what it finds to the errors, and compiling stops where later phases would
/// only repeat them.
pub fn compile(name: &str, file: &Path, text: &str, catalog: &dyn Catalog) -> Result<Plan, CompileError> {
    let fail = |errors| CompileError { file: file.to_path_buf(), errors };
    if let Err((line, message)) = crate::repository::check_nesting(text) {
        return Err(fail(vec![Diagnostic { line: Some(line), node: None, message }]));
    }
    let yaml: PipelineYaml = serde_yaml_ng::from_str(text).map_err(|e| {
        let line = e.location().map(|l| l.line());
        fail(vec![Diagnostic { line, node: None, message: e.to_string() }])
    })?;
    if yaml.nodes.len() > MAX_NODES {
        let message = format!("{} nodes; a pipeline may have at most {MAX_NODES}", yaml.nodes.len());
        return Err(fail(vec![Diagnostic { line: None, node: None, message }]));
    }
    let mut c = Compiler {
        loc: Locator::new(text),
        base_dir: file.parent().unwrap_or(Path::new(".")),
        catalog,
        errors: Diags::default(),
    };
    let inputs = c.inputs(&yaml);
    let pool = c.pipeline_pool(&yaml);
    let mut drafts = c.nodes(&yaml, &inputs);
    let wiring = c.wire(&drafts, &inputs);
    let cyclic = c.check_cycles(&drafts, &wiring);
    let outputs = c.outputs(&yaml, &drafts, &inputs);
    if !c.errors.0.is_empty() || cyclic {
        return Err(fail(c.errors.0));
    }
    let (needed, warnings) = prune(&drafts, &wiring, &outputs);
    let order = topological(&wiring, &needed);
    let nodes = c.typecheck(&mut drafts, &wiring, &order, &inputs);
    if !c.errors.0.is_empty() {
        return Err(fail(c.errors.0));
    }
    let outputs = c.type_outputs(outputs, &order, &nodes, &inputs);
    if !c.errors.0.is_empty() {
        return Err(fail(c.errors.0));
    }
    let (dependents, dep_counts) = dependents(&nodes);
    Ok(Plan {
        name: name.to_string(),
        max_batch_size: yaml.max_batch_size,
        layout: yaml.layout,
        pool,
        inputs,
        outputs,
        nodes,
        dependents,
        dep_counts,
        warnings,
    })
}

/// What every phase reads, and the errors they collect.
struct Compiler<'a> {
    loc: Locator<'a>,
    /// The pipeline file's folder: relative paths in op params resolve here.
    base_dir: &'a Path,
    catalog: &'a dyn Catalog,
    errors: Diags,
}

impl Compiler<'_> {
    /// The pipeline's inputs: names unique, dtypes known.
    fn inputs(&mut self, yaml: &PipelineYaml) -> Vec<PlanInput> {
        let mut inputs: Vec<PlanInput> = Vec::new();
        for i in &yaml.inputs {
            let line = self.loc.entry("inputs", &i.name);
            match DataType::parse(&i.dtype) {
                _ if inputs.iter().any(|x| x.name == i.name) => {
                    self.errors.add(line, None, format!("input '{}' is declared twice", i.name))
                }
                Some(dtype) => {
                    let blob = dtype == DataType::Bytes && i.dims == [1];
                    inputs.push(PlanInput { name: i.name.clone(), dtype, dims: i.dims.clone(), blob })
                }
                None => self.errors.add(line, None, format!("input '{}': unknown dtype '{}'", i.name, i.dtype)),
            }
        }
        if yaml.inputs.is_empty() {
            self.errors.add(self.loc.top_key("inputs"), None, "a pipeline needs at least one input".into());
        }
        inputs
    }

    /// The pool a fused pipeline runs on (checked for split ones too: it must exist).
    fn pipeline_pool(&mut self, yaml: &PipelineYaml) -> String {
        let pools = self.catalog.pools();
        let pool = yaml.pool.clone().unwrap_or_else(|| PoolConfig::DEFAULT_NAME.to_string());
        if !pools.contains(&pool) {
            self.errors.add(
                self.loc.top_key("pool"),
                None,
                format!("unknown pool '{pool}'; the server's pools: {}", pools.join(", ")),
            );
        }
        if yaml.pool.is_some() && yaml.layout != Layout::Fused {
            self.errors.add(
                self.loc.top_key("pool"),
                None,
                "`pool` is for `layout: fused`; in a split pipeline each node names its pool".into(),
            );
        }
        pool
    }

    /// Every node built: its op from its params, or its model's signature looked up.
    fn nodes(&mut self, yaml: &PipelineYaml, inputs: &[PlanInput]) -> Vec<Draft> {
        let mut drafts: Vec<Draft> = Vec::new();
        for n in &yaml.nodes {
            let line = self.loc.entry("nodes", &n.name);
            let node = Some(n.name.as_str());
            if drafts.iter().any(|d| d.yaml.name == n.name) || inputs.iter().any(|i| i.name == n.name) {
                self.errors.add(
                    line,
                    node,
                    "the name is used twice (node names and input names must all differ)".into(),
                );
                continue;
            }
            if n.name.contains('.') || n.name.is_empty() {
                self.errors.add(line, node, "a node name must be non-empty and contain no '.'".into());
                continue;
            }
            let mut d =
                Draft { yaml: n.clone(), line, ok: false, op: None, model: None, in_ports: vec![], out_ports: vec![] };
            match (&n.op, &n.model) {
                (Some(op_name), None) => self.op_node(&mut d, op_name),
                (None, Some(model)) => self.model_node(&mut d, model),
                _ => self.errors.add(line, node, "give exactly one of `op` or `model`".into()),
            }
            drafts.push(d);
        }
        drafts
    }

    fn op_node(&mut self, d: &mut Draft, op_name: &str) {
        let (n, line) = (&d.yaml, d.line);
        let node = Some(n.name.as_str());
        let catalog = self.catalog;
        let metadata = |model: &str, key: &str| {
            let sig = catalog.model(model, None)?.ok()?;
            sig.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
        };
        let params = n.params.as_ref().map_or(Ok(serde_json::Value::Null), serde_json::to_value);
        let built = params.map_err(|e| format!("params: {e}")).and_then(|params| {
            let cx = BuildContext::new(params, self.base_dir).with_metadata(&metadata);
            catalog.ops().build(op_name, &cx)
        });
        match built {
            Ok(o) => {
                d.in_ports = o.inputs().into_iter().map(|p| (p.name.to_string(), p.ty)).collect();
                d.out_ports = o.outputs().into_iter().map(|p| (p.name.to_string(), p.ty)).collect();
                d.op = Some(o);
                d.ok = true;
            }
            Err(e) => self.errors.add(
                self.loc.find_after(line.unwrap_or(0), "op:").or(line),
                node,
                format!("op '{op_name}': {e}"),
            ),
        }
        if n.max_queue_delay_us.is_some() || n.max_batch_size.is_some() || n.version.is_some() {
            self.errors.add(
                line,
                node,
                "`max_queue_delay_us`, `max_batch_size` and `version` are for model nodes".into(),
            );
        }
        if let Some(p) = &n.pool {
            let pools = catalog.pools();
            if !pools.contains(p) {
                let l = self.loc.find_after(line.unwrap_or(0), "pool:").or(line);
                self.errors.add(l, node, format!("unknown pool '{p}'; the server's pools: {}", pools.join(", ")));
            }
        }
    }

    fn model_node(&mut self, d: &mut Draft, model: &str) {
        let (n, line) = (&d.yaml, d.line);
        let node = Some(n.name.as_str());
        let l = self.loc.find_after(line.unwrap_or(0), "model:").or(line);
        match self.catalog.model(model, n.version) {
            None => self.errors.add(l, node, format!("unknown model '{model}'")),
            Some(Err(reason)) => self.errors.add(l, node, format!("model '{model}' cannot be used: {reason}")),
            Some(Ok(sig)) if n.max_batch_size.is_some_and(|b| b == 0 || b > sig.max_batch_size) => {
                let why = match sig.max_batch_size {
                    0 => format!("model '{model}' does not batch (its max_batch_size is 0)"),
                    n => format!("model '{model}' takes batches of 1..={n}"),
                };
                self.errors.add(line, node, format!("max_batch_size {}: {why}", n.max_batch_size.unwrap_or(0)));
            }
            Some(Ok(sig)) => {
                let strip = |t: &TensorInfo| {
                    let dims = if sig.max_batch_size > 0 { t.dims[1..].to_vec() } else { t.dims.clone() };
                    (t.name.clone(), ValueType::tensor(t.dtype, dims))
                };
                d.in_ports = sig.inputs.iter().map(strip).collect();
                d.out_ports = sig.outputs.iter().map(strip).collect();
                d.model = Some((model.to_string(), sig));
                d.ok = true;
            }
        }
        if d.yaml.pool.is_some() {
            self.errors.add(line, node, "a model node runs on its model's instances: remove `pool`".into());
        }
        if d.yaml.params.is_some() {
            self.errors.add(line, node, "a model node takes no params (model settings live in its model.yaml)".into());
        }
    }

    /// Every node input's reference resolved; the graph of node-to-node edges.
    fn wire(&mut self, drafts: &[Draft], inputs: &[PlanInput]) -> Wiring {
        let mut graph: DiGraph<usize, ()> = DiGraph::new();
        let idx: Vec<NodeIndex> = (0..drafts.len()).map(|i| graph.add_node(i)).collect();
        let mut srcs = Vec::with_capacity(drafts.len());
        for (di, d) in drafts.iter().enumerate() {
            let node = Some(d.yaml.name.as_str());
            let mut w = vec![None; d.in_ports.len()];
            if d.ok {
                for (port, r) in &d.yaml.inputs {
                    let l = self.loc.find_after(d.line.unwrap_or(0), &format!("{port}:")).or(d.line);
                    let Some(pi) = d.in_ports.iter().position(|(p, _)| p == port) else {
                        let names: Vec<&str> = d.in_ports.iter().map(|(p, _)| p.as_str()).collect();
                        self.errors.add(l, node, format!("has no input '{port}'; its inputs: {}", names.join(", ")));
                        continue;
                    };
                    match resolve(r, inputs, drafts) {
                        Ok(src) => {
                            if let RawSrc::Node(from, _) = src {
                                graph.add_edge(idx[from], idx[di], ());
                            }
                            w[pi] = Some(src);
                        }
                        Err(Unresolved::Reported) => {}
                        Err(Unresolved::Error(e)) => self.errors.add(l, node, e),
                    }
                }
                for ((p, _), s) in d.in_ports.iter().zip(&w) {
                    if s.is_none() && !d.yaml.inputs.contains_key(p) {
                        self.errors.add(d.line, node, format!("input '{p}' is not wired"));
                    }
                }
            }
            srcs.push(w);
        }
        Wiring { graph, idx, srcs }
    }

    /// Reports each strongly connected component with more than one node (or a
    /// self-loop) as a path; whether there was any.
    fn check_cycles(&mut self, drafts: &[Draft], wiring: &Wiring) -> bool {
        let graph = &wiring.graph;
        let mut cyclic = false;
        for scc in petgraph::algo::tarjan_scc(graph) {
            let self_loop = scc.len() == 1 && graph.contains_edge(scc[0], scc[0]);
            if scc.len() > 1 || self_loop {
                let members: BTreeSet<usize> = scc.iter().map(|n| graph[*n]).collect();
                let first = *members.iter().next().expect("non-empty");
                let path = cycle_path(graph, &wiring.idx, first, &members);
                let names: Vec<&str> = path.iter().map(|&i| drafts[i].yaml.name.as_str()).collect();
                let (line, node) = (drafts[first].line, Some(drafts[first].yaml.name.as_str()));
                self.errors.add(line, node, format!("cycle: {}", names.join(" -> ")));
                cyclic = true;
            }
        }
        cyclic
    }

    /// The pipeline's outputs: names unique, references resolved.
    fn outputs(&mut self, yaml: &PipelineYaml, drafts: &[Draft], inputs: &[PlanInput]) -> Vec<RawOutput> {
        let mut outputs: Vec<RawOutput> = Vec::new();
        for o in &yaml.outputs {
            let line = self.loc.entry("outputs", &o.name);
            if outputs.iter().any(|r| r.name == o.name) {
                self.errors.add(line, None, format!("output '{}' is declared twice", o.name));
                continue;
            }
            match resolve(&o.from, inputs, drafts) {
                Ok(src) => outputs.push(RawOutput { name: o.name.clone(), src, line }),
                Err(Unresolved::Reported) => {}
                Err(Unresolved::Error(e)) => self.errors.add(line, None, format!("output '{}': {e}", o.name)),
            }
        }
        if yaml.outputs.is_empty() {
            self.errors.add(self.loc.top_key("outputs"), None, "a pipeline needs at least one output".into());
        }
        outputs
    }

    /// Type-checks the needed nodes along `order` with the types each op infers; builds
    /// the plan's nodes in that order.
    fn typecheck(
        &mut self,
        drafts: &mut [Draft],
        wiring: &Wiring,
        order: &[usize],
        inputs: &[PlanInput],
    ) -> Vec<PlanNode> {
        let pos: HashMap<usize, usize> = order.iter().enumerate().map(|(p, &i)| (i, p)).collect();
        let mut nodes: Vec<PlanNode> = Vec::new();
        // Output types by position in `order`; a node that fails its check gives `Any`, so
        // the nodes after it are still checked without cascading errors.
        let mut types: Vec<Vec<ValueType>> = Vec::new();
        let names: Vec<(String, Vec<String>)> = order
            .iter()
            .map(|&di| (drafts[di].yaml.name.clone(), drafts[di].out_ports.iter().map(|p| p.0.clone()).collect()))
            .collect();
        for &di in order {
            let op = drafts[di].op.take();
            let d = &drafts[di];
            let node = Some(d.yaml.name.as_str());
            let srcs: Vec<Src> = wiring.srcs[di].iter().map(|s| to_src(s.expect("wired"), &pos)).collect();
            let given: Vec<ValueType> = srcs
                .iter()
                .map(|s| match *s {
                    Src::Input(i) => input_type(&inputs[i]),
                    Src::Node { node, output } => types[node][output].clone(),
                })
                .collect();
            types.push(vec![ValueType::Any; d.out_ports.len()]);
            // A list where the port takes one element: the node runs once per element.
            let mut mapped = false;
            let mut mapped_inputs = Vec::new();
            let mut element_types = Vec::new();
            for (((port, want), got), src) in d.in_ports.iter().zip(&given).zip(&srcs) {
                let from = src_name(*src, inputs, &names);
                mapped_inputs.push(false);
                if want.accepts(got) {
                    element_types.push(got.clone());
                } else if let (ValueType::List(el), false) = (got, matches!(want, ValueType::List(_))) {
                    if matches!(el.as_ref(), ValueType::List(_)) {
                        self.errors.add(
                            d.line,
                            node,
                            format!("input '{port}': '{from}' is a list of lists, which cannot be mapped"),
                        );
                    } else if want.accepts(el) {
                        mapped = true;
                        *mapped_inputs.last_mut().expect("pushed above") = true;
                        element_types.push(el.as_ref().clone());
                    } else {
                        self.errors.add(
                            d.line,
                            node,
                            format!("input '{port}' expects {want}, but '{from}' gives {got}"),
                        );
                    }
                } else {
                    self.errors.add(d.line, node, format!("input '{port}' expects {want}, but '{from}' gives {got}"));
                }
            }
            if element_types.len() != d.in_ports.len() {
                continue;
            }
            let listed = |t: ValueType| if mapped { ValueType::List(Box::new(t)) } else { t };
            let (kind, out) = match op {
                // infer may record what it learns about its inputs (gather's element shape).
                Some(mut o) => match o.infer(&element_types) {
                    Ok(out) => (NodeKind::Op(Arc::from(o)), out.into_iter().map(listed).collect::<Vec<_>>()),
                    Err(e) => {
                        self.errors.add(d.line, node, e);
                        continue;
                    }
                },
                None => {
                    let (model, sig) = d.model.clone().expect("a built node is an op or a model");
                    let out = d.out_ports.iter().map(|(_, t)| listed(t.clone())).collect();
                    (NodeKind::Model { model, pinned: d.yaml.version, sig }, out)
                }
            };
            *types.last_mut().expect("pushed above") = out.clone();
            nodes.push(plan_node(d, kind, srcs, out, mapped_inputs));
        }
        nodes
    }

    /// The outputs' types: each must be a tensor of a known dtype.
    fn type_outputs(
        &mut self,
        outputs: Vec<RawOutput>,
        order: &[usize],
        nodes: &[PlanNode],
        inputs: &[PlanInput],
    ) -> Vec<PlanOutput> {
        let pos: HashMap<usize, usize> = order.iter().enumerate().map(|(p, &i)| (i, p)).collect();
        let mut typed = Vec::new();
        for RawOutput { name, src, line } in outputs {
            let src = to_src(src, &pos);
            let ty = match src {
                Src::Input(i) => input_type(&inputs[i]),
                Src::Node { node, output } => nodes[node].output_types[output].clone(),
            };
            match ty {
                ValueType::Tensor { dtype: Some(dtype), dims } => {
                    typed.push(PlanOutput { name, src, dtype, dims: dims.unwrap_or_default() })
                }
                ValueType::List(_) => self.errors.add(
                    line,
                    None,
                    format!("output '{name}' is a {ty}; collect it into one tensor with a `gather` node"),
                ),
                other => self.errors.add(
                    line,
                    None,
                    format!("output '{name}' must be a tensor of a known dtype, but it is {other}"),
                ),
            }
        }
        typed
    }
}

/// Resolves a reference: a pipeline input's name, or `node.output`.
fn resolve(r: &str, inputs: &[PlanInput], drafts: &[Draft]) -> Result<RawSrc, Unresolved> {
    let err = |m: String| Unresolved::Error(m);
    match r.split_once('.') {
        None => inputs.iter().position(|i| i.name == r).map(RawSrc::Input).ok_or_else(|| {
            err(format!("unknown reference '{r}': no pipeline input has that name (use node.output for node outputs)"))
        }),
        Some((n, o)) => {
            let di = drafts
                .iter()
                .position(|d| d.yaml.name == n)
                .ok_or_else(|| err(format!("unknown reference '{r}': no node '{n}'")))?;
            let d = &drafts[di];
            if !d.ok {
                return Err(Unresolved::Reported);
            }
            d.out_ports.iter().position(|(p, _)| p == o).map(|oi| RawSrc::Node(di, oi)).ok_or_else(|| {
                let outs: Vec<&str> = d.out_ports.iter().map(|(p, _)| p.as_str()).collect();
                err(format!("unknown reference '{r}': node '{n}' has outputs {}", outs.join(", ")))
            })
        }
    }
}

/// Which nodes some output depends on; a warning for each of the others.
fn prune(drafts: &[Draft], wiring: &Wiring, outputs: &[RawOutput]) -> (Vec<bool>, Vec<Diagnostic>) {
    let node_of = |s: &RawSrc| if let RawSrc::Node(n, _) = s { Some(*n) } else { None };
    let mut needed = vec![false; drafts.len()];
    let mut stack: Vec<usize> = outputs.iter().filter_map(|o| node_of(&o.src)).collect();
    while let Some(n) = stack.pop() {
        if !std::mem::replace(&mut needed[n], true) {
            stack.extend(wiring.srcs[n].iter().flatten().filter_map(node_of));
        }
    }
    let mut warnings = Vec::new();
    for (i, d) in drafts.iter().enumerate() {
        if !needed[i] {
            let consumed = wiring.graph.neighbors(wiring.idx[i]).next().is_some();
            let why = if consumed { "no pipeline output depends on it" } else { "its outputs feed nothing" };
            warnings.push(Diagnostic {
                line: d.line,
                node: Some(d.yaml.name.clone()),
                message: format!("unused: {why}; it will not run"),
            });
        }
    }
    (needed, warnings)
}

/// The needed nodes (draft indices) in topological order.
fn topological(wiring: &Wiring, needed: &[bool]) -> Vec<usize> {
    petgraph::algo::toposort(&wiring.graph, None)
        .expect("cycles were reported before")
        .into_iter()
        .map(|n| wiring.graph[n])
        .filter(|&i| needed[i])
        .collect()
}

/// For each node, the nodes that consume its outputs and how many distinct nodes it
/// waits for.
fn dependents(nodes: &[PlanNode]) -> (Vec<Vec<usize>>, Vec<usize>) {
    let mut dependents = vec![Vec::new(); nodes.len()];
    let mut dep_counts = vec![0; nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        for s in &n.inputs {
            if let Src::Node { node, .. } = s {
                if !dependents[*node].contains(&i) {
                    dependents[*node].push(i);
                    dep_counts[i] += 1;
                }
            }
        }
    }
    (dependents, dep_counts)
}

fn to_src(s: RawSrc, pos: &HashMap<usize, usize>) -> Src {
    match s {
        RawSrc::Input(i) => Src::Input(i),
        RawSrc::Node(n, o) => Src::Node { node: pos[&n], output: o },
    }
}

fn input_type(i: &PlanInput) -> ValueType {
    if i.blob {
        ValueType::Bytes
    } else {
        ValueType::tensor(i.dtype, i.dims.clone())
    }
}

#[derive(Default)]
struct Diags(Vec<Diagnostic>);

impl Diags {
    fn add(&mut self, line: Option<usize>, node: Option<&str>, message: String) {
        self.0.push(Diagnostic { line, node: node.map(str::to_string), message });
    }
}

#[derive(Debug, Clone, Copy)]
enum RawSrc {
    Input(usize),
    Node(usize, usize),
}

fn plan_node(
    d: &Draft,
    kind: NodeKind,
    inputs: Vec<Src>,
    output_types: Vec<ValueType>,
    mapped_inputs: Vec<bool>,
) -> PlanNode {
    PlanNode {
        name: d.yaml.name.clone(),
        what: d.yaml.op.clone().or_else(|| d.yaml.model.clone()).unwrap_or_default(),
        kind,
        inputs,
        input_names: d.in_ports.iter().map(|(p, _)| p.clone()).collect(),
        output_names: d.out_ports.iter().map(|(p, _)| p.clone()).collect(),
        output_types,
        mapped: mapped_inputs.contains(&true),
        mapped_inputs,
        pool: d.yaml.pool.clone().unwrap_or_else(|| PoolConfig::DEFAULT_NAME.to_string()),
        concurrency: d.yaml.concurrency,
        batching: crate::sched::ItemLimits {
            max_queue_delay: d.yaml.max_queue_delay_us.map(std::time::Duration::from_micros),
            max_batch_size: d.yaml.max_batch_size,
        },
    }
}

fn src_name(s: Src, inputs: &[PlanInput], names: &[(String, Vec<String>)]) -> String {
    match s {
        Src::Input(i) => inputs[i].name.clone(),
        Src::Node { node, output } => format!("{}.{}", names[node].0, names[node].1[output]),
    }
}

/// A cycle through `start` staying inside `members`, as draft indices, closed (first == last).
fn cycle_path(g: &DiGraph<usize, ()>, idx: &[NodeIndex], start: usize, members: &BTreeSet<usize>) -> Vec<usize> {
    // Breadth-first from start's successors back to start, within the component.
    let mut prev: HashMap<usize, usize> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(n) = queue.pop_front() {
        for m in g.neighbors(idx[n]).map(|m| g[m]) {
            if !members.contains(&m) || prev.contains_key(&m) {
                continue;
            }
            prev.insert(m, n);
            if m == start {
                let mut path = vec![start];
                let mut cur = n;
                while cur != start {
                    path.push(cur);
                    cur = prev[&cur];
                }
                path.push(start);
                path.reverse();
                return path;
            }
            queue.push_back(m);
        }
    }
    vec![start, start]
}

impl Plan {
    /// The plan as a Graphviz DOT graph: inputs, nodes (ops as boxes, models as
    /// ellipses, fan-outs doubled) and outputs, edges labelled with the values' types.
    pub fn to_dot(&self) -> String {
        let mut g: DiGraph<String, String> = DiGraph::new();
        let ins: Vec<NodeIndex> = self.inputs.iter().map(|i| g.add_node(format!("input {}", i.name))).collect();
        let ns: Vec<NodeIndex> = self
            .nodes
            .iter()
            .map(|n| {
                let what = match &n.kind {
                    NodeKind::Op(_) => format!("op on pool {}", n.pool),
                    NodeKind::Model { model, sig, .. } => format!("model {model} v{}", sig.version),
                };
                let map = if n.mapped { " (per element)" } else { "" };
                g.add_node(format!("{}\n{what}{map}", n.name))
            })
            .collect();
        let ty_of = |s: Src| match s {
            Src::Input(i) => {
                let i = &self.inputs[i];
                if i.blob {
                    "bytes".to_string()
                } else {
                    ValueType::tensor(i.dtype, i.dims.clone()).to_string()
                }
            }
            Src::Node { node, output } => self.nodes[node].output_types[output].to_string(),
        };
        let at = |s: Src| match s {
            Src::Input(i) => ins[i],
            Src::Node { node, .. } => ns[node],
        };
        for (n, node) in self.nodes.iter().enumerate() {
            for (s, port) in node.inputs.iter().zip(&node.input_names) {
                let label = match *s {
                    Src::Input(_) => format!("{port}: {}", ty_of(*s)),
                    Src::Node { node: m, output } => {
                        format!("{}->{port}: {}", self.nodes[m].output_names[output], ty_of(*s))
                    }
                };
                g.add_edge(at(*s), ns[n], label);
            }
        }
        for o in &self.outputs {
            let out = g.add_node(format!("output {}", o.name));
            g.add_edge(at(o.src), out, ty_of(o.src));
        }
        format!("{}", petgraph::dot::Dot::new(&g))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A classifier taking FP32 [N,3,8,8] and a model that is broken on disk.
    struct Fake(OpRegistry);
    impl Catalog for Fake {
        fn ops(&self) -> &OpRegistry {
            &self.0
        }
        fn model(&self, name: &str, _version: Option<u64>) -> Option<Result<ModelSig, String>> {
            let t = |name: &str, dtype, dims: &[i64]| TensorInfo { name: name.into(), dtype, dims: dims.to_vec() };
            match name {
                "cls" => Some(Ok(ModelSig {
                    version: 1,
                    inputs: vec![t("x", DataType::F32, &[-1, 3, 8, 8])],
                    outputs: vec![t("logits", DataType::F32, &[-1, 10])],
                    max_batch_size: 8,
                    metadata: vec![],
                })),
                "broken" => Some(Err("model.onnx: not a valid ONNX file".into())),
                _ => None,
            }
        }
        fn pools(&self) -> Vec<String> {
            vec!["default".into(), "pre".into()]
        }
    }

    const HEAD: &str = "inputs:\n  - {name: image, dtype: BYTES, dims: [1]}\n";

    fn compile_str(text: &str) -> Result<Plan, String> {
        compile("p", Path::new("pipelines/p.yaml"), text, &Fake(OpRegistry::builtin())).map_err(|e| e.to_string())
    }

    fn errors_of(text: &str) -> String {
        compile_str(text).err().expect("the pipeline should not compile")
    }

    /// decode -> resize 8x8 -> normalize -> cls -> top3, with `extra` appended to nodes.
    fn good(extra: &str) -> String {
        format!(
            "{HEAD}outputs:\n  - {{name: top, from: top.classes}}\nnodes:\n  - name: decode\n    op: decode_image\n    inputs: {{bytes: image}}\n  - name: resize\n    op: resize\n    inputs: {{image: decode.image}}\n    params: {{mode: stretch, width: 8, height: 8}}\n  - name: norm\n    op: normalize\n    inputs: {{image: resize.image}}\n  - name: cls\n    model: cls\n    inputs: {{x: norm.tensor}}\n  - name: top\n    op: topk\n    inputs: {{scores: cls.logits}}\n    params: {{k: 3}}\n{extra}"
        )
    }

    #[test]
    fn a_good_pipeline_compiles_in_topological_order() {
        let plan = compile_str(&good("")).unwrap();
        let names: Vec<&str> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["decode", "resize", "norm", "cls", "top"]);
        assert_eq!(plan.outputs[0].dtype, DataType::I64);
        assert_eq!(plan.outputs[0].dims, vec![3]);
        assert!(plan.warnings.is_empty());
        assert!(plan.to_dot().contains("tensor FP32 [3,8,8]"));
    }

    /// decode -> rotations -> to_tensor: a chain of `n` nodes.
    fn chain(n: usize) -> String {
        let mut text = format!("{HEAD}outputs:\n  - {{name: o, from: n{}.tensor}}\nnodes:\n", n - 1);
        text.push_str("  - {name: n0, op: decode_image, inputs: {bytes: image}}\n");
        for i in 1..n - 1 {
            text.push_str(&format!("  - {{name: n{i}, op: rotate180, inputs: {{image: n{}.image}}}}\n", i - 1));
        }
        text.push_str(&format!("  - {{name: n{}, op: to_tensor, inputs: {{image: n{}.image}}}}\n", n - 1, n - 2));
        text
    }

    #[test]
    fn long_chains_compile_on_a_small_stack_and_longer_ones_are_refused() {
        let longest = chain(MAX_NODES);
        let plan = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || compile_str(&longest).map(|p| p.nodes.len()))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(plan, Ok(MAX_NODES));
        let started = std::time::Instant::now();
        let e = errors_of(&chain(50_000));
        assert!(e.contains("50000 nodes; a pipeline may have at most 1000"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        for (bomb, line) in [
            (format!("{HEAD}outputs: {}{}\n", "[".repeat(100_000), "]".repeat(100_000)), 3),
            (format!("{HEAD}outputs:\n  {}x\n", "- ".repeat(100_000)), 4),
            (format!("{HEAD}outputs: {{a: {}1{}}}\n", "{b: ".repeat(65), "}".repeat(65)), 3),
            (format!("{HEAD}outputs:\n  {}x\n", "? ".repeat(100)), 4),
        ] {
            let started = std::time::Instant::now();
            let e = errors_of(&bomb);
            let at = format!("pipelines/p.yaml:{line}: ");
            assert!(e.starts_with(&at) && e.contains("at most 64"), "{}", &e[..e.len().min(200)]);
            assert!(started.elapsed() < std::time::Duration::from_secs(1));
        }
        // Comments do not count, nor indentation: JSON-style files nest by brackets only.
        let fine = good("  - {name: extra, op: rotate180, inputs: {image: decode.image}} # [[[[[[\n");
        let commented = compile_str(&format!("{fine}description: it's a # [[[[{}\n", "[".repeat(200)));
        assert!(commented.is_ok(), "{:?}", commented.err());
        let indented: String = (0..40).map(|d| format!("{}[\n", " ".repeat(4 * d))).collect();
        let closed: String = (0..40).rev().map(|d| format!("{}]\n", " ".repeat(4 * d))).collect();
        assert!(crate::repository::check_nesting(&format!("a:\n{indented}{closed}")).is_ok());
        // Stray brackets and apostrophes in plain scalars do not switch the checks off.
        let e = errors_of(&format!("{HEAD}description: b[c it's\noutputs:\n  {}x\n", "- ".repeat(100)));
        assert!(e.contains("at most 64"), "{e}");
        let e = errors_of(&format!("{HEAD}k': {}\n", "[".repeat(100)));
        assert!(e.contains("at most 64"), "{e}");
    }

    #[test]
    fn yaml_syntax_and_unknown_keys_have_line_numbers() {
        let e = errors_of(&format!("{HEAD}outputs: []\nnodes:\n  - name: a\n    opp: x\n"));
        assert!(e.starts_with("pipelines/p.yaml:6: nodes[0]: unknown field `opp`"), "{e}");
        assert!(e.contains("unknown field `opp`"), "{e}");
        let e = errors_of("inputs: [\n");
        assert!(e.starts_with("pipelines/p.yaml:"), "{e}");
    }

    #[test]
    fn unknown_op_model_and_reference_are_each_reported() {
        let extra = "  - name: a\n    op: sharpen\n    inputs: {image: decode.image}\n  - name: b\n    model: nope\n    inputs: {x: norm.tensor}\n  - name: c\n    model: broken\n  - name: d\n    op: rotate180\n    inputs: {image: decod.image}\n  - name: e\n    op: rotate180\n    inputs: {image: decode.picture}\n";
        let e = errors_of(&good(extra));
        assert!(
            e.contains("pipelines/p.yaml:24: node 'a': op 'sharpen': unknown op 'sharpen'; known ops: decode_image"),
            "{e}"
        );
        assert!(e.contains("pipelines/p.yaml:27: node 'b': unknown model 'nope'"), "{e}");
        assert!(e.contains("node 'c': model 'broken' cannot be used: model.onnx: not a valid ONNX file"), "{e}");
        assert!(e.contains("node 'd': unknown reference 'decod.image': no node 'decod'"), "{e}");
        assert!(e.contains("node 'e': unknown reference 'decode.picture': node 'decode' has outputs image"), "{e}");
        assert_eq!(e.lines().count(), 5, "{e}");
    }

    #[test]
    fn bad_params_and_unknown_pools_name_the_node() {
        let extra = "  - name: r\n    op: resize\n    inputs: {image: decode.image}\n    params: {mode: stretch, widht: 4}\n    pool: gpu\n";
        let e = errors_of(&good(extra));
        assert!(e.contains("node 'r': op 'resize': bad params: unknown field `widht`"), "{e}");
        assert!(e.contains("node 'r': unknown pool 'gpu'; the server's pools: default, pre"), "{e}");
        let text =
            good("").replace("    inputs: {x: norm.tensor}\n", "    inputs: {x: norm.tensor}\n    max_batch_size: 9\n");
        assert!(errors_of(&text).contains("node 'cls': max_batch_size 9: model 'cls' takes batches of 1..=8"));
        let text = good("").replace("    params: {k: 3}\n", "    params: {k: 3}\n    max_queue_delay_us: 5\n");
        assert!(errors_of(&text)
            .contains("node 'top': `max_queue_delay_us`, `max_batch_size` and `version` are for model nodes"));
    }

    #[test]
    fn a_cycle_is_shown_as_a_path() {
        let text = format!(
            "{HEAD}outputs:\n  - {{name: o, from: c.image}}\nnodes:\n  - name: a\n    op: rotate180\n    inputs: {{image: c.image}}\n  - name: b\n    op: rotate180\n    inputs: {{image: a.image}}\n  - name: c\n    op: rotate180\n    inputs: {{image: b.image}}\n"
        );
        let e = errors_of(&text);
        assert!(e.contains("pipelines/p.yaml:6: node 'a': cycle: a -> b -> c -> a"), "{e}");
    }

    #[test]
    fn dtype_and_rank_mismatches_name_both_ends() {
        // The model takes FP32 [3,8,8] per item; to_tensor gives UINT8 [8,8,3].
        let text = good("").replace("op: normalize", "op: to_tensor");
        let e = errors_of(&text);
        assert!(
            e.contains(
                "node 'cls': input 'x' expects tensor FP32 [3,8,8], but 'norm.tensor' gives tensor UINT8 [8,8,3]"
            ),
            "{e}"
        );
        let text = good("").replace("{mode: stretch, width: 8, height: 8}", "{mode: stretch, width: 8, height: 9}");
        let e = errors_of(&text);
        assert!(e.contains("expects tensor FP32 [3,8,8], but 'norm.tensor' gives tensor FP32 [3,9,8]"), "{e}");
    }

    #[test]
    fn outputs_must_be_produced_tensors() {
        let text = good("").replace("from: top.classes", "from: top.nothing");
        let e = errors_of(&text);
        assert!(
            e.contains("output 'top': unknown reference 'top.nothing': node 'top' has outputs scores, classes, labels"),
            "{e}"
        );
        let text = good("").replace("from: top.classes", "from: decode.image");
        let e = errors_of(&text);
        assert!(e.contains("output 'top' must be a tensor of a known dtype, but it is image"), "{e}");
    }

    #[test]
    fn unused_nodes_are_warned_about_and_pruned() {
        let extra = "  - name: spare\n    op: rotate180\n    inputs: {image: decode.image}\n";
        let plan = compile_str(&good(extra)).unwrap();
        assert!(plan.nodes.iter().all(|n| n.name != "spare"));
        let w = Located(Path::new("p.yaml"), &plan.warnings[0]).to_string();
        assert_eq!(w, "p.yaml:23: node 'spare': unused: its outputs feed nothing; it will not run");
    }

    #[test]
    fn lists_fan_out_and_a_list_output_asks_for_a_gather() {
        let text = format!(
            "{HEAD}outputs:\n  - {{name: o, from: cls.logits}}\nnodes:\n  - name: decode\n    op: decode_image\n    inputs: {{bytes: image}}\n  - name: boxes\n    op: detect_yolo\n    inputs: {{predictions: cls.logits, image: decode.image}}\n    params: {{width: 8, height: 8}}\n  - name: crop\n    op: crop_boxes\n    inputs: {{image: decode.image, boxes: boxes.boxes}}\n    params: {{resize: [8, 8]}}\n  - name: norm\n    op: normalize\n    inputs: {{image: crop.crops}}\n  - name: cls\n    model: cls\n    inputs: {{x: norm.tensor}}\n"
        );
        // cls feeds boxes, boxes feeds crop feeds norm feeds cls: a cycle.
        assert!(errors_of(&text).contains("cycle: boxes -> crop -> norm -> cls -> boxes"));
        let text = text.replace("predictions: cls.logits", "predictions: preds").replacen(
            "outputs:",
            "  - {name: preds, dtype: FP32, dims: [4, 7]}\noutputs:",
            1,
        );
        let e = errors_of(&text);
        assert!(
            e.contains("output 'o' is a list of tensor FP32 [10]; collect it into one tensor with a `gather` node"),
            "{e}"
        );
    }
}
