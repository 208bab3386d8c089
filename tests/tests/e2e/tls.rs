//! TLS on both listeners, with and without client certificates, through the project's
//! client (gRPC) and a plain TLS socket (HTTP). Certificates are made here, per run.

use ndarray::array;
use rcgen::KeyPair;
use sluice_client::array::{ArrayExt, TensorExt};
use sluice_client::{Client, ClientError, ConnectOptions, InferOptions, TlsOptions};
use sluice_tests::pki::pki;
use sluice_tests::{affine_model, config, Repo};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::{self, pki_types::pem::PemObject};

fn repo() -> Repo {
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), "max_batch_size: 8\n");
    repo
}

async fn connect(url: String, tls: Option<TlsOptions>) -> Result<Client, ClientError> {
    let opts = ConnectOptions { tls, connect_timeout: Some(Duration::from_secs(5)), ..Default::default() };
    Client::connect_with(url, opts).await
}

/// The affine model (y = 2x + 1) through ndarray: what a TLS client should get back.
async fn affine_works(client: &Client) -> Result<(), ClientError> {
    let x = array![[1.0f32, 2.0, 3.0, 4.0]];
    let out = client.infer("affine", &[("x", &x.to_tensor())], InferOptions::default()).await?;
    let y = out.iter().find(|(n, _)| n == "y").expect("y").1.to_array::<f32>()?;
    assert_eq!(y, (x * 2.0 + 1.0).into_dyn());
    Ok(())
}

/// GET over HTTP/1.1 on a TLS socket; the status line, or the error.
async fn https_get(
    addr: std::net::SocketAddr,
    path: &str,
    ca_pem: &str,
    client: Option<&(String, String)>,
) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => {
            let chain =
                rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes()).map(|c| c.unwrap()).collect();
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    // With TLS 1.3 a refused client certificate surfaces on the first read.
    tls.read_to_end(&mut resp).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&resp);
    Ok(text.lines().next().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_grpc_and_http_and_plain_clients_are_refused() {
    let (repo, pki) = (repo(), pki());
    let mut cfg = config(repo.path());
    cfg.tls = Some(pki.write(repo.path(), false));
    let server = sluice_server::start(cfg).await.expect("server starts");
    let grpc = format!("https://{}", server.grpc_addr);
    let trust = TlsOptions { ca_pem: Some(pki.ca_pem.clone().into()), ..Default::default() };

    // By IP (the certificate names 127.0.0.1) and by an overridden name.
    affine_works(&connect(grpc.clone(), Some(trust.clone())).await.unwrap()).await.unwrap();
    let by_name = TlsOptions { domain: Some("localhost".into()), ..trust.clone() };
    affine_works(&connect(grpc.clone(), Some(by_name)).await.unwrap()).await.unwrap();

    // A name the certificate does not carry, an untrusted CA, and plain HTTP/2 all fail.
    let wrong_name = TlsOptions { domain: Some("elsewhere.example".into()), ..trust.clone() };
    let untrusted = TlsOptions { ca_pem: Some(pki.stranger_ca_pem.clone().into()), ..Default::default() };
    for tls in [wrong_name, untrusted] {
        let r = match connect(grpc.clone(), Some(tls)).await {
            Ok(c) => affine_works(&c).await,
            Err(e) => Err(e),
        };
        assert!(r.is_err(), "an unverifiable server was accepted");
    }
    let plain = format!("http://{}", server.grpc_addr);
    let r = match connect(plain.clone(), None).await {
        Ok(c) => tokio::time::timeout(Duration::from_secs(5), affine_works(&c)).await.unwrap_or(Ok(())),
        Err(e) => Err(e),
    };
    assert!(r.is_err(), "plain HTTP/2 reached a TLS server");
    // TLS options with an http:// address are a mistake worth naming.
    let e = connect(plain, Some(trust)).await.err().expect("refused").to_string();
    assert!(e.contains("https://"), "{e}");

    let status = https_get(server.http_addr, "/v2/health/ready", &pki.ca_pem, None).await.unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let (repo, pki) = (repo(), pki());
    let mut cfg = config(repo.path());
    cfg.tls = Some(pki.write(repo.path(), true));
    let server = sluice_server::start(cfg).await.expect("server starts");
    let grpc = format!("https://{}", server.grpc_addr);
    let with = |identity: Option<(String, String)>| TlsOptions {
        ca_pem: Some(pki.ca_pem.clone().into()),
        domain: None,
        identity: identity.map(|(c, k)| (c.into(), k.into())),
    };

    affine_works(&connect(grpc.clone(), Some(with(Some(pki.client.clone())))).await.unwrap()).await.unwrap();
    for identity in [None, Some(pki.stranger_client.clone())] {
        let r = match connect(grpc.clone(), Some(with(identity))).await {
            Ok(c) => affine_works(&c).await,
            Err(e) => Err(e),
        };
        assert!(r.is_err(), "a client without a certificate from the CA was served");
    }

    let ok = https_get(server.http_addr, "/v2/health/ready", &pki.ca_pem, Some(&pki.client)).await.unwrap();
    assert_eq!(ok, "HTTP/1.1 200 OK");
    for client in [None, Some(&pki.stranger_client)] {
        let r = https_get(server.http_addr, "/v2/health/ready", &pki.ca_pem, client).await;
        assert!(r.is_err() || r.as_deref() == Ok(""), "HTTP served a client without a valid certificate: {r:?}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_fail_the_start_naming_the_file() {
    let (repo, pki) = (repo(), pki());
    let mut files = pki.write(repo.path(), false);
    files.key = repo.path().join("missing.key");
    let mut cfg = config(repo.path());
    cfg.tls = Some(files.clone());
    let e = sluice_server::start(cfg.clone()).await.err().expect("refused").to_string();
    assert!(e.contains("missing.key"), "{e}");

    // A key that is not the certificate's.
    std::fs::write(repo.path().join("other.key"), KeyPair::generate().unwrap().serialize_pem()).unwrap();
    files.key = repo.path().join("other.key");
    cfg.tls = Some(files.clone());
    let e = sluice_server::start(cfg.clone()).await.err().expect("refused").to_string();
    assert!(e.contains("other.key") && e.contains("server.pem"), "{e}");

    std::fs::write(repo.path().join("junk.pem"), "not a certificate").unwrap();
    files.cert = repo.path().join("junk.pem");
    cfg.tls = Some(files);
    let e = sluice_server::start(cfg).await.err().expect("refused").to_string();
    assert!(e.contains("junk.pem"), "{e}");
}
