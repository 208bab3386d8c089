"""Answers Triton's `inference.GRPCInferenceService/ModelConfig` beside a Python server that
does not implement it (MLServer, KServe), in the same process: perf_analyzer asks every
model for its config before it starts, and gives up without one.

Importing this wraps `grpc.aio.server` so that every gRPC server made afterwards also
carries a generic handler for that one method (the server's own handlers still answer
everything else) and listens on loopback only. The answer is a ModelConfigResponse with the model's name and
max_batch_size, encoded by hand (two fields) so no Triton protobufs are needed.
"""
import os

import grpc

SERVICE = "inference.GRPCInferenceService"
# The max_batch_size sluice's model or pipeline declares (bench_peers.py sets it).
MAX_BATCH = int(os.environ.get("PEER_MAX_BATCH_SIZE", "8"))


def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number, wire_type, payload):
    return _varint(number << 3 | wire_type) + payload


def _model_name(request):
    # ModelConfigRequest { string name = 1; string version = 2; }
    i = 0
    while i < len(request):
        key, i = request[i], i + 1
        length = 0
        shift = 0
        while True:
            b, i = request[i], i + 1
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        if key == 0x0A:
            return request[i:i + length].decode()
        i += length
    return ""


def config_response(name):
    # ModelConfig { string name = 1; int32 max_batch_size = 4; }
    config = _field(1, 2, _varint(len(name.encode())) + name.encode()) + _field(4, 0, _varint(MAX_BATCH))
    # ModelConfigResponse { ModelConfig config = 1; }
    return _field(1, 2, _varint(len(config)) + config)


async def _model_config(request, context):
    return config_response(_model_name(request))


class _Handler(grpc.GenericRpcHandler):
    def service(self, details):
        if details.method == f"/{SERVICE}/ModelConfig":
            return grpc.unary_unary_rpc_method_handler(_model_config)
        return None


_server = grpc.aio.server


def _with_model_config(*args, **kwargs):
    server = _server(*args, **kwargs)
    server.add_generic_rpc_handlers((_Handler(),))
    # The benchmark listens on loopback only (KServe hard-codes [::]).
    add_port = server.add_insecure_port
    server.add_insecure_port = lambda address: add_port("127.0.0.1:" + address.rsplit(":", 1)[1])
    return server


grpc.aio.server = _with_model_config
