"""Talks to sluice running in its container with Triton's own Python client.

Run by tests/tests/deploy.rs against a container serving the example repository:
checks health, metadata and an inference of the OCR direction classifier over gRPC and
HTTP, against ONNX Runtime run here on the same model file. Exits non-zero on the first
mismatch.
"""
import sys

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

grpc_url, http_url, model_file = sys.argv[1:4]
MODEL = "ocr_cls"

x = np.random.default_rng(7).random((2, 3, 48, 192), dtype=np.float32)
session = ort.InferenceSession(model_file, providers=["CPUExecutionProvider"])
(out_name,) = [o.name for o in session.get_outputs()]
want = session.run(None, {session.get_inputs()[0].name: x})[0]

for proto, client, mod in (
    ("grpc", grpcclient.InferenceServerClient(grpc_url), grpcclient),
    ("http", httpclient.InferenceServerClient(http_url), httpclient),
):
    assert client.is_server_live(), proto
    assert client.is_server_ready(), proto
    for name in ("ocr_det", "ocr_cls", "ocr_rec", "ocr", "classify"):
        assert client.is_model_ready(name), f"{proto}: {name} not ready"
    md = client.get_model_metadata(MODEL)
    inputs = md.inputs if proto == "grpc" else md["inputs"]
    in_name = inputs[0].name if proto == "grpc" else inputs[0]["name"]
    inp = mod.InferInput(in_name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(MODEL, [inp], outputs=[mod.InferRequestedOutput(out_name)])
    got = result.as_numpy(out_name)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=proto)
    print(f"{proto}: {MODEL} matches ONNX Runtime ({got.shape})")
print("ok")
