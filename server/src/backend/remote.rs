//! `backend: remote`: a model served by other v2 servers (sluice or Triton) over gRPC.
//! The local batcher forms the batches (from many requests, and from the crops of many
//! requests); each batch is one ModelInfer call with raw tensors to one endpoint.
//!
//! Endpoints are chosen by the power of two choices on requests outstanding: two picked
//! at random, the one with fewer calls in flight wins, which spreads load by how fast
//! each endpoint answers without a global view. An endpoint whose call fails to connect
//! (or says UNAVAILABLE), or whose readiness check fails, is ejected; it comes back when
//! a later check passes after a backoff that doubles with each ejection in a row. A
//! failed call is tried again on another endpoint within the batch's time (inference
//! does not change state, so a retry is safe). tonic's `balance_list` is not used: its
//! load is always zero and it never resolves DNS again.

use super::{Backend, BackendError};
use crate::onnx::signature::TensorInfo;
use crate::repository::model_yaml::RemoteYaml;
use crate::repository::remote::{address_list, endpoints};
use crate::request::{Origin, TraceContext, REQUEST_ID_HEADER, TRACEPARENT_HEADER, TRACESTATE_HEADER};
use crate::telemetry::metrics::{Metrics, RemoteMetrics};
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use sluice_ops::{DataType, Tensor};
use sluice_proto::inference as pb;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;
use tonic::Code;

/// The pause before a batch tries endpoints that all failed it once more.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// The least time a readiness check gets: a busy server may answer slowly once.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// The most of a batch's request ids a call names (in its id and `x-request-id`).
const MAX_IDS_BYTES: usize = 2048;

/// The largest answer a remote call takes.
const MAX_ANSWER_BYTES: usize = 1 << 30;

/// The longest an ejected endpoint stays out before its checks may bring it back.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How long an instance polls its connections for an answer before it sleeps on them.
/// A thread asleep on a socket pays a wake-up when the answer comes (30-40 µs here, a
/// halted vCPU's), a fifth of a small model's whole call; calls that usually take longer
/// than this are not watched at all (see [`RemoteInstance::typical`]).
const ANSWER_WATCH: Duration = Duration::from_micros(300);

/// The runtime remote calls and checks run on: instance threads block on it; the
/// server's own runtime only serves requests.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sluice-remote")
            .enable_all()
            .build()
            .expect("the remote runtime starts. This is a bug.")
    })
}

type Client = pb::grpc_inference_service_client::GrpcInferenceServiceClient<Channel>;

/// A client of `addr` on the runtime of the caller's context (connections are made when
/// first used).
fn client(addr: &str) -> Result<Client, String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("'{addr}': {e}"))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .connect_lazy();
    // A model tier is trusted, but not to send without end: answers are bounded too.
    Ok(Client::new(channel).max_decoding_message_size(MAX_ANSWER_BYTES).max_encoding_message_size(usize::MAX))
}

/// One server of a remote model.
pub struct Endpoint {
    pub addr: String,
    /// The readiness checks' client (on the shared remote runtime).
    client: Option<Client>,
    in_flight: AtomicUsize,
    health: Mutex<Health>,
    metrics: Option<RemoteMetrics>,
    /// Wakes the calls in flight when the endpoint is ejected: a server cut off the
    /// network answers nothing, and its calls move on instead of waiting out their time.
    ejected_now: tokio::sync::Notify,
}

#[derive(Default)]
struct Health {
    /// Out of the rotation until then (a check must pass after it, too).
    ejected_until: Option<Instant>,
    /// Ejections in a row: the backoff doubles with each.
    ejections: u32,
}

impl Endpoint {
    fn new(addr: &str, model: &str, metrics: Option<&Metrics>) -> Result<Endpoint, String> {
        Ok(Endpoint {
            addr: addr.to_string(),
            client: Some(client(addr)?),
            in_flight: AtomicUsize::new(0),
            health: Mutex::new(Health::default()),
            metrics: metrics.map(|m| m.for_remote(model, addr)),
            ejected_now: tokio::sync::Notify::new(),
        })
    }

    /// An endpoint without a connection, for the balancer's tests.
    #[cfg(test)]
    fn bare(addr: &str) -> Endpoint {
        Endpoint {
            addr: addr.into(),
            client: None,
            in_flight: AtomicUsize::new(0),
            health: Mutex::new(Health::default()),
            metrics: None,
            ejected_now: tokio::sync::Notify::new(),
        }
    }

    fn ejected(&self) -> bool {
        self.health.lock().ejected_until.is_some()
    }

    /// Out of the rotation, for a backoff that doubles with each ejection in a row (an
    /// endpoint already out stays out as long as it keeps failing, its backoff as it is).
    fn eject(&self, base: Duration, why: &str) {
        let mut h = self.health.lock();
        if h.ejected_until.is_none() {
            tracing::warn!(endpoint = %self.addr, "remote endpoint ejected: {why}");
            h.ejections = h.ejections.saturating_add(1);
        }
        let backoff = base.saturating_mul(1 << (h.ejections.max(1) - 1).min(16)).min(MAX_BACKOFF);
        let until = Instant::now() + backoff;
        h.ejected_until = Some(h.ejected_until.map_or(until, |u| u.max(until)));
        if let Some(m) = &self.metrics {
            m.ejected.set(1);
        }
        drop(h);
        self.ejected_now.notify_waiters();
    }

    /// A readiness check passed: back in the rotation once its backoff is over.
    fn check_passed(&self, now: Instant) {
        let mut h = self.health.lock();
        if h.ejected_until.is_some_and(|until| now >= until) {
            h.ejected_until = None;
            tracing::info!(endpoint = %self.addr, "remote endpoint back in rotation");
            if let Some(m) = &self.metrics {
                m.ejected.set(0);
            }
        }
    }

    /// A call succeeded: ejections in a row start again from none.
    fn call_passed(&self) {
        self.health.lock().ejections = 0;
    }
}

/// Counts a call in flight on an endpoint while it lives.
struct InFlight<'a>(&'a Endpoint);

impl<'a> InFlight<'a> {
    fn start(e: &'a Endpoint) -> InFlight<'a> {
        e.in_flight.fetch_add(1, Relaxed);
        if let Some(m) = &e.metrics {
            m.in_flight.inc();
        }
        InFlight(e)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
        if let Some(m) = &self.0.metrics {
            m.in_flight.dec();
        }
    }
}

/// Picks an endpoint: of those not `tried` and in the rotation (or, when every one is
/// out, of all not tried: a guess beats failing at once), two at random, the one with
/// fewer calls in flight. `r` is a random number.
fn pick(endpoints: &[Arc<Endpoint>], tried: &[String], r: u64) -> Option<Arc<Endpoint>> {
    let open: Vec<&Arc<Endpoint>> = endpoints.iter().filter(|e| !tried.contains(&e.addr)).collect();
    let admitted: Vec<&Arc<Endpoint>> = open.iter().copied().filter(|e| !e.ejected()).collect();
    let from = if admitted.is_empty() { open } else { admitted };
    match from.len() {
        0 => None,
        1 => Some(from[0].clone()),
        n => {
            let a = (r % n as u64) as usize;
            let b = (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n;
            let (ea, eb) = (from[a], from[b]);
            Some(if eb.in_flight.load(Relaxed) < ea.in_flight.load(Relaxed) { eb.clone() } else { ea.clone() })
        }
    }
}

/// A remote model: its endpoints and how to call them, shared by its instances.
pub struct Remote {
    /// The model's name here (metrics) and there (calls).
    local: String,
    model: String,
    version: String,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    timeout: Duration,
    health_interval: Duration,
    outputs: Vec<TensorInfo>,
    seed: AtomicU64,
    metrics: Option<Metrics>,
}

impl Remote {
    /// Connects (lazily) to the endpoints of `cfg` and starts checking them.
    pub fn start(
        name: &str,
        cfg: &RemoteYaml,
        outputs: &[TensorInfo],
        metrics: Option<&Metrics>,
    ) -> Result<Arc<Remote>, String> {
        let model = cfg.model.clone().unwrap_or_else(|| name.to_string());
        let _rt = runtime().enter(); // lazy channels need a runtime to belong to
                                     // Series are labelled with this server's name for the model.
        let eps =
            endpoints(cfg)?.iter().map(|a| Endpoint::new(a, name, metrics).map(Arc::new)).collect::<Result<_, _>>()?;
        let remote = Arc::new(Remote {
            local: name.to_string(),
            model,
            version: cfg.version.map(|v| v.to_string()).unwrap_or_default(),
            endpoints: ArcSwap::from_pointee(eps),
            timeout: Duration::from_millis(cfg.timeout_ms),
            health_interval: Duration::from_millis(cfg.health_interval_ms),
            outputs: outputs.to_vec(),
            // Replicas of the CPU tier must not all pick in the same order.
            seed: AtomicU64::new({
                use std::hash::{BuildHasher, Hasher};
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u128(
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
                );
                h.finish()
            }),
            metrics: metrics.cloned(),
        });
        runtime().spawn(check_loop(Arc::downgrade(&remote)));
        if cfg.dns.is_some() {
            runtime().spawn(resolve_loop(Arc::downgrade(&remote), cfg.clone()));
        }
        Ok(remote)
    }

    /// The endpoints now: address, whether ejected, calls in flight (for views).
    pub fn endpoints(&self) -> Vec<(String, bool, usize)> {
        self.endpoints.load().iter().map(|e| (e.addr.clone(), e.ejected(), e.in_flight.load(Relaxed))).collect()
    }

    fn random(&self) -> u64 {
        // splitmix64 over a counter: cheap, lock-free, well spread.
        let mut z = self.seed.fetch_add(0x9e37_79b9_7f4a_7c15, Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// One batch: a call to one endpoint, tried again on others while time is left
    /// (`timeout_ms`, or less when the batch's callers' deadlines come sooner).
    /// `clients`: the calling instance's own connections, by endpoint.
    async fn call(
        &self,
        inputs: &[Tensor],
        input_names: &[String],
        callers: &Callers,
        clients: &mut Vec<(String, Client)>,
    ) -> Result<Vec<Tensor>, BackendError> {
        let deadline = callers.deadline;
        let own = Instant::now() + self.timeout;
        let deadline = deadline.map_or(own, |d| d.min(own));
        let req = pb::ModelInferRequest {
            model_name: self.model.clone(),
            model_version: self.version.clone(),
            id: callers.ids.clone(),
            inputs: inputs
                .iter()
                .zip(input_names)
                .map(|(t, n)| pb::model_infer_request::InferInputTensor {
                    name: n.clone(),
                    datatype: t.dtype.as_str().into(),
                    shape: t.shape.iter().map(|&d| d as i64).collect(),
                    ..Default::default()
                })
                .collect(),
            raw_input_contents: inputs.iter().map(|t| t.data.clone()).collect(),
            ..Default::default()
        };
        let mut tried: Vec<String> = Vec::new();
        let mut last = String::from("no endpoints");
        loop {
            let eps = self.endpoints.load_full();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BackendError(format!("remote model '{}': timed out; last error: {last}", self.model)));
            }
            let Some(ep) = pick(&eps, &tried, self.random()) else {
                // Every endpoint failed this batch. While time is left, a short pause and
                // another round: the one replica left may only have been slow once.
                if left > RETRY_PAUSE * 2 && !eps.is_empty() {
                    tokio::time::sleep(RETRY_PAUSE).await;
                    tried.clear();
                    continue;
                }
                return Err(BackendError(format!("remote model '{}': every endpoint failed: {last}", self.model)));
            };
            let mut r = tonic::Request::new(req.clone());
            r.set_timeout(left);
            callers.annotate(r.metadata_mut());
            let started = Instant::now();
            let result = {
                let _f = InFlight::start(&ep);
                let mut client = match clients.iter().find(|(a, _)| *a == ep.addr) {
                    Some((_, c)) => c.clone(),
                    None => {
                        let c = client(&ep.addr).map_err(BackendError)?;
                        // Endpoints that left the name take their connections with them.
                        let live = self.endpoints.load();
                        clients.retain(|(a, _)| live.iter().any(|e| e.addr == *a));
                        clients.push((ep.addr.clone(), c.clone()));
                        c
                    }
                };
                let ejected = ep.ejected_now.notified();
                tokio::pin!(ejected);
                ejected.as_mut().enable();
                tokio::select! {
                    r = client.model_infer(r) => r,
                    _ = ejected => Err(tonic::Status::unavailable("ejected while the call was in flight")),
                }
            };
            if let Some(m) = &ep.metrics {
                m.requests.inc();
                m.duration.observe(started.elapsed().as_secs_f64());
            }
            match result {
                Ok(resp) => {
                    ep.call_passed();
                    return self.outputs_of(resp.into_inner());
                }
                Err(st) => {
                    if let Some(m) = &ep.metrics {
                        m.failures.inc();
                    }
                    last = format!("{}: {}", ep.addr, st.message());
                    // Errors of the connection (closed, GOAWAY, reset) rather than answers
                    // of the server carry their cause; tonic's own timeout is `left` spent.
                    let transport = std::error::Error::source(&st).is_some();
                    match st.code() {
                        // Unreachable, or going away: out of the rotation, and try another.
                        Code::Unavailable => ep.eject(self.health_interval, st.message()),
                        // Full right now: another may not be.
                        Code::ResourceExhausted => {}
                        // This instance's connection broke: a new one, maybe elsewhere.
                        _ if transport => {}
                        Code::Cancelled if deadline > Instant::now() => {}
                        _ => return Err(BackendError(format!("remote model '{}': {last}", self.model))),
                    }
                    clients.retain(|(a, _)| *a != ep.addr);
                    tried.push(ep.addr.clone());
                }
            }
        }
    }

    /// The response's tensors in the model's output order, each checked.
    fn outputs_of(&self, resp: pb::ModelInferResponse) -> Result<Vec<Tensor>, BackendError> {
        let bad = |m: String| BackendError(format!("remote model '{}': {m}", self.model));
        if resp.raw_output_contents.len() != resp.outputs.len() {
            return Err(bad("the response's outputs are not all raw".into()));
        }
        let mut got: Vec<(String, Tensor)> = Vec::with_capacity(resp.outputs.len());
        for (o, data) in resp.outputs.into_iter().zip(resp.raw_output_contents) {
            let dtype = DataType::parse(&o.datatype)
                .ok_or_else(|| bad(format!("output '{}': datatype {}", o.name, o.datatype)))?;
            let shape = o.shape.iter().map(|&d| usize::try_from(d)).collect::<Result<Vec<_>, _>>();
            let shape = shape.map_err(|_| bad(format!("output '{}': shape {:?}", o.name, o.shape)))?;
            let t = Tensor::new(dtype, shape, data).map_err(|e| bad(format!("output '{}': {e}", o.name)))?;
            got.push((o.name, t));
        }
        self.outputs
            .iter()
            .map(|want| {
                let i = got
                    .iter()
                    .position(|(n, _)| *n == want.name)
                    .ok_or_else(|| bad(format!("no output '{}'", want.name)))?;
                Ok(got.swap_remove(i).1)
            })
            .collect()
    }
}

/// Checks each endpoint's readiness for the model every health interval, for as long
/// as the model is loaded.
async fn check_loop(remote: Weak<Remote>) {
    loop {
        let (eps, model, version, every) = match remote.upgrade() {
            Some(r) => (r.endpoints.load_full(), r.model.clone(), r.version.clone(), r.health_interval),
            None => return,
        };
        let checks = eps.iter().map(|ep| {
            let (model, version) = (model.clone(), version.clone());
            async move {
                let Some(mut client) = ep.client.clone() else { return };
                let mut r = tonic::Request::new(pb::ModelReadyRequest { name: model, version });
                r.set_timeout(every.max(CHECK_TIMEOUT));
                match client.model_ready(r).await {
                    Ok(resp) if resp.get_ref().ready => ep.check_passed(Instant::now()),
                    Ok(_) => ep.eject(every, "the model is not ready there"),
                    Err(st) => ep.eject(every, st.message()),
                }
            }
        });
        futures::future::join_all(checks).await;
        drop(eps);
        tokio::time::sleep(every).await;
    }
}

/// Resolves the DNS name again every interval: new addresses join (after a passing
/// check); the calls in flight to vanished ones are tried elsewhere.
async fn resolve_loop(remote: Weak<Remote>, cfg: RemoteYaml) {
    let every = Duration::from_millis(cfg.resolve_interval_ms);
    let Some(name) = cfg.dns.clone() else { return };
    loop {
        tokio::time::sleep(every).await;
        let Some(r) = remote.upgrade() else { return };
        let addrs: Vec<String> = match tokio::net::lookup_host(name.as_str()).await {
            Ok(a) => address_list(a),
            Err(e) => {
                tracing::warn!(dns = %name, "remote: cannot resolve: {e}; keeping the endpoints");
                continue;
            }
        };
        let now = r.endpoints.load_full();
        if addrs.is_empty() || now.iter().map(|e| &e.addr).eq(addrs.iter()) {
            continue;
        }
        let _rt = runtime().enter();
        let next: Vec<Arc<Endpoint>> = addrs
            .iter()
            .filter_map(|a| match now.iter().find(|e| e.addr == *a) {
                Some(e) => Some(e.clone()),
                None => Endpoint::new(a, &r.local, r.metrics.as_ref()).ok().map(|e| {
                    // New endpoints join once a check passes.
                    e.health.lock().ejected_until = Some(Instant::now());
                    Arc::new(e)
                }),
            })
            .collect();
        tracing::info!(dns = %name, endpoints = ?addrs, "remote: endpoints changed");
        r.endpoints.store(Arc::new(next));
        // Gone from the name: its calls in flight (it may be unreachable) go elsewhere.
        // (Its series go with the last holder of the endpoint: see `Metrics::for_remote`.)
        for gone in now.iter().filter(|e| !addrs.contains(&e.addr)) {
            gone.ejected_now.notify_waiters();
        }
    }
}

/// What a batch's call carries of its requests: their latest deadline, their ids, and
/// the trace the batch continues (its span's, a child of its first sampled request). A
/// call has one parent span; the batch span links to its other requests, and their ids
/// are in the next tier's logs and spans.
#[derive(Default)]
struct Callers {
    deadline: Option<Instant>,
    /// The requests' ids, each once, joined by commas (bounded).
    ids: String,
    id_header: Option<AsciiMetadataValue>,
    traceparent: Option<AsciiMetadataValue>,
    tracestate: Option<AsciiMetadataValue>,
}

impl Callers {
    fn of(deadline: Option<Instant>, origins: &[&Origin], trace: Option<&TraceContext>) -> Callers {
        let mut seen = std::collections::HashSet::new();
        let (mut ids, mut left) = (String::new(), 0usize);
        // Each request once (a request's crops share its origin).
        for o in origins.iter().filter(|o| !o.id.is_empty()) {
            if !seen.insert(o.id.as_str()) {
                continue;
            }
            if ids.len() + o.id.len() + 1 > MAX_IDS_BYTES {
                left += 1;
                continue;
            }
            if !ids.is_empty() {
                ids.push(',');
            }
            ids.push_str(&o.id);
        }
        if left > 0 {
            ids.push_str(&format!("{}+{left} more", if ids.is_empty() { "" } else { "," }));
        }
        // A header value is printable ASCII without space at either end (RFC 9113
        // 8.2.1); the body's id carries any other.
        let header_safe = !ids.is_empty()
            && ids.bytes().all(|b| (b' '..=b'~').contains(&b))
            && !ids.starts_with(' ')
            && !ids.ends_with(' ');
        Callers {
            deadline,
            id_header: header_safe.then(|| ids.parse().ok()).flatten(),
            ids,
            traceparent: trace.and_then(|t| t.traceparent().parse().ok()),
            tracestate: trace.and_then(|t| t.state.as_deref()).and_then(|s| s.parse().ok()),
        }
    }

    fn annotate(&self, md: &mut tonic::metadata::MetadataMap) {
        let headers = [
            (REQUEST_ID_HEADER, &self.id_header),
            (TRACEPARENT_HEADER, &self.traceparent),
            (TRACESTATE_HEADER, &self.tracestate),
        ];
        for (name, value) in headers {
            if let Some(v) = value {
                md.insert(name, v.clone());
            }
        }
    }
}

/// One instance: a batch at a time. It drives its own connections on a runtime of its
/// thread, so a call's bytes go from this thread to the socket and back with no hand-off
/// to other threads (each costs tens of microseconds).
pub struct RemoteInstance {
    remote: Arc<Remote>,
    input_names: Vec<String>,
    callers: Callers,
    rt: tokio::runtime::Runtime,
    clients: Vec<(String, Client)>,
    /// How long this instance's calls take, a moving average: a call expected back
    /// within [`ANSWER_WATCH`] is watched for, a longer one slept on.
    typical: Duration,
}

impl RemoteInstance {
    pub fn new(remote: Arc<Remote>, inputs: &[TensorInfo]) -> Result<RemoteInstance, String> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        Ok(RemoteInstance {
            remote,
            input_names: inputs.iter().map(|t| t.name.clone()).collect(),
            callers: Callers::default(),
            rt,
            clients: Vec::new(),
            typical: Duration::ZERO,
        })
    }
}

impl Backend for RemoteInstance {
    fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, BackendError> {
        let (remote, names, clients) = (&self.remote, &self.input_names, &mut self.clients);
        let callers = std::mem::take(&mut self.callers);
        let watch = watch_for(self.typical);
        let started = Instant::now();
        let out =
            self.rt.block_on(watched(remote.call(inputs, names, &callers, clients), watch, crate::rt::CONTENDED_YIELD));
        // An eighth of each new call, each counted as at most four watches: one slow call
        // (a retry, a timeout) does not stop the watching, two in a row do until the
        // calls are quick again; a slow model's calls keep it off.
        self.typical = (self.typical * 7 + started.elapsed().min(ANSWER_WATCH * 4)) / 8;
        out
    }

    fn device(&self) -> String {
        "remote".into()
    }

    fn passes_callers(&self) -> bool {
        true
    }

    fn set_callers(&mut self, deadline: Option<Instant>, origins: &[&Origin], trace: Option<&TraceContext>) {
        self.callers = Callers::of(deadline, origins, trace);
    }
}

/// How long to watch for the answer to a call when this instance's calls typically
/// take `typical`: all of [`ANSWER_WATCH`] when they come back within it, none when
/// they do not (a slow model's wake-up is small against its call, and watching for it
/// would only take a core from the pipelines' ops).
fn watch_for(typical: Duration) -> Duration {
    if typical <= ANSWER_WATCH {
        ANSWER_WATCH
    } else {
        Duration::ZERO
    }
}

/// Awaits `f`, polling the runtime's sockets without sleeping for up to `watch` (and
/// yielding the core on each turn, so only while nothing else on it wants to run: a
/// yield that takes `contended` or longer ends the watch); then sleeps on them as usual.
async fn watched<F: std::future::Future>(f: F, watch: Duration, contended: Duration) -> F::Output {
    tokio::pin!(f);
    let start = Instant::now();
    loop {
        if let std::task::Poll::Ready(v) = futures::poll!(f.as_mut()) {
            return v;
        }
        if start.elapsed() >= watch {
            return f.await;
        }
        if !crate::rt::yield_uncontended(contended) {
            return f.await;
        }
        // Wakes at once, after the current-thread runtime has run its ready tasks (the
        // connection's) and checked its sockets and timers without waiting (tokio 1.x's
        // `block_on`; should that change, the watch only costs its time, never an answer).
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n).map(|i| Arc::new(Endpoint::bare(&format!("10.0.0.{i}:8001")))).collect()
    }

    #[test]
    fn an_answer_is_watched_for_only_when_calls_come_back_within_the_watch() {
        assert_eq!(watch_for(Duration::ZERO), ANSWER_WATCH);
        assert_eq!(watch_for(ANSWER_WATCH), ANSWER_WATCH);
        assert_eq!(watch_for(ANSWER_WATCH + Duration::from_micros(1)), Duration::ZERO);
    }

    #[test]
    fn a_watched_call_gets_its_answer_from_a_socket_while_watching() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // The answer comes from another thread, over a socket, while the call is watched
        // for (a watch far longer than the test may take, never cut short by a busy
        // core): the watch itself must see it.
        let answerer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_millis(20));
            std::io::Write::write_all(&mut s, b"answer").unwrap();
        });
        let call = async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            // The connection is driven by a task of its own, as a client's is.
            let read = tokio::spawn(async move {
                let mut buf = [0u8; 6];
                tokio::io::AsyncReadExt::read_exact(&mut s, &mut buf).await.unwrap();
                buf
            });
            read.await.unwrap()
        };
        let started = Instant::now();
        assert_eq!(&rt.block_on(watched(call, Duration::from_secs(30), Duration::MAX)), b"answer");
        assert!(started.elapsed() < Duration::from_secs(10), "the watch did not see the answer");
        answerer.join().unwrap();
        // Without a watch, the same.
        assert_eq!(rt.block_on(watched(async { 7 }, Duration::ZERO, crate::rt::CONTENDED_YIELD)), 7);
    }

    #[test]
    fn two_choices_prefer_the_endpoint_with_fewer_calls_in_flight() {
        let e = eps(2);
        e[0].in_flight.store(5, Relaxed);
        for r in 0..100u64 {
            assert_eq!(pick(&e, &[], r.wrapping_mul(0x9e37_79b9_7f4a_7c15)).unwrap().addr, "10.0.0.1:8001");
        }
        // Over many endpoints, load spreads: each is picked, the busiest least.
        let e = eps(4);
        e[3].in_flight.store(10, Relaxed);
        let mut counts = [0usize; 4];
        let remote_rng = AtomicU64::new(1);
        for _ in 0..4000 {
            let r = remote_rng.fetch_add(0x9e37_79b9_7f4a_7c15, Relaxed).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            let p = pick(&e, &[], r).unwrap();
            counts[e.iter().position(|x| Arc::ptr_eq(x, &p)).unwrap()] += 1;
        }
        assert!(counts[..3].iter().all(|&c| c > 800), "{counts:?}");
        assert_eq!(counts[3], 0, "the busiest never wins a pair: {counts:?}");
    }

    #[test]
    fn ejected_and_tried_endpoints_are_left_out_until_none_is_left() {
        let e = eps(3);
        e[0].eject(Duration::from_millis(50), "test");
        let tried = vec![e[1].addr.clone()];
        for r in 0..50 {
            assert_eq!(pick(&e, &tried, r * 7919).unwrap().addr, e[2].addr);
        }
        // Every admitted one tried: an ejected one is a better guess than nothing.
        let tried = vec![e[1].addr.clone(), e[2].addr.clone()];
        assert_eq!(pick(&e, &tried, 3).unwrap().addr, e[0].addr);
        let all: Vec<String> = e.iter().map(|x| x.addr.clone()).collect();
        assert!(pick(&e, &all, 3).is_none());
    }

    #[test]
    fn a_call_names_its_batchs_requests_once_and_carries_the_trace_given() {
        let trace = crate::request::TraceContext { trace_id: 0xabc, span_id: 7, flags: 1, state: Some("k=v".into()) };
        let o = |id: &str| Origin { id: id.into(), trace: None };
        let (a, a2, b, c, none) = (o("a"), o("a"), o("b"), o("c"), o(""));
        let callers = Callers::of(None, &[&a, &a2, &none, &b, &c], Some(&trace));
        assert_eq!(callers.ids, "a,b,c", "the crops of one request are named once");
        let mut md = tonic::metadata::MetadataMap::new();
        callers.annotate(&mut md);
        assert_eq!(md.get(REQUEST_ID_HEADER).unwrap(), "a,b,c");
        assert_eq!(md.get(TRACEPARENT_HEADER).unwrap(), "00-00000000000000000000000000000abc-0000000000000007-01");
        assert_eq!(md.get(TRACESTATE_HEADER).unwrap(), "k=v");
        // Bounded however many requests a batch holds.
        let many: Vec<Origin> = (0..1000).map(|i| o(&format!("request-{i:04}"))).collect();
        let callers = Callers::of(None, &many.iter().collect::<Vec<_>>(), None);
        assert!(callers.ids.len() <= MAX_IDS_BYTES + 16, "{}", callers.ids.len());
        let listed = callers.ids.split(',').filter(|s| s.starts_with("request-")).count();
        let more: usize =
            callers.ids.rsplit(',').next().unwrap().trim_start_matches('+').trim_end_matches(" more").parse().unwrap();
        assert_eq!(listed + more, 1000);
        // Ids no header may carry stay in the body only.
        for odd in ["caf\u{e9}", " padded"] {
            let callers = Callers::of(None, &[&o(odd)], None);
            assert_eq!((callers.ids.as_str(), callers.id_header.is_none()), (odd, true));
        }
        let long = o(&"x".repeat(MAX_IDS_BYTES + 1));
        assert_eq!(Callers::of(None, &[&long], None).ids, "+1 more");
        let callers = Callers::of(None, &[&none], None);
        let mut md = tonic::metadata::MetadataMap::new();
        callers.annotate(&mut md);
        assert!(md.is_empty(), "{md:?}");
    }

    #[test]
    fn an_ejected_endpoint_returns_after_its_backoff_which_doubles() {
        let e = Endpoint::bare("10.0.0.9:8001");
        let base = Duration::from_millis(100);
        e.eject(base, "test");
        let until = e.health.lock().ejected_until.unwrap();
        e.check_passed(Instant::now());
        assert!(e.ejected(), "not before the backoff is over");
        e.check_passed(until);
        assert!(!e.ejected());
        // Ejected again before a call passed: 200 ms. Failing while out does not double it.
        let t0 = Instant::now();
        e.eject(base, "test");
        e.eject(base, "test");
        let second = e.health.lock().ejected_until.unwrap() - t0;
        assert!(second >= Duration::from_millis(200) && second < Duration::from_millis(390), "{second:?}");
        assert_eq!(e.health.lock().ejections, 2);
        // A good call resets the count; many ejections in a row stay within the cap.
        e.call_passed();
        assert_eq!(e.health.lock().ejections, 0);
        for _ in 0..40 {
            e.health.lock().ejected_until = None;
            e.eject(base, "test");
        }
        assert!(e.health.lock().ejected_until.unwrap() - Instant::now() <= MAX_BACKOFF);
    }
}
