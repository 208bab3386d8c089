"""Calls a sluice pipeline (the `classify` example) with Triton's Python client: encoded
images as a BYTES tensor, over gRPC and HTTP (binary data in, binary and JSON out). The expected classes come
from the project's own client (argv), so both clients must agree exactly.

usage: tritonclient_pipeline_check.py GRPC HTTP IMAGE_FILE... -- CLASSES_JSON
"""
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

sep = sys.argv.index("--")
grpc_url, http_url, files = sys.argv[1], sys.argv[2], sys.argv[3:sep]
want_classes = np.array(json.loads(sys.argv[sep + 1]), dtype=np.int64)
images = np.array([[open(f, "rb").read()] for f in files], dtype=object)

g = grpcclient.InferenceServerClient(grpc_url)
md = g.get_model_metadata("classify")
assert md.platform == "sluice_pipeline", md
assert md.inputs[0].datatype == "BYTES" and list(md.inputs[0].shape) == [-1, 1], md
inp = grpcclient.InferInput("image", list(images.shape), "BYTES")
inp.set_data_from_numpy(images)
r = g.infer("classify", [inp])
np.testing.assert_array_equal(r.as_numpy("classes"), want_classes)
scores = r.as_numpy("scores")
assert scores.shape == (len(files), 5) and (np.diff(scores, axis=1) <= 0).all(), scores

# HTTP: images must travel as binary data (JSON strings cannot hold arbitrary bytes);
# outputs both as binary and as JSON.
h = httpclient.InferenceServerClient(http_url)
for binary_out in (True, False):
    hin = httpclient.InferInput("image", list(images.shape), "BYTES")
    hin.set_data_from_numpy(images, binary_data=True)
    outs = [httpclient.InferRequestedOutput(n, binary_data=binary_out) for n in ("scores", "classes")]
    hr = h.infer("classify", [hin], outputs=outs)
    np.testing.assert_array_equal(hr.as_numpy("classes"), want_classes)
    np.testing.assert_allclose(hr.as_numpy("scores"), scores, rtol=1e-6)
print("tritonclient pipeline: all checks passed")
