//! The point of separate pools, measured: kept in its own test binary because it reads
//! wall-clock busy fractions, and the other pipeline tests running beside it on a 2-core
//! machine would take the cores it measures.

use sluice_client::{InferOptions, Tensor};
use sluice_tests::{start, Repo};

/// The point of separate pools: while CPU work queues, the model is never left idle.
/// A CPU stage that sleeps 1.5x the model's compute time runs on a pool of 2 threads
/// (so together they outpace the model); a burst of requests queues up in front of the
/// pool, and the model, fed by both threads, stays busy from its first item to its last.
/// Everything is read from the server's per-node and per-model metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_stays_busy_while_cpu_work_queues_on_its_own_pool() {
    use sluice_tests::{busy_model, metric};
    let repo = Repo::new();
    repo.add("busy", &busy_model(400), "max_batch_size: 0\nmax_queue_size: 256\nintra_op_threads: 1\n");
    let x = Tensor::from_f32(vec![1, 512], &[0.5; 512]);

    // The model's compute time on this machine, measured through the server.
    let s = start(repo.config()).await;
    for _ in 0..20 {
        s.client.infer("busy", &[("x", &x)], InferOptions::default()).await.unwrap();
    }
    let compute = metric(&s.http, "sluice_compute_duration_seconds_sum", &["model=\"busy\""]).await / 20.0;
    s.server.shutdown().await;

    let pre_ms = (compute * 1500.0).max(1.0);
    repo.pipeline(
        "p",
        &format!(
            "max_batch_size: 0\ninputs:\n  - {{name: x, dtype: FP32, dims: [1, 512]}}\noutputs:\n  - {{name: y, from: model.y}}\nnodes:\n  - name: pre\n    op: delay\n    pool: pre\n    inputs: {{value: x}}\n    params: {{ms: {pre_ms}}}\n  - name: model\n    model: busy\n    inputs: {{x: pre.value}}\n"
        ),
    );
    let mut cfg = repo.config();
    cfg.pools = vec![sluice_server::PoolConfig { name: "pre".into(), threads: 2, queue: 256 }];
    let s = start(cfg).await;
    let label = ["model=\"busy\""];
    let busy_before = metric(&s.http, "sluice_model_busy_seconds_total", &label).await;
    let n = 40;
    let t0 = std::time::Instant::now();
    let calls = (0..n).map(|_| {
        let client = s.client.clone();
        let x = x.clone();
        async move { client.infer("p", &[("x", &x)], InferOptions::default()).await }
    });
    for r in futures::future::join_all(calls).await {
        r.unwrap();
    }
    let wall = t0.elapsed().as_secs_f64();
    let busy = metric(&s.http, "sluice_model_busy_seconds_total", &label).await - busy_before;
    let node = |n: &'static str| ["pipeline=\"p\"", n];
    let pre_queue = metric(&s.http, "sluice_node_queue_seconds_sum", &node("node=\"pre\"")).await / n as f64;
    let model_queue = metric(&s.http, "sluice_node_queue_seconds_sum", &node("node=\"model\"")).await / n as f64;
    // The model cannot start before the first item's CPU stage is done.
    let window = wall - pre_ms / 1000.0;
    let fraction = busy / window;
    eprintln!(
        "compute {:.2} ms, pre {pre_ms:.2} ms, wall {wall:.3} s, model busy {fraction:.2}, mean queue: pre {:.1} ms, model {:.1} ms",
        compute * 1e3,
        pre_queue * 1e3,
        model_queue * 1e3
    );
    assert!(pre_queue > 2.0 * pre_ms / 1000.0, "CPU work queued: {:.1} ms per item", pre_queue * 1e3);
    assert!(fraction >= 0.85, "the model was busy {fraction:.2} of the time while CPU work queued");
}
