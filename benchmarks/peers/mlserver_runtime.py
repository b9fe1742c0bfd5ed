"""A small MLServer custom runtime: onnxruntime on the fused policy model (runs inside the MLServer venv).

``run_peers.py`` copies this file into the MLServer model folder and names ``mlserver_runtime.OnnxPolicy``
as the model's ``implementation``. Request: one input ``obs`` FP32 [B, d] (V2 inference protocol, typed
or raw contents); response: ``action`` INT64 [B] and ``value`` FP32 [B], the fused graph's outputs as
they are (the post-processing is inside the graph, see ``fuse.py``).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxPolicy(MLModel):
    """One onnxruntime session (one intra-op thread, like polyhead's default) per MLServer worker."""

    async def load(self) -> bool:
        uri = await get_model_uri(self._settings)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(uri, sess_options=options, providers=["CPUExecutionProvider"])
        self._session.run(["action", "value"], {"obs": np.zeros((1, self._width()), np.float32)})
        return True

    def _width(self) -> int:
        return int(self._session.get_inputs()[0].shape[1])

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        if len(payload.inputs) != 1:
            raise InferenceError(f"expected one input 'obs', got {len(payload.inputs)}")
        obs = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        action, value = self._session.run(["action", "value"], {"obs": obs.reshape(-1, self._width())})
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output("action", action), NumpyCodec.encode_output("value", value)],
        )
