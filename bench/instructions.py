"""Instructions per request: the server's user-space instructions under valgrind's callgrind, for exactly N requests,
this checkout against another (``--base``), in the same run.

Throughput on a shared 2-core machine drifts by several percent from one round to the next, which hides a change
of a few percent in the server's own cost. An instruction count does not drift: callgrind counts what the process
executes (not the kernel's share, nor cache misses), so it answers "does this tree do more work per request" to
about 1-2% (the spread comes from how many requests one turn of the event loop takes in at 16 connections).

    apt-get install -y valgrind
    git worktree add --detach ../base <commit>
    .venv/bin/python bench/instructions.py --base ../base                  # tiny model, REST JSON, c1 and c16
    .venv/bin/python bench/instructions.py --base ../base --body binary

It measures the server's own cost, which the tiny model leaves to show: ONNX Runtime's kernels under valgrind run
hundreds of times slower, so the image model's 400 requests took over 15 minutes here (its cells are measured by
throughput, in run.py).

Both servers run this interpreter with ``PYTHONPATH`` set to their checkout's sources, so only the code differs.
Each round: start the server under callgrind with instrumentation off, answer ``--warmup`` requests, count the
next ``--requests`` over ``--concurrency`` keep-alive connections, stop. Under callgrind a server runs some 50x
slower: the defaults take about a minute per round here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import payloads  # noqa: E402
from servers import HOST, free_port, spawn  # noqa: E402

import models  # noqa: E402

READY_SECONDS = 300.0  # callgrind's start is slow: bounded all the same
ROUND_SECONDS = 900.0


def _request_bytes(model: str, body: payloads.Body) -> bytes:
    head = f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body.data)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in body.headers().items())
    return head.encode("latin-1") + b"\r\n" + body.data


async def _send(port: int, request: bytes, count: int, concurrency: int) -> None:
    """Exactly ``count`` requests over ``concurrency`` keep-alive connections, each answer read in full and 200."""

    async def connection(n: int) -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            for _ in range(n):
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"the server answered {head[:200]!r}")
                fields = [line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line]
                length = next(int(value) for name, value in fields if name.strip().lower() == b"content-length")
                await reader.readexactly(length)
        finally:
            writer.close()

    shares = [count // concurrency + (1 if i < count % concurrency else 0) for i in range(concurrency)]
    await asyncio.wait_for(asyncio.gather(*(connection(n) for n in shares if n)), ROUND_SECONDS)


def count_round(tree: Path, model_dir: Path, model: str, request: bytes, args: argparse.Namespace, work: Path,
                concurrency: int) -> float:
    """One server start under callgrind; returns instructions per request."""
    port = free_port()
    out = work / f"callgrind.{port}"
    argv = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        sys.executable, "-m", "zeroserve.runtime", "--model_dir", str(model_dir), "--model_name", model,
        "--host", HOST, "--http_port", str(port),
    ]  # fmt: skip
    env = {"PYTHONPATH": f"{tree / 'plugin'}{os.pathsep}{tree / 'runtime-image'}"}
    server = spawn("zeroserve", model, port, argv, work / f"server.{port}.log", env=env)
    try:
        server.wait_ready(READY_SECONDS)
        asyncio.run(_send(port, request, args.warmup, concurrency))
        pid = str(server.process.pid)
        subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True, timeout=60)
        asyncio.run(_send(port, request, args.requests, concurrency))
        subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True, timeout=120)
    finally:
        server.stop()
    dump = Path(f"{out}.1")
    for line in dump.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1]) / args.requests
    raise RuntimeError(f"no instruction total in {dump}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, help="another checkout to compare with (e.g. a git worktree)")
    parser.add_argument("--model", default="tiny", choices=sorted(models.BUILDERS))
    parser.add_argument("--body", default="json", choices=("json", "binary"))
    parser.add_argument("--requests", type=int, default=2000, help="requests counted per round")
    parser.add_argument("--warmup", type=int, default=300, help="requests answered before counting")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated connection counts")
    parser.add_argument("--rounds", type=int, default=2, help="server starts per tree and concurrency")
    args = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed: apt-get install -y valgrind", file=sys.stderr)
            return 2
    trees = {"this tree": HERE.parent}
    if args.base is not None:
        if not (args.base / "runtime-image" / "zeroserve").is_dir():
            print(f"{args.base} is not a zeroserve checkout", file=sys.stderr)
            return 2
        trees["base"] = args.base.resolve()
    concurrencies = [int(value) for value in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="zeroserve-instructions-") as scratch:
        work = Path(scratch)
        model_dir = models.write_models(work / "models", [args.model])[args.model].parent
        body = payloads.json_body(args.model) if args.body == "json" else payloads.binary_body(args.model)
        request = _request_bytes(args.model, body)
        print(f"{args.model}, REST {args.body}, {args.requests} requests counted per round, {args.rounds} rounds")
        for concurrency in concurrencies:
            counts: dict[str, list[float]] = {name: [] for name in trees}
            for _ in range(args.rounds):  # the trees' rounds interleaved
                for name, tree in trees.items():
                    counts[name].append(count_round(tree, model_dir, args.model, request, args, work, concurrency))
            line = f"c{concurrency}: " + "; ".join(
                f"{name} {statistics.median(values):,.0f} ({', '.join(f'{v:,.0f}' for v in values)})"
                for name, values in counts.items()
            )
            if "base" in counts:
                ratio = statistics.median(counts["this tree"]) / statistics.median(counts["base"])
                line += f"; this tree / base {ratio:.3f}"
            print(line + " instructions per request", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
