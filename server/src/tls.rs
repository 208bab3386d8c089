//! TLS for both listeners: one certificate and key (PEM) serve gRPC and HTTP, and an
//! optional client CA makes both require client certificates (mutual TLS).

use axum::serve::Listener;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::rustls::{self, pki_types::pem::PemObject, pki_types::CertificateDer, pki_types::PrivateKeyDer};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Where the server's TLS material is.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// Private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates, PEM: clients must present a certificate signed by one.
    pub client_ca: Option<PathBuf>,
}

/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress on the HTTP port at most; more connections wait in the
/// kernel's backlog (each handshake costs a signature and a file descriptor).
const MAX_HANDSHAKES: usize = 512;

/// The files, read and checked once at start-up.
#[derive(Clone)]
pub struct Tls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    client_ca_pem: Option<Vec<u8>>,
    rustls: Arc<rustls::ServerConfig>,
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("TLS: cannot read {}: {e}", path.display()))
}

fn certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("TLS: {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("TLS: {}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

impl Tls {
    pub fn load(files: &TlsFiles) -> Result<Tls, String> {
        let cert_pem = read(&files.cert)?;
        let key_pem = read(&files.key)?;
        let client_ca_pem = files.client_ca.as_deref().map(read).transpose()?;
        let chain = certs(&cert_pem, &files.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| format!("TLS: {}: no usable private key: {e}", files.key.display()))?;
        // tonic builds its gRPC acceptor with rustls's process default: make it ring, the
        // one provider compiled in, so it never has to guess.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let builder = match (&client_ca_pem, &files.client_ca) {
            (Some(pem), Some(path)) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certs(pem, path)? {
                    roots.add(c).map_err(|e| format!("TLS: {}: {e}", path.display()))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| format!("TLS: {}: {e}", path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| {
            format!("TLS: {} and {} do not make a key pair: {e}", files.cert.display(), files.key.display())
        })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls { cert_pem, key_pem, client_ca_pem, rustls: Arc::new(config) })
    }

    /// The same material for tonic's own TLS acceptor.
    pub fn grpc(&self) -> tonic::transport::ServerTlsConfig {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let mut c = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(ca) = &self.client_ca_pem {
            c = c.client_ca_root(Certificate::from_pem(ca));
        }
        c
    }

    /// An HTTP listener that hands out connections once their handshake is done. The
    /// handshakes run in their own tasks (at most [`MAX_HANDSHAKES`] at once), so a slow
    /// or stuck client never holds up the accept loop; one that has not finished in 10 s
    /// is dropped. Dropping the listener ends the accept loop and its handshakes.
    pub fn http_listener(&self, tcp: TcpListener) -> io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let acceptor = TlsAcceptor::from(self.rustls.clone());
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
            let mut handshakes = JoinSet::new();
            loop {
                let permit = permits.clone().acquire_owned().await.expect("the semaphore is never closed");
                let (stream, peer) = loop {
                    tokio::select! {
                        accepted = tcp.accept() => match accepted {
                            Ok(c) => break c,
                            Err(e) => {
                                // Out of file descriptors and the like: back off, don't spin.
                                tracing::warn!("HTTP accept failed: {e}");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        },
                        // Reap finished handshakes so the set stays small.
                        Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
                    }
                };
                let _ = stream.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                handshakes.spawn(async move {
                    let _permit = permit;
                    let handshake = async {
                        let tls = acceptor.accept(stream).await?;
                        // A full channel means axum is not taking connections: give up with the rest.
                        tx.send((tls, peer)).await.map_err(|_| io::Error::other("the server is stopping"))
                    };
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { rx, local, task })
    }
}

pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept task only ends when aborted by our own drop.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
