"""An MLServer runtime serving one workload of steps.py, written the way MLServer's docs
write custom runtimes: decode the request with its codecs, run, encode the outputs.
model-settings.json names the workload and the models folder in `parameters.extra`."""
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from steps import WORKLOADS


class Workload(MLModel):
    async def load(self) -> bool:
        extra = self.settings.parameters.extra
        self.run = WORKLOADS[extra["workload"]](extra["models"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inputs = {}
        for inp in payload.inputs:
            if inp.datatype == "BYTES":
                data = getattr(inp.data, "root", inp.data)
                inputs[inp.name] = np.array(data, dtype=object).reshape(inp.shape)
            else:
                inputs[inp.name] = NumpyCodec.decode_input(inp)
        outputs = self.run(inputs)
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(name, value) for name, value in outputs.items()],
        )
