//! Hot reload: building the next snapshot of the repository next to the one serving.
//! (The thread that watches the folders and triggers reloads is `housekeeping`.)
//!
//! A reload reads the repository, loads and warms up only the model versions whose files
//! changed (the others, with their batchers, carry over as they are), compiles the
//! pipelines whose file or models changed, and swaps the new snapshot in at once.
//! Whatever fails keeps its previous version serving and is reported with its reason.

use super::{Engine, Failure, ModelEntry, ModelSlot, PipelineSlot, Retired, Snapshot};
use crate::error::{panic_message, Error};
use crate::model::{LoadError, LoadedModel};
use crate::pipeline::{self, compile::Located, exec::Pipeline, Catalog, ModelSig};
use crate::repository::{self, ModelDir};
use sluice_ops::OpRegistry;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a reload looks at.
#[derive(Debug, Clone)]
pub enum Scope {
    /// The whole repository; only what changed on disk is loaded again.
    All,
    /// Only these models and pipelines (and the pipelines that use a model among them),
    /// loaded again even if their files did not change: the explicit load API.
    Only(BTreeSet<String>),
}

impl Scope {
    fn covers(&self, name: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Only(names) => names.contains(name),
        }
    }
    fn forces(&self, name: &str) -> bool {
        matches!(self, Scope::Only(names) if names.contains(name))
    }
}

/// Why a reload changed nothing at all (what fails inside it is in its report).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Repository(String),
    #[error("{0}")]
    Pipelines(String),
    #[error("cannot start a thread: {0}")]
    Thread(String),
}

/// What a reload is about: a model (one version of it) or a pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub kind: Kind,
    pub name: String,
    pub version: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Model,
    Pipeline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Loaded,
    Reloaded,
    Removed,
    Unloaded,
}

/// One thing a reload changed: "model m v2 loaded", "pipeline p removed".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub subject: Subject,
    pub verb: Verb,
}

/// One thing that failed in a reload (what serves stays as it was).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    pub subject: Subject,
    pub reason: String,
}

impl Subject {
    fn model(name: &str, version: Option<u64>) -> Subject {
        Subject { kind: Kind::Model, name: name.to_string(), version }
    }
    fn pipeline(name: &str) -> Subject {
        Subject { kind: Kind::Pipeline, name: name.to_string(), version: None }
    }
    /// The name, with the version when there is one: "m v2".
    pub fn label(&self) -> String {
        match self.version {
            Some(v) => format!("{} v{v}", self.name),
            None => self.name.clone(),
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.subject.kind {
            Kind::Model => "model",
            Kind::Pipeline => "pipeline",
        };
        let verb = match self.verb {
            Verb::Loaded => "loaded",
            Verb::Reloaded => "reloaded",
            Verb::Removed => "removed",
            Verb::Unloaded => "unloaded",
        };
        write!(f, "{kind} {} {verb}", self.subject.label())
    }
}

/// What one reload did.
#[derive(Debug, Default, Clone)]
pub struct ReloadReport {
    pub changed: Vec<Change>,
    pub failed: Vec<Failed>,
}

impl ReloadReport {
    fn change(&mut self, subject: Subject, verb: Verb) {
        self.changed.push(Change { subject, verb });
    }
    fn fail(&mut self, subject: Subject, reason: &str) {
        self.failed.push(Failed { subject, reason: reason.to_string() });
    }
}

/// The newest ready version of a model in a set being built, or the named one.
fn resolve(models: &BTreeMap<String, ModelEntry>, name: &str, version: Option<u64>) -> Option<Arc<LoadedModel>> {
    models.get(name)?.ready(version).cloned()
}

/// The models a pipeline compiles against: those of the snapshot being built.
struct Building<'a> {
    models: &'a BTreeMap<String, ModelEntry>,
    pools: Vec<String>,
    ops: &'a OpRegistry,
}

impl Catalog for Building<'_> {
    fn model(&self, name: &str, version: Option<u64>) -> Option<Result<ModelSig, String>> {
        let entry = self.models.get(name)?;
        Some(match entry.ready(version) {
            Some(m) => Ok(ModelSig::from(&m.spec)),
            None => Err(match version {
                Some(v) if !entry.versions.contains_key(&v) => {
                    let served: Vec<String> = entry.versions.keys().map(u64::to_string).collect();
                    format!("version {v} is not served (served versions: {})", served.join(", "))
                }
                _ => entry.reason(),
            }),
        })
    }
    fn pools(&self) -> Vec<String> {
        self.pools.clone()
    }
    fn ops(&self) -> &OpRegistry {
        self.ops
    }
}

/// Whether every model the pipeline runs is still what the new model set resolves to.
fn still_bound(p: &Pipeline, models: &BTreeMap<String, ModelEntry>) -> bool {
    p.models().all(|(m, pinned)| resolve(models, &m.spec.name, pinned).is_some_and(|n| Arc::ptr_eq(&n, m)))
}

impl Engine {
    /// Reads the repository and swaps in a snapshot with what changed. Blocking: it loads
    /// models. Fails only when the repository folder itself cannot be read.
    pub fn reload(&self, scope: &Scope) -> Result<ReloadReport, ReloadError> {
        let _one_at_a_time = self.reloading.lock();
        self.reload_locked(scope, None)
    }

    /// A reload, with the `reloading` lock held by the caller. `unloaded`: a name to add
    /// to (true) or take from (false) the unloaded set first.
    fn reload_locked(&self, scope: &Scope, unloaded: Option<(&str, bool)>) -> Result<ReloadReport, ReloadError> {
        let started = Instant::now();
        let mut report = ReloadReport::default();
        let result = {
            let old = self.snapshot();
            let mut names = old.unloaded.clone();
            match unloaded {
                Some((name, true)) => names.insert(name.to_string()),
                Some((name, false)) => names.remove(name),
                None => false,
            };
            self.build(&old, &names, scope, &mut report)
        };
        let outcome = match &result {
            Ok(_) if report.failed.is_empty() => "ok",
            _ => "error",
        };
        let metrics = &self.telemetry.metrics;
        metrics.reloads.with_label_values(&[outcome]).inc();
        metrics.reload_duration.observe(started.elapsed().as_secs_f64());
        let next = match result {
            Ok(next) => next,
            Err(e) => {
                tracing::error!("reload failed, nothing changed: {e}");
                return Err(e);
            }
        };
        if !report.changed.is_empty() || !report.failed.is_empty() {
            let changed: Vec<String> = report.changed.iter().map(Change::to_string).collect();
            tracing::info!(
                ?changed,
                failed = report.failed.len(),
                took_ms = started.elapsed().as_millis() as u64,
                "reload done"
            );
        }
        let kept: HashSet<usize> = next
            .models
            .values()
            .flat_map(|e| e.versions.values())
            .filter_map(|s| match s {
                ModelSlot::Ready { model, .. } => Some(Arc::as_ptr(model) as usize),
                ModelSlot::Unavailable(_) => None,
            })
            .chain(next.pipelines.values().filter_map(|s| match s {
                PipelineSlot::Ready { pipeline, .. } => Some(Arc::as_ptr(pipeline) as usize),
                PipelineSlot::Unavailable { .. } => None,
            }))
            .collect();
        let old = self.swap(next);
        let mut retired = self.retired.lock();
        for e in old.models.values() {
            for s in e.versions.values() {
                if let ModelSlot::Ready { model, .. } = s {
                    if !kept.contains(&(Arc::as_ptr(model) as usize)) {
                        retired.push(Retired::Model(model.clone()));
                    }
                }
            }
        }
        for s in old.pipelines.values() {
            if let PipelineSlot::Ready { pipeline, .. } = s {
                if !kept.contains(&(Arc::as_ptr(pipeline) as usize)) {
                    retired.push(Retired::Pipeline(pipeline.clone()));
                }
            }
        }
        drop(retired);
        drop(old);
        self.reap();
        Ok(report)
    }

    /// Loads (or loads again) one model or pipeline by name, and the pipelines that use
    /// it; clears an earlier unload. Blocking.
    pub fn load_named(&self, name: &str) -> Result<ReloadReport, Error> {
        let plain = !name.is_empty() && !name.contains(['/', '\\']) && !name.starts_with('.');
        if !plain || !(self.cfg.models_dir.join(name).is_dir() || self.pipeline_file(name).is_some()) {
            return Err(Error::ModelNotFound { model: name.to_string(), version: None });
        }
        let _one_at_a_time = self.reloading.lock();
        let scope = Scope::Only([name.to_string()].into());
        let report = self.reload_locked(&scope, Some((name, false))).map_err(|e| Error::Internal(e.to_string()))?;
        match report.failed.iter().find(|f| f.subject.name == name) {
            Some(f) => Err(Error::Repository(format!("'{name}' failed to load: {}", f.reason))),
            None => Ok(report),
        }
    }

    /// Stops serving a model or pipeline until it is loaded again; requests already
    /// running finish. A model that pipelines use cannot be unloaded before them.
    pub fn unload(&self, name: &str) -> Result<ReloadReport, Error> {
        // Held from the check to the swap, so no reload binds a pipeline to it meanwhile.
        let _one_at_a_time = self.reloading.lock();
        let snapshot = self.snapshot();
        if !snapshot.models.contains_key(name) && !snapshot.pipelines.contains_key(name) {
            return Err(Error::ModelNotFound { model: name.to_string(), version: None });
        }
        let users: Vec<&str> = snapshot
            .pipelines()
            .filter(|(_, s)| match s {
                PipelineSlot::Ready { pipeline, .. } => pipeline.models().any(|(m, _)| m.spec.name == name),
                PipelineSlot::Unavailable { .. } => false,
            })
            .map(|(n, _)| n)
            .collect();
        if !users.is_empty() {
            return Err(Error::Repository(format!(
                "model '{name}' is used by pipelines {}: unload them first",
                users.join(", ")
            )));
        }
        drop(snapshot);
        self.reload_locked(&Scope::Only([name.to_string()].into()), Some((name, true)))
            .map_err(|e| Error::Internal(e.to_string()))
    }

    /// Replaced models and pipelines not yet dropped (some request still holds them).
    pub fn retired(&self) -> usize {
        self.retired.lock().len()
    }

    fn pipeline_file(&self, name: &str) -> Option<PathBuf> {
        pipeline::file_of(self.cfg.pipelines_dir.as_ref()?, name)
    }

    fn build(
        &self,
        old: &Snapshot,
        unloaded: &BTreeSet<String>,
        scope: &Scope,
        report: &mut ReloadReport,
    ) -> Result<Snapshot, ReloadError> {
        let models = self.build_models(old, unloaded, scope, report)?;
        let pipelines = self.build_pipelines(old, unloaded, &models, scope, report)?;
        Ok(Snapshot { pipelines, models, unloaded: unloaded.clone(), aliases: Arc::new(self.cfg.aliases.clone()) })
    }

    fn build_models(
        &self,
        old: &Snapshot,
        unloaded: &BTreeSet<String>,
        scope: &Scope,
        report: &mut ReloadReport,
    ) -> Result<BTreeMap<String, ModelEntry>, ReloadError> {
        let scanned: BTreeMap<String, Result<ModelDir, String>> =
            repository::scan(&self.cfg.models_dir).map_err(ReloadError::Repository)?.into_iter().collect();
        let names: BTreeSet<&String> = scanned.keys().chain(old.models.keys()).collect();
        let mut models = BTreeMap::new();
        for name in names {
            if unloaded.contains(name) {
                if old.models.contains_key(name) {
                    tracing::info!(model = %name, "model unloaded");
                    report.change(Subject::model(name, None), Verb::Unloaded);
                }
                continue;
            }
            let prev = old.models.get(name);
            if !scope.covers(name) {
                if let Some(e) = prev {
                    models.insert(name.clone(), e.clone());
                }
                continue;
            }
            let entry = match scanned.get(name) {
                None => {
                    if prev.is_some() {
                        tracing::info!(model = %name, "model removed from the repository");
                        report.change(Subject::model(name, None), Verb::Removed);
                    }
                    continue;
                }
                Some(Err(reason)) => {
                    if prev.and_then(|e| e.problem.as_ref()) != Some(reason) || scope.forces(name) {
                        tracing::error!(model = %name, "{reason}");
                        self.telemetry.metrics.model_loads.with_label_values(&[name, "", "error"]).inc();
                        report.fail(Subject::model(name, None), reason);
                    }
                    // What was loaded keeps serving.
                    ModelEntry {
                        versions: prev.map(|e| e.versions.clone()).unwrap_or_default(),
                        problem: Some(reason.clone()),
                    }
                }
                Some(Ok(dir)) => {
                    let mut versions = BTreeMap::new();
                    for (v, onnx) in &dir.versions {
                        let before = prev.and_then(|e| e.versions.get(v));
                        let slot = self.version_slot(dir, *v, onnx, before, scope.forces(name), report);
                        versions.insert(*v, slot);
                    }
                    // Versions the policy no longer picks go, unless one it picks failed:
                    // a broken new version must not take the serving one down.
                    let failed = versions.values().any(|s| matches!(s, ModelSlot::Unavailable(_)));
                    for (v, slot) in prev.iter().flat_map(|p| &p.versions) {
                        if versions.contains_key(v) {
                            continue;
                        }
                        match slot {
                            ModelSlot::Ready { model, .. } if failed => {
                                let failure = Failure {
                                    reason: "no longer picked by version_policy; kept while a newer version fails \
                                             to load"
                                        .into(),
                                    fingerprint: None,
                                    retry: false,
                                };
                                versions.insert(*v, ModelSlot::Ready { model: model.clone(), stale: Some(failure) });
                            }
                            _ => {
                                tracing::info!(model = %name, version = v, "model version no longer served");
                                report.change(Subject::model(name, Some(*v)), Verb::Removed);
                            }
                        }
                    }
                    ModelEntry { versions, problem: None }
                }
            };
            models.insert(name.clone(), entry);
        }
        Ok(models)
    }

    /// The slot of one version: carried over when its files are unchanged, else loaded.
    fn version_slot(
        &self,
        dir: &ModelDir,
        v: u64,
        onnx: &Result<PathBuf, String>,
        before: Option<&ModelSlot>,
        force: bool,
        report: &mut ReloadReport,
    ) -> ModelSlot {
        let name = &dir.name;
        let fingerprint = onnx.as_ref().ok().map(|p| dir.fingerprint(p));
        if !force {
            match before {
                Some(ModelSlot::Ready { model, .. }) if Some(&model.spec.fingerprint) == fingerprint.as_ref() => {
                    return ModelSlot::Ready { model: model.clone(), stale: None };
                }
                Some(slot @ (ModelSlot::Ready { stale: Some(f), .. } | ModelSlot::Unavailable(f)))
                    if f.fingerprint == fingerprint && (fingerprint.is_some() || onnx.is_err()) && !f.retry =>
                {
                    // The same files failed before: no point in trying them again.
                    return slot.clone();
                }
                _ => {}
            }
        }
        let started = Instant::now();
        let loaded = onnx.clone().and_then(|path| repository::read_spec(dir, v, &path)).and_then(|spec| {
            // While serving, a CPU model loads on the CPU requests leave idle. GPU models
            // load at normal priority: the driver threads a CUDA context starts would
            // keep a low priority for good.
            let gpu = spec.config.wants_gpu();
            let load = || self.load_model(spec);
            if self.serving.load(std::sync::atomic::Ordering::Acquire) && !gpu {
                let slow = Instant::now() + Duration::from_secs(30);
                let loaded = crate::rt::priority::in_background(self.cfg.load_nice, load);
                if Instant::now() > slow {
                    tracing::warn!(model = %name, "a background load took over 30 s: the machine is busy (see --load-nice)");
                }
                loaded
            } else {
                load()
            }
            .map_err(|e| e.to_string())
        });
        let v_label = v.to_string();
        match loaded {
            Ok(m) => {
                tracing::info!(
                    model = %name,
                    version = v,
                    devices = ?m.devices,
                    took_ms = started.elapsed().as_millis() as u64,
                    "model ready"
                );
                self.telemetry.metrics.model_loads.with_label_values(&[name, &v_label, "ok"]).inc();
                let verb = if before.is_some() { Verb::Reloaded } else { Verb::Loaded };
                report.change(Subject::model(name, Some(v)), verb);
                ModelSlot::Ready { model: Arc::new(m), stale: None }
            }
            Err(reason) => {
                tracing::error!(model = %name, version = v, "model failed to load: {reason}");
                self.telemetry.metrics.model_loads.with_label_values(&[name, &v_label, "error"]).inc();
                report.fail(Subject::model(name, Some(v)), &reason);
                // A remote model's servers may come up later: its files are no reason.
                let retry = dir.config.backend == crate::repository::model_yaml::BackendKind::Remote;
                let failure = Failure { reason, fingerprint, retry };
                match before {
                    Some(ModelSlot::Ready { model, .. }) => {
                        ModelSlot::Ready { model: model.clone(), stale: Some(failure) }
                    }
                    _ => ModelSlot::Unavailable(failure),
                }
            }
        }
    }

    fn build_pipelines(
        &self,
        old: &Snapshot,
        unloaded: &BTreeSet<String>,
        models: &BTreeMap<String, ModelEntry>,
        scope: &Scope,
        report: &mut ReloadReport,
    ) -> Result<BTreeMap<String, PipelineSlot>, ReloadError> {
        let files: BTreeMap<String, PathBuf> = match &self.cfg.pipelines_dir {
            Some(dir) => pipeline::list_files(dir).map_err(ReloadError::Pipelines)?.into_iter().collect(),
            None => BTreeMap::new(),
        };
        let catalog =
            Building { models, pools: self.cfg.pools.iter().map(|p| p.name.clone()).collect(), ops: &self.cfg.ops };
        let lookup = |name: &str, version: u64| resolve(models, name, Some(version));
        let names: BTreeSet<&String> = files.keys().chain(old.pipelines.keys()).collect();
        let mut pipelines = BTreeMap::new();
        for name in names {
            let prev = old.pipelines.get(name);
            if unloaded.contains(name) {
                if prev.is_some() {
                    tracing::info!(pipeline = %name, "pipeline unloaded");
                    report.change(Subject::pipeline(name), Verb::Unloaded);
                }
                continue;
            }
            if !scope.covers(name) {
                match prev {
                    None => continue,
                    Some(slot @ PipelineSlot::Ready { pipeline, .. }) if still_bound(pipeline, models) => {
                        pipelines.insert(name.clone(), slot.clone());
                        continue;
                    }
                    // A model it uses changed, or it failed before (perhaps on a model
                    // that was just loaded): compile it again.
                    Some(_) => {}
                }
            }
            let Some(file) = files.get(name) else {
                if prev.is_some() {
                    tracing::info!(pipeline = %name, "pipeline removed");
                    report.change(Subject::pipeline(name), Verb::Removed);
                }
                continue;
            };
            let text = crate::repository::read_config(file).map_err(|e| format!("{}: {e}", file.display()));
            if let (Ok(text), Some(PipelineSlot::Ready { pipeline, .. })) = (&text, prev) {
                if pipeline.source == *text && still_bound(pipeline, models) && !scope.forces(name) {
                    pipelines.insert(name.clone(), PipelineSlot::Ready { pipeline: pipeline.clone(), stale: None });
                    continue;
                }
            }
            let built = text.and_then(|text| {
                if models.contains_key(name) {
                    return Err(format!("{}: a model is named '{name}' too; rename one of them", file.display()));
                }
                // Ops' constructors (a user's own too) run here: a panic fails this
                // pipeline's load, not the reload.
                let plan = catch_unwind(AssertUnwindSafe(|| pipeline::compile(name, file, &text, &catalog)))
                    .map_err(|p| format!("{}: compiling panicked: {}", file.display(), panic_message(p)))?
                    .map_err(|e| e.to_string())?;
                for w in &plan.warnings {
                    tracing::warn!("{}", Located(file, w));
                }
                Pipeline::bind(plan, text, &lookup, &self.pools, &self.telemetry.metrics)
            });
            let slot = match built {
                Ok(p) => {
                    tracing::info!(pipeline = %name, nodes = p.plan.nodes.len(), "pipeline ready");
                    self.telemetry.metrics.pipeline_loads.with_label_values(&[name, "ok"]).inc();
                    let verb = if prev.is_some() { Verb::Reloaded } else { Verb::Loaded };
                    report.change(Subject::pipeline(name), verb);
                    PipelineSlot::Ready { pipeline: Arc::new(p), stale: None }
                }
                Err(reason) => {
                    let known = match prev {
                        Some(PipelineSlot::Ready { stale, .. }) => stale.as_ref() == Some(&reason),
                        Some(PipelineSlot::Unavailable { reason: r }) => *r == reason,
                        None => false,
                    };
                    if !known || scope.forces(name) {
                        tracing::error!(pipeline = %name, "pipeline failed to load:\n{reason}");
                        self.telemetry.metrics.pipeline_loads.with_label_values(&[name, "error"]).inc();
                        report.fail(Subject::pipeline(name), &reason);
                    }
                    match prev {
                        Some(PipelineSlot::Ready { pipeline, .. }) => {
                            PipelineSlot::Ready { pipeline: pipeline.clone(), stale: Some(reason) }
                        }
                        _ => PipelineSlot::Unavailable { reason },
                    }
                }
            };
            pipelines.insert(name.clone(), slot);
        }
        Ok(pipelines)
    }

    /// Loads one model version; a panic fails this load, not the reload.
    fn load_model(&self, spec: repository::ModelSpec) -> Result<LoadedModel, LoadError> {
        let metrics = &self.telemetry.metrics;
        catch_unwind(AssertUnwindSafe(|| LoadedModel::load(spec, &self.cfg.ort_dylib, metrics)))
            .unwrap_or_else(|p| Err(LoadError::Panicked(panic_message(p))))
    }
}
