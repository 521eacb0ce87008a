"""An existing Starlette app that mounts a remote model at /predict.

    python examples/starlette_app.py --model-url http://127.0.0.1:8080 --port 8000
    # or: uvicorn --factory examples.starlette_app:create_app

then:

    curl -s localhost:8000/predict -d '{"input": [[0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5,
                                                   0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]]}'
    curl -s localhost:8000/label -d '{"features": [0.5, 0.5, ...]}'

The model service is any V2 server (a Knative Service URL in production; ``zeroserve dev`` or
``python -m zeroserve.runtime`` on this machine). Under /predict the app also serves the model's V2 routes
(/predict/v2/models/mlp/infer and friends), so V2 clients can point at http://host:8000/predict.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from zeroserve import AsyncRemoteModel, ColdStartPolicy, RemoteModelError, RequestRejected, Unavailable
from zeroserve.starlette import mount_model

LABELS = ["cat", "dog", "bird", "fish"]


def create_app(model_url: str | None = None, model_name: str = "mlp") -> Starlette:
    """The app: its own routes, plus the remote model at /predict (lifespan handled by mount_model)."""
    url = model_url or os.environ.get("MODEL_URL", "http://127.0.0.1:8080")
    model = AsyncRemoteModel(url, model=model_name, cold_start=ColdStartPolicy(wake_on_start=True))

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def label(request: Request) -> JSONResponse:
        try:
            payload = await request.json()
        except ValueError:
            payload = None
        features = payload.get("features") if isinstance(payload, dict) else None
        if not isinstance(features, list):
            return JSONResponse({"error": 'send {"features": [16 numbers]}'}, status_code=400)
        try:
            scores = (await model.infer({"input": [features]}))["output"][0]
        except ValueError as exc:  # not numbers, ragged lists: the client cannot encode them
            return JSONResponse({"error": str(exc)}, status_code=400)
        except RequestRejected as exc:  # the server's own words, e.g. a wrong shape (400)
            status = exc.last_status if exc.last_status is not None and exc.last_status < 500 else 502
            return JSONResponse({"error": exc.message}, status_code=status)
        except RemoteModelError as exc:  # one error tree; it says which endpoint failed and how often
            return JSONResponse({"error": exc.message}, status_code=503 if isinstance(exc, Unavailable) else 502)
        return JSONResponse({"label": LABELS[int(scores.argmax())], "scores": scores.tolist()})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield  # the app's own start-up and shut-down; the model's are added by mount_model

    app = Starlette(routes=[Route("/health", health), Route("/label", label, methods=["POST"])], lifespan=lifespan)
    mount_model(app, "/predict", model)  # hold requests while the service is cold (when_cold="reject" to 503)
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
