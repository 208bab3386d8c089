//! ONNX Runtime through the `ort` crate, loaded at run time (`load-dynamic`): the binary
//! builds and runs without the native library; models that need it fail to load with a
//! clear message when it is missing.

use super::{normalize_bools, Backend, BackendError, BatchInput};
use crate::onnx::signature::TensorInfo;
use crate::repository::model_yaml::{ArenaExtend, ConvSearch, ExecutionProvider, ModelYaml};
use crate::rt::priority;
use ort::environment::Environment;
use ort::ep::ExecutionProvider as _;
use ort::memory::Allocator;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{RunOptions, Session, SessionInputValue};
use ort::value::{DynTensor, DynValue, TensorElementType};
use sluice_ops::{DataType, Tensor};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// ONNX Runtime allows one environment per process; the first library path wins.
static RUNTIME: OnceLock<Result<(PathBuf, Environment), String>> = OnceLock::new();

/// Loads `libonnxruntime` from `dylib` once per process. Later calls return the first outcome.
pub fn init(dylib: &Path) -> Result<(), String> {
    environment(dylib).map(|_| ())
}

fn environment(dylib: &Path) -> Result<&'static Environment, String> {
    let rt = RUNTIME.get_or_init(|| {
        if !dylib.exists() {
            return Err(format!(
                "ONNX Runtime library not found at {} (set ORT_DYLIB_PATH or --ort-dylib, or run scripts/setup.sh)",
                dylib.display()
            ));
        }
        let env = ort::init_from(dylib)
            .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", dylib.display()))?
            .with_name("sluice")
            .build()
            .map_err(|e| format!("cannot start ONNX Runtime from {}: {e}", dylib.display()))?;
        Ok((dylib.to_path_buf(), env))
    });
    match rt {
        Ok((_, env)) => Ok(env),
        Err(e) => Err(e.clone()),
    }
}

/// Lists folders of GPU runtime libraries (one per line), beside the ONNX Runtime library.
/// `scripts/setup.sh` writes it on GPU hosts for the CUDA, cuDNN and TensorRT wheels.
pub const PRELOAD_FILE: &str = "sluice-preload-dirs";

/// Library name prefixes ONNX Runtime's CUDA and TensorRT providers link or open by name.
const GPU_LIBRARIES: &[&str] = &[
    "libcudart.so",
    "libcublasLt.so",
    "libcublas.so",
    "libcufft.so",
    "libcurand.so",
    "libnvrtc.so",
    "libnvJitLink.so",
    "libcudnn",
    "libnvinfer.so",
    "libnvinfer_plugin.so",
    "libnvonnxparser.so",
];

/// Loads the CUDA, cuDNN and TensorRT libraries from the folders named in
/// [`PRELOAD_FILE`] (or `SLUICE_GPU_LIB_DIRS`, colon-separated) globally, before ONNX
/// Runtime: its providers then find them already loaded, by soname, without the user
/// setting LD_LIBRARY_PATH (which a running process cannot change for its own loader).
/// Returns how many were loaded.
pub fn preload_gpu_libraries(dylib: &Path) -> usize {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("SLUICE_GPU_LIB_DIRS").map(|v| std::env::split_paths(&v).collect()).unwrap_or_default();
    if let Some(list) = dylib.parent().and_then(|d| std::fs::read_to_string(d.join(PRELOAD_FILE)).ok()) {
        dirs.extend(list.lines().map(str::trim).filter(|l| !l.is_empty()).map(PathBuf::from));
    }
    // Folders in the order given (the environment's first), files sorted within each;
    // a library name found in two folders is loaded from the first only.
    let mut pending: Vec<PathBuf> = Vec::new();
    let mut names = std::collections::HashSet::new();
    for d in &dirs {
        let Ok(entries) = std::fs::read_dir(d) else { continue };
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                name.contains(".so") && GPU_LIBRARIES.iter().any(|g| name.starts_with(g))
            })
            .collect();
        files.sort();
        pending.extend(files.into_iter().filter(|p| names.insert(p.file_name().map(|n| n.to_owned()))));
    }
    // Dependencies first without a table of them: retry what failed until nothing more loads.
    let mut loaded = 0;
    loop {
        let before = pending.len();
        pending.retain(|p| !dlopen_global(p));
        loaded += before - pending.len();
        if pending.len() == before || pending.is_empty() {
            break;
        }
    }
    if loaded > 0 || !pending.is_empty() {
        tracing::info!(loaded, failed = pending.len(), "preloaded GPU runtime libraries from {dirs:?}");
    }
    for p in &pending {
        tracing::debug!("cannot preload {}: {}", p.display(), dlerror_of(p));
    }
    loaded
}

#[cfg(unix)]
fn dlopen_global(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: a NUL-terminated path; the handle is kept for the life of the process on
    // purpose (the libraries must stay loaded for ONNX Runtime).
    !unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) }.is_null()
}

#[cfg(not(unix))]
fn dlopen_global(_path: &Path) -> bool {
    false
}

/// Why `path` does not load (tried once more, for the message).
#[cfg(unix)]
fn dlerror_of(path: &Path) -> String {
    if dlopen_global(path) {
        return "loaded on a later try".into();
    }
    // SAFETY: dlerror returns a thread-local C string or null.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        return "unknown error".into();
    }
    // SAFETY: non-null, NUL-terminated, valid until the next dl* call on this thread.
    unsafe { std::ffi::CStr::from_ptr(e) }.to_string_lossy().into_owned()
}

#[cfg(not(unix))]
fn dlerror_of(_path: &Path) -> String {
    "not supported on this platform".into()
}

/// Input buffers kept per input for the most recent batch shapes (at least one per
/// allowed batch size), so a batch is copied once, straight from the requests into memory
/// ONNX Runtime reads, without allocating (and page-faulting) a new buffer each time.
const STAGED_SHAPES: usize = 4;
/// Bytes of staged buffers kept per input beyond the one in use: a model whose inputs
/// vary in size (OCR's detector) must not keep four of its largest shapes for life.
const STAGED_MAX_BYTES: usize = 64 << 20;

pub struct OrtBackend {
    /// One session, or one per allowed batch size (`Some(size)`) on GPU providers.
    sessions: Vec<(Option<usize>, Session)>,
    /// Per input: (dtype, shape, buffer), most recently used first.
    staged: Vec<Vec<(DataType, Vec<usize>, DynTensor)>>,
    /// How many shapes `staged` keeps per input.
    staged_shapes: usize,
    input_names: Vec<String>,
    output_names: Vec<String>,
    device: String,
    /// For models whose inputs vary beyond the batch size: each run gives the memory
    /// arena's unused blocks back, so memory follows the current shapes rather than
    /// the largest ever seen.
    run_options: Option<RunOptions>,
}

fn ort_err(context: &str) -> impl Fn(ort::Error<ort::session::builder::SessionBuilder>) -> String + '_ {
    move |e| format!("{context}: {e}")
}

/// Creates ONNX Runtime's intra-op threads through [`priority::spawn`].
struct PoolThreads;

impl ort::environment::ThreadManager for PoolThreads {
    type Thread = std::thread::JoinHandle<()>;

    fn create(&self, work: impl FnOnce() + Send + 'static) -> ort::Result<Self::Thread> {
        // ONNX Runtime's own pool threads get the platform's default (8 MiB) stack.
        let builder = std::thread::Builder::new().name("ort-intra-op".into()).stack_size(8 << 20);
        priority::spawn(builder, work).map_err(|e| ort::Error::new(e.to_string()))
    }

    fn join(thread: Self::Thread) -> ort::Result<()> {
        thread.join().map_err(|_| ort::Error::new("an ONNX Runtime pool thread panicked"))
    }
}

/// The model a session is created from: the file, and its bytes after `fold_graph`'s
/// rewrites when any applied. Prepared once per load and shared by its instances.
pub struct ModelSource {
    pub file: PathBuf,
    pub folded: Option<Vec<u8>>,
}

impl ModelSource {
    pub fn prepare(dylib: &Path, file: &Path, cfg: &ModelYaml) -> Result<ModelSource, String> {
        let mut source = ModelSource { file: file.to_path_buf(), folded: None };
        if !cfg.fold_graph {
            return Ok(source);
        }
        let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
        // A malformed file must not take the loading thread down: a panic in the rewrite
        // leaves the model to ONNX Runtime, as it is.
        let folded = std::panic::catch_unwind(|| crate::onnx::fold::fold(&bytes))
            .unwrap_or_else(|_| Err("the graph rewrite panicked".into()));
        match folded {
            // Checked once here on the CPU provider (no optimisation: only that ONNX
            // Runtime accepts the graph), so a rejected rewrite falls back to the file
            // before any session, and is never mistaken for a GPU provider's failure.
            Ok(Some((folded, what))) => match accepts(dylib, &folded) {
                Ok(()) => {
                    tracing::info!(model = %file.display(), "folded {what}");
                    source.folded = Some(folded);
                }
                Err(e) => tracing::warn!(
                    model = %file.display(),
                    "ONNX Runtime rejects the folded graph ({e}); loading the file as it is (fold_graph: false skips the rewrite)"
                ),
            },
            Ok(None) => {}
            // ONNX Runtime gets the file as it is and reports what is wrong with it.
            Err(e) => tracing::warn!(model = %file.display(), "graph not folded: {e}"),
        }
        Ok(source)
    }
}

fn accepts(dylib: &Path, model: &[u8]) -> Result<(), String> {
    // Without ONNX Runtime the load fails anyway, with that message: nothing to check.
    let Ok(env) = environment(dylib) else { return Ok(()) };
    Session::builder(env)
        .map_err(|e| e.to_string())?
        .with_optimization_level(GraphOptimizationLevel::Disable)
        .map_err(|e| e.to_string())?
        .with_intra_threads(1)
        .map_err(|e| e.to_string())?
        .commit_from_memory(model)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Creates one model instance on `device` (a GPU id, used by GPU providers) with the
/// providers the model.yaml asks for.
pub fn load(
    dylib: &Path,
    source: &ModelSource,
    cfg: &ModelYaml,
    device: i32,
    inputs: &[TensorInfo],
    outputs: &[TensorInfo],
) -> Result<OrtBackend, String> {
    let model_file = source.file.as_path();
    if let Some(t) = inputs.iter().chain(outputs).find(|t| t.dtype == DataType::Bytes) {
        return Err(format!(
            "{}: '{}' is a string tensor, which the ONNX Runtime backend does not support",
            model_file.display(),
            t.name
        ));
    }
    let (first, placed) = session(dylib, source, cfg, device, shrink_arena(cfg, inputs))?;
    // GPU providers re-plan their kernels whenever a session's input shape changes (see
    // allowed_batch_sizes): give each allowed batch size a session of its own, so every
    // session only ever sees one shape. On CPU one session serves all sizes.
    let allowed = &cfg.dynamic_batching.allowed_batch_sizes;
    let sessions = if placed != "cpu" && !allowed.is_empty() {
        let mut sessions = vec![(Some(allowed[0]), first)];
        for &size in &allowed[1..] {
            sessions.push((Some(size), session(dylib, source, cfg, device, false)?.0));
        }
        sessions
    } else {
        vec![(None, first)]
    };
    Ok(OrtBackend {
        sessions,
        staged: inputs.iter().map(|_| Vec::new()).collect(),
        staged_shapes: STAGED_SHAPES.max(allowed.len()),
        input_names: inputs.iter().map(|t| t.name.clone()).collect(),
        output_names: outputs.iter().map(|t| t.name.clone()).collect(),
        device: placed,
        run_options: if shrink_arena(cfg, inputs) {
            let mut o = RunOptions::new().map_err(|e| format!("run options: {e}"))?;
            o.set("memory.enable_memory_arena_shrinkage", "cpu:0").map_err(|e| format!("run options: {e}"))?;
            Some(o)
        } else {
            None
        },
    })
}

/// Session options from the model.yaml, no providers yet.
fn builder(env: &Environment, cfg: &ModelYaml) -> Result<ort::session::builder::SessionBuilder, String> {
    Session::builder(env)
        .map_err(|e| format!("cannot create session options: {e}"))?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(ort_err("optimization level"))?
        .with_intra_threads(cfg.intra_op_threads)
        .map_err(ort_err("intra-op threads"))?
        .with_intra_op_spinning(cfg.intra_op_spinning)
        .map_err(ort_err("intra-op spinning"))?
        .with_inter_op_spinning(false)
        .map_err(ort_err("inter-op spinning"))?
        // The intra-op pool's threads serve requests: start them at normal priority even
        // when the session is created by a background reload (see rt::priority).
        .with_thread_manager(PoolThreads)
        .map_err(ort_err("thread manager"))
}

/// One ONNX Runtime session with the model.yaml's options and providers; returns it with
/// where it runs ("tensorrt:0+cuda:0", "cuda:1", "cpu").
///
/// Every provider that starts is registered, in the model.yaml's order; ONNX Runtime gives
/// each node to the first that supports it. A provider can fail twice: when registered
/// (its library or the CUDA runtime missing) or when the session is created (no visible
/// GPU, a driver too old, out of memory, a TensorRT build that fails). Either way the
/// session is tried again without it, as long as another provider in the list (or `cpu`)
/// remains; the CPU provider is always there underneath, so listing `cpu` only says that
/// running on it alone is acceptable.
fn session(
    dylib: &Path,
    source: &ModelSource,
    cfg: &ModelYaml,
    device: i32,
    variable: bool,
) -> Result<(Session, String), String> {
    let model_file = source.file.as_path();
    let env = environment(dylib)?;
    let wanted = cfg.providers();
    // The GPU runtime's libraries are mapped only once a model asks for a GPU provider,
    // before ONNX Runtime loads the provider's library (which links them).
    static GPU_LIBRARIES_LOADED: OnceLock<usize> = OnceLock::new();
    if wanted.iter().any(|p| p.is_gpu()) {
        GPU_LIBRARIES_LOADED.get_or_init(|| preload_gpu_libraries(dylib));
    }
    let cpu_listed = wanted.contains(&ExecutionProvider::Cpu);
    let hint = "list cpu in execution_providers, or set allow_fallback: true, to run on CPU instead";
    let mut skip: Vec<ExecutionProvider> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    loop {
        let mut builder = builder(env, cfg)?;
        if variable {
            // Memory patterns are planned per input shape and kept: no use when shapes vary.
            builder = builder.with_memory_pattern(false).map_err(ort_err("memory pattern"))?;
        }
        let mut gpus = Vec::new();
        let left: Vec<ExecutionProvider> = wanted.iter().copied().filter(|p| !skip.contains(p)).collect();
        for p in left {
            if !p.is_gpu() {
                break;
            }
            match register_provider(&mut builder, cfg, p, device, model_file) {
                Ok(()) => gpus.push(p),
                Err(e) => {
                    failures.push(e);
                    skip.push(p);
                }
            }
        }
        if gpus.is_empty() && !cpu_listed {
            return Err(format!("{} ({hint})", failures.join("; ")));
        }
        let committed = match &source.folded {
            Some(bytes) => builder.commit_from_memory(bytes),
            None => builder.commit_from_file(model_file),
        };
        match committed {
            Ok(session) => {
                let placed: Vec<String> = gpus.iter().map(|p| format!("{}:{device}", p.as_str())).collect();
                let placed = if placed.is_empty() { "cpu".to_string() } else { placed.join("+") };
                if !failures.is_empty() {
                    tracing::warn!(model = %model_file.display(), "{}; running on {placed}", failures.join("; "));
                }
                return Ok((session, placed));
            }
            // Blame the first GPU provider and try without it.
            Err(e) if !gpus.is_empty() => {
                failures.push(format!(
                    "execution provider '{}' could not create the session on device {device}: {e}",
                    gpus[0].as_str()
                ));
                skip.push(gpus[0]);
            }
            Err(e) => {
                let mut msg = format!("ONNX Runtime cannot load {}: {e}", model_file.display());
                if !failures.is_empty() {
                    msg = format!("{}; {msg}", failures.join("; "));
                }
                return Err(msg);
            }
        }
    }
}

/// Whether a model's inputs vary in more than the batch size (image sides, sequence
/// lengths): ONNX Runtime's arena then grows to the largest shape it has seen and keeps it,
/// unless told to shrink after each run. `shrink_arena` in model.yaml decides; by default
/// it follows the inputs.
fn shrink_arena(cfg: &ModelYaml, inputs: &[TensorInfo]) -> bool {
    let skip = usize::from(cfg.max_batch_size > 0);
    cfg.shrink_arena.unwrap_or_else(|| inputs.iter().any(|t| t.dims.iter().skip(skip).any(|&d| d < 0)))
}

/// FNV-1a, 64 bits: a stable content key (std's hasher may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

fn register_provider(
    builder: &mut ort::session::builder::SessionBuilder,
    cfg: &ModelYaml,
    provider: ExecutionProvider,
    id: i32,
    model_file: &Path,
) -> Result<(), String> {
    let (available, dispatch, wheel) = match provider {
        ExecutionProvider::Cpu => return Ok(()),
        ExecutionProvider::Cuda => {
            let search = match cfg.cudnn_conv_algo_search {
                ConvSearch::Heuristic => ort::ep::cuda::ConvAlgorithmSearch::Heuristic,
                ConvSearch::Exhaustive => ort::ep::cuda::ConvAlgorithmSearch::Exhaustive,
                ConvSearch::Default => ort::ep::cuda::ConvAlgorithmSearch::Default,
            };
            let mut cuda = ort::ep::CUDA::default().with_device_id(id).with_conv_algorithm_search(search);
            if let Some(mb) = cfg.cuda.memory_limit_mb {
                cuda = cuda.with_memory_limit(mb << 20);
            }
            if let Some(a) = cfg.cuda.arena_extend_strategy {
                cuda = cuda.with_arena_extend_strategy(match a {
                    ArenaExtend::NextPowerOfTwo => ort::ep::ArenaExtendStrategy::NextPowerOfTwo,
                    ArenaExtend::SameAsRequested => ort::ep::ArenaExtendStrategy::SameAsRequested,
                });
            }
            if let Some(on) = cfg.cuda.tf32 {
                cuda = cuda.with_tf32(on);
            }
            (ort::ep::CUDA::is_available(), cuda.build(), "onnxruntime-gpu")
        }
        ExecutionProvider::Tensorrt => {
            let t = &cfg.tensorrt;
            let mut trt = ort::ep::TensorRT::default().with_device_id(id).with_fp16(t.fp16);
            if let Some(dir) = &t.engine_cache {
                // ONNX Runtime's cache key hashes the file name and the graph's names, not
                // the weights: every version is a `model.onnx`, so one folder per file, told
                // apart as the repository's reload does (size and modification time) rather
                // than by reading the whole file again for every session.
                let base = model_file.parent().map(|m| m.join(dir)).unwrap_or_else(|| dir.clone());
                let meta = std::fs::metadata(model_file).map_err(|e| format!("{}: {e}", model_file.display()))?;
                let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
                // fold_graph (and its version) change the graph the engine is built from.
                let fold = if cfg.fold_graph { crate::onnx::fold::VERSION } else { 0 };
                let key = [
                    meta.len().to_le_bytes(),
                    mtime.map_or(0, |d| d.as_nanos() as u64).to_le_bytes(),
                    fold.to_le_bytes(),
                ]
                .concat();
                let dir = base.join(format!("{:016x}", fnv1a(&key)));
                std::fs::create_dir_all(&dir).map_err(|e| format!("TensorRT engine cache {}: {e}", dir.display()))?;
                trt = trt.with_engine_cache(true).with_engine_cache_path(dir.display()).with_timing_cache(true);
            }
            if let Some(mb) = t.workspace_mb {
                trt = trt.with_max_workspace_size(mb << 20);
            }
            if !t.profile.is_empty() {
                trt = trt
                    .with_profile_min_shapes(t.profile_string(|p| &p.min))
                    .with_profile_opt_shapes(t.profile_string(|p| &p.opt))
                    .with_profile_max_shapes(t.profile_string(|p| &p.max));
            }
            (ort::ep::TensorRT::is_available(), trt.build(), "onnxruntime-gpu with TensorRT libraries")
        }
    };
    let name = provider.as_str();
    match available {
        Ok(true) => {}
        Ok(false) => {
            return Err(format!(
                "execution provider '{name}' is not available in this ONNX Runtime build (needs {wheel})"
            ))
        }
        Err(e) => return Err(format!("cannot query execution providers: {e}")),
    }
    dispatch
        .error_on_failure()
        .register(builder)
        .map_err(|e| format!("execution provider '{name}' failed to start on device {id}: {e}"))
}

fn to_ort_type(d: DataType) -> Result<TensorElementType, BackendError> {
    Ok(match d {
        DataType::Bool => TensorElementType::Bool,
        DataType::U8 => TensorElementType::Uint8,
        DataType::U16 => TensorElementType::Uint16,
        DataType::U32 => TensorElementType::Uint32,
        DataType::U64 => TensorElementType::Uint64,
        DataType::I8 => TensorElementType::Int8,
        DataType::I16 => TensorElementType::Int16,
        DataType::I32 => TensorElementType::Int32,
        DataType::I64 => TensorElementType::Int64,
        DataType::F16 => TensorElementType::Float16,
        DataType::BF16 => TensorElementType::Bfloat16,
        DataType::F32 => TensorElementType::Float32,
        DataType::F64 => TensorElementType::Float64,
        DataType::Bytes => {
            return Err(BackendError("string tensors are not supported by the ONNX Runtime backend".into()))
        }
    })
}

fn to_input(t: &Tensor) -> Result<DynTensor, BackendError> {
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    let mut v = DynTensor::new(&Allocator::default(), to_ort_type(t.dtype)?, shape)
        .map_err(|e| BackendError(format!("cannot allocate input tensor: {e}")))?;
    if !t.data.is_empty() {
        // SAFETY: the tensor was allocated on the CPU for exactly this dtype and shape, and
        // `t.data` was validated to hold exactly that many bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(t.data.as_ptr(), v.data_ptr_mut().cast::<u8>(), t.data.len());
            if t.dtype == DataType::Bool {
                normalize_bools(std::slice::from_raw_parts_mut(v.data_ptr_mut().cast::<u8>(), t.data.len()));
            }
        }
    }
    Ok(v)
}

fn from_output(name: &str, v: &DynValue) -> Result<Tensor, BackendError> {
    macro_rules! extract {
        ($t:ty, $dt:expr) => {{
            let (shape, data) =
                v.try_extract_tensor::<$t>().map_err(|e| BackendError(format!("output '{name}': {e}")))?;
            let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            // SAFETY: a slice of plain numbers viewed as its bytes.
            let bytes = unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) };
            Tensor { dtype: $dt, shape, data: bytes::Bytes::copy_from_slice(bytes) }
        }};
    }
    let ty = match v.dtype() {
        ort::value::ValueType::Tensor { ty, .. } => *ty,
        other => return Err(BackendError(format!("output '{name}' is not a tensor: {other:?}"))),
    };
    Ok(match ty {
        TensorElementType::Float32 => extract!(f32, DataType::F32),
        TensorElementType::Float64 => extract!(f64, DataType::F64),
        TensorElementType::Float16 => extract!(half::f16, DataType::F16),
        TensorElementType::Bfloat16 => extract!(half::bf16, DataType::BF16),
        TensorElementType::Int8 => extract!(i8, DataType::I8),
        TensorElementType::Int16 => extract!(i16, DataType::I16),
        TensorElementType::Int32 => extract!(i32, DataType::I32),
        TensorElementType::Int64 => extract!(i64, DataType::I64),
        TensorElementType::Uint8 => extract!(u8, DataType::U8),
        TensorElementType::Uint16 => extract!(u16, DataType::U16),
        TensorElementType::Uint32 => extract!(u32, DataType::U32),
        TensorElementType::Uint64 => extract!(u64, DataType::U64),
        TensorElementType::Bool => extract!(bool, DataType::Bool),
        other => return Err(BackendError(format!("output '{name}' has unsupported type {other:?}"))),
    })
}

/// Copies `input`'s parts, then zeros for its padding, into `dst` (exactly its size).
fn fill(dst: &mut [u8], input: &BatchInput<'_>) {
    let mut at = 0;
    for p in &input.parts {
        dst[at..at + p.data.len()].copy_from_slice(&p.data);
        at += p.data.len();
    }
    if input.parts[0].dtype == DataType::Bool {
        normalize_bools(&mut dst[..at]);
    }
    dst[at..].fill(0);
}

impl OrtBackend {
    /// The index of the session for a batch of `rows` (one per allowed size on GPU
    /// providers), or of the only one.
    fn session_for(&self, rows: Option<usize>) -> usize {
        self.sessions.iter().position(|(size, _)| size.is_some() && *size == rows).unwrap_or(0)
    }

    /// The staging buffer of input `i` for `shape`, moved to the front of its list.
    fn staging(&mut self, i: usize, dtype: DataType, shape: &[usize]) -> Result<&mut DynTensor, BackendError> {
        let list = &mut self.staged[i];
        match list.iter().position(|(d, s, _)| *d == dtype && s == shape) {
            Some(k) => list[..=k].rotate_right(1),
            None => {
                let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
                let t = DynTensor::new(&Allocator::default(), to_ort_type(dtype)?, dims)
                    .map_err(|e| BackendError(format!("cannot allocate input tensor: {e}")))?;
                list.insert(0, (dtype, shape.to_vec(), t));
                list.truncate(self.staged_shapes);
                let bytes = |(d, s, _): &(DataType, Vec<usize>, DynTensor)| {
                    sluice_ops::tensor::element_count(s) * d.size().unwrap_or(0)
                };
                while list.len() > 1 && list[1..].iter().map(bytes).sum::<usize>() > STAGED_MAX_BYTES {
                    list.pop();
                }
            }
        }
        Ok(&mut list[0].2)
    }
}

/// The named outputs, copied out of ONNX Runtime's buffers, in the model's order.
fn collect_outputs(names: &[String], outputs: &ort::session::SessionOutputs<'_>) -> Result<Vec<Tensor>, BackendError> {
    names
        .iter()
        .map(|n| {
            let v = outputs
                .get(n.as_str())
                .ok_or_else(|| BackendError(format!("ONNX Runtime returned no output '{n}'")))?;
            from_output(n, v)
        })
        .collect()
}

impl Backend for OrtBackend {
    fn run_batch(&mut self, inputs: &[BatchInput<'_>], staged: &mut dyn FnMut()) -> Result<Vec<Tensor>, BackendError> {
        if inputs.len() != self.input_names.len() {
            return Err(BackendError(format!("{} inputs for a model of {}", inputs.len(), self.input_names.len())));
        }
        for (i, input) in inputs.iter().enumerate() {
            let shape = input.shape();
            let dtype = input.parts[0].dtype;
            let expected = sluice_ops::tensor::element_count(&shape) * dtype.size().unwrap_or(0);
            let t = self.staging(i, dtype, &shape)?;
            if expected > 0 {
                // SAFETY: the tensor was allocated on the CPU for exactly this dtype and
                // shape (`expected` bytes), and is not aliased while `dst` lives.
                let dst = unsafe { std::slice::from_raw_parts_mut(t.data_ptr_mut().cast::<u8>(), expected) };
                fill(dst, input);
            }
        }
        staged();
        let i = self.session_for(inputs.first().and_then(|b| b.shape().first().copied()));
        let views: Vec<_> = self
            .input_names
            .iter()
            .zip(&self.staged)
            .map(|(n, list)| (Cow::Borrowed(n.as_str()), SessionInputValue::from(list[0].2.view())))
            .collect();
        let session = &mut self.sessions[i].1;
        let outputs = match &self.run_options {
            Some(o) => session.run_with_options(views, o),
            None => session.run(views),
        }
        .map_err(|e| BackendError(e.to_string()))?;
        collect_outputs(&self.output_names, &outputs)
    }

    fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, BackendError> {
        let values = self
            .input_names
            .iter()
            .zip(inputs)
            .map(|(n, t)| Ok((Cow::Borrowed(n.as_str()), SessionInputValue::from(to_input(t)?))))
            .collect::<Result<Vec<_>, BackendError>>()?;
        let i = self.session_for(inputs.first().and_then(|t| t.shape.first().copied()));
        let session = &mut self.sessions[i].1;
        let outputs = match &self.run_options {
            Some(o) => session.run_with_options(values, o),
            None => session.run(values),
        }
        .map_err(|e| BackendError(e.to_string()))?;
        collect_outputs(&self.output_names, &outputs)
    }

    fn device(&self) -> String {
        self.device.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_batches_join_parts_zero_the_padding_and_normalise_bools() {
        let a = Tensor::new(DataType::Bool, vec![2], vec![0u8, 7].into()).unwrap();
        let b = Tensor::new(DataType::Bool, vec![1], vec![255u8].into()).unwrap();
        let mut dst = vec![9u8; 5];
        fill(&mut dst, &BatchInput { parts: vec![&a, &b], pad: 2 });
        assert_eq!(dst, vec![0, 1, 1, 0, 0]);
        let f = Tensor::from_f32(vec![1], &[2.5]);
        let mut dst = vec![9u8; 8];
        fill(&mut dst, &BatchInput { parts: vec![&f], pad: 1 });
        assert_eq!(dst, [2.5f32.to_le_bytes(), [0; 4]].concat());
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn preloads_only_gpu_libraries_from_the_listed_folders() {
        let libs = tempfile::tempdir().unwrap();
        let ort = tempfile::tempdir().unwrap();
        // A real shared library standing in for a CUDA one, and files to be left alone.
        let zlib = ["/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib/libz.so.1", "/lib64/libz.so.1"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists());
        let Some(zlib) = zlib else { return };
        std::os::unix::fs::symlink(zlib, libs.path().join("libcudart.so.99")).unwrap();
        std::os::unix::fs::symlink(zlib, libs.path().join("libsomething.so.1")).unwrap();
        std::fs::write(libs.path().join("libcublas.so.99"), "not an ELF file").unwrap();
        std::fs::write(ort.path().join(PRELOAD_FILE), format!("{}\n\n/nowhere\n", libs.path().display())).unwrap();
        assert_eq!(preload_gpu_libraries(&ort.path().join("libonnxruntime.so")), 1);
        // Nothing listed: nothing loaded.
        assert_eq!(preload_gpu_libraries(&libs.path().join("libonnxruntime.so")), 0);
    }
}
