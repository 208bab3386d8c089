"""Talks to a running sluice server with Triton's own Python client, over gRPC and HTTP.

Run by tests/tests/e2e/triton_tools.rs, which starts the server with the `affine` test model
(y = 2x + 1, neg = -x over x: FP32 [N, 4], max_batch_size 8). Exits non-zero on the first
mismatch.
"""
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

grpc_url, http_url, model = sys.argv[1:4]
x = (np.arange(12, dtype=np.float32).reshape(3, 4) * 0.5) - 1.0
want = {"y": 2 * x + 1, "neg": -x}


def check_outputs(result, names):
    for n in names:
        got = result.as_numpy(n)
        assert got is not None, f"output {n} missing"
        np.testing.assert_array_equal(got, want[n], err_msg=n)


def expect_error(fn, needle):
    try:
        fn()
    except InferenceServerException as e:
        assert needle in str(e), f"{needle!r} not in {e}"
        return
    raise AssertionError(f"expected an error containing {needle!r}")


# gRPC
g = grpcclient.InferenceServerClient(grpc_url)
assert g.is_server_live() and g.is_server_ready() and g.is_model_ready(model)
assert g.get_server_metadata().name == "sluice"
md = g.get_model_metadata(model)
assert md.inputs[0].name == "x" and md.inputs[0].datatype == "FP32", md
assert list(md.inputs[0].shape) == [-1, 4], md
cfg = g.get_model_config(model).config
assert cfg.max_batch_size == 8 and list(cfg.input[0].dims) == [4], cfg
assert cfg.HasField("dynamic_batching"), cfg
inp = grpcclient.InferInput("x", [3, 4], "FP32")
inp.set_data_from_numpy(x)
check_outputs(g.infer(model, [inp]), ["y", "neg"])
only_neg = g.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("neg")])
check_outputs(only_neg, ["neg"])
assert only_neg.as_numpy("y") is None
stats = g.get_inference_statistics(model).model_stats[0]
assert stats.inference_count >= 6, stats
assert [m.name for m in g.get_model_repository_index().models] == [model]
bad = grpcclient.InferInput("x", [3, 4], "INT32")
bad.set_data_from_numpy(x.astype(np.int32))
expect_error(lambda: g.infer(model, [bad]), "expected datatype FP32, got INT32")
expect_error(lambda: g.infer("missing", [inp]), "model 'missing' is not found")

# HTTP: binary tensors both ways, JSON both ways, and a mix.
h = httpclient.InferenceServerClient(http_url)
assert h.is_server_live() and h.is_server_ready() and h.is_model_ready(model)
md = h.get_model_metadata(model)
assert md["inputs"][0]["shape"] == [-1, 4], md
cfg = h.get_model_config(model)
assert cfg["max_batch_size"] == 8, cfg
for binary_in in (True, False):
    hin = httpclient.InferInput("x", [3, 4], "FP32")
    hin.set_data_from_numpy(x, binary_data=binary_in)
    check_outputs(h.infer(model, [hin]), ["y", "neg"])
    outs = [
        httpclient.InferRequestedOutput("y", binary_data=True),
        httpclient.InferRequestedOutput("neg", binary_data=False),
    ]
    check_outputs(h.infer(model, [hin], outputs=outs), ["y", "neg"])
stats = h.get_inference_statistics(model)
assert stats["model_stats"][0]["inference_count"] >= 18, stats
expect_error(lambda: h.infer("missing", [hin]), "model 'missing' is not found")

# The repository extension: unload, then load again, with each client's own calls.
g.unload_model(model)
assert not g.is_model_ready(model)
assert [(m.name, m.state, m.reason) for m in g.get_model_repository_index().models] == [
    (model, "UNAVAILABLE", "unloaded")
]
g.load_model(model)
assert g.is_model_ready(model)
h.unload_model(model)
assert not h.is_model_ready(model)
h.load_model(model)
assert h.is_model_ready(model)
check_outputs(g.infer(model, [inp]), ["y", "neg"])
expect_error(lambda: g.load_model("missing"), "model 'missing' is not found")
print("tritonclient: all checks passed")
