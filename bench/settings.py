"""What one ``run.py`` run measures and for how long: its command line, parsed into a frozen ``Settings``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import matrix
import servers

DEFAULT_SERVERS = ("zeroserve", "zeroserve+batching", "kserve", "mlserver")
# Cold starts skip the batching variant: it starts exactly as zeroserve does.
COLD_START_SERVERS = ("zeroserve", "zeroserve@base", "kserve", "mlserver")


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    servers: tuple[str, ...]
    models: tuple[str, ...]
    protocols: tuple[str, ...]
    concurrency: tuple[int, ...]
    python: str
    duration_s: float
    warmup_s: float
    baseline_s: float
    cold_starts: int
    quick: bool
    grpc_rounds: int


def _choose(parser: argparse.ArgumentParser, flag: str, text: str, allowed: Sequence[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = sorted(set(chosen) - set(allowed))
    if unknown or not chosen:
        parser.error(f"{flag}: unknown {unknown}; choose from {','.join(allowed)}")
    return chosen


def parse_args(argv: Sequence[str] | None, description: str) -> Settings:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--servers", default=",".join(DEFAULT_SERVERS), help="comma-separated, run in that order")
    parser.add_argument("--models", default=",".join(matrix.MODELS), help="comma-separated: tiny,image,large")
    parser.add_argument(
        "--protocols",
        default=",".join(matrix.PROTOCOLS),
        help="comma-separated: rest-json,rest-binary,grpc (rest = both REST ones)",
    )
    parser.add_argument("--concurrency", help="comma-separated connections / calls in flight (default 1,4,16,64)")
    parser.add_argument("--quick", action="store_true", help="smoke run: c1,c16, 2 s per cell, 1 cold start")
    parser.add_argument("--duration", type=float, help="seconds per measured cell (default 5, quick 2)")
    parser.add_argument("--warmup", type=float, help="seconds of discarded load before each cell (default 1)")
    parser.add_argument("--cold-starts", type=int, help="launches per server, median reported; 0: none (default 5)")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the servers")
    parser.add_argument(
        "--grpc-rounds", type=int,
        help="alternating rounds of a gRPC cell, --duration / 2 s each per server (default 4; quick: 1 of --duration)",
    )
    args = parser.parse_args(argv)
    kinds = _choose(parser, "--servers", args.servers, tuple(servers.KINDS))
    chosen_models = _choose(parser, "--models", args.models, matrix.MODELS)
    rest = ",".join(matrix.REST_PROTOCOLS)
    protocols_text = ",".join(rest if part.strip() == "rest" else part for part in args.protocols.split(","))
    protocols = _choose(parser, "--protocols", protocols_text, tuple(matrix.PROTOCOLS))
    if args.concurrency:
        try:
            concurrency = tuple(sorted({int(part) for part in args.concurrency.split(",") if part.strip()}))
        except ValueError:
            parser.error(f"--concurrency: integers separated by commas, got {args.concurrency!r}")
        if not concurrency or min(concurrency) < 1:
            parser.error("--concurrency: at least one value, each 1 or more")
    else:
        concurrency = matrix.QUICK_CONCURRENCY if args.quick else matrix.CONCURRENCY
    return Settings(
        servers=kinds,
        models=chosen_models,
        protocols=protocols,
        concurrency=concurrency,
        python=args.python,
        duration_s=args.duration or (2.0 if args.quick else 5.0),
        warmup_s=args.warmup or 1.0,
        baseline_s=1.0 if args.quick else 3.0,
        cold_starts=args.cold_starts if args.cold_starts is not None else (1 if args.quick else 5),
        quick=args.quick,
        grpc_rounds=max(1, args.grpc_rounds or (1 if args.quick else 4)),
    )
