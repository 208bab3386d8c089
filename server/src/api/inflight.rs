//! A byte budget for request bodies in flight, shared by both protocols. Each request's
//! bytes are taken from the budget as they arrive (HTTP: all at once from its
//! Content-Length, before any is read) and given back when its answer is sent, so a
//! burst of large requests is refused with RESOURCE_EXHAUSTED / 429 instead of all being
//! buffered and decoded at once.
//!
//! Part of the budget is kept for small requests: a flood of large bodies may hold all
//! but the reserve, so requests of a usual size (a JPEG, a tensor) are still served
//! while it lasts. A body counts as large once its bytes pass `small` (HTTP: from its
//! Content-Length; a streamed body when it gets there), and then holds its whole size in
//! the large requests' share too.

use super::access::Denied;
use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The budget: one permit per byte, in two semaphores: every request's bytes take from
/// `all`, large requests' bytes from `large` too, which holds all but the reserve.
#[derive(Clone)]
pub struct InflightBudget {
    all: Arc<Semaphore>,
    large: Arc<Semaphore>,
    limit: usize,
    large_limit: usize,
    /// A request of at most this many bytes is small.
    small: usize,
}

impl InflightBudget {
    /// `limit_bytes` in all; an eighth of it (less where the largest message would not
    /// fit in the rest) is kept for requests of at most 1/64 of that reserve, so that it
    /// takes 64 large bodies still under that size, all at once, to fill it.
    pub fn new(limit_bytes: usize, largest_message: usize) -> InflightBudget {
        // tokio caps a semaphore's permits at usize::MAX >> 3.
        let limit = limit_bytes.min(Semaphore::MAX_PERMITS);
        // The largest gRPC body: the message and its 5-byte length prefix.
        let largest_body = largest_message.saturating_add(5);
        let reserve = (limit / 8).min(limit.saturating_sub(largest_body));
        InflightBudget::with_reserve(limit, reserve, reserve / 64)
    }

    fn with_reserve(limit: usize, reserve: usize, small: usize) -> InflightBudget {
        let large_limit = limit - reserve;
        InflightBudget {
            all: Arc::new(Semaphore::new(limit)),
            large: Arc::new(Semaphore::new(large_limit)),
            limit,
            large_limit,
            small,
        }
    }

    /// The most one request of `n` bytes may hold: all but the reserve when it is large.
    /// Capped where tokio's semaphores count a take (u32).
    fn most_for(&self, n: usize) -> usize {
        let cap = if n > self.small { self.large_limit } else { self.limit };
        cap.min(u32::MAX as usize)
    }

    /// Bytes held by requests now.
    pub fn used(&self) -> usize {
        self.limit - self.all.available_permits()
    }

    fn lease(&self) -> Lease {
        Lease(Arc::new(LeaseInner { budget: self.clone(), held: Mutex::new(Held::default()) }))
    }
}

/// One request's share; every clone (the body's, the response future's) must be gone
/// before its bytes return to the budget.
#[derive(Clone)]
struct Lease(Arc<LeaseInner>);

struct LeaseInner {
    budget: InflightBudget,
    held: Mutex<Held>,
}

/// What one request holds: its bytes so far, from `all`, and from `large` once past `small`.
#[derive(Default)]
struct Held {
    bytes: usize,
    all: Option<OwnedSemaphorePermit>,
    large: Option<OwnedSemaphorePermit>,
}

fn acquire(sem: &Arc<Semaphore>, bytes: usize) -> Option<OwnedSemaphorePermit> {
    sem.clone().try_acquire_many_owned(u32::try_from(bytes).ok()?).ok()
}

fn merge(into: &mut Option<OwnedSemaphorePermit>, permit: OwnedSemaphorePermit) {
    match into.as_mut() {
        Some(p) => p.merge(permit),
        None => *into = Some(permit),
    }
}

impl Lease {
    fn take(&self, bytes: usize) -> Result<(), String> {
        if bytes == 0 {
            return Ok(());
        }
        if u32::try_from(bytes).is_err() {
            // tokio's semaphores count a take in u32.
            return Err(format!("a body frame of {bytes} bytes is more than one request may hold at once"));
        }
        let b = &self.0.budget;
        let mut held = self.0.held.lock();
        let total = held.bytes.saturating_add(bytes);
        // A body turning large takes its whole size from the large share, not just this frame.
        // No reserve (the largest message needs the whole budget): one share, as if small.
        // (Between taking from `large` and failing on `all`, a request briefly holds large
        // permits another may be refused for: a retry finds them back.)
        let is_large = total > b.small && b.large_limit < b.limit;
        let large_bytes = is_large.then_some(if held.large.is_some() { bytes } else { total });
        let large = large_bytes
            .map(|n| {
                acquire(&b.large, n).ok_or_else(|| {
                    format!(
                        "too many large request bytes in flight: {} MiB of the {} MiB that requests over {} KiB \
                         may hold are taken (the rest of sluice serve --max-inflight-mb is kept for smaller ones); \
                         retry later",
                        (b.large_limit - b.large.available_permits()) >> 20,
                        b.large_limit >> 20,
                        b.small >> 10
                    )
                })
            })
            .transpose()?;
        let all = acquire(&b.all, bytes).ok_or_else(|| {
            format!(
                "too many request bytes in flight: {} MiB of the {} MiB budget are held by other requests \
                 (sluice serve --max-inflight-mb); retry later",
                b.used() >> 20,
                b.limit >> 20
            )
        })?;
        held.bytes = total;
        merge(&mut held.all, all);
        if let Some(l) = large {
            merge(&mut held.large, l);
        }
        Ok(())
    }
}

/// A request body that takes its bytes from the lease as they arrive; past the budget it
/// fails with a RESOURCE_EXHAUSTED status (tonic answers the call with it).
pub struct BudgetedBody<B> {
    inner: B,
    lease: Lease,
    /// Taken up front from the declared length.
    counted: bool,
    /// Resolves when the server starts to shut down or the body's time is up: a body
    /// still arriving then fails, so a client sending slowly can neither hold its share
    /// of the budget for long nor hold the shutdown. Taken once it has fired.
    cutoff: Option<Pin<Box<dyn Future<Output = &'static str> + Send>>>,
}

impl<B> Body for BudgetedBody<B>
where
    B: Body + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, Self::Error>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(f) => f,
            Poll::Pending => {
                if let Some(Poll::Ready(why)) = self.cutoff.as_mut().map(|c| c.as_mut().poll(cx)) {
                    self.cutoff = None;
                    return Poll::Ready(Some(Err(Box::new(tonic::Status::unavailable(why)))));
                }
                return Poll::Pending;
            }
        };
        Poll::Ready(match frame {
            Some(Ok(f)) => {
                let len = if self.counted { 0 } else { f.data_ref().map_or(0, |d| d.remaining()) };
                match self.lease.take(len) {
                    Ok(()) => Some(Ok(f)),
                    Err(m) => Some(Err(Box::new(tonic::Status::resource_exhausted(m)))),
                }
            }
            Some(Err(e)) => Some(Err(e.into())),
            None => None,
        })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The tower layer for both servers.
#[derive(Clone)]
pub struct InflightLayer {
    budget: InflightBudget,
    stopping: tokio::sync::watch::Receiver<bool>,
    body_timeout: std::time::Duration,
}

impl InflightLayer {
    /// `stopping` turns true when the server starts to shut down; a body must arrive
    /// whole within `body_timeout`.
    pub fn new(
        budget: InflightBudget,
        stopping: tokio::sync::watch::Receiver<bool>,
        body_timeout: std::time::Duration,
    ) -> InflightLayer {
        InflightLayer { budget, stopping, body_timeout }
    }
}

impl<S> tower::Layer<S> for InflightLayer {
    type Service = Inflight<S>;
    fn layer(&self, inner: S) -> Inflight<S> {
        Inflight {
            inner,
            budget: self.budget.clone(),
            stopping: self.stopping.clone(),
            body_timeout: self.body_timeout,
        }
    }
}

#[derive(Clone)]
pub struct Inflight<S> {
    inner: S,
    budget: InflightBudget,
    stopping: tokio::sync::watch::Receiver<bool>,
    body_timeout: std::time::Duration,
}

/// The request body of one of the two servers: refused requests are answered in its
/// protocol, and a budgeted body is boxed back into it.
pub trait ProtocolBody: Body + Sized + Send + Unpin + 'static {
    /// `too_large`: the request alone is over the budget (413), not just now (429).
    fn refuse(message: String, too_large: bool) -> http::Response<Self>;
    fn deny(denied: Denied) -> http::Response<Self>;
    fn wrap(b: BudgetedBody<Self>) -> Self;
}

/// gRPC: RESOURCE_EXHAUSTED, trailers-only.
impl ProtocolBody for tonic::body::Body {
    fn refuse(message: String, _too_large: bool) -> http::Response<Self> {
        tonic::Status::resource_exhausted(message).into_http()
    }
    fn deny(denied: Denied) -> http::Response<Self> {
        match denied {
            Denied::Key(m) => tonic::Status::unauthenticated(m),
            Denied::Forbidden(m) => tonic::Status::permission_denied(m),
        }
        .into_http()
    }
    fn wrap(b: BudgetedBody<Self>) -> Self {
        tonic::body::Body::new(b)
    }
}

/// HTTP: 429 with the v2 protocol's error body.
impl ProtocolBody for axum::body::Body {
    fn refuse(message: String, too_large: bool) -> http::Response<Self> {
        use axum::response::IntoResponse;
        match too_large {
            true => crate::error::Error::TooLarge(message).into_response(),
            false => crate::error::Error::Busy(message).into_response(),
        }
    }
    fn deny(denied: Denied) -> http::Response<Self> {
        use axum::response::IntoResponse;
        let (status, m) = match denied {
            Denied::Key(m) => (http::StatusCode::UNAUTHORIZED, m),
            Denied::Forbidden(m) => (http::StatusCode::FORBIDDEN, m),
        };
        (status, axum::Json(serde_json::json!({ "error": m }))).into_response()
    }
    fn wrap(b: BudgetedBody<Self>) -> Self {
        axum::body::Body::new(b)
    }
}

impl<S, B> tower::Service<http::Request<B>> for Inflight<S>
where
    B: ProtocolBody,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S: tower::Service<http::Request<B>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let lease = self.budget.lease();
        // A declared length is taken whole before a byte is read (hyper holds the body
        // to it); otherwise bytes are taken frame by frame.
        let declared = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if let Some(n) = declared {
            if n > self.budget.most_for(n) {
                let m = format!(
                    "a body of {} MiB is larger than the most one request may hold of the in-flight budget, \
                     {} MiB (sluice serve --max-inflight-mb)",
                    n >> 20,
                    self.budget.most_for(n) >> 20
                );
                return Box::pin(std::future::ready(Ok(B::refuse(m, true))));
            }
            if let Err(m) = lease.take(n) {
                return Box::pin(std::future::ready(Ok(B::refuse(m, false))));
            }
        }
        let body_lease = lease.clone();
        let (mut rx, timeout) = (self.stopping.clone(), self.body_timeout);
        let cutoff: Pin<Box<dyn Future<Output = &'static str> + Send>> = Box::pin(async move {
            tokio::select! {
                _ = rx.wait_for(|s| *s) => "the server is shutting down",
                () = tokio::time::sleep(timeout) => {
                    "the request body did not arrive in time (sluice serve --http-body-timeout-s)"
                }
            }
        });
        let req = req.map(|inner| {
            B::wrap(BudgetedBody { inner, lease: body_lease, counted: declared.is_some(), cutoff: Some(cutoff) })
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await;
            // Held until the answer is ready: the decoded request lives that long.
            drop(lease);
            resp
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    type Frames = futures::stream::Iter<std::vec::IntoIter<Result<Frame<bytes::Bytes>, std::convert::Infallible>>>;

    fn chunked(parts: &[&'static [u8]]) -> http_body_util::StreamBody<Frames> {
        let frames: Vec<_> = parts.iter().map(|p| Ok(Frame::data(bytes::Bytes::from_static(p)))).collect();
        http_body_util::StreamBody::new(futures::stream::iter(frames))
    }

    #[tokio::test]
    async fn bodies_take_bytes_as_they_arrive_and_give_them_back() {
        let budget = InflightBudget::with_reserve(10, 0, 0);
        let first =
            BudgetedBody { inner: chunked(&[b"12345", b"678"]), lease: budget.lease(), counted: false, cutoff: None };
        let held = first.collect().await.unwrap().to_bytes();
        assert_eq!(&held[..], b"12345678");
        assert_eq!(budget.used(), 0, "the lease went with the body");

        let lease = budget.lease();
        let a = BudgetedBody { inner: chunked(&[b"1234567"]), lease: lease.clone(), counted: false, cutoff: None };
        let _a = a.collect().await.unwrap();
        assert_eq!(budget.used(), 7, "held while the request is answered");
        let b = BudgetedBody { inner: chunked(&[b"12", b"345"]), lease: budget.lease(), counted: false, cutoff: None };
        let err = b.collect().await.unwrap_err();
        let status = err.downcast_ref::<tonic::Status>().expect("a gRPC status");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("--max-inflight-mb"), "{}", status.message());
        drop(lease);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn the_reserve_is_an_eighth_and_leaves_room_for_the_largest_message() {
        let b = InflightBudget::new(512 << 20, 256 << 20);
        assert_eq!((b.large_limit, b.small), (448 << 20, 1 << 20));
        assert_eq!((b.most_for(1 << 20), b.most_for((1 << 20) + 1)), (512 << 20, 448 << 20));
        // Where the largest message needs the whole budget, there is no reserve.
        let b = InflightBudget::new(256 << 20, 256 << 20);
        assert_eq!((b.large_limit, b.small), (256 << 20, 0));
        // Where it needs more than seven eighths, the reserve is what it leaves: room for
        // the largest message with gRPC's 5-byte prefix.
        let b = InflightBudget::new(280 << 20, 256 << 20);
        assert_eq!(b.large_limit, (256 << 20) + 5);
        // Past u32, a take cannot be counted: that is the most one request may hold.
        let b = InflightBudget::new(8 << 30, 256 << 20);
        assert_eq!(b.most_for(5 << 30), u32::MAX as usize);
    }

    #[test]
    fn large_bodies_leave_the_reserve_to_small_ones() {
        // 100 bytes, 20 of them kept for requests of at most 5.
        let budget = InflightBudget::with_reserve(100, 20, 5);
        let big = budget.lease();
        big.take(4).unwrap();
        assert_eq!(budget.large.available_permits(), 80, "small so far");
        big.take(46).unwrap();
        assert_eq!(budget.large.available_permits(), 30, "past 5 bytes it holds its whole size as large");
        let other = budget.lease();
        let err = other.take(40).unwrap_err();
        assert!(err.contains("too many large request bytes") && err.contains("--max-inflight-mb"), "{err}");
        assert_eq!(budget.used(), 50, "a refused take holds nothing");
        other.take(30).unwrap();
        assert_eq!((budget.used(), budget.large.available_permits()), (80, 0));
        // The large share is full; small requests still have the reserve.
        let small: Vec<_> = (0..4)
            .map(|_| {
                let l = budget.lease();
                l.take(5).unwrap();
                l
            })
            .collect();
        assert_eq!(budget.used(), 100);
        let err = budget.lease().take(1).unwrap_err();
        assert!(err.contains("budget are held by other requests"), "{err}");
        drop((small, big, other));
        assert_eq!((budget.used(), budget.large.available_permits()), (0, 80));
    }

    #[test]
    fn without_a_reserve_every_request_shares_one_budget() {
        let budget = InflightBudget::new(100, 100);
        let a = budget.lease();
        a.take(60).unwrap();
        let err = budget.lease().take(50).unwrap_err();
        assert!(err.starts_with("too many request bytes in flight: 0 MiB of the 0 MiB budget"), "{err}");
        assert_eq!(budget.large.available_permits(), 100, "no large share in use");
    }
}
