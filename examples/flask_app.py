"""A Flask app that mounts a remote model at /predict with the ZeroServe extension, served by waitress.

    python examples/flask_app.py --model-url http://127.0.0.1:8080 --port 8000
    # or: waitress-serve --call examples.flask_app:create_app   (MODEL_URL in the environment)

Plain WSGI: calls are synchronous and no event loop runs in the process. POST /label with
{"features": [16 numbers]}, or use /predict (convenience JSON) and /predict/v2/models/mlp/... (V2).
A bad request gets a JSON 400 with the reason (the model server's own words for a wrong shape), a model that
cannot be reached a JSON 502/503: never Flask's HTML 500.
"""

from __future__ import annotations

import argparse
import os

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

from zeroserve import ColdStartPolicy, RemoteModelError, RequestRejected, Unavailable
from zeroserve.flask import ZeroServe

LABELS = ["cat", "dog", "bird", "fish"]
predict = ZeroServe(prefix="/predict", when_cold="hold", cold_start=ColdStartPolicy(wake_on_start=True))


def create_app(model_url: str | None = None, model_name: str = "mlp") -> Flask:
    app = Flask(__name__)
    app.config["ZEROSERVE_URL"] = model_url or os.environ.get("MODEL_URL", "http://127.0.0.1:8080")
    app.config["ZEROSERVE_MODEL"] = model_name

    @app.post("/label")
    def label() -> ResponseReturnValue:
        payload = request.get_json(silent=True)
        features = payload.get("features") if isinstance(payload, dict) else None
        if not isinstance(features, list):
            return jsonify(error='send {"features": [16 numbers]}'), 400
        try:
            scores = predict.model.infer({"input": [features]})["output"][0]
        except ValueError as exc:  # not numbers, ragged lists: the client cannot encode them
            return jsonify(error=str(exc)), 400
        return jsonify(label=LABELS[int(scores.argmax())], scores=scores.tolist())

    @app.errorhandler(RemoteModelError)
    def model_failed(exc: RemoteModelError) -> ResponseReturnValue:
        if isinstance(exc, RequestRejected) and exc.last_status is not None and exc.last_status < 500:
            return jsonify(error=exc.message), exc.last_status  # e.g. 400 for a wrong shape, in the server's words
        return jsonify(error=exc.message), 503 if isinstance(exc, Unavailable) else 502

    predict.init_app(app)  # state lives in app.extensions["zeroserve"]: one extension, any number of apps
    return app


def main() -> None:
    import waitress  # type: ignore[import-untyped]

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-url", help="the model service (default: $MODEL_URL or http://127.0.0.1:8080)")
    parser.add_argument("--model-name", default="mlp")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    waitress.serve(create_app(args.model_url, args.model_name), host="127.0.0.1", port=args.port, threads=8)


if __name__ == "__main__":
    main()
