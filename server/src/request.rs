//! What a request carries in and out of the engine, whatever protocol it came over:
//! named tensors, the request's options and, when asked for, where its time went.

use sluice_ops::Tensor;
use std::time::Duration;

/// gRPC metadata / HTTP header carrying the request id when the body has none.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// W3C trace context headers (gRPC metadata or HTTP): the caller's trace, which the
/// request joins and passes on to remote models.
pub const TRACEPARENT_HEADER: &str = "traceparent";
pub const TRACESTATE_HEADER: &str = "tracestate";

/// The only version a flat `models/<name>/` folder has.
pub const DEFAULT_VERSION: &str = "1";

#[derive(Debug, Clone)]
pub struct NamedTensor {
    pub name: String,
    pub tensor: Tensor,
}

#[derive(Debug, Clone, Default)]
pub struct InferRequest {
    pub model_name: String,
    /// Empty: the default version.
    pub model_version: String,
    pub id: String,
    pub inputs: Vec<NamedTensor>,
    /// Outputs to return; empty: all of them.
    pub outputs: Vec<String>,
    /// Return where the request's time went ([`InferResponse::timing`]).
    pub timing: bool,
    /// The request's v2 `parameters` that are plain values (pipelines read the ones they
    /// declare; the rest are ignored).
    pub parameters: Vec<(String, Scalar)>,
    /// The trace the request belongs to, passed on to the servers it calls.
    pub trace: Option<TraceContext>,
}

impl InferRequest {
    /// Who the request's work is for, as its steps carry it to the batchers.
    pub fn origin(&self) -> std::sync::Arc<Origin> {
        std::sync::Arc::new(Origin { id: self.id.clone(), trace: self.trace.clone() })
    }
}

/// Who a piece of queued work is for: the request's id and trace, which a remote
/// model's call carries on (a batch names every request in it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    pub id: String,
    pub trace: Option<TraceContext>,
}

/// A W3C trace context: what a `traceparent` header says, and the `tracestate` that
/// came with it (passed on unread).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    /// The caller's span, the parent of the next hop's.
    pub span_id: u64,
    pub flags: u8,
    pub state: Option<String>,
}

/// The most of a `tracestate` passed on: the spec's bound on what must be kept.
const MAX_TRACESTATE: usize = 512;

/// A `tracestate` header as passed on: printable ASCII, at most
/// 512 bytes, cut as the spec says: entries over 128 bytes go first, then entries from
/// the end. None when nothing is left.
fn bounded_tracestate(t: &str) -> Option<String> {
    if !t.bytes().all(|b| (b' '..=b'~').contains(&b) || b == b'\t') {
        return None;
    }
    let mut entries: Vec<&str> = t.split(',').map(|e| e.trim_matches([' ', '\t'])).filter(|e| !e.is_empty()).collect();
    let len = |es: &[&str]| es.iter().map(|e| e.len() + 1).sum::<usize>().saturating_sub(1);
    if len(&entries) > MAX_TRACESTATE {
        entries.retain(|e| e.len() <= 128);
    }
    while len(&entries) > MAX_TRACESTATE {
        entries.pop();
    }
    (!entries.is_empty()).then(|| entries.join(","))
}

impl TraceContext {
    /// Reads `traceparent` (version 00, or a later version's first four fields, as the
    /// spec asks). None when malformed: a bad header starts a new trace, it does not
    /// fail the request.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<TraceContext> {
        let s = traceparent.trim_matches([' ', '\t']);
        let f: Vec<&str> = s.splitn(5, '-').collect();
        if f.len() < 4 || f[0].len() != 2 || f[1].len() != 32 || f[2].len() != 16 || f[3].len() != 2 {
            return None;
        }
        let hex = |x: &str| x.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !f[..4].iter().all(|x| hex(x)) || f[0] == "ff" || (f[0] == "00" && f.len() > 4) {
            return None;
        }
        let trace_id = u128::from_str_radix(f[1], 16).ok()?;
        let span_id = u64::from_str_radix(f[2], 16).ok()?;
        let flags = u8::from_str_radix(f[3], 16).ok()?;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        let state = tracestate.and_then(bounded_tracestate);
        Some(TraceContext { trace_id, span_id, flags, state })
    }

    /// The `traceparent` header for the next hop (version 00: only the sampled flag is
    /// defined there, so other bits are not passed on).
    pub fn traceparent(&self) -> String {
        format!("00-{:032x}-{:016x}-{:02x}", self.trace_id, self.span_id, self.flags & 1)
    }

    /// Whether the caller records this trace (the sampled flag).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

#[derive(Debug, Clone)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    pub id: String,
    pub outputs: Vec<NamedTensor>,
    /// When asked for: per step (each pipeline node, or the model itself) the time its
    /// work waited (for a pool thread or a batch) and computed, summed over its items.
    pub timing: Option<Vec<StepTiming>>,
}

/// Where one step of a request spent its time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepTiming {
    /// The pipeline node, or the model's name.
    pub step: String,
    pub queue: Duration,
    pub compute: Duration,
    /// Items (and fan-out elements) the step ran for this request.
    pub items: u64,
}

/// A plain request parameter value (v2 `parameters`), as pipelines read it.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Num(f64),
    Str(String),
    Bool(bool),
}

impl std::fmt::Display for Scalar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::Num(n) => write!(f, "{n}"),
            Scalar::Str(s) => write!(f, "'{s}'"),
            Scalar::Bool(b) => write!(f, "{b}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_read_as_the_w3c_spec_says() {
        let h = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceContext::parse(h, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(t.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(t.span_id, 0x00f067aa0ba902b7);
        assert_eq!(t.flags, 1);
        assert_eq!(t.state.as_deref(), Some("congo=t61rcWkgMzE"));
        assert_eq!(t.traceparent(), h, "written back the same");
        // A later version may add fields after the four it shares with 00.
        assert!(TraceContext::parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what", None).is_some());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad, None), None, "{bad}");
        }
        // A non-printable tracestate is dropped, the context kept; a long one is cut by
        // entries: those over 128 bytes first, then from the end.
        assert_eq!(TraceContext::parse(h, Some("a=\u{7f}")).unwrap().state, None);
        let long = "a=".to_string() + &"b".repeat(600);
        assert_eq!(TraceContext::parse(h, Some(&long)).unwrap().state, None);
        let big = format!(
            "k=1, big={}, {}",
            "x".repeat(200),
            (0..60).map(|i| format!("v{i:02}=12")).collect::<Vec<_>>().join(",")
        );
        let cut = TraceContext::parse(h, Some(&big)).unwrap().state.unwrap();
        assert!(cut.len() <= 512 && cut.starts_with("k=1,v00=12,") && !cut.contains("big="), "{cut}");
        // Only the sampled flag goes on under version 00.
        let t = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff", None).unwrap();
        assert!(t.sampled() && t.traceparent().ends_with("-01"));
    }
}
