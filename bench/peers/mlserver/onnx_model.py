"""The MLServer peer's model: ONNX Runtime behind MLServer's ``MLModel`` API, as a user would write it.

MLServer 1.7.1 has no ONNX runtime of its own (SeldonIO/MLServer#2360), so this is the minimal custom runtime:
decode inputs with ``NumpyCodec``, ``session.run``, encode outputs with ``NumpyCodec``.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxModel(MLModel):
    async def load(self) -> bool:
        uri = Path(await get_model_uri(self.settings))
        path = uri if uri.is_file() else next(uri.glob("*.onnx"))
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {tensor.name: NumpyCodec.decode_input(tensor) for tensor in payload.inputs}
        names = [output.name for output in self.session.get_outputs()]
        arrays = self.session.run(names, feeds)
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(name, array) for name, array in zip(names, arrays)],
        )
