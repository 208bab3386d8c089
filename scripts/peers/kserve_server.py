"""The KServe Python server serving one workload of steps.py, the way KServe's docs write a
custom V2 model: a `kserve.Model` whose predict turns InferRequest inputs into NumPy,
runs, and answers an InferResponse (predict is plain `def`, as in those docs: KServe
calls it on its event loop). KServe's own flags (--http_port, --grpc_port, ...) are read
by kserve itself."""
import argparse
import logging

import modelconfig  # noqa: F401  (answers perf_analyzer's ModelConfig call)
import uvicorn
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.model_server import parser as kserve_parser

from steps import WORKLOADS


class Workload(Model):
    def __init__(self, name, models):
        super().__init__(name)
        self.run = WORKLOADS[name](models)
        self.ready = True

    def get_input_types(self):
        return self.run.inputs

    def get_output_types(self):
        return self.run.outputs

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        outputs = self.run({inp.name: inp.as_numpy() for inp in payload.inputs})
        infer_outputs = []
        for name, value in outputs.items():
            out = InferOutput(name=name, shape=list(value.shape), datatype=_datatype(value))
            out.set_data_from_numpy(value)
            infer_outputs.append(out)
        return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=infer_outputs)


def _datatype(value):
    return {"float32": "FP32", "int64": "INT64"}[str(value.dtype)]


if __name__ == "__main__":
    p = argparse.ArgumentParser(parents=[kserve_parser], conflict_handler="resolve")
    p.add_argument("--workload", required=True)
    p.add_argument("--models_dir", required=True)
    args, _ = p.parse_known_args()
    # KServe hard-codes 0.0.0.0 for HTTP; the benchmark stays on loopback.
    config_init = uvicorn.Config.__init__
    uvicorn.Config.__init__ = lambda self, app, **kw: config_init(self, app, **{**kw, "host": "127.0.0.1"})
    server = ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, enable_latency_logging=False)
    # As in production: no log line per request (by default KServe logs each gRPC call).
    for name in ("kserve", "kserve.trace"):
        logging.getLogger(name).setLevel(logging.WARNING)
    server.start([Workload(args.workload, args.models_dir)])
