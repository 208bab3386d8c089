"""Summarises scripts/bench_core.sh's raw results as the Markdown of BENCHMARKS.md."""
import csv
import json
import re
import sys
from pathlib import Path

out = Path(sys.argv[1])

raw = {}
for line in (out / "raw.md").read_text().splitlines():
    m = re.match(r"\| (\d+) \| ([\d.]+) \| ([\d.]+) \|", line)
    if m:
        raw[int(m[1])] = float(m[2])
best_b, best_raw = max(raw.items(), key=lambda kv: kv[1])

print("| concurrency | infer/s | p50 ms | p90 ms | p99 ms | sluice / raw ORT best |")
print("|---|---|---|---|---|---|")
best_server = 0.0
for c in (1, 2, 4, 8, 16):
    rows = list(csv.DictReader(open(out / f"resnet50_c{c}.csv")))
    r = rows[0]
    ips = float(r["Inferences/Second"])
    best_server = max(best_server, ips)
    ms = lambda k: float(r[k]) / 1000
    print(f"| {c} | {ips:.2f} | {ms('p50 latency'):.1f} | {ms('p90 latency'):.1f} | {ms('p99 latency'):.1f} | {ips / best_raw:.3f} |")
print()
print(f"raw ORT best: {best_raw:.2f} items/s at batch {best_b}; sluice best: {best_server:.2f} infer/s; "
      f"ratio {best_server / best_raw:.3f}")
stats = json.loads((out / "resnet50_stats.json").read_text())["model_stats"][0]
sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}
print(f"resnet50 executions by batch size: {dict(sorted(sizes.items()))}")

# Overhead: p50 from the server's histogram (linear within a bucket), mean from statistics.
buckets = []
for line in (out / "metrics.txt").read_text().splitlines():
    m = re.match(r'sluice_request_overhead_seconds_bucket\{(?=.*model="tiny")(?=.*le="([^"]+)").*\} (\d+)', line)
    if m:
        buckets.append((float("inf") if m[1] == "+Inf" else float(m[1]), int(m[2])))
total = buckets[-1][1]
prev_le, prev_n, p50 = 0.0, 0, None
for le, n in buckets:
    if n >= total / 2:
        p50 = prev_le + (le - prev_le) * ((total / 2 - prev_n) / max(n - prev_n, 1))
        break
    prev_le, prev_n = le, n
t = json.loads((out / "tiny_stats.json").read_text())["model_stats"][0]["inference_stats"]
mean = (t["success"]["ns"] - t["compute_infer"]["ns"]) / t["success"]["count"] / 1000
tiny = list(csv.DictReader(open(out / "tiny_c1.csv")))[0]
print(f"tiny model, concurrency 1: {total} requests; server overhead (total - compute) "
      f"p50 {p50 * 1e6:.1f} us, mean {mean:.1f} us; client p50 {float(tiny['p50 latency']):.0f} us")
