"""``zeroserve dev``: Knative's activator and autoscaler in miniature, for one machine and no cluster.

It holds a port, starts model server processes (``python -m zeroserve.runtime``) when requests come, holds
requests while a process starts, forwards them, starts more under load, stops idle ones, and backs off after a
failed start as kubelet's CrashLoopBackOff does. It never imports the server: it starts it and speaks HTTP to
it (of the server's package it imports only the leaf ``otel_sdk``).

Modules, one job each:

- ``dev``: the command line (``main``); ``settings``: the frozen settings it builds;
- ``serve``: the lifecycle: bind, serve, signals, ordered shutdown;
- ``proxy``: the ASGI app: hold, forward, relay, and the activator's own answers from ``answers``;
- ``scaler``: which processes run and which request goes where; ``backoff``: when the next start may begin;
- ``process``: one server process: spawn, stderr, readiness and progress, failure reason, stop;
- ``telemetry``: the activator's spans and metrics.
"""
