"""Drives sluice's live dashboard in Debian's headless Chromium while load runs: the
page's numbers must move, and once the load stops they must equal the server's own
/metrics. Saves a screenshot taken under load. Run by tests/tests/e2e/dashboard.rs.

usage: dashboard_check.py HTTP_URL PIPELINE MODEL REQUEST_JSON SCREENSHOT_PNG
  REQUEST_JSON: a v2 JSON inference request body for PIPELINE, sent in a loop.
"""
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request

os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium look for drivers online
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

http, pipeline, model, body, shot = sys.argv[1:6]
stop = threading.Event()
sent = {"ok": 0, "failed": 0}


def load():
    req = lambda: urllib.request.Request(
        f"{http}/v2/models/{pipeline}/infer", data=body.encode(), headers={"Content-Type": "application/json"})
    while not stop.is_set():
        try:
            urllib.request.urlopen(req()).read()
            sent["ok"] += 1
        except OSError:
            sent["failed"] += 1


def metric(name, label):
    text = urllib.request.urlopen(f"{http}/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and label in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {label} in /metrics")


opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tempfile.mkdtemp()}", "--window-size=1400,1100"]:
    opts.add_argument(flag)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
try:
    for t in threads:
        t.start()
    driver.get(f"{http}/dashboard")

    def read(ep, field):
        # The page redraws its tables every frame: an element found can be replaced before
        # its text is read (stale); look it up again.
        for _ in range(20):
            try:
                els = driver.find_elements(By.CSS_SELECTOR, f'[data-ep="{ep}"][data-field="{field}"]')
                return els[0].text if els else None
            except StaleElementReferenceException:
                time.sleep(0.05)
        raise AssertionError(f"{ep} {field}: the element went stale on every read")

    deadline = time.time() + 15
    while read(pipeline, "requests_total") in (None, "0") and time.time() < deadline:
        time.sleep(0.2)
    first = int(read(pipeline, "requests_total"))
    time.sleep(3)
    second = int(read(pipeline, "requests_total"))
    assert second > first, f"the pipeline's request count did not move: {first} -> {second}"
    rps = float(read(pipeline, "rps"))
    assert rps > 0, f"requests/s shows {rps} under load"
    p99 = read(pipeline, "p99_ms")
    assert p99 not in (None, "–") and float(p99) > 0, f"p99 shows {p99!r} under load"
    nodes = driver.find_elements(By.CSS_SELECTOR, f'[data-pipeline="{pipeline}"] g.node')
    assert nodes, "the pipeline's graph has no nodes"
    model_first = int(read(model, "requests_total"))
    driver.save_screenshot(shot)

    # Stop the load, let a frame or two go by: the page must show exactly the metrics.
    stop.set()
    for t in threads:
        t.join()
    time.sleep(2.5)
    shown = int(read(pipeline, "requests_total"))
    counted = metric("sluice_requests_total", f'model="{pipeline}"')
    assert shown == counted, f"the page shows {shown} requests, /metrics {counted}"
    model_shown = int(read(model, "requests_total"))
    model_counted = metric("sluice_requests_total", f'model="{model}"')
    assert model_shown == model_counted and model_shown >= model_first, (model_shown, model_counted)
    assert sent["failed"] == 0 and shown >= sent["ok"], sent
    print(json.dumps({"first": first, "second": second, "rps": rps, "p99_ms": float(p99), "nodes": len(nodes),
                      "final": shown, "metrics": counted, "sent": sent["ok"]}))
finally:
    stop.set()
    driver.quit()
