//! Compiling a pipeline file into a [`Plan`]: every node built, every reference resolved,
//! the graph checked for cycles and type-checked edge by edge. All errors are collected,
//! not just the first, each with file:line and the node it is about.

use super::cond::{self, Expr, Kind, Operand, Scalar};
use super::params::{self, ParamDecl};
use super::schema::{ArmYaml, Layout, Locator, NodeYaml, OnAbsent, PipelineYaml};
use crate::onnx::signature::TensorInfo;
use crate::repository::ModelSpec;
use crate::sched::pool::PoolConfig;
use petgraph::graph::{DiGraph, NodeIndex};
use sluice_ops::op::Builder;
use sluice_ops::{BuildContext, DataType, Op, OpRegistry, Value, ValueType};
use std::cell::RefCell;
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
    /// A request parameter, by its position in [`Plan::params`].
    Param(usize),
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
    /// One of several models per item (`route`) or per request (`split`); every arm has
    /// the same signature (the first arm's is the node's).
    Branches {
        arms: Vec<Arm>,
        choice: Choice,
    },
}

/// A model a branching node can send work to.
#[derive(Clone, Debug)]
pub struct Arm {
    /// `model` or `model:version`, as metrics and views name the branch.
    pub label: String,
    pub model: String,
    pub pinned: Option<u64>,
    pub sig: ModelSig,
}

#[derive(Clone, Debug)]
pub enum Choice {
    /// By a value: per element when the node is mapped (`by` holds one value per
    /// element), else one value for the item.
    Route {
        by: Src,
        /// `by` holds one value per element of the mapped node (else one for the item).
        per_element: bool,
        cases: Vec<(Scalar, usize)>,
        default: Option<usize>,
    },
    /// By weight, once per request; `sticky`: by a hash of the request id.
    Split { weights: Vec<u32>, sticky: bool },
}

/// A node's `when:`.
#[derive(Clone, Debug)]
pub struct When {
    pub text: String,
    pub expr: Expr,
    /// What its `node.output` operands name, with where each comes from.
    pub reads: Vec<(String, Src)>,
}

/// An op whose params name request parameters: built again for the values a request
/// gives (the compiled op has the defaults), and checked to keep its types.
pub struct Rebuild {
    build: Builder,
    raw: serde_json::Value,
    base_dir: PathBuf,
    /// The model metadata the first build read: later builds see the same.
    metadata: SeenMetadata,
    /// The parameters it names, by position in [`Plan::params`].
    pub uses: Vec<usize>,
    /// The pipeline's parameter declarations.
    pub decls: Vec<ParamDecl>,
    element_types: Vec<ValueType>,
    out_types: Vec<ValueType>,
    /// The most recent builds by parameter values: a handful of behaviours, each built once.
    cache: parking_lot::Mutex<Vec<Build>>,
}

/// One build of a [`Rebuild`]: the parameter values it is for, and the op.
type Build = (Vec<String>, Arc<dyn Op>);

/// The model metadata an op's build read: (model, key) -> value.
type SeenMetadata = HashMap<(String, String), Option<String>>;
/// A node's ports: name and type.
type Ports = Vec<(String, ValueType)>;

/// How many builds per node [`Rebuild`] keeps.
const REBUILD_CACHE: usize = 16;

impl Rebuild {
    /// The op for `values` (every parameter's value for this request): the cached
    /// build, or a new one.
    pub fn op_for(&self, values: &[Scalar]) -> Result<Arc<dyn Op>, String> {
        let decls = &self.decls;
        let key: Vec<String> = self.uses.iter().map(|&p| format!("{:?}", values[p])).collect();
        {
            let mut cache = self.cache.lock();
            if let Some(i) = cache.iter().position(|(k, _)| *k == key) {
                let hit = cache.remove(i);
                let op = hit.1.clone();
                cache.push(hit);
                return Ok(op);
            }
        }
        let params = params::substitute(&self.raw, &|name| {
            let i = decls.iter().position(|d| d.name == name).expect("checked at compile time");
            decls[i].to_json(&values[i])
        });
        let metadata = |m: &str, k: &str| self.metadata.get(&(m.to_string(), k.to_string())).cloned().flatten();
        // The pipeline folder's path is the server's business, not the client's.
        let canonical = self.base_dir.canonicalize().unwrap_or_else(|_| self.base_dir.clone());
        let hide = |e: String| {
            e.replace(&canonical.display().to_string(), "<pipeline folder>")
                .replace(&self.base_dir.display().to_string(), "<pipeline folder>")
        };
        let mut op = (self.build)(&BuildContext::new(params, &self.base_dir).with_metadata(&metadata)).map_err(hide)?;
        let out = op.infer(&self.element_types).map_err(hide)?;
        if out != self.out_types {
            return Err("these values change the types of its outputs, which the pipeline was checked with".into());
        }
        let op: Arc<dyn Op> = Arc::from(op);
        let mut cache = self.cache.lock();
        if cache.len() >= REBUILD_CACHE {
            cache.remove(0);
        }
        cache.push((key, op.clone()));
        Ok(op)
    }
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
    pub when: Option<When>,
    /// Per input: the value it takes when its source is absent.
    pub defaults: Vec<Option<Value>>,
    /// Skipped when an input without a default is absent (`on_absent: skip`).
    pub skip_if_absent: bool,
    /// Whether its outputs may be absent: it has a condition, or may be skipped.
    pub may_skip: bool,
    pub rebuild: Option<Arc<Rebuild>>,
}

impl PlanNode {
    /// Every value it waits for: its inputs, then what its condition and its route read.
    pub fn reads(&self) -> impl Iterator<Item = &Src> {
        let when = self.when.iter().flat_map(|w| w.reads.iter().map(|(_, s)| s));
        let by = match &self.kind {
            NodeKind::Branches { choice: Choice::Route { by, .. }, .. } => Some(by),
            _ => None,
        };
        self.inputs.iter().chain(when).chain(by)
    }

    /// The models it may run, with the version each names (`None`: the latest).
    pub fn models(&self) -> Vec<(&str, &ModelSig, Option<u64>)> {
        match &self.kind {
            NodeKind::Op(_) => vec![],
            NodeKind::Model { model, pinned, sig } => vec![(model, sig, *pinned)],
            NodeKind::Branches { arms, .. } => arms.iter().map(|a| (a.model.as_str(), &a.sig, a.pinned)).collect(),
        }
    }
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
    /// What it is when its source is absent (a skipped node's output).
    pub default: Option<Value>,
}

/// A compiled pipeline: nodes in topological order, each input wired to its source.
#[derive(Clone)]
pub struct Plan {
    pub name: String,
    pub max_batch_size: usize,
    pub layout: Layout,
    /// The pool a fused pipeline's items run on.
    pub pool: String,
    /// The request parameters it reads.
    pub params: Vec<ParamDecl>,
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
    in_ports: Ports,
    out_ports: Ports,
    /// A route's or a split's models, and how it chooses.
    arms: Vec<Arm>,
    route: Option<DraftRoute>,
    weights: Vec<u32>,
    when: Option<Expr>,
    /// An op whose params name parameters: what building it again takes.
    rebuild: Option<(Builder, serde_json::Value, SeenMetadata, Vec<usize>)>,
}

struct DraftRoute {
    by: String,
    cases: Vec<(Scalar, usize)>,
    default: Option<usize>,
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
    /// Per draft: what its condition reads.
    when_reads: Vec<Vec<(String, RawSrc)>>,
    /// Per draft: its route's `by`.
    by: Vec<Option<RawSrc>>,
}

/// A pipeline output before type checking: name, source, line.
struct RawOutput {
    name: String,
    src: RawSrc,
    line: Option<usize>,
    default: Option<serde_json::Value>,
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
        params: Vec::new(),
    };
    c.parameters(&yaml);
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
        params: c.params,
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
    params: Vec<ParamDecl>,
}

impl Compiler<'_> {
    /// The request parameters the pipeline declares.
    fn parameters(&mut self, yaml: &PipelineYaml) {
        if yaml.parameters.len() > params::MAX_PARAMS {
            let message =
                format!("{} parameters; a pipeline may declare at most {}", yaml.parameters.len(), params::MAX_PARAMS);
            self.errors.add(self.loc.top_key("parameters"), None, message);
            return;
        }
        for p in &yaml.parameters {
            let line = self.loc.entry("parameters", &p.name);
            if self.params.iter().any(|d| d.name == p.name) {
                self.errors.add(line, None, format!("parameter '{}' is declared twice", p.name));
                continue;
            }
            match ParamDecl::from_yaml(p) {
                Ok(d) => self.params.push(d),
                Err(e) => self.errors.add(line, None, e),
            }
        }
    }

    fn param_index(&self, name: &str) -> Result<usize, String> {
        self.params.iter().position(|d| d.name == name).ok_or_else(|| {
            let names: Vec<String> = self.params.iter().map(|d| format!("${}", d.name)).collect();
            let declared = if names.is_empty() { "none".to_string() } else { names.join(", ") };
            format!("'${name}' names no parameter (declared under `parameters:`: {declared})")
        })
    }

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
            let mut d = Draft {
                yaml: n.clone(),
                line,
                ok: false,
                op: None,
                model: None,
                in_ports: vec![],
                out_ports: vec![],
                arms: vec![],
                route: None,
                weights: vec![],
                when: None,
                rebuild: None,
            };
            let kinds = [n.op.is_some(), n.model.is_some(), n.route.is_some(), n.split.is_some()];
            if kinds.iter().filter(|k| **k).count() != 1 {
                self.errors.add(line, node, "give exactly one of `op`, `model`, `route` or `split`".into());
            } else if let Some(op_name) = &n.op {
                self.op_node(&mut d, op_name);
            } else if let Some(model) = &n.model {
                self.model_node(&mut d, model);
            } else {
                self.branch_node(&mut d);
            }
            if let Some(w) = &n.when {
                let l = self.loc.find_after(line.unwrap_or(0), "when:").or(line);
                let parsed = cond::parse(w).and_then(|e| {
                    e.params().iter().try_for_each(|p| self.param_index(p).map(|_| ()))?;
                    Ok(e)
                });
                match parsed {
                    Ok(e) => d.when = Some(e),
                    Err(e) => self.errors.add(l, node, format!("when: {e}")),
                }
            }
            if n.sticky && n.split.is_none() {
                self.errors.add(line, node, "`sticky` is for `split` nodes".into());
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
        let params = params.map_err(|e| format!("params: {e}")).and_then(|raw| {
            let mut uses = Vec::new();
            let mut unknown = None;
            params::visit_refs(&raw, &mut |name| match self.param_index(name) {
                Ok(i) if !uses.contains(&i) => uses.push(i),
                Ok(_) => {}
                Err(e) => unknown = Some(e),
            });
            match unknown {
                Some(e) => Err(format!("params: {e}")),
                None => Ok((raw, uses)),
            }
        });
        // The first build reads the defaults; the model metadata it reads is kept for
        // builds with a request's values.
        let seen = RefCell::new(HashMap::new());
        let recording = |model: &str, key: &str| {
            let v = metadata(model, key);
            seen.borrow_mut().insert((model.to_string(), key.to_string()), v.clone());
            v
        };
        let decls = &self.params;
        let built = params.and_then(|(raw, uses)| {
            let with_defaults = params::substitute(&raw, &|name| {
                let d = decls.iter().find(|d| d.name == name).expect("checked above");
                d.to_json(&d.default)
            });
            let cx = BuildContext::new(with_defaults, self.base_dir).with_metadata(&recording);
            catalog.ops().build(op_name, &cx).map(|o| (o, raw, uses))
        });
        match built {
            Ok((o, raw, uses)) => {
                if !uses.is_empty() {
                    let build = catalog.ops().get(op_name).expect("it was just built").build;
                    d.rebuild = Some((build, raw, seen.take(), uses));
                }
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
                (d.in_ports, d.out_ports) = ports_of(&sig);
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

    /// A `route` or `split` node: its models found, each with the same signature.
    fn branch_node(&mut self, d: &mut Draft) {
        let n = d.yaml.clone();
        let (line, node) = (d.line, Some(n.name.as_str()));
        let before = self.errors.0.len();
        let key_line = if n.route.is_some() { "route:" } else { "split:" };
        let l = self.loc.find_after(line.unwrap_or(0), key_line).or(line);
        let arm = |this: &mut Self, d: &mut Draft, model: &str, version: Option<u64>| -> Option<usize> {
            let label = version.map_or(model.to_string(), |v| format!("{model}:{v}"));
            if let Some(i) = d.arms.iter().position(|a| a.label == label) {
                return Some(i);
            }
            match this.catalog.model(model, version) {
                None => this.errors.add(l, node, format!("unknown model '{model}'")),
                Some(Err(reason)) => this.errors.add(l, node, format!("model '{model}' cannot be used: {reason}")),
                Some(Ok(sig)) => {
                    d.arms.push(Arm { label, model: model.to_string(), pinned: version, sig });
                    return Some(d.arms.len() - 1);
                }
            }
            None
        };
        if let Some(r) = &n.route {
            let mut cases: Vec<(Scalar, usize)> = Vec::new();
            for (k, v) in &r.cases {
                let key = match k {
                    serde_yaml_ng::Value::Number(x) => x.as_f64().map(Scalar::Num),
                    serde_yaml_ng::Value::String(s) => Some(Scalar::Str(s.clone())),
                    serde_yaml_ng::Value::Bool(b) => Some(Scalar::Bool(*b)),
                    _ => None,
                };
                let Some(key) = key else {
                    self.errors.add(l, node, "route: a case is a number, a string or a boolean".into());
                    continue;
                };
                if matches!(key, Scalar::Num(n) if n.is_nan()) {
                    self.errors.add(l, node, "route: a case cannot be NaN".into());
                    continue;
                }
                if cases.iter().any(|(k, _)| *k == key) {
                    self.errors.add(l, node, format!("route: case {key} is given twice"));
                    continue;
                }
                match serde_yaml_ng::from_value::<ArmYaml>(v.clone()) {
                    Ok(a) => {
                        let (model, version) = a.model();
                        if let Some(i) = arm(self, d, model, version) {
                            cases.push((key, i));
                        }
                    }
                    Err(_) => self.errors.add(
                        l,
                        node,
                        format!("route: case {key}: give a model's name or {{model: <name>, version: <n>}}"),
                    ),
                }
            }
            if r.cases.is_empty() {
                self.errors.add(l, node, "route: give at least one case".into());
            }
            let default = r.default.as_ref().and_then(|a| {
                let (model, version) = a.model();
                arm(self, d, model, version)
            });
            d.route = Some(DraftRoute { by: r.by.clone(), cases, default });
        } else if let Some(split) = &n.split {
            if split.len() < 2 {
                self.errors.add(l, node, "split: give at least two branches".into());
            }
            if split.iter().any(|a| a.weight == 0) || split.iter().map(|a| u64::from(a.weight)).sum::<u64>() > 1_000_000
            {
                self.errors.add(l, node, "split: weights are 1 or more, and at most 1000000 in all".into());
            }
            for a in split {
                if let Some(i) = arm(self, d, &a.model, a.version) {
                    if i < d.weights.len() {
                        let m = &d.arms[i].label;
                        self.errors.add(l, node, format!("split: '{m}' is given twice"));
                    } else {
                        d.weights.push(a.weight);
                    }
                }
            }
        }
        if let Some(first) = d.arms.first() {
            let (ins, outs) = ports_of(&first.sig);
            for a in &d.arms[1..] {
                let (i2, o2) = ports_of(&a.sig);
                if i2 != ins || o2 != outs {
                    let show = |p: &[(String, ValueType)]| {
                        p.iter().map(|(n, t)| format!("{n}: {t}")).collect::<Vec<_>>().join(", ")
                    };
                    self.errors.add(
                        l,
                        node,
                        format!(
                            "its models must share one signature, but '{}' takes ({}) -> ({}) and '{}' takes ({}) -> ({})",
                            first.label,
                            show(&ins),
                            show(&outs),
                            a.label,
                            show(&i2),
                            show(&o2)
                        ),
                    );
                }
            }
            let most = d.arms.iter().map(|a| a.sig.max_batch_size).min().unwrap_or(0);
            if n.max_batch_size.is_some_and(|b| b == 0 || b > most) {
                let m = n.max_batch_size.unwrap_or(0);
                self.errors.add(line, node, format!("max_batch_size {m}: its models take batches of 1..={most}"));
            }
            (d.in_ports, d.out_ports) = (ins, outs);
        }
        if n.pool.is_some() || n.params.is_some() {
            self.errors.add(line, node, "a route or split runs models: remove `pool` and `params`".into());
        }
        if n.version.is_some() {
            self.errors.add(line, node, "give versions per branch, not on the node".into());
        }
        d.ok = self.errors.0.len() == before;
    }

    /// Every node input's reference resolved; the graph of node-to-node edges.
    fn wire(&mut self, drafts: &[Draft], inputs: &[PlanInput]) -> Wiring {
        let mut graph: DiGraph<usize, ()> = DiGraph::new();
        let idx: Vec<NodeIndex> = (0..drafts.len()).map(|i| graph.add_node(i)).collect();
        let mut srcs = Vec::with_capacity(drafts.len());
        let mut when_reads = Vec::with_capacity(drafts.len());
        let mut bys = Vec::with_capacity(drafts.len());
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
                    match resolve(r, inputs, drafts, &self.params) {
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
                for port in d.yaml.defaults.keys().filter(|p| !d.in_ports.iter().any(|(q, _)| q == *p)) {
                    let l = self.loc.find_after(d.line.unwrap_or(0), "defaults:").or(d.line);
                    self.errors.add(l, node, format!("defaults: it has no input '{port}'"));
                }
                for ((p, _), s) in d.in_ports.iter().zip(&w) {
                    if s.is_none() && !d.yaml.inputs.contains_key(p) {
                        self.errors.add(d.line, node, format!("input '{p}' is not wired"));
                    }
                }
            }
            srcs.push(w);
            // What its condition reads and its route's `by`: edges like inputs.
            let mut read = |r: &str, key: &str, errors: &mut Diags| match resolve(r, inputs, drafts, &self.params) {
                Ok(src) => {
                    if let RawSrc::Node(from, _) = src {
                        graph.add_edge(idx[from], idx[di], ());
                    }
                    Some(src)
                }
                Err(Unresolved::Reported) => None,
                Err(Unresolved::Error(e)) => {
                    let l = self.loc.find_after(d.line.unwrap_or(0), key).or(d.line);
                    errors.add(l, node, format!("{} {e}", key.trim_end_matches(':')));
                    None
                }
            };
            let mut reads = Vec::new();
            for r in d.when.iter().flat_map(|e| e.refs()) {
                if let Some(src) = read(r, "when:", &mut self.errors) {
                    reads.push((r.to_string(), src));
                }
            }
            when_reads.push(reads);
            bys.push(d.route.as_ref().and_then(|r| read(&r.by, "by:", &mut self.errors)));
        }
        Wiring { graph, idx, srcs, when_reads, by: bys }
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
            match resolve(&o.from, inputs, drafts, &self.params) {
                Ok(src) => outputs.push(RawOutput { name: o.name.clone(), src, line, default: o.default.clone() }),
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
        // Whether each node's outputs may be absent, by position in `order`.
        let mut may_skip: Vec<bool> = Vec::new();
        let names: Vec<(String, Vec<String>)> = order
            .iter()
            .map(|&di| (drafts[di].yaml.name.clone(), drafts[di].out_ports.iter().map(|p| p.0.clone()).collect()))
            .collect();
        for &di in order {
            let op = drafts[di].op.take();
            let d = &drafts[di];
            let node = Some(d.yaml.name.as_str());
            let srcs: Vec<Src> = wiring.srcs[di].iter().map(|s| to_src(s.expect("wired"), &pos)).collect();
            let reads: Vec<(String, Src)> =
                wiring.when_reads[di].iter().map(|(r, s)| (r.clone(), to_src(*s, &pos))).collect();
            let by = wiring.by[di].map(|s| to_src(s, &pos));
            let type_of = |s: &Src| match *s {
                Src::Input(i) => input_type(&inputs[i]),
                Src::Param(p) => self.params[p].value_type(),
                Src::Node { node, output } => types[node][output].clone(),
            };
            let given: Vec<ValueType> = srcs.iter().map(type_of).collect();
            let read_types: Vec<ValueType> = reads.iter().map(|(_, s)| type_of(s)).collect();
            let by_type = by.as_ref().map(type_of);
            let skips_before = may_skip.clone();
            let skippable = |s: &Src| matches!(*s, Src::Node { node, .. } if skips_before[node]);
            types.push(vec![ValueType::Any; d.out_ports.len()]);
            may_skip.push(false);
            // A list where the port takes one element: the node runs once per element.
            let mut mapped = false;
            let mut mapped_inputs = Vec::new();
            let mut element_types = Vec::new();
            for (((port, want), got), src) in d.in_ports.iter().zip(&given).zip(&srcs) {
                let from = src_name(*src, inputs, &self.params, &names);
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
            // Absent values: each input that may be absent needs a default, or the node is
            // skipped with it.
            let skip_if_absent = d.yaml.on_absent == Some(OnAbsent::Skip);
            let defaults_line = self.loc.find_after(d.line.unwrap_or(0), "defaults:").or(d.line);
            let mut defaults = vec![None; d.in_ports.len()];
            let mut skipped_by_input = false;
            for (pi, (port, src)) in d.in_ports.iter().map(|p| &p.0).zip(&srcs).enumerate() {
                let from = src_name(*src, inputs, &self.params, &names);
                match (skippable(src), d.yaml.defaults.get(port)) {
                    (true, Some(_)) if mapped_inputs[pi] => self.errors.add(
                        defaults_line,
                        node,
                        format!("defaults: input '{port}' is mapped over a list; a default cannot stand for the list"),
                    ),
                    (true, Some(v)) => match params::literal(v, &given[pi]) {
                        Ok(v) => defaults[pi] = Some(v),
                        Err(e) => self.errors.add(defaults_line, node, format!("defaults: input '{port}': {e}")),
                    },
                    (true, None) if skip_if_absent => skipped_by_input = true,
                    (true, None) => self.errors.add(
                        d.line,
                        node,
                        format!(
                            "input '{port}' reads '{from}', which is absent when node '{}' is skipped; give \
                             `defaults: {{{port}: ...}}` or `on_absent: skip`",
                            from.split('.').next().unwrap_or_default()
                        ),
                    ),
                    (false, Some(_)) => self.errors.add(
                        defaults_line,
                        node,
                        format!("defaults: input '{port}' reads '{from}', which is never absent"),
                    ),
                    (false, None) => {}
                }
            }
            if let Some(b) = by.filter(|b| skippable(b)) {
                if skip_if_absent {
                    skipped_by_input = true;
                } else {
                    let from = src_name(b, inputs, &self.params, &names);
                    self.errors.add(
                        d.line,
                        node,
                        format!("route: by '{from}' may be absent (a skipped node's); add `on_absent: skip`"),
                    );
                }
            }
            // A condition that reads an absent value skips its node too.
            let when_may_skip = reads.iter().any(|(_, s)| skippable(s));
            if skip_if_absent && !skipped_by_input && !when_may_skip {
                self.errors.add(d.line, node, "on_absent: skip, but nothing it reads can be absent".into());
            }
            let when = d.when.as_ref().and_then(|expr| {
                let kind_of = |o: &Operand| -> Result<Kind, String> {
                    let ty_of = |r: &str| {
                        let i = reads.iter().position(|(n, _)| n == r).ok_or("an unresolved reference")?;
                        Ok::<_, String>(&read_types[i])
                    };
                    match o {
                        Operand::Lit(s) => Ok(s.kind()),
                        Operand::Param(p) => Ok(self.params[self.param_index(p)?].kind()),
                        Operand::Ref(r) => scalar_kind(ty_of(r)?).map_err(|e| format!("'{r}' {e}")),
                        Operand::Len(r) => match ty_of(r)? {
                            ValueType::List(_) | ValueType::Any => Ok(Kind::Num),
                            ValueType::Tensor { dims, .. } if dims.as_ref().is_none_or(|d| !d.is_empty()) => {
                                Ok(Kind::Num)
                            }
                            t => Err(format!("len({r}): '{r}' is {t}; len() takes a list or a tensor with dimensions")),
                        },
                    }
                };
                let l = self.loc.find_after(d.line.unwrap_or(0), "when:").or(d.line);
                match expr.check(&kind_of) {
                    Ok(()) => Some(When {
                        text: d.yaml.when.clone().unwrap_or_default(),
                        expr: expr.clone(),
                        reads: reads.clone(),
                    }),
                    Err(e) => {
                        self.errors.add(l, node, format!("when: {e}"));
                        None
                    }
                }
            });
            let listed = |t: ValueType| if mapped { ValueType::List(Box::new(t)) } else { t };
            let mut rebuild = None;
            let (kind, out) = match op {
                // infer may record what it learns about its inputs (gather's element shape).
                Some(mut o) => match o.infer(&element_types) {
                    Ok(out) => {
                        if let Some((build, raw, metadata, uses)) = &d.rebuild {
                            rebuild = Some(Arc::new(Rebuild {
                                build: *build,
                                raw: raw.clone(),
                                base_dir: self.base_dir.to_path_buf(),
                                metadata: metadata.clone(),
                                uses: uses.clone(),
                                decls: self.params.clone(),
                                element_types: element_types.clone(),
                                out_types: out.clone(),
                                cache: Default::default(),
                            }));
                        }
                        (NodeKind::Op(Arc::from(o)), out.into_iter().map(listed).collect::<Vec<_>>())
                    }
                    Err(e) => {
                        self.errors.add(d.line, node, e);
                        continue;
                    }
                },
                None => {
                    let out = d.out_ports.iter().map(|(_, t)| listed(t.clone())).collect();
                    match (&d.model, &d.route) {
                        (Some((model, sig)), _) => {
                            (NodeKind::Model { model: model.clone(), pinned: d.yaml.version, sig: sig.clone() }, out)
                        }
                        (None, Some(r)) => {
                            let (Some(by), Some(by_type)) = (by, &by_type) else {
                                continue; // its `by` did not resolve, which is reported
                            };
                            let per_element = match self.check_route_by(r, by_type, mapped) {
                                Ok(per_element) => per_element,
                                Err(e) => {
                                    let l = self.loc.find_after(d.line.unwrap_or(0), "by:").or(d.line);
                                    self.errors.add(l, node, format!("route: {e}"));
                                    false
                                }
                            };
                            let choice = Choice::Route { by, per_element, cases: r.cases.clone(), default: r.default };
                            (NodeKind::Branches { arms: d.arms.clone(), choice }, out)
                        }
                        (None, None) => {
                            let choice = Choice::Split { weights: d.weights.clone(), sticky: d.yaml.sticky };
                            (NodeKind::Branches { arms: d.arms.clone(), choice }, out)
                        }
                    }
                }
            };
            *types.last_mut().expect("pushed above") = out.clone();
            let skips = d.when.is_some() || skipped_by_input;
            *may_skip.last_mut().expect("pushed above") = skips;
            let mut n = plan_node(d, kind, srcs, out, mapped_inputs);
            (n.when, n.defaults, n.skip_if_absent, n.may_skip, n.rebuild) =
                (when, defaults, skip_if_absent, skips, rebuild);
            nodes.push(n);
        }
        nodes
    }

    /// A route's `by`: one value per element of a mapped node (a list of values, or a
    /// tensor whose one dimension is variable) or one value for all, of the kind its
    /// cases are. Whether it is per element.
    fn check_route_by(&self, r: &DraftRoute, by: &ValueType, mapped: bool) -> Result<bool, String> {
        let (kind, per_element) = match by {
            ValueType::List(el) if mapped => {
                (scalar_kind(el).map_err(|e| format!("by '{}': an element {e}", r.by))?, true)
            }
            ValueType::Tensor { dtype, dims: Some(d) } if mapped && d.len() == 1 && d[0] < 0 => match dtype {
                Some(dt) => (params::kind_of_dtype(*dt).ok_or_else(|| format!("'{}' is {by}", r.by))?, true),
                None => (Kind::Unknown, true),
            },
            t => {
                let kind = scalar_kind(t).map_err(|e| {
                    let per = if mapped { "one value per element (a list, or a tensor [-1]) or " } else { "" };
                    format!("by '{}' {e}; it must hold {per}one value", r.by)
                })?;
                (kind, false)
            }
        };
        match r.cases.iter().find(|(k, _)| kind != Kind::Unknown && k.kind() != kind) {
            Some((k, _)) => Err(format!("by '{}' is {kind}, but case {k} is {}", r.by, k.kind())),
            None => Ok(per_element),
        }
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
        for RawOutput { name, src, line, default } in outputs {
            let src = to_src(src, &pos);
            let (ty, skips) = match src {
                Src::Input(i) => (input_type(&inputs[i]), false),
                Src::Param(p) => (self.params[p].value_type(), false),
                Src::Node { node, output } => (nodes[node].output_types[output].clone(), nodes[node].may_skip),
            };
            let default = match (skips, default) {
                (true, None) => {
                    let message = format!(
                        "output '{name}' reads a value that is absent when its node is skipped; give it a `default:` \
                         (`empty`, or a value)"
                    );
                    self.errors.add(line, None, message);
                    None
                }
                (true, Some(v)) => match params::literal(&v, &ty) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        self.errors.add(line, None, format!("output '{name}': default: {e}"));
                        None
                    }
                },
                (false, Some(_)) => {
                    self.errors.add(line, None, format!("output '{name}': default: its value is never absent"));
                    None
                }
                (false, None) => None,
            };
            match ty {
                ValueType::Tensor { dtype: Some(dtype), dims } => {
                    typed.push(PlanOutput { name, src, dtype, dims: dims.unwrap_or_default(), default })
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

/// Resolves a reference: a pipeline input's name, `$parameter` or `node.output`.
fn resolve(r: &str, inputs: &[PlanInput], drafts: &[Draft], params: &[ParamDecl]) -> Result<RawSrc, Unresolved> {
    let err = |m: String| Unresolved::Error(m);
    if let Some(p) = r.strip_prefix('$') {
        return params.iter().position(|d| d.name == p).map(RawSrc::Param).ok_or_else(|| {
            err(format!("unknown reference '{r}': no parameter '{p}' is declared under `parameters:`"))
        });
    }
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
            stack.extend(wiring.when_reads[n].iter().map(|(_, s)| s).filter_map(node_of));
            stack.extend(wiring.by[n].iter().filter_map(node_of));
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
        for s in n.reads() {
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
        RawSrc::Param(p) => Src::Param(p),
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
    Param(usize),
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
        when: None,
        defaults: vec![],
        skip_if_absent: false,
        may_skip: false,
        rebuild: None,
    }
}

/// A model's inputs and outputs as node ports: per item, without the batch dimension.
fn ports_of(sig: &ModelSig) -> (Ports, Ports) {
    let strip = |t: &TensorInfo| {
        let dims = if sig.max_batch_size > 0 { t.dims[1..].to_vec() } else { t.dims.clone() };
        (t.name.clone(), ValueType::tensor(t.dtype, dims))
    };
    (sig.inputs.iter().map(strip).collect(), sig.outputs.iter().map(strip).collect())
}

/// The kind of the one value a condition (or a route) reads from a value of type `t`.
fn scalar_kind(t: &ValueType) -> Result<Kind, String> {
    match t {
        ValueType::Any => Ok(Kind::Unknown),
        ValueType::Tensor { dtype, dims } => {
            if let Some(d) = dims {
                // Variable dims may hold any number of values: one value is checked here.
                if d.iter().any(|&x| x < 0) || d.iter().product::<i64>() != 1 {
                    return Err(format!("is {t}, not one value; use len() for its length"));
                }
            }
            match dtype {
                None => Ok(Kind::Unknown),
                Some(dt) => params::kind_of_dtype(*dt).ok_or_else(|| format!("is {t}, which conditions do not read")),
            }
        }
        ValueType::List(_) => Err(format!("is a {t}; use len() for its length")),
        other => Err(format!("is {other}, not a value")),
    }
}

fn src_name(s: Src, inputs: &[PlanInput], params: &[ParamDecl], names: &[(String, Vec<String>)]) -> String {
    match s {
        Src::Input(i) => inputs[i].name.clone(),
        Src::Param(p) => format!("${}", params[p].name),
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
    /// The plan as a Graphviz DOT graph: inputs, parameters, nodes (ops as boxes, models
    /// as ellipses, fan-outs doubled, conditions and branches in their labels) and
    /// outputs; edges labelled with the values' types, conditional ones as such.
    pub fn to_dot(&self) -> String {
        let mut g: DiGraph<String, String> = DiGraph::new();
        let ins: Vec<NodeIndex> = self.inputs.iter().map(|i| g.add_node(format!("input {}", i.name))).collect();
        let ps: Vec<NodeIndex> =
            self.params.iter().map(|p| g.add_node(format!("parameter ${} (default {})", p.name, p.default))).collect();
        let ns: Vec<NodeIndex> = self
            .nodes
            .iter()
            .map(|n| {
                let what = match &n.kind {
                    NodeKind::Op(_) => format!("op on pool {}", n.pool),
                    NodeKind::Model { model, sig, .. } => format!("model {model} v{}", sig.version),
                    NodeKind::Branches { arms, choice: Choice::Route { cases, default, .. } } => {
                        let mut c: Vec<String> =
                            cases.iter().map(|(k, a)| format!("{k} -> {}", arms[*a].label)).collect();
                        if let Some(a) = default {
                            c.push(format!("else -> {}", arms[*a].label));
                        }
                        format!("route: {}", c.join(", "))
                    }
                    NodeKind::Branches { arms, choice: Choice::Split { weights, sticky } } => {
                        let total: u32 = weights.iter().sum();
                        let c: Vec<String> = arms
                            .iter()
                            .zip(weights)
                            .map(|(a, w)| {
                                format!("{} {:.0}%", a.label, f64::from(*w) * 100.0 / f64::from(total.max(1)))
                            })
                            .collect();
                        format!("split{}: {}", if *sticky { " (sticky)" } else { "" }, c.join(", "))
                    }
                };
                let map = if n.mapped { " (per element)" } else { "" };
                let when = n.when.as_ref().map(|w| format!("\nwhen {}", w.text)).unwrap_or_default();
                let skip = if n.skip_if_absent { "\nskipped when an input is absent" } else { "" };
                g.add_node(format!("{}\n{what}{map}{when}{skip}", n.name))
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
            Src::Param(p) => self.params[p].value_type().to_string(),
            Src::Node { node, output } => {
                let n = &self.nodes[node];
                let maybe = if n.may_skip { " (may be absent)" } else { "" };
                format!("{}{maybe}", n.output_types[output])
            }
        };
        let at = |s: Src| match s {
            Src::Input(i) => ins[i],
            Src::Param(p) => ps[p],
            Src::Node { node, .. } => ns[node],
        };
        let from = |s: Src| match s {
            Src::Node { node, output } => format!("{}->", self.nodes[node].output_names[output]),
            _ => String::new(),
        };
        for (n, node) in self.nodes.iter().enumerate() {
            for (s, port) in node.inputs.iter().zip(&node.input_names) {
                g.add_edge(at(*s), ns[n], format!("{}{port}: {}", from(*s), ty_of(*s)));
            }
            for (_, s) in node.when.iter().flat_map(|w| &w.reads) {
                g.add_edge(at(*s), ns[n], format!("{}when", from(*s)));
            }
            if let NodeKind::Branches { choice: Choice::Route { by, .. }, .. } = &node.kind {
                g.add_edge(at(*by), ns[n], format!("{}route by", from(*by)));
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
                // Two classifiers of one signature, and one that gives more classes.
                "cls" | "cls2" | "wide" => Some(Ok(ModelSig {
                    version: 1,
                    inputs: vec![t("x", DataType::F32, &[-1, 3, 8, 8])],
                    outputs: vec![t("logits", DataType::F32, &[-1, if name == "wide" { 20 } else { 10 }])],
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

    /// `good()` with `cls` run only when `cond` holds, `top` skipped with it, and the
    /// output defaulting to `empty`; `params` declared.
    fn conditional(cond: &str, params: &str) -> String {
        good("")
            .replace(HEAD, &format!("parameters:\n{params}{HEAD}"))
            .replace("from: top.classes}", "from: top.classes, default: [-1, -1, -1]}")
            .replace(
                "    inputs: {x: norm.tensor}\n",
                &format!("    inputs: {{x: norm.tensor}}\n    when: \"{cond}\"\n"),
            )
            .replace("    params: {k: 3}\n", "    params: {k: 3}\n    on_absent: skip\n")
    }

    const VARIANT: &str = "  - {name: variant, type: string, default: a, values: [a, b]}\n";

    #[test]
    fn a_condition_and_its_absence_rules_compile() {
        let plan = compile_str(&conditional("$variant == 'a'", VARIANT)).unwrap();
        let cls = plan.nodes.iter().find(|n| n.name == "cls").unwrap();
        assert!(cls.when.is_some() && cls.may_skip);
        let top = plan.nodes.iter().find(|n| n.name == "top").unwrap();
        assert!(top.skip_if_absent && top.may_skip);
        let Some(Value::Tensor(t)) = &plan.outputs[0].default else { panic!("a default") };
        assert_eq!(t.to_i64().unwrap(), vec![-1; 3]);
        let e = errors_of(&conditional("$variant == 'a'", VARIANT).replace("[-1, -1, -1]", "empty"));
        assert!(e.contains("output 'top': default: `empty` is no rows, but the value always has 3"), "{e}");
        let dot = plan.to_dot();
        assert!(dot.contains("when $variant == 'a'") && dot.contains("(may be absent)"), "{dot}");
        // A condition over a computed value waits for it: `resize` reads nothing new, but
        // `norm` now depends on... nothing else; `cls` reads `decode.image`'s size via len.
        let text = conditional("len(norm.tensor) == 3 and $variant in ['a', 'b']", VARIANT);
        assert!(compile_str(&text).is_ok(), "{:?}", compile_str(&text).err());
    }

    #[test]
    fn each_condition_error_names_the_line() {
        let at_when = |e: &str| e.contains("pipelines/p.yaml:21: node 'cls': when: ");
        for (cond, says) in [
            ("$variant ==", "ends too early"),
            ("nope.x > 0", "when unknown reference 'nope.x': no node 'nope'"),
            ("$other == 'a'", "'$other' names no parameter (declared under `parameters:`: $variant)"),
            ("$variant > 'a'", "only numbers can be ordered"),
            ("norm.tensor > 0", "'norm.tensor' is tensor FP32 [3,8,8], not one value; use len()"),
            ("$variant", "is a string, not a condition"),
        ] {
            let e = errors_of(&conditional(cond, VARIANT));
            assert!(e.contains(says), "{cond}: {e}");
            if !says.contains("unknown reference") {
                assert!(at_when(&e), "{cond}: {e}");
            }
        }
    }

    #[test]
    fn every_reader_of_an_absent_value_must_say_what_happens() {
        let base = conditional("$variant == 'a'", VARIANT);
        // top reads cls.logits without `on_absent`.
        let e = errors_of(&base.replace("    on_absent: skip\n", ""));
        assert!(
            e.contains("node 'top': input 'scores' reads 'cls.logits', which is absent when node 'cls' is skipped; give `defaults: {scores: ...}` or `on_absent: skip`"),
            "{e}"
        );
        // A default instead of skipping: a value of the right type.
        let with_default = base.replace("    on_absent: skip\n", "    defaults: {scores: [0,0,0,0,0,0,0,0,0,1]}\n");
        let e = errors_of(&with_default);
        assert!(e.contains("output 'top': default: its value is never absent"), "{e}");
        let fixed = with_default.replace("from: top.classes, default: [-1, -1, -1]}", "from: top.classes}");
        assert!(compile_str(&fixed).is_ok(), "{:?}", compile_str(&fixed).err());
        let e = errors_of(&fixed.replace("[0,0,0,0,0,0,0,0,0,1]", "[1, 2]"));
        assert!(
            e.contains("defaults: input 'scores': the default is tensor FP32 [2], but the value is tensor FP32 [10]"),
            "{e}"
        );
        // The output that reads a skippable value needs a default.
        let e = errors_of(&base.replace("from: top.classes, default: [-1, -1, -1]}", "from: top.classes}"));
        assert!(
            e.contains("output 'top' reads a value that is absent when its node is skipped; give it a `default:`"),
            "{e}"
        );
        // `on_absent` and `defaults` where nothing can be absent.
        let e = errors_of(&good("").replace("    params: {k: 3}\n", "    params: {k: 3}\n    on_absent: skip\n"));
        assert!(e.contains("node 'top': on_absent: skip, but nothing it reads can be absent"), "{e}");
        let e = errors_of(&good("").replace("    params: {k: 3}\n", "    params: {k: 3}\n    defaults: {scores: 1}\n"));
        assert!(e.contains("defaults: input 'scores' reads 'cls.logits', which is never absent"), "{e}");
        let e = errors_of(&good("").replace("    params: {k: 3}\n", "    params: {k: 3}\n    defaults: {score: 1}\n"));
        assert!(e.contains("defaults: it has no input 'score'"), "{e}");
    }

    #[test]
    fn parameters_are_declared_typed_and_named_where_used() {
        let thr = "  - {name: thr, type: int, default: 3, min: 1, max: 10}\n";
        let text = |p: &str| good("").replace(HEAD, &format!("parameters:\n{p}{HEAD}"));
        let plan = compile_str(&text(thr).replace("params: {k: 3}", "params: {k: $thr}")).unwrap();
        let top = plan.nodes.iter().find(|n| n.name == "top").unwrap();
        assert_eq!(top.rebuild.as_ref().unwrap().uses, vec![0]);
        let e = errors_of(&text(thr).replace("params: {k: 3}", "params: {k: $kk}"));
        assert!(e.contains("node 'top': op 'topk': params: '$kk' names no parameter"), "{e}");
        let e = errors_of(&text(&format!("{thr}{thr}")));
        assert!(e.contains("pipelines/p.yaml:2: parameter 'thr' is declared twice"), "{e}");
        let e = errors_of(&text("  - {name: thr, type: int, default: 0.5}\n"));
        assert!(e.contains("pipelines/p.yaml:2: parameter 'thr': default: expected an integer, got 0.5"), "{e}");
        let e = errors_of(&text("  - {name: thr, type: number, default: 1}\n"));
        assert!(e.contains("unknown variant `number`"), "{e}");
        // As an input: a tensor of no dimensions, type-checked like any value.
        let e = errors_of(&text(thr).replace("inputs: {scores: cls.logits}", "inputs: {scores: $thr}"));
        assert!(e.contains("input 'scores' expects tensor FP32, but '$thr' gives tensor INT64 []"), "{e}");
        let e = errors_of(&text(thr).replace("inputs: {scores: cls.logits}", "inputs: {scores: $nope}"));
        assert!(e.contains("unknown reference '$nope': no parameter 'nope' is declared"), "{e}");
    }

    /// decode -> boxes from an input -> crop each -> normalize -> `node` (given) -> gather.
    fn routed(node: &str) -> String {
        format!(
            "{HEAD}  - {{name: preds, dtype: FP32, dims: [4, 7]}}\noutputs:\n  - {{name: o, from: g.tensor}}\nnodes:\n  - name: decode\n    op: decode_image\n    inputs: {{bytes: image}}\n  - name: boxes\n    op: detect_yolo\n    inputs: {{predictions: preds, image: decode.image}}\n    params: {{width: 8, height: 8}}\n  - name: crop\n    op: crop_boxes\n    inputs: {{image: decode.image, boxes: boxes.boxes}}\n    params: {{resize: [8, 8]}}\n  - name: norm\n    op: normalize\n    inputs: {{image: crop.crops}}\n  - name: cls\n{node}    inputs: {{x: norm.tensor}}\n  - name: g\n    op: gather\n    inputs: {{list: cls.logits}}\n"
        )
    }

    #[test]
    fn routes_and_splits_compile_with_their_models_checked() {
        let plan =
            compile_str(&routed("    route:\n      by: boxes.classes\n      cases: {0: cls, 1: cls2}\n")).unwrap();
        let cls = plan.nodes.iter().find(|n| n.name == "cls").unwrap();
        let NodeKind::Branches { arms, choice: Choice::Route { cases, default, .. } } = &cls.kind else { panic!() };
        assert_eq!(arms.iter().map(|a| a.label.as_str()).collect::<Vec<_>>(), ["cls", "cls2"]);
        assert_eq!(cases, &[(Scalar::Num(0.0), 0), (Scalar::Num(1.0), 1)]);
        assert!(default.is_none() && cls.mapped);
        assert!(plan.to_dot().contains("route: 0 -> cls, 1 -> cls2"), "{}", plan.to_dot());
        let split = "    split:\n      - {model: cls, weight: 9}\n      - {model: cls2, weight: 1}\n    sticky: true\n";
        let plan = compile_str(&routed(split)).unwrap();
        assert!(plan.to_dot().contains("split (sticky): cls 90%, cls2 10%"), "{}", plan.to_dot());

        for (node, says) in [
            ("    route:\n      by: boxes.classes\n      cases: {0: cls, 1: wide}\n", "its models must share one signature, but 'cls' takes (x: tensor FP32 [3,8,8]) -> (logits: tensor FP32 [10]) and 'wide' takes"),
            ("    route:\n      by: boxes.classes\n      cases: {0: cls, 1: nope}\n", "node 'cls': unknown model 'nope'"),
            ("    route:\n      by: boxes.classes\n      cases: {a: cls, b: cls2}\n", "route: by 'boxes.classes' is a number, but case 'a' is a string"),
            ("    route:\n      by: boxes.boxes\n      cases: {0: cls}\n", "route: by 'boxes.boxes' is tensor FP32 [-1,4]"),
            ("    route:\n      by: boxes.nothing\n      cases: {0: cls}\n", "by unknown reference 'boxes.nothing'"),
            ("    route:\n      by: boxes.classes\n      cases: {}\n", "route: give at least one case"),
            ("    split:\n      - {model: cls, weight: 1}\n", "split: give at least two branches"),
            ("    split:\n      - {model: cls, weight: 0}\n      - {model: cls2, weight: 1}\n", "split: weights are 1 or more"),
            ("    split:\n      - {model: cls, weight: 1}\n      - {model: cls, weight: 1}\n", "split: 'cls' is given twice"),
            ("    model: cls\n    sticky: true\n", "`sticky` is for `split` nodes"),
            ("    model: cls\n    when: boxes.scores > 0.5\n", "'boxes.scores' is tensor FP32 [-1], not one value"),
            ("    route:\n      by: boxes.classes\n      cases: {1: cls, 1.0: cls2}\n", "route: case 1 is given twice"),
            ("    route:\n      by: boxes.classes\n      cases: {1: {model: cls, verison: 2}}\n", "route: case 1: give a model's name or {model: <name>, version: <n>}"),
            ("    model: cls\n    route: {by: boxes.classes, cases: {0: cls}}\n", "give exactly one of `op`, `model`, `route` or `split`"),
        ] {
            let e = errors_of(&routed(node));
            assert!(e.contains(says), "{node}: {e}");
        }
    }
}
