"""The cold start is told once, whole: readiness waits until the start is recorded (its init span included), and
the first answer after that carries it. A model turns READY in its loading thread a moment before the start is
recorded on the event loop; a request answered in between must neither make the server look ready nor use up the
first answer without the cold start to tell."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from zeroserve.runtime import loader
from zeroserve.runtime.config import RuntimeConfig
from zeroserve.runtime.repository import ModelRepository, State

import models as test_models


def test_ready_and_first_answer_wait_for_the_start_to_be_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    test_models.mlp_model(tmp_path / "model.onnx")
    config = RuntimeConfig.from_args(["--model_name", "mlp", "--model_dir", str(tmp_path)], {})
    repository = ModelRepository()
    coldstart = repository.coldstart
    seen: list[tuple[bool, bool]] = []  # (ready, first answer) the moment every model is READY
    load_models = loader.load_models

    async def load_then_look(*args: Any) -> None:
        await load_models(*args)
        (entry,) = repository.entries()
        assert entry.state is State.READY
        seen.append((repository.all_ready(), coldstart.take_first_answer()))

    monkeypatch.setattr(loader, "load_models", load_then_look)
    asyncio.run(loader.load_in_background(config, repository, on_failure=None))
    assert seen == [(False, False)]
    assert repository.all_ready()
    assert coldstart.take_first_answer() is True  # the first answer once the start is recorded
    assert coldstart.take_first_answer() is False
