"""The soak run of scripts/soak.sh.

usage: soak.py OUT_DIR MINUTES

1. starts `sluice serve` on the example repository (loopback, its own ports);
2. measures each pipeline's capacity alone (closed loop, 4 in flight, 15 s);
3. runs the three together, open loop with Poisson arrivals, each at a sixth of its own
   capacity (about half the machine in all), for MINUTES, sampling the server's RSS
   every 5 s;
4. prints a markdown table: requests and failures, RSS at the start and end and its
   growth per minute (least squares over the run after the first minute), and p99 per
   pipeline in the first and the last minute.
"""
import csv
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

root = Path(__file__).resolve().parent.parent
out = Path(sys.argv[1])
minutes = float(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
sluice = root / "target/release/sluice"

images = out / "images"
subprocess.run([sys.executable, root / "tests/python/render_text.py", images, "--random", "4"], check=True,
               stdout=subprocess.DEVNULL)
text_pages = sorted(images.glob("random_*.png"))[:4]
photo = root / "ops/tests/fixtures/photo.jpg"
workloads = {
    "classify": [photo],
    "detect_crop_classify": [photo],
    "ocr": text_pages,
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


grpc, http = free_port(), free_port()
server = subprocess.Popen(
    [sluice, "serve", "--models", root / "models", "--pipelines", root / "pipelines",
     "--grpc-addr", f"127.0.0.1:{grpc}", "--http-addr", f"127.0.0.1:{http}", "--reload", "none"],
    stdout=open(out / "server.log", "w"), stderr=subprocess.STDOUT)
try:
    for _ in range(600):
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=1).status == 200:
                break
        except Exception:
            pass
        time.sleep(0.2)
    else:
        sys.exit("the server did not become ready")

    def bench(name, extra, tag):
        args = [sluice, "bench", name, "--url", f"http://127.0.0.1:{grpc}", "--format", "json",
                "--out", out / f"{tag}.json"] + extra
        for img in workloads[name]:
            args += ["--image", img]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        return json.loads((out / f"{tag}.json").read_text())

    capacity = {}
    for name in workloads:
        r = bench(name, ["--concurrency", "4", "--seconds", "15", "--warmup", "3"], f"capacity_{name}")
        capacity[name] = r[0]["throughput"]
    rates = {n: max(capacity[n] / 6, 0.5) for n in workloads}

    rss = []
    stop = threading.Event()

    def sample():
        t0 = time.time()
        while not stop.is_set():
            with open(f"/proc/{server.pid}/status") as f:
                kb = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
            rss.append((time.time() - t0, kb / 1024))
            stop.wait(5)

    sampler = threading.Thread(target=sample)
    sampler.start()
    runs = [threading.Thread(target=bench, args=(
        n, ["--rate", f"{rates[n]:.2f}", "--poisson", "--seconds", str(int(minutes * 60)), "--warmup", "0",
            "--samples", out / f"requests_{n}.csv"], f"soak_{n}")) for n in workloads]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    stop.set()
    sampler.join()
finally:
    server.terminate()
    server.wait()


def p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.99 * len(xs)))] if xs else float("nan")


last = minutes - 1
print(f"Soak: {minutes:g} min, open loop (Poisson), each pipeline at a sixth of its capacity alone "
      f"({', '.join(f'{n} {rates[n]:.1f}/s of {capacity[n]:.1f}/s' for n in workloads)})\n")
print("| pipeline | requests | failed | p99 first minute ms | p99 last minute ms | drift |")
print("|---|---|---|---|---|---|")
for n in workloads:
    rows = list(csv.DictReader(open(out / f"requests_{n}.csv")))
    failed = sum(1 for r in rows if r["ok"] != "1")
    first = [float(r["latency_ms"]) for r in rows if float(r["at_s"]) < 60]
    final = [float(r["latency_ms"]) for r in rows if float(r["at_s"]) >= last * 60]
    a, b = p99(first), p99(final)
    print(f"| {n} | {len(rows)} | {failed} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
steady = [(t / 60, m) for t, m in rss if t >= 60]
n = len(steady)
mx = sum(t for t, _ in steady) / n
my = sum(m for _, m in steady) / n
slope = sum((t - mx) * (m - my) for t, m in steady) / sum((t - mx) ** 2 for t, _ in steady)
print(f"\nServer RSS: {rss[0][1]:.0f} MiB at the start, {max(m for _, m in rss):.0f} MiB at most, "
      f"{rss[-1][1]:.0f} MiB at the end; growth after the first minute {slope:+.2f} MiB/min (least squares).")
