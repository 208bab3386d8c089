//! Accepting and keeping connections, for both servers: at most so many open per
//! listener (past that, new clients wait in the kernel's backlog), accept errors (no file
//! descriptors left) back off instead of spinning, HTTP clients must send their headers and
//! bodies within time limits, and at shutdown every connection without a request in flight
//! closes at once (a client stuck mid-header does not hold the exit for its timeout).

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

/// What a connection may take.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Open connections per listener.
    pub max_connections: usize,
    /// HTTP/1: time to send a request's headers (also an idle connection's time limit
    /// between requests).
    pub header_read_timeout: Duration,
    /// HTTP/2 streams a client may have open on one connection.
    pub max_concurrent_streams: u32,
    /// Bytes of headers per request.
    pub max_header_bytes: u32,
}

/// How long to wait after an accept error before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Takes the next connection once one of `slots` is free, backing off on errors.
async fn accept_limited(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> (TcpStream, SocketAddr, OwnedSemaphorePermit) {
    let permit = slots.clone().acquire_owned().await.expect("the semaphore is never closed");
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                // Nagle's algorithm holds back HTTP/2's small frames behind delayed ACKs.
                let _ = tcp.set_nodelay(true);
                return (tcp, peer, permit);
            }
            Err(e) => {
                // Out of file descriptors and the like: the error repeats until some
                // connection closes, so wait instead of spinning on it.
                tracing::warn!("accept failed: {e}; retrying in {} ms", ACCEPT_BACKOFF.as_millis());
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// A connection holding one of its listener's slots until it closes. Until the client
/// has sent [`HANDSHAKE_BYTES`] (HTTP/2's preface and a SETTINGS header, or the start of
/// an HTTP/1 request), it has the header timeout to do so, and at shutdown it reads as
/// closed: a client that connects and sends nothing holds a slot only that long.
pub struct Limited<IO> {
    io: IO,
    _slot: OwnedSemaphorePermit,
    /// Bytes received so far, up to [`HANDSHAKE_BYTES`].
    received: usize,
    /// The handshake deadline or the shutdown, whichever comes first; taken once fired.
    cutoff: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// The cutoff fired before the handshake: reads see the end of the stream.
    cut: bool,
}

/// HTTP/2's connection preface (24 bytes) and a SETTINGS frame's header (9).
const HANDSHAKE_BYTES: usize = 33;

impl<IO> Limited<IO> {
    fn new(io: IO, slot: OwnedSemaphorePermit, handshake: Duration, stopping: watch::Receiver<bool>) -> Self {
        let cutoff = Box::pin(async move {
            tokio::select! {
                () = stopped(stopping) => {}
                () = tokio::time::sleep(handshake) => {}
            }
        });
        Limited { io, _slot: slot, received: 0, cutoff: Some(cutoff), cut: false }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Limited<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.cut {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                self.received = (self.received + buf.filled().len() - before).min(HANDSHAKE_BYTES);
                if self.received >= HANDSHAKE_BYTES {
                    self.cutoff = None;
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.cutoff.as_mut().map(|c| c.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => {
                    self.cutoff = None;
                    self.cut = true;
                    Poll::Ready(Ok(()))
                }
                _ => Poll::Pending,
            },
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Limited<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Limited<TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Resolves once `stopping` turns true.
fn stopped(mut stopping: watch::Receiver<bool>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        let _ = stopping.wait_for(|s| *s).await;
    })
}

/// The gRPC server's connections: limited, backing off on errors.
pub fn grpc_incoming(
    listener: TcpListener,
    limits: &ConnLimits,
    stopping: watch::Receiver<bool>,
) -> impl futures::Stream<Item = io::Result<Limited<TcpStream>>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let handshake = limits.header_read_timeout;
    futures::stream::unfold((listener, slots), move |(listener, slots)| {
        let stopping = stopping.clone();
        async move {
            let (tcp, _, slot) = accept_limited(&listener, &slots).await;
            Some((Ok(Limited::new(tcp, slot, handshake, stopping)), (listener, slots)))
        }
    })
}

/// A response body that keeps its request counted in flight until it has been sent.
struct Guarded {
    body: axum::body::Body,
    _guard: InFlightGuard,
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = axum::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Requests of one HTTP connection whose answer is not sent yet.
#[derive(Clone, Default)]
struct InFlight(Arc<AtomicUsize>);

struct InFlightGuard(Arc<AtomicUsize>);

impl InFlight {
    fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self.0.clone())
    }
    fn idle(&self) -> bool {
        self.0.load(Ordering::Acquire) == 0
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Resolves once the server stops and this connection has had no request in flight for
/// a moment (long enough for hyper to write the last answer and close it itself): one
/// still sending the headers of a request is then closed.
async fn idle_after_stop(stopping: watch::Receiver<bool>, flight: InFlight) {
    stopped(stopping).await;
    let mut quiet = 0;
    while quiet < 10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        quiet = if flight.idle() { quiet + 1 } else { 0 };
    }
}

/// Serves `app` over HTTP (1.1 and 2) on `listener` (plain or TLS) until `stop`, then
/// lets requests in flight finish while idle and half-sent connections close at once.
pub async fn serve_http<L>(mut listener: L, app: axum::Router, limits: ConnLimits, stopping: watch::Receiver<bool>)
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size((limits.max_header_bytes as usize).max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes)
        // Image tensors are large: the 64 KiB default window costs round trips.
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        // A client that stops answering pings is gone: free its connection.
        .keep_alive_interval(Some(Duration::from_secs(60)))
        .keep_alive_timeout(Duration::from_secs(20));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = stopped(stopping.clone());
    loop {
        // A slot first: past the limit, new clients wait in the kernel's backlog.
        // (axum's listeners back off on accept errors themselves.)
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
            () = stop.as_mut() => break,
        };
        let (io, peer) = tokio::select! {
            c = listener.accept() => c,
            () = stop.as_mut() => break,
        };
        // The client's address reaches handlers and the access check as axum's would.
        let flight = InFlight::default();
        let counted = flight.clone();
        let svc = app
            .clone()
            .map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            })
            .map_future(move |answer| {
                // In flight until the answer's body has been sent, not just its headers.
                let guard = counted.enter();
                async move {
                    answer.await.map(|resp: axum::response::Response| {
                        resp.map(|body| axum::body::Body::new(Guarded { body, _guard: guard }))
                    })
                }
            });
        let io = Limited::new(io, slot, limits.header_read_timeout, stopping.clone());
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(svc));
        let conn = graceful.watch(conn.into_owned());
        let stopping = stopping.clone();
        tokio::spawn(async move {
            tokio::select! {
                ended = conn => if let Err(e) = ended {
                    tracing::debug!(%peer, "HTTP connection ended: {e}");
                },
                () = idle_after_stop(stopping, flight) => tracing::debug!(%peer, "closed at shutdown"),
            }
        });
    }
    drop(listener);
    // Idle connections and those still sending headers close now; the others after
    // their response.
    graceful.shutdown().await;
}
