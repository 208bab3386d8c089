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

/// A TCP connection holding one of its listener's slots until it closes.
pub struct Limited {
    tcp: TcpStream,
    _slot: OwnedSemaphorePermit,
    /// Bytes received so far, up to [`HANDSHAKE_BYTES`].
    received: usize,
    /// Resolves when the server stops: a client that has not even sent HTTP/2's preface
    /// and first SETTINGS by then reads as closed, instead of holding the shutdown.
    stopping: Pin<Box<dyn Future<Output = ()> + Send>>,
}

/// HTTP/2's connection preface (24 bytes) and a SETTINGS frame's header (9).
const HANDSHAKE_BYTES: usize = 33;

impl AsyncRead for Limited {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.tcp).poll_read(cx, buf) {
            Poll::Ready(r) => {
                self.received = (self.received + buf.filled().len() - before).min(HANDSHAKE_BYTES);
                Poll::Ready(r)
            }
            Poll::Pending if self.received < HANDSHAKE_BYTES && self.stopping.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Limited {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Limited {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp.connect_info()
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
    max_connections: usize,
    stopping: watch::Receiver<bool>,
) -> impl futures::Stream<Item = io::Result<Limited>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(max_connections));
    futures::stream::unfold((listener, slots), move |(listener, slots)| {
        let stopping = stopping.clone();
        async move {
            let (tcp, _, slot) = accept_limited(&listener, &slots).await;
            Some((Ok(Limited { tcp, _slot: slot, received: 0, stopping: stopped(stopping) }), (listener, slots)))
        }
    })
}

/// Requests of one HTTP connection whose answer is not ready yet.
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
                let guard = counted.enter();
                async move {
                    let r = answer.await;
                    drop(guard);
                    r
                }
            });
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
            drop(slot);
        });
    }
    drop(listener);
    // Idle connections and those still sending headers close now; the others after
    // their response.
    graceful.shutdown().await;
}
