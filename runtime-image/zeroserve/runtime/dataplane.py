"""The transport-neutral V2 operations: health, metadata and inference. REST (and gRPC) are thin over it."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from zeroserve.runtime.errors import InvalidInput
from zeroserve.runtime.messages import InferRequest, InferResult, OutputTensor
from zeroserve.runtime.repository import ModelRepository, State

SERVER_NAME = "zeroserve"
EXTENSIONS = ["binary_tensor_data"]


class DataPlane:
    def __init__(self, repository: ModelRepository, inference_threads: int) -> None:
        self.repository = repository
        # session.run releases the GIL; a bounded pool keeps ORT's own threads from being oversubscribed.
        self._executor = ThreadPoolExecutor(max_workers=inference_threads, thread_name_prefix="zeroserve-infer")

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def ready(self) -> bool:
        return self.repository.all_ready()

    def server_metadata(self) -> dict[str, Any]:
        from zeroserve.runtime import version

        return {"name": SERVER_NAME, "version": version(), "extensions": EXTENSIONS}

    def model_ready(self, name: str, version: str | None) -> bool:
        return self.repository.find(name, version).state is State.READY

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        model = self.repository.ready_model(name, version)
        return model.metadata(self.repository.versions(name))

    async def infer(self, name: str, version: str | None, request: InferRequest) -> InferResult:
        model = self.repository.ready_model(name, version)
        feeds = model.feeds(request.inputs)
        output_names: list[str] | None = None
        if request.outputs is not None:
            output_names = [output.name for output in request.outputs]
            if len(set(output_names)) != len(output_names):
                raise InvalidInput("an output is requested more than once")
            model.check_outputs(output_names)
        loop = asyncio.get_running_loop()
        arrays = await loop.run_in_executor(self._executor, model.run, feeds, output_names)
        specs = {spec.name: spec for spec in model.outputs}
        names = output_names if output_names is not None else [spec.name for spec in model.outputs]
        outputs = [
            OutputTensor(out_name, specs[out_name].datatype, array)
            for out_name, array in zip(names, arrays)
        ]
        return InferResult(model.name, model.version, outputs, request.id)
