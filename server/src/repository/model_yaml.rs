//! `models/<name>/model.yaml`: how a model is served. Unknown keys are errors, reported
//! with file:line, because a misspelt knob that is silently ignored is worse than none.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// ONNX Runtime (`ort`), loaded at run time: CPU, CUDA and TensorRT.
    #[default]
    Onnxruntime,
    /// tract-onnx, compiled in (cargo feature `tract`): CPU only, fixed shapes, no
    /// shared library to install.
    Tract,
    /// Other v2 servers (sluice or Triton) over gRPC: see [`RemoteYaml`].
    Remote,
}

impl BackendKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            BackendKind::Onnxruntime => "onnxruntime",
            BackendKind::Tract => "tract",
            BackendKind::Remote => "remote",
        }
    }

    /// The `platform` of the model's metadata and configuration (Triton's name for ONNX
    /// Runtime's; tract has none there).
    pub fn platform(&self) -> &'static str {
        match self {
            BackendKind::Onnxruntime => "onnxruntime_onnx",
            BackendKind::Tract => "tract_onnx",
            BackendKind::Remote => "remote",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    #[default]
    Cpu,
    Cuda,
    Tensorrt,
}

impl ExecutionProvider {
    pub fn is_gpu(self) -> bool {
        self != ExecutionProvider::Cpu
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionProvider::Cpu => "cpu",
            ExecutionProvider::Cuda => "cuda",
            ExecutionProvider::Tensorrt => "tensorrt",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ConvSearch {
    #[default]
    Heuristic,
    Exhaustive,
    Default,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelYaml {
    /// What runs the model: `onnxruntime` (the default) or `tract`.
    #[serde(default)]
    pub backend: BackendKind,
    /// Where the model runs (shorthand for a one-provider `execution_providers`); a GPU
    /// provider that is not available is a load error unless `allow_fallback` is set, in
    /// which case the model runs on CPU.
    #[serde(default)]
    pub execution_provider: ExecutionProvider,
    /// Providers in order of preference, e.g. `[tensorrt, cuda, cpu]`: every one that
    /// starts is registered with ONNX Runtime in this order, and each node of the graph
    /// runs on the first that supports it. One that cannot start (no GPU, no TensorRT
    /// libraries) is skipped when another one in the list starts; the model fails to load,
    /// naming each provider's reason, only when none does.
    #[serde(default)]
    pub execution_providers: Vec<ExecutionProvider>,
    /// Adds `cpu` as the last resort (the same as listing it last).
    #[serde(default)]
    pub allow_fallback: bool,
    /// The GPU of the GPU providers (shorthand for a one-GPU `device_ids`).
    #[serde(default)]
    pub device_id: i32,
    /// GPUs to place instances on: `instances` instances on each.
    #[serde(default)]
    pub device_ids: Vec<i32>,
    /// How the CUDA provider picks convolution algorithms. `exhaustive` benchmarks every
    /// algorithm for each new input shape: with dynamic batching every new batch size
    /// stalls its batch for hundreds of milliseconds. `heuristic` (the default) does not.
    #[serde(default)]
    pub cudnn_conv_algo_search: ConvSearch,
    #[serde(default)]
    pub cuda: CudaOptions,
    #[serde(default)]
    pub tensorrt: TensorrtOptions,
    /// Instances of the model (per GPU with GPU providers), each with its own session
    /// on its own thread.
    #[serde(default = "one")]
    pub instances: usize,
    /// Largest batch the model accepts along dimension 0; 0 means the model has no
    /// batch dimension and every request runs on its own.
    #[serde(default)]
    pub max_batch_size: usize,
    #[serde(default)]
    pub dynamic_batching: DynamicBatching,
    /// Requests waiting for an instance; past this a request is rejected at once.
    #[serde(default = "default_queue")]
    pub max_queue_size: usize,
    /// ONNX Runtime intra-op threads per instance (0: ONNX Runtime decides).
    #[serde(default = "one")]
    pub intra_op_threads: usize,
    /// Busy-waiting ORT threads steal the cores CPU ops need; off unless asked for.
    #[serde(default)]
    pub intra_op_spinning: bool,
    /// Exact graph rewrites before ONNX Runtime loads the model: scalar Mul/Add folded
    /// into neighbouring convolutions, hard-swish chains turned into HardSigmoid (see
    /// `onnx::fold`). Off leaves the file exactly as it is.
    #[serde(default = "yes")]
    pub fold_graph: bool,
    /// Overrides of the dims read from the ONNX file, by tensor name (full dims,
    /// batch dimension included, -1 for variable).
    #[serde(default)]
    pub inputs: Vec<TensorOverride>,
    #[serde(default)]
    pub outputs: Vec<TensorOverride>,
    /// Runs made at load time, so the first real request does not pay for lazy
    /// initialisation (memory arenas, kernel selection, TensorRT engine builds).
    #[serde(default)]
    pub warmup: Vec<Warmup>,
    /// Which of the numbered version folders (`models/<name>/<n>/model.onnx`) are served.
    #[serde(default)]
    pub version_policy: VersionPolicy,
    /// The largest size a request may give any variable dimension of an input other than
    /// the batch dimension (image sides, sequence lengths): memory for activations grows
    /// with it, and one huge input must not take the server's memory.
    #[serde(default = "default_max_dim")]
    pub max_dim: usize,
    /// Give ONNX Runtime's unused arena memory back after every run (CPU). By default on
    /// for models whose inputs vary in more than the batch size, so memory follows the
    /// shapes in use rather than the largest seen; costs some allocation per run.
    #[serde(default)]
    pub shrink_arena: Option<bool>,
    /// `backend: remote`: where the model is served.
    #[serde(default)]
    pub remote: Option<RemoteYaml>,
}

/// A model served by other v2 servers over gRPC. Its signature and max batch size are
/// read from one of them when the model loads; the local batcher forms the batches and
/// each batch is one RPC to the endpoint with the fewest requests outstanding (of two
/// picked at random), retried on another when one is unreachable.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteYaml {
    /// `host:port` of each server ...
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// ... or a DNS name `host:port` whose addresses are the servers (a Kubernetes
    /// headless Service), resolved again every `resolve_interval_ms`.
    #[serde(default)]
    pub dns: Option<String>,
    /// The model's name there (default: this model's name).
    #[serde(default)]
    pub model: Option<String>,
    /// The version there (default: the server's default).
    #[serde(default)]
    pub version: Option<u64>,
    #[serde(default = "default_resolve_ms")]
    pub resolve_interval_ms: u64,
    /// How often each endpoint's readiness for the model is checked; an endpoint that
    /// fails a check or a call is left out until a later check passes.
    #[serde(default = "default_health_ms")]
    pub health_interval_ms: u64,
    /// The most one batch's call (all its tries) may take.
    #[serde(default = "default_remote_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_resolve_ms() -> u64 {
    5000
}
fn default_health_ms() -> u64 {
    1000
}
fn default_remote_timeout_ms() -> u64 {
    10_000
}

/// The most endpoints a remote model may list.
pub const MAX_ENDPOINTS: usize = 256;

/// Caps on what a model.yaml may ask for: each value is allocated or started at load.
pub const MAX_BATCH_SIZE: usize = 4096;
pub const MAX_QUEUE_SIZE: usize = 1 << 20;
pub const MAX_THREADS: usize = 256;
/// Instances per CPU core, and per GPU.
pub const INSTANCES_PER_CORE: usize = 4;
pub const INSTANCES_PER_GPU: usize = 16;

fn default_max_dim() -> usize {
    4096
}

/// Triton's version policies: `{latest: N}` (the default, N = 1), `all`, or
/// `{specific: [1, 3]}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "PolicyYaml")]
pub enum VersionPolicy {
    Latest(usize),
    All,
    Specific(Vec<u64>),
}

/// The policy as written: the word `all` or a map with one key.
#[derive(Deserialize)]
#[serde(untagged)]
enum PolicyYaml {
    Word(String),
    Map(PolicyMap),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyMap {
    latest: Option<usize>,
    specific: Option<Vec<u64>>,
}

impl TryFrom<PolicyYaml> for VersionPolicy {
    type Error = String;
    fn try_from(p: PolicyYaml) -> Result<Self, String> {
        match p {
            PolicyYaml::Word(w) if w == "all" => Ok(VersionPolicy::All),
            PolicyYaml::Map(PolicyMap { latest: Some(n), specific: None }) => Ok(VersionPolicy::Latest(n)),
            PolicyYaml::Map(PolicyMap { latest: None, specific: Some(v) }) => Ok(VersionPolicy::Specific(v)),
            _ => Err("expected `all`, `{latest: N}` or `{specific: [versions]}`".into()),
        }
    }
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest(1)
    }
}

impl VersionPolicy {
    /// The versions to serve out of those on disk (sorted), and the ones the policy names
    /// that are missing.
    pub fn select(&self, available: &[u64]) -> (Vec<u64>, Vec<u64>) {
        match self {
            VersionPolicy::Latest(n) => (available[available.len().saturating_sub(*n)..].to_vec(), vec![]),
            VersionPolicy::All => (available.to_vec(), vec![]),
            VersionPolicy::Specific(wanted) => {
                let mut wanted = wanted.clone();
                wanted.sort_unstable();
                wanted.dedup();
                wanted.into_iter().partition(|v| available.contains(v))
            }
        }
    }
}

/// CUDA provider options.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CudaOptions {
    /// Cap on the provider's memory arena, in MiB (default: no cap).
    #[serde(default)]
    pub memory_limit_mb: Option<usize>,
    /// How the arena grows: `next_power_of_two` (ONNX Runtime's default) or
    /// `same_as_requested` (less memory held, more allocations).
    #[serde(default)]
    pub arena_extend_strategy: Option<ArenaExtend>,
    /// TF32 tensor cores for FP32 matmuls and convolutions (ONNX Runtime's default: on).
    #[serde(default)]
    pub tf32: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArenaExtend {
    NextPowerOfTwo,
    SameAsRequested,
}

/// TensorRT provider options.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TensorrtOptions {
    /// Build FP16 engines (faster, small accuracy change).
    #[serde(default)]
    pub fp16: bool,
    /// Folder for built engines, relative to the model's folder unless absolute: a
    /// restart or a second instance loads the engine instead of building it for minutes.
    #[serde(default)]
    pub engine_cache: Option<std::path::PathBuf>,
    /// Builder workspace in MiB (default: TensorRT's).
    #[serde(default)]
    pub workspace_mb: Option<usize>,
    /// The optimisation profile for inputs with variable dims: per input, the smallest,
    /// the most common and the largest full shape (batch dimension included).
    #[serde(default)]
    pub profile: BTreeMap<String, ProfileShapes>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileShapes {
    pub min: Vec<usize>,
    pub opt: Vec<usize>,
    pub max: Vec<usize>,
}

impl TensorrtOptions {
    /// ONNX Runtime's `name:1x3x224x224,other:...` form of the profile's `pick`ed shapes.
    pub fn profile_string(&self, pick: impl Fn(&ProfileShapes) -> &Vec<usize>) -> String {
        self.profile
            .iter()
            .map(|(name, p)| {
                let dims: Vec<String> = pick(p).iter().map(|d| d.to_string()).collect();
                format!("{name}:{}", dims.join("x"))
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DynamicBatching {
    /// How long the oldest request may wait for others to join its batch.
    #[serde(default)]
    pub max_queue_delay_us: u64,
    /// Batch sizes cut at once, without waiting for the delay, when they can be formed.
    #[serde(default)]
    pub preferred_batch_sizes: Vec<usize>,
    /// If set, every batch is padded with zero rows up to the smallest of these sizes
    /// that holds it, and each size is warmed up at load. GPU providers re-plan their
    /// kernels whenever a session's input shape changes (over 100 ms per change for
    /// ResNet-50 with cuDNN 9), so on GPU each instance keeps one session per size.
    #[serde(default)]
    pub allowed_batch_sizes: Vec<usize>,
    /// When an idle instance holds a partial batch for more requests.
    #[serde(default)]
    pub hold: Hold,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Hold {
    /// Only while more requests are expected within the delay: the senders of a batch
    /// that just finished, or requests arriving back to back.
    #[default]
    Adaptive,
    /// Always until the delay (Triton's behaviour): every partial batch waits it out.
    Delay,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorOverride {
    pub name: String,
    pub dims: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Warmup {
    #[serde(default = "one")]
    pub batch_size: usize,
    /// Full shapes for inputs with variable dims other than the batch dimension.
    #[serde(default)]
    pub shapes: BTreeMap<String, Vec<usize>>,
}

fn yes() -> bool {
    true
}

fn one() -> usize {
    1
}
fn default_queue() -> usize {
    256
}

impl ModelYaml {
    /// Parses a model.yaml; errors carry `path:line:column`.
    pub fn parse(path: &Path, text: &str) -> Result<ModelYaml, String> {
        super::check_nesting(text).map_err(|(line, m)| format!("{}:{line}: {m}", path.display()))?;
        let cfg: ModelYaml =
            if text.trim().is_empty() { serde_yaml_ng::from_str("{}") } else { serde_yaml_ng::from_str(text) }
                .map_err(|e| yaml_error(path, &e))?;
        cfg.check().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(cfg)
    }

    /// The providers to try, in order (see `execution_providers`).
    pub fn providers(&self) -> Vec<ExecutionProvider> {
        let mut list = if self.execution_providers.is_empty() {
            vec![self.execution_provider]
        } else {
            self.execution_providers.clone()
        };
        if self.allow_fallback && !list.contains(&ExecutionProvider::Cpu) {
            list.push(ExecutionProvider::Cpu);
        }
        list
    }

    /// Whether the model asks for a GPU at all.
    pub fn wants_gpu(&self) -> bool {
        self.providers().iter().any(|p| p.is_gpu())
    }

    /// The GPUs instances go on (one entry, the CPU's, for CPU-only models).
    pub fn devices(&self) -> Vec<i32> {
        if self.device_ids.is_empty() {
            vec![self.device_id]
        } else {
            self.device_ids.clone()
        }
    }

    /// The checks of values against each other (also run again once a remote model's
    /// batch size is known).
    pub(crate) fn check(&self) -> Result<(), String> {
        match (&self.backend, &self.remote) {
            (BackendKind::Remote, None) => return Err("backend: remote needs a `remote:` section".into()),
            (BackendKind::Remote, Some(r)) => {
                if r.endpoints.is_empty() == r.dns.is_none() {
                    return Err("remote: give either `endpoints` or `dns`".into());
                }
                if r.endpoints.len() > MAX_ENDPOINTS {
                    return Err(format!("remote: at most {MAX_ENDPOINTS} endpoints"));
                }
                for e in r.endpoints.iter().chain(&r.dns) {
                    if e.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err()) {
                        return Err(format!("remote: '{e}' is not host:port"));
                    }
                }
                if r.health_interval_ms == 0 || r.resolve_interval_ms == 0 || r.timeout_ms == 0 {
                    return Err("remote: intervals and timeout_ms must be above 0".into());
                }
                if self.wants_gpu() {
                    return Err("backend: remote runs where its endpoints are: remove the execution providers".into());
                }
            }
            (_, Some(_)) => return Err("`remote:` is for backend: remote".into()),
            _ => {}
        }
        if self.backend == BackendKind::Tract && self.wants_gpu() {
            return Err("backend: tract runs on the CPU only; GPU execution providers are ONNX Runtime's".into());
        }
        if !self.execution_providers.is_empty() && self.execution_provider != ExecutionProvider::Cpu {
            return Err("give either execution_provider or execution_providers, not both".into());
        }
        let mut seen = Vec::new();
        for p in &self.execution_providers {
            if seen.contains(p) {
                return Err(format!("execution_providers names {} twice", p.as_str()));
            }
            if seen.contains(&ExecutionProvider::Cpu) {
                return Err(format!("execution_providers: {} after cpu would never be used", p.as_str()));
            }
            seen.push(*p);
        }
        if self.device_id < 0 {
            return Err(format!("device_id {} must not be negative", self.device_id));
        }
        if !self.device_ids.is_empty() && self.device_id != 0 {
            return Err("give either device_id or device_ids, not both".into());
        }
        if self.device_ids.iter().any(|&d| d < 0) {
            return Err(format!("device_ids {:?} must not be negative", self.device_ids));
        }
        for (name, p) in &self.tensorrt.profile {
            let ok = p.min.len() == p.opt.len()
                && p.opt.len() == p.max.len()
                && p.min.iter().zip(&p.opt).zip(&p.max).all(|((a, b), c)| a <= b && b <= c);
            if !ok {
                return Err(format!(
                    "tensorrt.profile.{name}: min, opt and max must have the same rank and min <= opt <= max in every dim"
                ));
            }
        }
        if self.instances == 0 {
            return Err("instances must be at least 1".into());
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let most = if self.wants_gpu() { INSTANCES_PER_GPU } else { INSTANCES_PER_CORE * cores };
        if self.instances > most {
            return Err(format!(
                "instances {} is more than this machine can run usefully: at most {most} ({})",
                self.instances,
                if self.wants_gpu() {
                    format!("{INSTANCES_PER_GPU} per GPU")
                } else {
                    format!("{INSTANCES_PER_CORE} per CPU core, {cores} cores")
                }
            ));
        }
        if self.max_queue_size == 0 || self.max_queue_size > MAX_QUEUE_SIZE {
            return Err(format!("max_queue_size {} must be between 1 and {MAX_QUEUE_SIZE}", self.max_queue_size));
        }
        if self.max_batch_size > MAX_BATCH_SIZE {
            return Err(format!("max_batch_size {} is over the limit of {MAX_BATCH_SIZE}", self.max_batch_size));
        }
        if self.intra_op_threads > MAX_THREADS {
            return Err(format!("intra_op_threads {} is over the limit of {MAX_THREADS}", self.intra_op_threads));
        }
        if self.max_dim == 0 {
            return Err("max_dim must be at least 1".into());
        }
        for &p in &self.dynamic_batching.preferred_batch_sizes {
            if p == 0 || p > self.max_batch_size.max(1) {
                return Err(format!(
                    "preferred batch size {p} must be between 1 and max_batch_size ({})",
                    self.max_batch_size
                ));
            }
        }
        let allowed = &self.dynamic_batching.allowed_batch_sizes;
        if !allowed.is_empty()
            && (allowed.iter().any(|&a| a == 0 || a > self.max_batch_size) || !allowed.contains(&self.max_batch_size))
        {
            return Err(format!(
                "allowed_batch_sizes {allowed:?} must lie in 1..=max_batch_size and include max_batch_size ({})",
                self.max_batch_size
            ));
        }
        match &self.version_policy {
            VersionPolicy::Latest(0) => return Err("version_policy: latest must be at least 1".into()),
            VersionPolicy::Specific(v) if v.is_empty() => {
                return Err("version_policy: specific needs at least one version".into())
            }
            _ => {}
        }
        for w in &self.warmup {
            if w.batch_size == 0 || w.batch_size > self.max_batch_size.max(1) {
                return Err(format!(
                    "warmup batch_size {} must be between 1 and max_batch_size ({})",
                    w.batch_size, self.max_batch_size
                ));
            }
        }
        Ok(())
    }
}

/// `path:line:column: message`, the location taken from the YAML parser.
pub fn yaml_error(path: &Path, e: &serde_yaml_ng::Error) -> String {
    match e.location() {
        Some(loc) => {
            // The parser appends its own "at line L column C"; the prefix says it already.
            let msg = e.to_string();
            let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            format!("{}:{}:{}: {msg}", path.display(), loc.line(), loc.column())
        }
        None => format!("{}: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelYaml, String> {
        ModelYaml::parse(Path::new("models/m/model.yaml"), text)
    }

    #[test]
    fn provider_lists_devices_and_gpu_options() {
        let m = parse("execution_provider: cuda\nallow_fallback: true\n").unwrap();
        assert_eq!(m.providers(), vec![ExecutionProvider::Cuda, ExecutionProvider::Cpu]);
        assert_eq!(parse("").unwrap().providers(), vec![ExecutionProvider::Cpu]);
        assert!(!parse("").unwrap().wants_gpu());
        let m = parse(
            "execution_providers: [tensorrt, cuda]\ndevice_ids: [0, 2]\ntensorrt:\n  fp16: true\n  \
             profile:\n    x: {min: [1, 3, 32, 32], opt: [4, 3, 64, 64], max: [8, 3, 128, 128]}\n    \
             y: {min: [1], opt: [2], max: [3]}\ncuda:\n  arena_extend_strategy: next_power_of_two\n",
        )
        .unwrap();
        assert_eq!(m.providers(), vec![ExecutionProvider::Tensorrt, ExecutionProvider::Cuda]);
        assert!(m.wants_gpu());
        assert_eq!(m.devices(), vec![0, 2]);
        assert_eq!(m.tensorrt.profile_string(|p| &p.opt), "x:4x3x64x64,y:2");
        assert_eq!(m.cuda.arena_extend_strategy, Some(ArenaExtend::NextPowerOfTwo));
        assert_eq!(parse("device_id: 3\n").unwrap().devices(), vec![3]);

        for (bad, says) in [
            ("execution_provider: cuda\nexecution_providers: [cuda]\n", "not both"),
            ("execution_providers: [cuda, cuda]\n", "twice"),
            ("execution_providers: [cpu, cuda]\n", "after cpu"),
            ("device_id: -1\n", "negative"),
            ("device_id: 1\ndevice_ids: [0]\n", "not both"),
            ("tensorrt:\n  profile:\n    x: {min: [2], opt: [1], max: [3]}\n", "min <= opt <= max"),
            ("tensorrt:\n  fp32: true\n", "unknown field `fp32`"),
            ("execution_providers: [rocm]\n", "unknown variant `rocm`"),
            ("instances: 100000\n", "at most"),
            ("execution_provider: cuda\ninstances: 17\n", "16 per GPU"),
            ("max_batch_size: 2000000000\n", "over the limit of 4096"),
            ("warmup:\n  - batch_size: 2000000000\n", "between 1 and max_batch_size (0)"),
            ("max_queue_size: 4000000000\n", "between 1 and"),
            ("intra_op_threads: 100000\n", "over the limit"),
            ("max_dim: 0\n", "at least 1"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says) && e.starts_with("models/m/model.yaml"), "{bad}: {e}");
        }
    }

    #[test]
    fn defaults() {
        let m = parse("").unwrap();
        assert_eq!(m.instances, 1);
        assert_eq!(m.max_batch_size, 0);
        assert_eq!(m.execution_provider, ExecutionProvider::Cpu);
        assert_eq!(m.max_queue_size, 256);
    }

    #[test]
    fn full_file() {
        let m = parse(
            "max_batch_size: 8\ninstances: 2\nexecution_provider: cuda\nallow_fallback: true\n\
             dynamic_batching:\n  max_queue_delay_us: 500\n  preferred_batch_sizes: [4, 8]\n\
             warmup:\n  - batch_size: 8\n",
        )
        .unwrap();
        assert_eq!(m.dynamic_batching.preferred_batch_sizes, vec![4, 8]);
        assert_eq!(m.execution_provider, ExecutionProvider::Cuda);
        assert_eq!(m.warmup[0].batch_size, 8);
    }

    #[test]
    fn tract_runs_on_cpu_only() {
        let m = parse("backend: tract\nmax_batch_size: 12\n").unwrap();
        assert_eq!((m.backend.as_str(), m.backend.platform()), ("tract", "tract_onnx"));
        let err = parse("backend: tract\nexecution_providers: [cuda, cpu]\n").unwrap_err();
        assert!(err.contains("tract runs on the CPU only"), "{err}");
        let err = parse("backend: tensorflow\n").unwrap_err();
        assert!(err.starts_with("models/m/model.yaml:1:10: backend: unknown variant `tensorflow`"), "{err}");
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let err = parse("max_batch_size: 8\nmax_batch: 4\n").unwrap_err();
        assert!(err.starts_with("models/m/model.yaml:2:1: unknown field `max_batch`"), "{err}");
    }

    #[test]
    fn bad_value_names_line() {
        let err = parse("instances: two\n").unwrap_err();
        assert!(err.starts_with("models/m/model.yaml:1:12: instances: invalid type"), "{err}");
    }

    #[test]
    fn allowed_sizes_must_cover_max_batch_size() {
        let err = parse("max_batch_size: 8\ndynamic_batching:\n  allowed_batch_sizes: [1, 4]\n").unwrap_err();
        assert!(err.contains("must lie in 1..=max_batch_size and include max_batch_size (8)"), "{err}");
        parse("max_batch_size: 8\ndynamic_batching:\n  allowed_batch_sizes: [1, 4, 8]\n").unwrap();
    }

    #[test]
    fn version_policies() {
        assert_eq!(parse("").unwrap().version_policy, VersionPolicy::Latest(1));
        let latest = parse("version_policy: {latest: 2}\n").unwrap().version_policy;
        assert_eq!(latest.select(&[1, 2, 5]), (vec![2, 5], vec![]));
        let all = parse("version_policy: all\n").unwrap().version_policy;
        assert_eq!(all.select(&[1, 2]), (vec![1, 2], vec![]));
        let specific = parse("version_policy:\n  specific: [3, 1]\n").unwrap().version_policy;
        assert_eq!(specific.select(&[1, 2]), (vec![1], vec![3]));
        assert!(parse("version_policy: {latest: 0}\n").unwrap_err().contains("at least 1"));
        let err = parse("version_policy: newest\n").unwrap_err();
        assert!(err.starts_with("models/m/model.yaml:1:"), "{err}");
    }

    #[test]
    fn preferred_size_above_max_is_rejected() {
        let err = parse("max_batch_size: 4\ndynamic_batching:\n  preferred_batch_sizes: [8]\n").unwrap_err();
        assert!(err.contains("preferred batch size 8"), "{err}");
    }
}
