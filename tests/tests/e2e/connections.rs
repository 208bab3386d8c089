//! Connections a client opens and does not use well: headers sent a byte at a time,
//! connections held idle past the listener's limit, bodies never finished while the
//! server shuts down, a megabyte of gRPC metadata, large bodies that hold the in-flight
//! budget. Each is cut off, waits its turn or is refused; the server goes on serving and
//! stops on time.

use sluice_tests::{affine_model, config, start, Repo};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const YAML: &str = "max_batch_size: 8\n";

/// Waits for the server to close `c`: Ok(how long) on EOF or reset, Err on `limit`.
async fn closed_within(c: &mut TcpStream, limit: Duration) -> Result<Duration, Duration> {
    let t0 = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit.saturating_sub(t0.elapsed()), c.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(t0.elapsed()),
            Ok(Ok(_)) => {} // a 408 or similar before the close
            Err(_) => return Err(t0.elapsed()),
        }
    }
}

async fn live(http: &str) -> bool {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(1)).build().unwrap();
    matches!(client.get(format!("{http}/v2/health/live")).send().await, Ok(r) if r.status().is_success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off_and_the_server_goes_on() {
    let _clock = crate::timed().await;
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), YAML);
    let mut cfg = config(repo.path());
    cfg.limits.header_read_timeout = Duration::from_secs(1);
    let s = start(cfg).await;
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut c = TcpStream::connect(s.server.http_addr).await.unwrap();
        c.write_all(b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        slow.push(c);
    }
    assert!(live(&s.http).await, "others are served meanwhile");
    for c in &mut slow {
        let took = closed_within(c, Duration::from_secs(5)).await.expect("a slow client is cut off");
        assert!(took < Duration::from_secs(5));
    }
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_wait_until_others_close() {
    let _clock = crate::timed().await;
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), YAML);
    let mut cfg = config(repo.path());
    cfg.limits.max_connections = 8;
    cfg.limits.header_read_timeout = Duration::from_secs(60);
    let s = start(cfg).await;
    assert!(live(&s.http).await);
    // Eight idle connections on each port fill both listeners.
    let mut idle = Vec::new();
    for addr in [s.server.http_addr, s.server.grpc_addr] {
        for _ in 0..8 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!live(&s.http).await, "a ninth HTTP client waits in the backlog");
    let grpc = format!("http://{}", s.server.grpc_addr);
    let ready = |timeout: Duration| {
        let grpc = grpc.clone();
        async move {
            let ep = tonic::transport::Endpoint::from_shared(grpc).unwrap().timeout(timeout).connect_timeout(timeout);
            let Ok(ch) = ep.connect().await else { return false };
            let mut c = sluice_proto::grpc_inference_service_client::GrpcInferenceServiceClient::new(ch);
            c.server_live(sluice_proto::ServerLiveRequest {}).await.is_ok()
        }
    };
    assert!(!ready(Duration::from_secs(1)).await, "a ninth gRPC client waits in the backlog");
    drop(idle);
    let t0 = Instant::now();
    while !(live(&s.http).await && ready(Duration::from_secs(1)).await) {
        assert!(t0.elapsed() < Duration::from_secs(5), "served again once the idle ones closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_do_not_hold_the_shutdown() {
    let _clock = crate::timed().await;
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), YAML);
    let mut cfg = config(repo.path());
    cfg.limits.header_read_timeout = Duration::from_secs(60);
    cfg.limits.body_read_timeout = Duration::from_secs(60);
    let s = start(cfg).await;
    let mut mid_header = TcpStream::connect(s.server.http_addr).await.unwrap();
    mid_header.write_all(b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut mid_body = TcpStream::connect(s.server.http_addr).await.unwrap();
    mid_body
        .write_all(b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"inputs\": [")
        .await
        .unwrap();
    let idle_grpc = TcpStream::connect(s.server.grpc_addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), s.server.shutdown()).await.expect("shutdown finishes");
    assert!(t0.elapsed() < Duration::from_secs(3), "shutdown took {:?}", t0.elapsed());
    for c in [&mut mid_header, &mut mid_body] {
        closed_within(c, Duration::from_secs(2)).await.expect("closed by the shutdown");
    }
    drop(idle_grpc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_metadata_closes_only_its_own_connection() {
    let _clock = crate::timed().await;
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), YAML);
    let s = start(config(repo.path())).await;
    let mut raw = sluice_proto::grpc_inference_service_client::GrpcInferenceServiceClient::connect(format!(
        "http://{}",
        s.server.grpc_addr
    ))
    .await
    .unwrap();
    let mut req = tonic::Request::new(sluice_proto::ServerReadyRequest {});
    req.metadata_mut().insert("x-junk", "a".repeat(1 << 20).parse().unwrap());
    assert!(raw.server_ready(req).await.is_err(), "1 MB of metadata is refused");
    // h2 answers a header flood by closing that connection (GOAWAY ENHANCE_YOUR_CALM);
    // the client's channel connects again and is served.
    let t0 = Instant::now();
    loop {
        let next = raw.server_ready(sluice_proto::ServerReadyRequest {}).await;
        if next.is_ok_and(|r| r.into_inner().ready) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(2), "the same client is served again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_and_slow_bodies_are_cut_off() {
    let _clock = crate::timed().await;
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), YAML);
    let mut cfg = config(repo.path());
    cfg.limits.header_read_timeout = Duration::from_secs(1);
    cfg.limits.body_read_timeout = Duration::from_secs(2);
    let s = start(cfg).await;
    // Connected, nothing sent: neither protocol keeps the slot past the header timeout.
    for addr in [s.server.http_addr, s.server.grpc_addr] {
        let mut c = TcpStream::connect(addr).await.unwrap();
        closed_within(&mut c, Duration::from_secs(4)).await.expect("a silent connection is closed");
    }
    // A body sent a byte at a time, each byte in time, the whole too slow: the request
    // fails when its time is up instead of holding its budget.
    let mut c = TcpStream::connect(s.server.http_addr).await.unwrap();
    c.write_all(b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n").await.unwrap();
    let t0 = Instant::now();
    let mut answer = Vec::new();
    while t0.elapsed() < Duration::from_secs(6) {
        let _ = c.write_all(b" ").await;
        let mut buf = [0u8; 512];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), c.read(&mut buf)).await {
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || answer.starts_with(b"HTTP/1.1 ") {
                break;
            }
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    assert!(t0.elapsed() > Duration::from_millis(1500) && t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    assert!(live(&s.http).await);
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_listeners_advertise_the_stream_limit() {
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), YAML);
    let mut cfg = config(repo.path());
    cfg.limits.max_concurrent_streams = 16;
    let s = start(cfg).await;
    let grpc_call = "/inference.GRPCInferenceService/ServerLive";
    let mut clients = Vec::new();
    for (addr, path) in [(s.server.grpc_addr, grpc_call), (s.server.http_addr, "/v2/models/affine/infer")] {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (client, mut conn) = h2::client::handshake(tcp).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(200), &mut conn).await;
        // The SETTINGS frame carries the limit (a conforming client then queues the rest;
        // h2 refuses streams past it from one that does not).
        assert_eq!(conn.max_concurrent_send_streams(), 16, "{addr}");
        tokio::spawn(conn);
        // 40 requests whose bodies never finish and whose answers are never read.
        let mut client = Some(client);
        let mut held = Vec::new();
        for _ in 0..40 {
            let Some(c) = client.take() else { break };
            let Ok(Ok(mut ready)) = tokio::time::timeout(Duration::from_millis(300), c.ready()).await else {
                break;
            };
            let req = tonic::codegen::http::Request::post(format!("http://{addr}{path}"))
                .header("content-type", "application/grpc")
                .body(())
                .unwrap();
            held.push(ready.send_request(req, false).unwrap());
            client = Some(ready);
        }
        clients.push((client, held));
    }
    assert!(live(&s.http).await, "others are served meanwhile");
    s.server.shutdown().await;
}

/// An affine infer request, padded with whitespace (still valid JSON) to `len` bytes.
fn affine_body(len: usize) -> String {
    let mut b = r#"{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}"#.to_string();
    b.push_str(&" ".repeat(len.saturating_sub(b.len())));
    b
}

/// Opens a connection and sends the headers of an affine request declaring `len` body
/// bytes, and no body: the server takes the length from the budget before reading.
async fn declare(addr: std::net::SocketAddr, len: usize) -> TcpStream {
    let mut c = TcpStream::connect(addr).await.unwrap();
    let head = format!("POST /v2/models/affine/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n");
    c.write_all(head.as_bytes()).await.unwrap();
    c
}

/// What the server answers within `limit` to a request it refuses before reading its body
/// (the v2 error JSON ends with `"}`); empty if it is still waiting for the body.
async fn early_answer(c: &mut TcpStream, limit: Duration) -> String {
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = c.read(&mut buf).await {
            answer.extend_from_slice(&buf[..n]);
            if answer.ends_with(b"\"}") {
                break;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_holding_the_budget_leave_room_for_small_requests() {
    let repo = Repo::new();
    repo.add("affine", &affine_model(4), YAML);
    let mut cfg = config(repo.path());
    // 64 MiB: 8 MiB kept for requests of at most 128 KiB, 56 MiB for larger ones.
    cfg.limits.max_inflight_bytes = 64 << 20;
    cfg.max_message_bytes = 32 << 20;
    let s = start(cfg).await;
    let url = format!("{}/v2/models/affine/infer", s.http);
    let http = reqwest::Client::new();
    let post = |len: usize| http.post(&url).header("content-type", "application/json").body(affine_body(len)).send();
    let large = 256 << 10;
    assert_eq!(post(large).await.unwrap().status(), 200, "a large request is served while the budget is free");

    // Two bodies that declare 30 and 26 MiB and never send them hold the large share.
    let holders = vec![declare(s.server.http_addr, 30 << 20).await, declare(s.server.http_addr, 26 << 20).await];
    // Once the server has taken their lengths, a large request is refused at once (its
    // body unsent: a refused body still in flight could reset the connection first)...
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let mut c = declare(s.server.http_addr, large).await;
        let answer = early_answer(&mut c, Duration::from_millis(500)).await;
        if !answer.is_empty() {
            break answer;
        }
        assert!(Instant::now() < deadline, "the large share never filled");
    };
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    assert!(refused.contains("too many large request bytes") && refused.contains("--max-inflight-mb"), "{refused}");
    // ...while small ones, over HTTP and gRPC, are served.
    for _ in 0..20 {
        let r = post(4 << 10).await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    let x = sluice_client::Tensor::from_f32(vec![1, 4], &[1.0, 2.0, 3.0, 4.0]);
    s.client.infer("affine", &[("x", &x)], Default::default()).await.expect("a small gRPC request is served");
    // A body declaring more than the large share is refused outright (413), unread.
    let answer = early_answer(&mut declare(s.server.http_addr, 60 << 20).await, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 413") && answer.contains("most one request may hold"), "{answer}");
    // Closed, the holders give their bytes back.
    drop(holders);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match post(large).await {
            Ok(r) if r.status() == 200 => break,
            // 429 until the server sees the holders gone (its early answer may reset the
            // connection before the client reads it).
            _ => assert!(Instant::now() < deadline, "the budget did not come back"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.server.shutdown().await;
}
