"""Cold start to first inference: zeroserve beside KServe's and MLServer's Python servers, side by side in one run.

    .venv/bin/python bench/coldstart.py [--rounds 5 | --quick] [--models tiny,image]
        [--sources local,s3-cold,s3-warm] [--json PATH]

Models (bench/models.py): ``tiny`` and ``image``. Sources:

  local    --model_dir is the model folder on the local disk.
  s3-cold  the model folder on a moto S3 server (the real S3 API, bench/s3.py). zeroserve reads
           ``s3://bucket/model`` itself into a fresh, empty --cache_dir each launch. KServe and MLServer do not
           read S3: on KServe a storage-initializer container downloads the model first
           (``kserve_storage.Storage.download_files``, KServe's own code, in a fresh process here too; KServe
           runs the same initializer in front of MLServer), then the server starts on the local copy. Their
           time is download + server launch to first inference, and both parts are reported.
  s3-warm  zeroserve with a --cache_dir that an earlier launch filled: it lists the object and reads no model
           bytes (checked in moto's access log, and a FLAG if not). The peers have no such cache: a new pod's
           storage-initializer downloads every time, so their s3-warm row is the same download again.

Each round launches every server once per model and source, interleaved (the servers' order rotates from round
to round), from just before Popen to the first HTTP 200 of POST /v2/models/NAME/infer (JSON body from
bench/payloads.py): GET /v2/models/NAME/ready is polled every 5 ms, then the inference is sent (so a multi-MB
image body is not re-sent while a server loads). One discarded warm-up round first (page cache, bytecode, and
zeroserve's warm cache). zeroserve's first answer carries its own breakdown (Server-Timing: init = process start
to ready, of which fetch, session, warmup; the rest of init is imports and server set-up).

For the image model it also runs bench/artifact_cache.py's measurement (session creation with zeroserve's
optimized-model cache, ``--cache_uri``, against without it) and reports the ratio.

MLServer 1.7.1 and kserve-storage run from virtualenvs of their own (see bench/README.md); a server or source
whose virtualenv is missing is skipped with a note. ``run(models, sources, rounds, out_dir)`` is the entry point
for other scripts; it returns what ``--json`` writes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import payloads
import s3
import servers

from models import write_models

BENCH = Path(__file__).resolve().parent
MLSERVER_PYTHON = BENCH / ".peers" / "mlserver-venv" / "bin" / "python"
SOURCES = ("local", "s3-cold", "s3-warm")
BUCKET = "coldstart"
DEADLINE_S = 120.0
GOAL_VS_KSERVE = 0.4  # issue 5: zeroserve's cold start at most 0.4x KServe's for the small models
PHASES = ("init", "fetch", "session", "warmup")


@dataclass(slots=True)
class Launch:
    """One measured launch: what ran, and where its time went."""

    model: str
    source: str
    server: str
    seconds: float  # total: download (peers, S3) + launch to first inference
    server_s: float  # launch to first inference
    download_s: float | None = None  # peers from S3: the storage-initializer's download
    model_reads: int | None = None  # S3 GetObject requests during this launch (download included)
    phases: dict[str, float] = field(default_factory=dict)  # zeroserve's Server-Timing, seconds


def command(kind: str, model: str, model_dir: str, port: int, grpc_port: int, cache_dir: Path | None) -> list[str]:
    flags = ["--model_name", model, "--model_dir", model_dir, "--http_port", str(port)]
    if kind == "zeroserve":
        cache = ["--cache_dir", str(cache_dir)] if cache_dir is not None else []
        return [sys.executable, "-m", "zeroserve.runtime", *flags, *cache, "--host", servers.HOST]
    if kind == "kserve":
        return [sys.executable, str(BENCH / "peers" / "kserve_onnx.py"), *flags, "--grpc_port", str(grpc_port)]
    return [str(MLSERVER_PYTHON), str(BENCH / "peers" / "mlserver_onnx.py"), *flags, "--grpc_port", str(grpc_port)]


def first_inference(
    kind: str, model: str, model_dir: str, log: Path, env: dict[str, str], cache_dir: Path | None = None
) -> tuple[float, dict[str, float]]:
    """Launch one server, wait for its first 200 inference, stop it; return (seconds, Server-Timing phases)."""
    port, grpc_port = servers.free_port(), servers.free_port()
    argv = command(kind, model, model_dir, port, grpc_port, cache_dir)
    body = payloads.json_body(model)
    # Its own process group: MLServer starts worker processes, which Server.stop() ends with it.
    server = servers.spawn(kind, model, port, argv, log, env=env)
    try:
        server.poll_until("GET", f"/v2/models/{model}/ready", None, {}, DEADLINE_S)
        elapsed, _, headers = server.poll_until("POST", server.infer_path, body.data, body.headers(), DEADLINE_S)
    finally:
        server.stop()
    timing = next((value for name, value in headers.items() if name.lower() == "server-timing"), "")
    entries = (part.partition(";dur=") for part in timing.split(",") if ";dur=" in part)
    phases = {name.strip(): float(ms) / 1000 for name, _, ms in entries}
    return elapsed, {name: phases[name] for name in phases if name not in ("queue", "infer")}


class Bench:
    """The models, their S3 copies and the cache folders of one run."""

    def __init__(self, out_dir: Path, paths: dict[str, Path], s3_server: Any, uris: dict[str, str]) -> None:
        self.out_dir = out_dir
        self.paths = paths
        self.s3 = s3_server
        self.uris = uris
        self.count = 0

    def scratch(self, what: str) -> Path:
        self.count += 1
        path = self.out_dir / "scratch" / f"{what}-{self.count}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def launch(self, kind: str, model: str, source: str) -> Launch:
        log = self.out_dir / "logs" / f"{kind}-{model}-{source}.log"
        if source == "local":
            seconds, phases = first_inference(kind, model, str(self.paths[model].parent), log, {})
            return Launch(model, source, kind, seconds, seconds, phases=phases)
        env = self.s3.aws_env()
        reads_before = s3.model_reads(self.s3, BUCKET)
        if kind == "zeroserve":
            cache = self.out_dir / "zeroserve-warm-cache" if source == "s3-warm" else self.scratch("cache")
            seconds, phases = first_inference(kind, model, self.uris[model], log, env, cache)
            result = Launch(model, source, kind, seconds, seconds, phases=phases)
            if source == "s3-cold":
                shutil.rmtree(cache)
        else:  # the storage-initializer, then the server on its copy; a new pod has no cache either way
            target = self.scratch("download")
            download_s = s3.kserve_download(self.uris[model], target, env, log)
            server_s, _ = first_inference(kind, model, str(target), log, {})
            result = Launch(model, source, kind, download_s + server_s, server_s, download_s)
            shutil.rmtree(target)
        result.model_reads = s3.model_reads(self.s3, BUCKET) - reads_before
        return result


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(launches: list[Launch], kinds: list[str]) -> list[dict[str, Any]]:
    rows = []
    groups: dict[tuple[str, str], dict[str, list[Launch]]] = {}
    for launch in launches:
        groups.setdefault((launch.model, launch.source), {}).setdefault(launch.server, []).append(launch)
    for (model, source), by_server in groups.items():
        base = median([x.seconds for x in by_server.get("zeroserve", [])])
        for kind in kinds:
            runs = by_server.get(kind, [])
            if not runs:
                continue
            med = median([x.seconds for x in runs])
            row: dict[str, Any] = {
                "model": model, "source": source, "server": kind, "n": len(runs),
                "median_s": round(med, 4), "min_s": round(min(x.seconds for x in runs), 4),
                "zeroserve_over_server": round(base / med, 3),
                "server_median_s": round(median([x.server_s for x in runs]), 4),
            }  # fmt: skip
            if runs[0].download_s is not None:
                row["download_median_s"] = round(median([x.download_s or 0.0 for x in runs]), 4)
            if runs[0].model_reads is not None:
                row["model_reads_per_launch"] = [x.model_reads for x in runs]
            if kind == "zeroserve":
                names = dict.fromkeys(name for x in runs for name in x.phases)
                row["phases_median_s"] = {n: round(median([x.phases.get(n, 0.0) for x in runs]), 4) for n in names}
            rows.append(row)
    return rows


def breakdown(row: dict[str, Any]) -> str:
    if "phases_median_s" in row:
        phases = row["phases_median_s"]
        rest = phases.get("init", 0.0) - sum(phases.get(n, 0.0) for n in PHASES[1:])
        parts = [f"{n} {phases[n]:.3f}" for n in PHASES if n in phases]
        return "; ".join(parts) + f" (imports+set-up {rest:.3f})"
    if "download_median_s" in row:
        note = " (no cache: downloaded again)" if row["source"] == "s3-warm" else ""
        return f"download {row['download_median_s']:.3f} + server {row['server_median_s']:.3f}{note}"
    return f"server {row['server_median_s']:.3f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"cold start to first inference, median of {result['rounds']} rounds (s); zeroserve / server < 1: "
        "zeroserve faster",
        "",
        "| model | source | server | median s | min s | zeroserve / server | S3 model GETs per launch "
        "| breakdown (medians, s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        reads = row.get("model_reads_per_launch")
        cells = [
            row["model"], row["source"], row["server"], f"{row['median_s']:.3f}", f"{row['min_s']:.3f}",
            f"{row['zeroserve_over_server']:.2f}x", "-" if reads is None else ",".join(map(str, reads)), breakdown(row),
        ]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines.append("")
    lines.extend(result["goals"])
    lines.extend(result["notes"])
    if result["flags"]:
        lines.append("FLAGS: " + "; ".join(result["flags"]))
    return "\n".join(lines)


def goals(rows: list[dict[str, Any]], artifacts: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    lines, flags = [], []
    for row in rows:
        if row["server"] == "kserve":
            ratio = row["zeroserve_over_server"]
            verdict = "met" if ratio <= GOAL_VS_KSERVE else "NOT met"
            lines.append(
                f"goal zeroserve <= {GOAL_VS_KSERVE}x KServe, {row['model']} {row['source']}: {ratio:.2f}x ({verdict})"
            )
    for row in rows:
        if row["server"] == "zeroserve" and "model_reads_per_launch" in row:
            reads = row["model_reads_per_launch"]
            lines.append(f"zeroserve {row['model']} {row['source']}: S3 model GETs per launch {reads}")
            if row["source"] == "s3-warm" and any(reads):
                flags.append(f"zeroserve {row['model']} s3-warm read model bytes from S3: {reads}")
            if row["source"] == "s3-cold" and not all(reads):
                flags.append(f"zeroserve {row['model']} s3-cold launch without a model download: {reads}")
    if artifacts is not None:
        c, r = artifacts["create_ms"], artifacts["create_ratio"]
        lines.append(
            f"image session creation with zeroserve's optimized-model cache (--cache_uri, local hit, level ALL): "
            f"{c['ALL']:.1f} ms vs {c['plain']:.1f} ms without, ratio {r['ALL']:.2f}x "
            f"(new pod, digests not remembered: {c['ALL_full_hash']:.1f} ms, {r['ALL_full_hash']:.2f}x; "
            "bench/artifact_cache.py)"
        )
        if r["ALL"] >= 1:
            flags.append(f"image session creation with the artifact cache is not faster: {r['ALL']:.2f}x")
    return lines, flags


def run(models: Sequence[str], sources: Sequence[str], rounds: int, out_dir: Path) -> dict[str, Any]:
    """Measure every server on every model and source in ``rounds`` interleaved rounds; return the results."""
    kinds = ["zeroserve", "kserve"]
    notes = []
    if MLSERVER_PYTHON.exists():
        kinds.append("mlserver")
    else:
        notes.append(f"mlserver skipped: no virtualenv at {MLSERVER_PYTHON} (see bench/README.md)")
    storage_missing = s3.storage_unavailable_reason()
    if storage_missing and any(src != "local" for src in sources):
        notes.append(f"KServe/MLServer S3 rows skipped: {storage_missing}")
    notes.append(
        "peers from S3 = KServe storage-initializer download (fresh process) + server launch on the local copy; "
        "pod scheduling between the init container and the server is not included. s3-warm: the peers have no "
        "local model cache (a new pod downloads again), so their s3-warm row is the same download, repeated."
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_models(out_dir / "models", list(models))
    launches: list[Launch] = []
    with s3.moto_server(out_dir / "logs" / "moto.log") as s3_server:
        uris = s3.upload_models(s3_server, BUCKET, paths)
        bench = Bench(out_dir, paths, s3_server, uris)
        for round_ in range(rounds + 1):  # round 0: warm-up, discarded; it also fills zeroserve's warm cache
            order = kinds[round_ % len(kinds) :] + kinds[: round_ % len(kinds)]
            for model in models:
                for source in sources:
                    for kind in order:
                        if kind != "zeroserve" and source != "local" and storage_missing:
                            continue
                        launch = bench.launch(kind, model, source)
                        if round_:
                            launches.append(launch)
            print(f"round {round_}/{rounds} done{' (warm-up, discarded)' if not round_ else ''}", file=sys.stderr)
    artifacts = None
    if "image" in models:
        import artifact_cache
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)  # the "hardware specific" warning of every ALL-level save
        artifacts = artifact_cache.measure("image", paths["image"], out_dir / "artifacts", max(rounds, 3), 5)
    rows = summarize(launches, kinds)
    goal_lines, flags = goals(rows, artifacts)
    return {
        "rounds": rounds, "models": list(models), "sources": list(sources), "servers": kinds,
        "rows": rows, "goals": goal_lines, "notes": notes, "flags": flags, "artifact_cache": artifacts,
        "launches": [asdict(x) for x in launches], "loadavg_after": os.getloadavg(), "out_dir": str(out_dir),
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    parser.add_argument("--models", default="tiny,image")
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--out-dir", type=Path, help="models, logs and caches (default: a new temporary folder)")
    args = parser.parse_args(argv)
    chosen_models = [m for m in args.models.split(",") if m]
    sources = [s for s in args.sources.split(",") if s]
    unknown = sorted(set(chosen_models) - {"tiny", "image"}) + sorted(set(sources) - set(SOURCES))
    if unknown:
        parser.error(f"unknown model or source: {', '.join(unknown)}")
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="zeroserve-coldstart-"))
    missing = servers.unavailable_reason("zeroserve", sys.executable)  # and its sources compiled, as in the image
    if missing:
        parser.error(missing)
    result = run(chosen_models, sources, 2 if args.quick else args.rounds, out_dir)
    print(markdown(result))
    print(f"\nlogs in {out_dir / 'logs'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 1 if result["flags"] else 0


if __name__ == "__main__":
    sys.exit(main())
