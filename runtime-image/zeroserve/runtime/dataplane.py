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


INLINE_MAX_INPUT_BYTES = 64 * 1024


class DataPlane:
    def __init__(self, repository: ModelRepository, inference_threads: int, inline_seconds: float = 0.0) -> None:
        self.repository = repository
        # Runs shorter than this stay on the event loop: for a tiny model the hop to a worker thread
        # costs more than the run itself (measured ~130 us per request on 2 cores, bench/).
        self.inline_seconds = inline_seconds
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
        if model.run_seconds < self.inline_seconds and _input_bytes(feeds) <= INLINE_MAX_INPUT_BYTES:
            arrays = model.run(feeds, output_names)
        else:
            loop = asyncio.get_running_loop()
            arrays = await loop.run_in_executor(self._executor, model.run, feeds, output_names)
        specs = {spec.name: spec for spec in model.outputs}
        names = output_names if output_names is not None else [spec.name for spec in model.outputs]
        outputs = [
            OutputTensor(out_name, specs[out_name].datatype, array)
            for out_name, array in zip(names, arrays)
        ]
        return InferResult(model.name, model.version, outputs, request.id)


def _input_bytes(feeds: dict[str, Any]) -> int:
    return sum(array.nbytes for array in feeds.values())
