"""Serve a remote model under a prefix of a Flask app (extra ``flask``).

    from zeroserve.flask import ZeroServe

    predict = ZeroServe(url="https://mlp.default.example.com", model="mlp", prefix="/predict")
    predict.init_app(app)            # or ZeroServe(app, url=..., ...)

    @app.post("/score")
    def score():
        return {"score": predict.model.infer({"input": request.json["x"]})["output"].tolist()}

``init_app`` registers a Blueprint with the model's routes (see ``zeroserve._proxy``) and keeps the
per-app state (a ``RemoteModel``) in ``app.extensions["zeroserve"]``, so one extension object can
serve several apps. It is plain WSGI: the calls are synchronous, with no event loop in the process;
a wake-up on start runs in a daemon thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

try:
    import flask
    from flask import Blueprint, Flask, current_app, request
except ImportError as exc:  # pragma: no cover - depends on the environment
    if exc.name not in ("flask", "werkzeug"):
        raise
    raise ImportError("zeroserve.flask needs Flask: pip install 'zeroserve[flask]'") from exc

from zeroserve import _proxy
from zeroserve._proxy import Answer, Forwarding
from zeroserve._types import WhenCold
from zeroserve.client import RemoteModel
from zeroserve.errors import RemoteModelError

__all__ = ["ZeroServe"]

EXTENSION = "zeroserve"


@dataclass(slots=True)
class _State:
    model: RemoteModel
    forwarding: Forwarding

    def answer(self, path: str) -> Answer:
        target = _proxy.resolve(request.method, path, self.model.model)
        if isinstance(target, Answer):
            return target
        if target.kind == "status":
            return _proxy.status_answer(self.model, self.model.waking)
        refused = self.forwarding.too_large(request.content_length)
        if refused is not None:
            return refused
        body = request.get_data(cache=False)
        refused = self.forwarding.too_large(len(body))
        if refused is not None:
            return refused
        query = request.query_string.decode("latin-1")
        call = self.forwarding.call(target, request.method, query, request.headers.items(), body)
        if isinstance(call, Answer):
            return call
        try:
            if call.inputs is not None:
                result: Any = self.model.infer(call.inputs, cold_wait=call.cold_wait, context=call.context)
            else:
                result = self.model.request(call.method, call.path, content=call.content, headers=call.headers,
                                            cold_wait=call.cold_wait, context=call.context)
        except (RemoteModelError, ValueError) as exc:
            return call.failed(exc)
        return call.answer(result)


class ZeroServe:
    """A Flask extension serving one remote model under a URL prefix.

    Args:
        app: initialise for this app right away (else call ``init_app``).
        url: the model service; defaults to the app's ``ZEROSERVE_URL`` config (``ZEROSERVE_<NAME>_URL``
            for an extension with another ``name``).
        model: the served model's name; defaults to ``ZEROSERVE_MODEL`` (``ZEROSERVE_<NAME>_MODEL``).
        prefix: where the routes go; ``/models/<model>`` by default.
        name: tells several extensions in one app apart (blueprint ``zeroserve_<name>``).
        when_cold: ``"hold"`` keeps a request waiting while the service wakes; ``"reject"`` answers 503
            with ``Retry-After`` once ``cold_grace`` seconds have passed (the wake-up goes on).
        cold_grace: seconds a request may wait for a wake-up in ``"reject"`` mode.
        forward_headers: request headers to forward besides the protocol's own; the app's cookies and
            ``Authorization`` are not forwarded unless listed.
        max_body_bytes: larger request bodies are answered 413.
        client_options: passed to ``RemoteModel`` (``retry``, ``cold_start``, ``circuit``, ``headers``,
            ``auth``, ``binary``, ``transport``, ``tracer_provider``, ...). With
            ``cold_start=ColdStartPolicy(wake_on_start=True)`` the service is woken in a background
            thread when ``init_app`` runs.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        url: str | None = None,
        model: str | None = None,
        prefix: str | None = None,
        name: str = "zeroserve",
        when_cold: WhenCold = "hold",
        cold_grace: float = 0.5,
        forward_headers: Iterable[str] = (),
        max_body_bytes: int = _proxy.MAX_BODY_BYTES,
        **client_options: Any,
    ) -> None:
        Forwarding(when_cold=when_cold, cold_grace=cold_grace, max_body_bytes=max_body_bytes)  # checks them now
        if not name.isidentifier():
            raise ValueError(f"name must be an identifier, got {name!r}")
        self.url = url
        self.model_name = model
        self.prefix = prefix
        self.name = name
        self.when_cold: WhenCold = when_cold
        self.cold_grace = cold_grace
        self.forward_headers = tuple(forward_headers)
        self.max_body_bytes = max_body_bytes
        self.client_options = client_options
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Create this app's ``RemoteModel`` and register the routes."""
        config = "ZEROSERVE" if self.name == EXTENSION else f"ZEROSERVE_{self.name.upper()}"
        url = self.url or app.config.get(f"{config}_URL")
        model_name = self.model_name or app.config.get(f"{config}_MODEL")
        if not url or not model_name:
            raise RuntimeError(
                f"zeroserve needs the model service's URL and model name: pass url= and model=, or set "
                f"{config}_URL and {config}_MODEL in the app's config"
            )
        prefix = self.prefix or f"/models/{model_name}"
        _proxy.check_prefix(prefix)
        states = app.extensions.setdefault(EXTENSION, {})
        if self.name in states:
            raise RuntimeError(f"a zeroserve extension named {self.name!r} is already registered on this app")
        remote = RemoteModel(url, model_name, **self.client_options)
        forwarding = Forwarding(when_cold=self.when_cold, cold_grace=self.cold_grace,
                                forward_headers=self.forward_headers, max_body_bytes=self.max_body_bytes)
        states[self.name] = _State(remote, forwarding)
        app.register_blueprint(self._blueprint(), url_prefix=prefix)
        if remote.cold_start.wake_on_start:
            remote.wake(background=True)

    def get_model(self, app: Flask | None = None) -> RemoteModel:
        """The ``RemoteModel`` of ``app`` (the current app when None)."""
        return self._state(app).model

    @property
    def model(self) -> RemoteModel:
        """The current app's ``RemoteModel`` (inside a request or app context)."""
        return self._state(None).model

    def close(self, app: Flask | None = None) -> None:
        """Close the app's connection pool (WSGI has no shut-down hook; call it where your server allows)."""
        self._state(app).model.close()

    def _state(self, app: Flask | None) -> _State:
        target = app if app is not None else current_app
        try:
            state: _State = target.extensions[EXTENSION][self.name]
        except KeyError:
            raise RuntimeError(f"zeroserve extension {self.name!r} was not initialised for this app") from None
        return state

    def _blueprint(self) -> Blueprint:
        blueprint = Blueprint(f"zeroserve_{self.name}", __name__)
        name = self.name

        def root() -> flask.Response:
            return _response(current_app.extensions[EXTENSION][name].answer(""))

        def v2(rest: str) -> flask.Response:
            return _response(current_app.extensions[EXTENSION][name].answer("/v2/" + quote(rest, safe="/")))

        blueprint.add_url_rule("", "root", root, methods=["GET", "POST"])
        blueprint.add_url_rule("/v2/<path:rest>", "v2", v2, methods=["GET", "POST"])
        return blueprint


def _response(answer: Answer) -> flask.Response:
    return flask.Response(answer.body, answer.status, headers=answer.headers)
