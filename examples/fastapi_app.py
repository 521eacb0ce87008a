"""A FastAPI app that calls a remote model from a typed endpoint and mounts it at /predict.

    python examples/fastapi_app.py --model-url http://127.0.0.1:8080 --port 8000
    # or: uvicorn --factory examples.fastapi_app:create_app

then POST /label with {"features": [16 numbers]}, or use the mounted model at /predict (convenience JSON)
and /predict/v2/models/mlp/... (the V2 protocol, binary tensors passed through untouched).
"""

from __future__ import annotations

import argparse
import os

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from zeroserve import AsyncRemoteModel, RemoteModelError, RetryPolicy, Unavailable
from zeroserve.starlette import mount_model

LABELS = ["cat", "dog", "bird", "fish"]


class Features(BaseModel):
    features: list[float] = Field(min_length=16, max_length=16)


class Labelled(BaseModel):
    label: str
    scores: list[float]


def create_app(model_url: str | None = None, model_name: str = "mlp") -> FastAPI:
    url = model_url or os.environ.get("MODEL_URL", "http://127.0.0.1:8080")
    model = AsyncRemoteModel(url, model=model_name, retry=RetryPolicy(deadline=30))
    app = FastAPI(title="labeller")

    @app.post("/label")
    async def label(body: Features) -> Labelled:
        try:
            scores = (await model.infer({"input": [body.features]}))["output"][0]
        except Unavailable as exc:  # cold or overloaded: tell the caller when to come back
            retry = {"Retry-After": str(round(exc.retry_after))} if exc.retry_after else None
            raise HTTPException(503, exc.message, headers=retry) from exc
        except RemoteModelError as exc:
            raise HTTPException(502, exc.message) from exc
        return Labelled(label=LABELS[int(scores.argmax())], scores=scores.tolist())

    # Mounted after the app's own routes; its lifespan joins FastAPI's (the client closes on shut-down).
    mount_model(app, "/predict", model)
    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-url", help="the model service (default: $MODEL_URL or http://127.0.0.1:8080)")
    parser.add_argument("--model-name", default="mlp")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model_url, args.model_name), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
