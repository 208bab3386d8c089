"""sluice beside the Python servers its users would otherwise pick, in one run: MLServer and
the KServe Python server, each from PyPI in its own venv, serving the same ONNX files with
ONNX Runtime with the same session options (scripts/peers/steps.py does the pipelines'
steps in OpenCV and NumPy inside predict), all driven by the same perf_analyzer over gRPC, batch-1
requests. Neither peer answers Triton's ModelConfig call, which perf_analyzer makes before
it starts: scripts/peers/modelconfig.py answers it inside their process.

Servers run one at a time, each serving one workload. Server CPU is an estimate: CPU time
of the server's live processes over the whole perf_analyzer run (its trials included)
divided by the run's length and by the rate perf_analyzer reports. Run by scripts/bench_peers.sh, which builds and installs first.

usage: bench_peers.py OUT_DIR [SECONDS]
  PEER_WORKLOADS  which workloads (default: all five)
  PEER_SERVERS    which servers (default: sluice sluice-reduced sluice-tuned mlserver
                  mlserver-nobatch kserve kserve-reduced)

The `-reduced` variants run `detect` only, decoding the JPEG at a DCT scale (libjpeg-turbo's
1/2, 1/4, 1/8) as large as the letterbox needs: sluice with `engine: opencv, max_side: 320`
on decode_image (the binary must be built with `--features opencv`), KServe with the same
rule in cv2 (steps.decode_reduced). `sluice-tuned` is sluice-reduced with the detector as
two single-threaded instances instead of one on two threads (KServe runs one request at a
time, so one session on both cores is its best). Each server's best over its variants is
compared.
"""
import base64
import csv
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from bench_detect import detect_pipeline, photo

out = Path(sys.argv[1])
secs = float(sys.argv[2]) if len(sys.argv) > 2 else 5
out.mkdir(parents=True, exist_ok=True)
root = Path(__file__).resolve().parent.parent
HTTP, GRPC = 18300, 18301
TICK = os.sysconf("SC_CLK_TCK")

# workload: (concurrencies, the models it runs, sluice serves a pipeline of this text / file)
WORKLOADS = {
    "tiny": ([1, 4, 16], ["tiny"], None),
    "resnet50": ([1, 4], ["resnet50"], None),
    "classify": ([1, 4], ["resnet50"], "classify.yaml"),
    "detect": ([1, 4], ["detector"], detect_pipeline()),
    "detect_crop_classify": ([1, 4], ["detector", "resnet50"], "detect_crop_classify.yaml"),
}
BATCHABLE = {"tiny", "resnet50", "classify"}
# The longer side the reduced decode keeps: the detector's letterbox.
REDUCED_SIDE = 320
SERVERS = os.environ.get(
    "PEER_SERVERS", "sluice sluice-reduced sluice-tuned mlserver mlserver-nobatch kserve kserve-reduced").split()
chosen = os.environ.get("PEER_WORKLOADS", " ".join(WORKLOADS)).split()


def tree_cpu(pid):
    """CPU seconds of pid and every live process under it."""
    children, ticks = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(d))
        ticks[int(d)] = int(fields[11]) + int(fields[12])
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += ticks.get(p, 0)
        todo += children.get(p, [])
    return total / TICK


def wait_ready(proc, name, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {name} was ready")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{HTTP}/v2/models/{name}/ready", timeout=2).status == 200:
                return
        except Exception:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{name} not ready after {timeout} s")


def model_dir(repo, model, tuned=False):
    """The model folder sluice serves: the shipped model.yaml (tiny: gen_tiny's); tuned:
    single-threaded instances, one per core, instead of one instance on every core."""
    d = repo / "models" / model
    d.mkdir(parents=True)
    src = models / model
    os.symlink(src / "model.onnx", d / "model.onnx")
    text = (src / "model.yaml").read_text()
    if tuned:
        assert "\nintra_op_threads: 2\n" in text, f"{model}'s model.yaml changed: tune it here again"
        text = text.replace("\nintra_op_threads: 2\n", "\nintra_op_threads: 1\ninstances: 2\n")
    (d / "model.yaml").write_text(text)


def start_sluice(repo, workload, log, reduced, tuned):
    _, needs, pipeline = WORKLOADS[workload]
    if reduced:
        pipeline = detect_pipeline(decode_params=f"engine: opencv, max_side: {REDUCED_SIDE}")
    for m in needs:
        model_dir(repo, m, tuned)
    (repo / "pipelines").mkdir()
    if pipeline:
        text = (root / "pipelines" / pipeline).read_text() if pipeline.endswith(".yaml") else pipeline
        (repo / "pipelines" / f"{workload}.yaml").write_text(text)
    return subprocess.Popen(
        [root / "target/release/sluice", "serve", "--models", repo / "models", "--pipelines", repo / "pipelines",
         "--grpc-addr", f"127.0.0.1:{GRPC}", "--http-addr", f"127.0.0.1:{HTTP}",
         "--ort-dylib", root / ".sluice/lib/libonnxruntime.so"], stdout=log, stderr=log)


def peer_env(workload=None, reduced=False):
    env = dict(os.environ)
    if reduced:
        env["PEER_DECODE_MAX_SIDE"] = str(REDUCED_SIDE)
    env["PYTHONPATH"] = str(root / "scripts/peers")
    # What modelconfig.py answers perf_analyzer: the pipeline's max_batch_size in sluice.
    env["PEER_MAX_BATCH_SIZE"] = "4" if workload == "detect_crop_classify" else "8"
    return env


def meta():
    """Each workload's V2 metadata, read from steps.py in a peer's venv (it imports OpenCV
    and ONNX Runtime, which .venv does not need)."""
    code = ("import json, steps; print(json.dumps({k: {'inputs': w.inputs, 'outputs': w.outputs} "
            "for k, w in steps.WORKLOADS.items()}))")
    return json.loads(subprocess.check_output([root / ".venv-mlserver/bin/python", "-c", code], env=peer_env()))


def start_mlserver(repo, workload, log, batching):
    w = meta()[workload]
    (repo / "settings.json").write_text(json.dumps(
        {"http_port": HTTP, "grpc_port": GRPC, "metrics_port": HTTP + 2, "host": "127.0.0.1", "debug": False}))
    d = repo / workload
    d.mkdir()
    settings = {
        "name": workload, "implementation": "mlserver_runtime.Workload",
        "parameters": {"extra": {"workload": workload, "models": str(models)}},
        "inputs": w["inputs"], "outputs": w["outputs"],
    }
    if batching:
        # The adaptive batching of MLServer's docs, at sluice's settings for these models.
        settings.update(max_batch_size=8, max_batch_time=0.002)
    (d / "model-settings.json").write_text(json.dumps(settings))
    venv = root / ".venv-mlserver/bin"
    return subprocess.Popen(
        [venv / "python", "-c", "import modelconfig, sys; from mlserver.cli.main import main; "
         "sys.argv = ['mlserver', 'start', sys.argv[1]]; main()", repo],
        stdout=log, stderr=log, env=peer_env(workload), cwd=repo)


def start_kserve(repo, workload, log, reduced):
    return subprocess.Popen(
        [root / ".venv-kserve/bin/python", root / "scripts/peers/kserve_server.py", "--workload", workload,
         "--models_dir", models, "--http_port", str(HTTP), "--grpc_port", str(GRPC)],
        stdout=log, stderr=log, env=peer_env(workload, reduced), cwd=repo)


def answer(workload, image):
    """What the server answers for the benchmark's image, to show that every server does
    the same work: the boxes found (detect), crops classified (detect_crop_classify), the
    best class (classify)."""
    if workload not in ("classify", "detect", "detect_crop_classify"):
        return ""
    import tritonclient.grpc as tc
    client = tc.InferenceServerClient(f"127.0.0.1:{GRPC}")
    inp = tc.InferInput("image", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[image]], dtype=object))
    res = client.infer(workload, [inp])
    client.close()
    if workload == "classify":
        return f"top-1 class {int(res.as_numpy('classes').reshape(-1)[0])}"
    if workload == "detect":
        return f"{res.as_numpy('boxes').reshape(-1, 4).shape[0]} boxes"
    return f"{int(res.as_numpy('count').reshape(-1)[0])} crops"


def measure(workload, server, conc, data):
    tag = f"{workload}_{server}_c{conc}"
    csv_path = out / f"{tag}.csv"
    cmd = [root / ".sluice/bin/perf_analyzer", "-i", "grpc", "-u", f"127.0.0.1:{GRPC}", "-m", workload, "-b", "1",
           "--concurrency-range", f"{conc}:{conc}", "-p", str(int(secs * 1000)), "-s", "25", "-r", "8",
           "-f", csv_path]
    # Tensors of zeros where no image is sent: perf_analyzer's random bytes make NaNs,
    # which MLServer cannot encode.
    cmd += ["--input-data", data, "--shape", "image:1"] if data else ["--input-data", "zero"]
    if csv_path.exists():
        csv_path.unlink()
    with open(out / f"{tag}.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=log, timeout=900)
    if not csv_path.exists():
        return None
    row = next(csv.DictReader(open(csv_path)))
    return float(row["Inferences/Second"]), float(row["p50 latency"]) / 1000, float(row["p99 latency"]) / 1000


def client_cpu():
    """CPU seconds of the finished perf_analyzer runs (the server is a child, but a live one)."""
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def run(workload, server, data, image):
    concs = WORKLOADS[workload][0]
    if server == "mlserver-nobatch" and workload not in BATCHABLE:
        return {}
    tuned = server == "sluice-tuned"
    reduced = server.endswith("-reduced") or tuned
    if reduced and workload != "detect":
        return {}
    repo = Path(tempfile.mkdtemp())
    log = open(out / f"{workload}_{server}.server.log", "w")
    if server.startswith("sluice"):
        proc = start_sluice(repo, workload, log, reduced, tuned)
    elif server.startswith("mlserver"):
        proc = start_mlserver(repo, workload, log, batching=server == "mlserver" and workload in BATCHABLE)
    else:
        proc = start_kserve(repo, workload, log, reduced)
    results = {}
    try:
        wait_ready(proc, workload)
        answers[(workload, server)] = answer(workload, image)
        for conc in concs:
            c0, t0, u0 = tree_cpu(proc.pid), time.time(), client_cpu()
            r = measure(workload, server, conc, data)
            took = time.time() - t0
            cpu, client = (tree_cpu(proc.pid) - c0) / took, (client_cpu() - u0) / took
            results[conc] = r and (*r, cpu / r[0] * 1000, client / r[0] * 1000)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(repo)
    return results


models = Path(tempfile.mkdtemp()) / "models"
models.mkdir()
for m in ("resnet50", "detector"):
    (models / m).mkdir()
    os.symlink(root / f"models/{m}/model.onnx", models / m / "model.onnx")
    shutil.copy(root / f"models/{m}/model.yaml", models / m / "model.yaml")
subprocess.run([sys.executable, root / "scripts/gen_tiny.py", models / "tiny"], check=True, stdout=subprocess.DEVNULL)

image = photo(640, 480)
data = out / "image.json"
data.write_text(json.dumps({"data": [{"image": {"b64": base64.b64encode(struct.pack("<I", len(image)) + image).decode(),
                                                "shape": [1]}}]}))

print(f"perf_analyzer over gRPC, batch 1, {secs:g} s windows; BYTES workloads send one {len(image) // 1024} KB "
      "640x480 JPEG; server and client (perf_analyzer) CPU ms per inference over the whole run")
print()
print("| workload | server | concurrency | infer/s | p50 ms | p99 ms | server CPU ms/inference | client CPU ms/inference |")
print("|---|---|---|---|---|---|---|---|")
best, answers = {}, {}
for workload in chosen:
    for server in SERVERS:
        res = run(workload, server, data if workload not in ("tiny", "resnet50") else None, image)
        for conc, r in res.items():
            if r is None:
                print(f"| {workload} | {server} | {conc} | unstable | | | | |", flush=True)
                continue
            ips, p50, p99, cpu, client = r
            print(f"| {workload} | {server} | {conc} | {ips:,.1f} | {p50:.2f} | {p99:.2f} | {cpu:.3f} | {client:.3f} |",
                  flush=True)
            key = (workload, server.split("-")[0])
            best[key] = max(best.get(key, 0), ips)

print()
print("Best infer/s over the concurrencies and variants (MLServer: batching on or off; sluice and")
print("KServe on detect: the variants above; whichever served more):")
print()
print("| workload | sluice | MLServer | KServe | sluice / MLServer | sluice / KServe |")
print("|---|---|---|---|---|---|")
for workload in chosen:
    s, m, k = (best.get((workload, x), 0) for x in ("sluice", "mlserver", "kserve"))
    ratio = lambda a, b: f"{a / b:.2f}" if a and b else "-"
    print(f"| {workload} | {s:,.1f} | {m:,.1f} | {k:,.1f} | {ratio(s, m)} | {ratio(s, k)} |")
if any(answers.values()):
    print()
    print("What each server answered for the image (the models have random weights; the same")
    print("counts say the servers did the same work):")
    print()
    for workload in chosen:
        got = [f"{server} {a}" for (w, server), a in answers.items() if w == workload and a]
        if got:
            print(f"- {workload}: " + "; ".join(got))
if "detect" in chosen:
    # What every server's `detect` pays at least: the detector alone in ONNX Runtime,
    # batch 1, the session options of steps.py, in the same run (this VM's speed drifts).
    # And decoding the image, full and reduced, in libjpeg-turbo (cv2, one thread).
    code = """
import sys, time, numpy as np
sys.path.insert(0, sys.argv[2])
from steps import decode, decode_reduced, session
def cpu_ms(f, n):
    for _ in range(20):
        f()
    c = time.process_time()
    for _ in range(n):
        f()
    return (time.process_time() - c) / n * 1000
x = np.zeros((1, 3, 320, 320), np.float32)
for threads in (1, 2):
    s = session(sys.argv[1], threads)
    print(f"the detector, {threads} intra-op thread(s)", cpu_ms(lambda: s.run(None, {"images": x}), 300))
blob = open(sys.argv[3], "rb").read()
print("decoding the JPEG, full size", cpu_ms(lambda: decode(blob), 300))
print("decoding the JPEG, reduced to the letterbox", cpu_ms(lambda: decode_reduced(blob, int(sys.argv[4])), 300))
"""
    (out / "image.jpg").write_bytes(image)
    res = subprocess.check_output([root / ".venv-kserve/bin/python", "-c", code, models / "detector/model.onnx",
                                   root / "scripts/peers", out / "image.jpg", str(REDUCED_SIDE)], text=True)
    print()
    print("What every server's `detect` pays, alone, no server (batch 1; cv2 with one thread):")
    print()
    for line in res.split("\n"):
        if line:
            what, cpu = line.rsplit(" ", 1)
            print(f"- {what}: {float(cpu):.2f} ms of CPU per image")
shutil.rmtree(models.parent)
