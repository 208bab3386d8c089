//! Who may call what. The APIs fall into groups (Triton's names where Triton has them);
//! each group can require a header with a secret value, separately per protocol
//! (`--grpc-restricted-protocol`, `--http-restricted-api`, as Triton spells them). The
//! calls that change what is served (load, unload, reload) also follow the model-control
//! policy (by default only from the server's own host), and over HTTP refuse requests a
//! browser sends on behalf of another site.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use subtle::ConstantTimeEq;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ApiGroup {
    /// Model and pipeline inference.
    Inference,
    /// Liveness and readiness: the v2 calls and grpc.health.v1.
    Health,
    /// Server and model metadata.
    Metadata,
    /// Triton's model configuration call.
    ModelConfig,
    /// Per-model statistics.
    Statistics,
    /// The repository index and load, unload, reload.
    ModelRepository,
    /// Prometheus' /metrics (HTTP).
    Metrics,
    /// The live dashboard (HTTP).
    Dashboard,
}

impl ApiGroup {
    pub const ALL: [ApiGroup; 8] = [
        ApiGroup::Inference,
        ApiGroup::Health,
        ApiGroup::Metadata,
        ApiGroup::ModelConfig,
        ApiGroup::Statistics,
        ApiGroup::ModelRepository,
        ApiGroup::Metrics,
        ApiGroup::Dashboard,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ApiGroup::Inference => "inference",
            ApiGroup::Health => "health",
            ApiGroup::Metadata => "metadata",
            ApiGroup::ModelConfig => "model-config",
            ApiGroup::Statistics => "statistics",
            ApiGroup::ModelRepository => "model-repository",
            ApiGroup::Metrics => "metrics",
            ApiGroup::Dashboard => "dashboard",
        }
    }
}

impl fmt::Display for ApiGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One restriction: these groups need `header: value`.
#[derive(Clone)]
pub struct Restriction {
    pub groups: Vec<ApiGroup>,
    /// Lower case, as HTTP/2 carries header names.
    pub header: String,
    pub value: String,
}

impl fmt::Debug for Restriction {
    // The value is a secret: never in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Restriction({:?} need header '{}')", self.groups, self.header)
    }
}

/// `GROUP[,GROUP...]:HEADER=VALUE`; a VALUE of `@PATH` is read from that file (trimmed),
/// so the secret stays out of the process list.
impl FromStr for Restriction {
    type Err = String;
    fn from_str(s: &str) -> Result<Restriction, String> {
        let usage = || format!("'{s}': expected GROUP[,GROUP...]:HEADER=VALUE, e.g. model-repository:admin-key=s3cret");
        let (groups, kv) = s.split_once(':').ok_or_else(usage)?;
        let (header, value) = kv.split_once('=').ok_or_else(usage)?;
        let groups = groups
            .split(',')
            .map(|g| {
                ApiGroup::ALL.into_iter().find(|a| a.name() == g.trim()).ok_or_else(|| {
                    let names: Vec<&str> = ApiGroup::ALL.iter().map(|a| a.name()).collect();
                    format!("'{g}' is not an API group; the groups: {}", names.join(", "))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let header = header.trim().to_ascii_lowercase();
        if header.is_empty() || http::HeaderName::from_bytes(header.as_bytes()).is_err() {
            return Err(format!("'{header}' is not a valid header name"));
        }
        let value = match value.strip_prefix('@') {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("reading the key for '{header}' from {path}: {e}"))?
                .trim()
                .to_string(),
            None => value.to_string(),
        };
        if value.is_empty() {
            return Err(format!("the value for '{header}' is empty"));
        }
        Ok(Restriction { groups, header, value })
    }
}

/// Who may call load, unload and reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum ModelControl {
    /// Nobody: the repository changes only through its files.
    Off,
    /// Clients on the server's own host (a sidecar, `kubectl exec`, `sluice load`).
    #[default]
    Loopback,
    /// Any client that reaches the port (restrict it with a key).
    Any,
}

/// The access rules of one protocol.
#[derive(Debug, Clone, Default)]
pub struct AccessRules {
    pub restrictions: Vec<Restriction>,
    pub model_control: ModelControl,
}

/// Why a call is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// No key, or the wrong one: 401 / UNAUTHENTICATED.
    Key(String),
    /// Not allowed from here at all: 403 / PERMISSION_DENIED.
    Forbidden(String),
}

impl AccessRules {
    /// Checks one call of `group` (`mutating`: it changes what is served).
    pub fn check(
        &self,
        group: ApiGroup,
        mutating: bool,
        headers: &http::HeaderMap,
        peer: Option<SocketAddr>,
    ) -> Result<(), Denied> {
        for r in self.restrictions.iter().filter(|r| r.groups.contains(&group)) {
            let given = headers.get(r.header.as_str()).map(|v| v.as_bytes()).unwrap_or_default();
            if !bool::from(given.ct_eq(r.value.as_bytes())) {
                return Err(Denied::Key(format!(
                    "the {group} API is restricted: send the header '{}' with the key the server was given",
                    r.header
                )));
            }
        }
        if mutating {
            match self.model_control {
                ModelControl::Off => {
                    return Err(Denied::Forbidden(
                        "model control is off (sluice serve --model-control off, or --reload none)".into(),
                    ))
                }
                ModelControl::Loopback if !peer.is_some_and(|p| p.ip().to_canonical().is_loopback()) => {
                    return Err(Denied::Forbidden(format!(
                        "model control is allowed only from the server's own host; this call came from {}: start \
                         the server with --model-control any (and a key: --http-restricted-api / \
                         --grpc-restricted-protocol model-repository:HEADER=KEY) to allow it",
                        peer.map_or("an unknown address".into(), |p| p.ip().to_string())
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Whether a browser sent this request on behalf of another site: its `Origin` names a
/// host other than the one it was sent to, or `Sec-Fetch-Site` says so.
pub fn cross_origin(headers: &http::HeaderMap) -> bool {
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if matches!(site, Some("cross-site" | "same-site")) {
        return true;
    }
    let Some(origin) = headers.get(http::header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let host = headers.get(http::header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin.split_once("://").map(|(_, h)| h.trim_end_matches('/'));
    origin_host.is_none() || origin_host != host
}

/// Whether the host a request was addressed to (Host, or HTTP/2's authority) is this
/// machine by a loopback name: with model control for loopback clients only, a request
/// to any other name from a loopback address is a browser tricked by DNS rebinding (a
/// page's own name pointed at 127.0.0.1).
pub fn addressed_to_loopback(authority: Option<&str>) -> bool {
    let Some(a) = authority else { return false };
    let host = match a.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => a.rsplit_once(':').map_or(a, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// The group of a gRPC method (`/package.Service/Method`) and whether it changes what
/// is served; `None` for methods of no known service (answered UNIMPLEMENTED anyway).
pub fn grpc_group(path: &str) -> Option<(ApiGroup, bool)> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    Some(match (service, method) {
        ("grpc.health.v1.Health", _) => (ApiGroup::Health, false),
        ("inference.GRPCInferenceService", m) => match m {
            "ServerLive" | "ServerReady" | "ModelReady" => (ApiGroup::Health, false),
            "ServerMetadata" | "ModelMetadata" => (ApiGroup::Metadata, false),
            "ModelConfig" => (ApiGroup::ModelConfig, false),
            "ModelInfer" | "ModelStreamInfer" => (ApiGroup::Inference, false),
            "ModelStatistics" => (ApiGroup::Statistics, false),
            "RepositoryIndex" => (ApiGroup::ModelRepository, false),
            "RepositoryModelLoad" | "RepositoryModelUnload" => (ApiGroup::ModelRepository, true),
            _ => return None,
        },
        _ => return None,
    })
}

/// The group of an HTTP path and whether it changes what is served.
pub fn http_group(path: &str) -> Option<(ApiGroup, bool)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // The shapes of http.rs's routes: a model's own calls come after its name (and
    // version), so a model named "ready" or "stats" is still a name.
    let model_call = |call: &str| match call {
        "infer" => Some(ApiGroup::Inference),
        "ready" => Some(ApiGroup::Health),
        "config" => Some(ApiGroup::ModelConfig),
        "stats" => Some(ApiGroup::Statistics),
        _ => None,
    };
    Some(match parts.as_slice() {
        ["v2", "health", ..] => (ApiGroup::Health, false),
        ["v2"] => (ApiGroup::Metadata, false),
        ["v2", "repository", "index"] => (ApiGroup::ModelRepository, false),
        ["v2", "repository", ..] => (ApiGroup::ModelRepository, true),
        ["v2", "models", "stats"] => (ApiGroup::Statistics, false),
        ["v2", "models", _] | ["v2", "models", _, "versions", _] => (ApiGroup::Metadata, false),
        ["v2", "models", _, call] | ["v2", "models", _, "versions", _, call] => (model_call(call)?, false),
        ["metrics"] => (ApiGroup::Metrics, false),
        ["dashboard", ..] => (ApiGroup::Dashboard, false),
        _ => return None,
    })
}

/// Which protocol a layer guards: it decides how paths map to groups and how a refusal
/// is written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Protocol {
    Grpc,
    Http,
}

/// The tower layer applying [`AccessRules`] in front of a server.
#[derive(Clone)]
pub struct AccessLayer {
    rules: Arc<AccessRules>,
    protocol: Protocol,
}

impl AccessLayer {
    pub fn new(rules: AccessRules, protocol: Protocol) -> AccessLayer {
        AccessLayer { rules: Arc::new(rules), protocol }
    }
}

impl<S> tower::Layer<S> for AccessLayer {
    type Service = Access<S>;
    fn layer(&self, inner: S) -> Access<S> {
        Access { inner, rules: self.rules.clone(), protocol: self.protocol }
    }
}

#[derive(Clone)]
pub struct Access<S> {
    inner: S,
    rules: Arc<AccessRules>,
    protocol: Protocol,
}

/// The client's address, as either server records it on the request.
fn peer<B>(req: &http::Request<B>) -> Option<SocketAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let ext = req.extensions();
    ext.get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .or_else(|| ext.get::<TcpConnectInfo>().and_then(|c| c.remote_addr()))
        .or_else(|| ext.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|c| c.get_ref().remote_addr()))
}

impl<S, B> tower::Service<http::Request<B>> for Access<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: super::inflight::ProtocolBody,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        let group = match self.protocol {
            Protocol::Grpc => grpc_group(path),
            Protocol::Http => http_group(path),
        };
        let verdict = match group {
            Some((group, mutating)) => {
                let checked = self.rules.check(group, mutating, req.headers(), peer(&req));
                // A page on another site may not make a browser change what is served.
                let authority = req
                    .headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .or_else(|| req.uri().authority().map(|a| a.as_str()));
                let browser_forgery = self.protocol == Protocol::Http
                    && (mutating || group == ApiGroup::ModelRepository)
                    && (cross_origin(req.headers())
                        || (mutating
                            && self.rules.model_control == ModelControl::Loopback
                            && !addressed_to_loopback(authority)));
                match checked {
                    Ok(()) if browser_forgery => Err(Denied::Forbidden(
                        "cross-origin requests may not use the repository API (and with --model-control \
                         loopback, a request must be addressed to localhost or a loopback address)"
                            .into(),
                    )),
                    other => other,
                }
            }
            None => Ok(()),
        };
        match verdict {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(denied) => {
                tracing::warn!(path = %req.uri().path(), peer = ?peer(&req), "refused: {denied:?}");
                Box::pin(std::future::ready(Ok(B::deny(denied))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
        pairs.iter().map(|(k, v)| (http::HeaderName::from_static(k), http::HeaderValue::from_static(v))).collect()
    }

    #[test]
    fn restrictions_parse_as_triton_writes_them() {
        let r: Restriction = "model-repository,statistics:Admin-Key=s3cret".parse().unwrap();
        assert_eq!(r.groups, vec![ApiGroup::ModelRepository, ApiGroup::Statistics]);
        assert_eq!((r.header.as_str(), r.value.as_str()), ("admin-key", "s3cret"));
        assert!(!format!("{r:?}").contains("s3cret"), "the key stays out of logs");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key"), "from-file\n").unwrap();
        let r: Restriction = format!("inference:authorization=@{}", dir.path().join("key").display()).parse().unwrap();
        assert_eq!(r.value, "from-file");
        for (bad, says) in [
            ("inference", "expected GROUP"),
            ("infer:k=v", "not an API group"),
            ("inference:=v", "not a valid header name"),
            ("inference:k=", "empty"),
            ("inference:k=@/nonexistent/key", "reading the key"),
        ] {
            let e = bad.parse::<Restriction>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn keys_are_checked_per_group() {
        let rules = AccessRules {
            restrictions: vec!["model-repository,metrics:admin-key=s3cret".parse().unwrap()],
            model_control: ModelControl::Any,
        };
        let none = headers(&[]);
        let wrong = headers(&[("admin-key", "guess")]);
        let right = headers(&[("admin-key", "s3cret")]);
        assert!(
            matches!(rules.check(ApiGroup::ModelRepository, true, &none, None), Err(Denied::Key(m)) if m.contains("'admin-key'"))
        );
        assert!(rules.check(ApiGroup::Metrics, false, &wrong, None).is_err());
        assert!(rules.check(ApiGroup::ModelRepository, true, &right, None).is_ok());
        assert!(rules.check(ApiGroup::Inference, false, &none, None).is_ok(), "other groups stay open");
    }

    #[test]
    fn model_control_follows_the_policy() {
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let remote: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let h = headers(&[]);
        let rules = |model_control| AccessRules { restrictions: vec![], model_control };
        assert!(rules(ModelControl::Loopback).check(ApiGroup::ModelRepository, true, &h, Some(local)).is_ok());
        let e = rules(ModelControl::Loopback).check(ApiGroup::ModelRepository, true, &h, Some(remote)).unwrap_err();
        assert!(matches!(&e, Denied::Forbidden(m) if m.contains("10.1.2.3") && m.contains("--model-control any")));
        assert!(rules(ModelControl::Loopback).check(ApiGroup::ModelRepository, false, &h, Some(remote)).is_ok());
        assert!(rules(ModelControl::Any).check(ApiGroup::ModelRepository, true, &h, Some(remote)).is_ok());
        assert!(rules(ModelControl::Off).check(ApiGroup::ModelRepository, true, &h, Some(local)).is_err());
    }

    #[test]
    fn cross_origin_requests_are_recognised() {
        assert!(!cross_origin(&headers(&[("host", "localhost:8000")])), "no Origin: not a browser form");
        assert!(!cross_origin(&headers(&[("host", "localhost:8000"), ("origin", "http://localhost:8000")])));
        assert!(cross_origin(&headers(&[("host", "localhost:8000"), ("origin", "http://evil.example")])));
        assert!(cross_origin(&headers(&[("host", "localhost:8000"), ("origin", "null")])));
        assert!(cross_origin(&headers(&[("sec-fetch-site", "cross-site")])));
    }

    #[test]
    fn loopback_names_are_recognised() {
        for a in ["localhost:8000", "127.0.0.1:8000", "127.0.0.1", "[::1]:8000", "LOCALHOST", "[::ffff:127.0.0.1]:80"] {
            assert!(addressed_to_loopback(Some(a)), "{a}");
        }
        for a in ["evil.example:8000", "10.0.0.1:8000", "sluice.serving.svc"] {
            assert!(!addressed_to_loopback(Some(a)), "{a}");
        }
        assert!(!addressed_to_loopback(None));
    }

    #[test]
    fn every_route_has_a_group() {
        assert_eq!(http_group("/v2/models/m/versions/1/infer"), Some((ApiGroup::Inference, false)));
        assert_eq!(http_group("/v2/models/m/ready"), Some((ApiGroup::Health, false)));
        assert_eq!(http_group("/v2/models/m"), Some((ApiGroup::Metadata, false)));
        assert_eq!(http_group("/v2/models/m/versions/2/config"), Some((ApiGroup::ModelConfig, false)));
        assert_eq!(http_group("/v2/repository/models/m/unload"), Some((ApiGroup::ModelRepository, true)));
        assert_eq!(http_group("/v2/repository/index"), Some((ApiGroup::ModelRepository, false)));
        assert_eq!(http_group("/dashboard/events"), Some((ApiGroup::Dashboard, false)));
        assert_eq!(http_group("/v2/models/ready"), Some((ApiGroup::Metadata, false)), "a model named ready");
        assert_eq!(http_group("/v2/models/infer/versions/3"), Some((ApiGroup::Metadata, false)));
        assert_eq!(http_group("/v2/models/stats/stats"), Some((ApiGroup::Statistics, false)));
        assert_eq!(
            grpc_group("/inference.GRPCInferenceService/RepositoryModelLoad"),
            Some((ApiGroup::ModelRepository, true))
        );
        assert_eq!(grpc_group("/grpc.health.v1.Health/Watch"), Some((ApiGroup::Health, false)));
        assert_eq!(grpc_group("/inference.GRPCInferenceService/ModelInfer"), Some((ApiGroup::Inference, false)));
    }
}
