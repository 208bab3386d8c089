"""What the server allocates per request, by protocol: serves the tiny model under
valgrind's DHAT twice per protocol (a few requests, then many more), sends each batch-1
request with Triton's Python client (gRPC; HTTP with binary tensors, as perf_analyzer
sends), and subtracts the two heap profiles site by site, so start-up and warm-up cancel
out and what is left is what each request costs. Prints allocations and bytes per request,
and the sites that allocate the most bytes per request with their average block size.
Run by scripts/profile_allocs.sh.

usage: profile_allocs.py OUT_DIR [FEW MANY]
  PROFILE_REUSE=1  analyse the DHAT profiles already in OUT_DIR instead of serving again
"""
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
FEW, MANY = (int(a) for a in sys.argv[2:4]) if len(sys.argv) > 3 else (100, 600)
root = Path(__file__).resolve().parent.parent
GRPC, HTTP = "127.0.0.1:18401", "127.0.0.1:18400"


def profile(proto, n, repo):
    dhat = out / f"dhat-{proto}-{n}.json"
    if os.environ.get("PROFILE_REUSE") == "1" and dhat.exists():
        return json.load(open(dhat))
    server = subprocess.Popen(
        ["valgrind", "--tool=dhat", f"--dhat-out-file={dhat}", root / "target/release/sluice", "serve",
         "--models", repo, "--pipelines", "/nonexistent", "--grpc-addr", GRPC, "--http-addr", HTTP,
         "--ort-dylib", root / ".sluice/lib/libonnxruntime.so"],
        stdout=subprocess.DEVNULL, stderr=open(out / f"server-{proto}-{n}.log", "w"))
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(f"http://{HTTP}/v2/models/tiny/ready", timeout=5).status == 200:
                    break
            except Exception:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"the server under valgrind was not ready in time; see {out}/server-{proto}-{n}.log")
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        if proto == "grpc":
            import tritonclient.grpc as tc
            client = tc.InferenceServerClient(GRPC)
        else:
            import tritonclient.http as tc
            client = tc.InferenceServerClient(HTTP)
        inp = tc.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(x) if proto == "grpc" else inp.set_data_from_numpy(x, binary_data=True)
        outs = [tc.InferRequestedOutput("y")] if proto == "grpc" else [tc.InferRequestedOutput("y", binary_data=True)]
        for _ in range(n):
            y = client.infer("tiny", [inp], outputs=outs).as_numpy("y")
            assert np.array_equal(y, 2 * x + 1)
        client.close()
    finally:
        server.terminate()
        server.wait()
    return json.load(open(dhat))


def sites(prof):
    """Total (bytes, blocks) per allocation site, keyed by its first frames outside the
    allocator (the same site in two runs has different addresses, not different frames)."""
    table = prof["ftbl"]
    by = {}
    for pp in prof["pps"]:
        frames = [table[f].split(": ", 1)[-1] for f in pp["fs"]]
        frames = [f for f in frames if not any(s in f for s in ALLOCATOR)]
        key = " <- ".join(frames[:4])
        tb, tbk = by.get(key, (0, 0))
        by[key] = (tb + pp["tb"], tbk + pp["tbk"])
    return by


ALLOCATOR = ("library/alloc/", "library/core/", "library/std/src/alloc", "vgpreload", "[root]")


def short(key):
    return " <- ".join(f[:100] for f in key.split(" <- ")[:3])


def totals(prof):
    return sum(pp["tb"] for pp in prof["pps"]), sum(pp["tbk"] for pp in prof["pps"])


repo = Path(tempfile.mkdtemp())
subprocess.run([sys.executable, root / "scripts/gen_tiny.py", repo / "tiny"], check=True, stdout=subprocess.DEVNULL)
print(f"the tiny model, batch-1 requests one after another; per request = ({MANY} requests - {FEW}) / {MANY - FEW}")
print()
print("| protocol | allocations / request | bytes / request | mean block size, largest of the per-request sites |")
print("|---|---|---|---|")
details = {}
for proto in ("grpc", "http"):
    few_prof, many_prof = profile(proto, FEW, repo), profile(proto, MANY, repo)
    (tb0, tbk0), (tb1, tbk1) = totals(few_prof), totals(many_prof)
    few, many = sites(few_prof), sites(many_prof)
    # Per site, only those that allocate on (about) every request: start-up work varies a
    # little from run to run, so single sites are noisy where the totals are not.
    diff = {}
    for key, (tb, tbk) in many.items():
        b0, k0 = few.get(key, (0, 0))
        if (tbk - k0) / (MANY - FEW) >= 0.5:
            diff[key] = ((tb - b0) / (MANY - FEW), (tbk - k0) / (MANY - FEW))
    largest = max((b / k for b, k in diff.values()), default=0)
    n = MANY - FEW
    print(f"| {proto} | {(tbk1 - tbk0) / n:.0f} | {(tb1 - tb0) / n:,.0f} | {largest:,.0f} B |")
    details[proto] = sorted(diff.items(), key=lambda kv: -kv[1][0])[:8]
for proto, top in details.items():
    print()
    print(f"{proto}: the sites allocating the most bytes per request")
    print()
    print("| bytes / request | blocks / request | site |")
    print("|---|---|---|")
    for key, (b, k) in top:
        print(f"| {b:,.0f} | {k:.1f} | `{short(key)}` |")
