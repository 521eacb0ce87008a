"""Many models on demand (issue 19): index, start, first request, memory, herd, warm path and reload, in one run.

    .venv/bin/python bench/multi_model.py [--count 1000] [--rounds 5] [--quick] [--only s3,first,herd,warm,reload]

Writes ``--count`` small MLPs (``mNNN/1/model.onnx``, distinct weights, ~5.5 KB each), keeps them on the local
disk and uploads them to a moto S3 server (its own process on 127.0.0.1, bucket ``many``; bucket ``one`` holds
``m000`` alone), then measures, every comparison interleaved in the same run:

  s3      process launch to /v2/health/ready 200: --model_loading on_demand over every model on S3 against an
          eager server of one model on S3 (a fresh --cache_dir each launch), --rounds launches each after a
          discarded pair; the index time from the server's log line and from its first answer's Server-Timing
          (``index``); S3 GETs and listings before ready; one first request each (a load from S3). Then
          --probe-launches launches under index_probe.py (where the index time goes) and botocore's parser against
          ElementTree on the listing.
  first   the first request to an unloaded model of an on-demand server over the local repository (its
          ``load;dur`` and wall time) against an eager server's fetch+session+warmup of the same file (its first
          answer's Server-Timing): the first load of the process and two later ones. Then, with those 3 loaded,
          the server's RSS against an eager server of the same 3 models, each after one request per model.
  herd    --herd threads released by a barrier send the first request for one model (local and S3, 3 models
          each); every answer must be 200 and zeroserve_model_loads_total{outcome="ready"} must be 1.
  warm    requests/s of a loaded model (wrk -c16 -t2, JSON) on the on-demand server against an eager single-model
          server of the same file, and an on-demand server of that one model, alternating windows, medians.
  reload  a conv model (1.3 MB) and a ResNet-18 (47 MB), after a primer MLP: the first load, then --reloads
          unload + load, with --cache_uri (a fresh cache each round) and without, --reload-rounds rounds; and a
          second process's first load on the cache the first one filled.

Prints the report and writes ``bench/results/multi-model-<stamp>/`` (results.json, report.md, logs/). Exits 1 when
a request failed or an answer was wrong (FLAGS); a goal not met is reported, not a failure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import index_probe
import load
import model_repos
import multi_model_report as report
import s3
import servers
import zeroserve_proc as zp

BENCH = Path(__file__).resolve().parent
SECTIONS = ("s3", "first", "herd", "warm", "reload")
ON_DEMAND = ("--model_loading", "on_demand")


def median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(statistics.median(kept), 3) if kept else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def alternate(kinds: Sequence[str], round_: int) -> list[str]:
    """``kinds`` rotated by the round, so that no kind always goes first."""
    shift = round_ % len(kinds)
    return [*kinds[shift:], *kinds[:shift]]


class Bench:
    def __init__(self, args: argparse.Namespace, out_dir: Path, work: Path) -> None:
        self.args = args
        self.out_dir = out_dir
        self.work = work
        self.flags: list[str] = []
        self.checker = zp.Checker()
        self.launches = 0
        self.result: dict[str, Any] = {"args": vars(args), "loadavg_start": os.getloadavg(), "flags": self.flags}
        self.repo = work / "repo"
        self.names: list[str] = []
        self.moto: Any = None

    def say(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def flag(self, message: str) -> None:
        self.say(f"FLAG: {message}")
        self.flags.append(message)

    def log(self, label: str) -> Path:
        self.launches += 1
        return self.out_dir / "logs" / f"{self.launches:03d}-{label}.log"

    def scratch(self, what: str) -> Path:
        self.launches += 1
        return self.work / "scratch" / f"{what}-{self.launches}"

    def check(self, answer: zp.Answer, model: str, where: str) -> None:
        wrong = self.checker.wrong(answer, self.repo / model / "1" / "model.onnx")
        if wrong:
            self.flag(f"{where}: {model}: {wrong}")

    # --- set-up ---

    def prepare(self) -> None:
        started = time.perf_counter()
        self.names = model_repos.write_mlps(self.repo, self.args.count)
        written = time.perf_counter() - started
        model_repos.copy_models(self.repo, [self.names[0]], self.work / "one")
        started = time.perf_counter()
        objects = model_repos.upload_tree(self.moto, "many", self.repo)
        model_repos.upload_tree(self.moto, "one", self.work / "one")
        sizes = [p.stat().st_size for p in self.repo.rglob("model.onnx")]
        self.result["models"] = {
            "count": len(self.names), "bytes_each_min_max": [min(sizes), max(sizes)], "write_s": round(written, 2),
            "upload_s": round(time.perf_counter() - started, 2), "s3_objects": objects,
        }  # fmt: skip
        self.say(f"{len(self.names)} models written in {written:.1f} s and uploaded")

    def listings(self, bucket: str) -> int:
        return sum(r.method == "GET" and r.path.startswith(f"/{bucket}") and "list-type" in r.path
                   for r in self.moto.requests())  # fmt: skip

    # --- s3: index and start to ready ---

    def s3_start(self) -> None:
        samples: dict[str, list[dict[str, Any]]] = {"on_demand_all": [], "eager_1": []}
        for round_ in range(self.args.rounds + 1):  # round 0: discarded (page cache, bytecode)
            for kind in alternate(list(samples), round_):
                cache = self.scratch("cache")
                if kind == "on_demand_all":
                    row = self._s3_on_demand(self.names[1 + round_], cache)
                else:
                    with zp.serving("s3-eager", "s3://one", ["--cache_dir", str(cache)], self.log("s3-eager"),
                                    self.moto.aws_env()) as (server, ready_s):  # fmt: skip
                        answer = zp.infer(server, self.names[0])
                        self.check(answer, self.names[0], "s3 eager first request")
                    row = {
                        "ready_s": round(ready_s, 4), "init_ms": answer.timing.get("init"),
                        "fetch_session_warmup_ms": round(answer.fetch_session_warmup(), 2), "timing_ms": answer.timing,
                    }  # fmt: skip
                shutil.rmtree(cache, ignore_errors=True)
                if round_:
                    samples[kind].append(row)
            self.say(f"s3 round {round_}/{self.args.rounds} done{' (discarded)' if not round_ else ''}")
        od, eager = samples["on_demand_all"], samples["eager_1"]

        def med(rows: list[dict[str, Any]], key: str) -> float | None:
            return median([r[key] for r in rows])

        self.result["s3"] = {
            "samples": samples,
            "ready_s": {"on_demand_all": med(od, "ready_s"), "eager_1": med(eager, "ready_s")},
            "ready_ratio": ratio(med(od, "ready_s"), med(eager, "ready_s")),
            "index_log_s": med(od, "index_log_s"), "index_log_s_max": max(r["index_log_s"] or 0 for r in od),
            "index_timing_ms": med(od, "index_timing_ms"),
            "eager_fetch_ms": median([r["timing_ms"].get("fetch") for r in eager]),
            "index_breakdown_ms": self._index_breakdown(),
            "first_request": {
                "on_demand_load_ms": med(od, "load_ms"), "on_demand_wall_ms": med(od, "first_request_wall_ms"),
                "eager_fetch_session_warmup_ms": med(eager, "fetch_session_warmup_ms"),
                "wall_minus_eager_ms": _minus(med(od, "first_request_wall_ms"), med(eager, "fetch_session_warmup_ms")),
                "load_minus_eager_ms": _minus(med(od, "load_ms"), med(eager, "fetch_session_warmup_ms")),
            },
        }  # fmt: skip

    def _s3_on_demand(self, model: str, cache: Path) -> dict[str, Any]:
        """One on-demand launch over the S3 repository: start to ready, what it read from S3 meanwhile, and one
        first request."""
        reads, lists = s3.model_reads(self.moto, "many"), self.listings("many")
        flags = [*ON_DEMAND, "--cache_dir", str(cache)]
        with zp.serving("s3-on-demand", "s3://many", flags, self.log("s3-od"), self.moto.aws_env()) as (
            server, ready_s,
        ):  # fmt: skip
            reads_at_ready = s3.model_reads(self.moto, "many") - reads
            lists_at_ready = self.listings("many") - lists
            answer = zp.infer(server, model)
            self.check(answer, model, "s3 on-demand first request")
            found = zp.indexed(server)
        if found is None or found[0] != len(self.names):
            self.flag(f"s3 on-demand indexed {found} models, expected {len(self.names)}")
        if reads_at_ready:
            self.flag(f"s3 on-demand read {reads_at_ready} model object(s) before it was ready")
        return {
            "ready_s": round(ready_s, 4), "model": model,
            "index_log_s": found[1] if found else None, "indexed": found[0] if found else None,
            "index_timing_ms": answer.timing.get("index"), "init_ms": answer.timing.get("init"),
            "s3_gets_at_ready": reads_at_ready, "s3_listings_at_ready": lists_at_ready,
            "s3_gets_after_first_request": s3.model_reads(self.moto, "many") - reads,
            "first_request_wall_ms": round(answer.wall_ms, 2), "load_ms": answer.timing.get("load"),
            "load_fetch_session_warmup_ms": round(answer.fetch_session_warmup("load."), 2),
            "timing_ms": answer.timing,
        }  # fmt: skip

    def _index_breakdown(self) -> dict[str, Any] | None:
        """Medians of index_probe.py's parts over --probe-launches launches, and botocore's parser against
        ElementTree on the same listing."""
        if not self.args.probe_launches:
            return None
        probes = []
        for _ in range(self.args.probe_launches):
            flags = [*ON_DEMAND, "--cache_dir", str(self.scratch("cache"))]
            with zp.serving("s3-probe", "s3://many", flags, self.log("s3-probe"), self.moto.aws_env(),
                            entry=(str(BENCH / "index_probe.py"),)) as (server, _):  # fmt: skip
                pass
            lines = [x for x in server.log_path.read_text().splitlines() if x.startswith(index_probe.PREFIX)]
            if lines:
                probes.append(json.loads(lines[-1][len(index_probe.PREFIX) :]))
            else:
                self.flag(f"index probe wrote no {index_probe.PREFIX.strip()} line: {server.log_path}")
        keys = dict.fromkeys(k for probe in probes for k in probe)
        parts: dict[str, Any] = {k: median([p.get(k) for p in probes]) for k in keys}
        port = int(self.moto.endpoint_url.rsplit(":", 1)[1])
        status, _, body = servers.request(port, "GET", "/many?list-type=2&prefix=")
        if status == 200:  # moto answers unsigned requests
            parts["listing_parse"] = index_probe.parse_times(body)
        return parts

    # --- first: the first request to an unloaded model, and memory with 3 loaded ---

    def first_load(self) -> None:
        kinds = ["eager_1", "on_demand_all", "eager_3"]
        rows: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
        for round_ in range(self.args.rounds + 1):
            three = self.names[10 + 3 * round_ : 13 + 3 * round_]
            for kind in alternate(kinds, round_):
                row = self._first_load_launch(kind, three)
                if round_:
                    rows[kind].append(row)
            self.say(f"first-request round {round_}/{self.args.rounds} done{' (discarded)' if not round_ else ''}")
        od, one, three_rows = rows["on_demand_all"], rows["eager_1"], rows["eager_3"]
        first = median([r["first"]["load_ms"] for r in od])
        first_wall = median([r["first"]["wall_ms"] for r in od])
        later = median([a["load_ms"] for r in od for a in r["later"]])
        later_wall = median([a["wall_ms"] for r in od for a in r["later"]])
        eager = median([r["fetch_session_warmup_ms"] for r in one])
        rss_od, rss_eager = median([r["rss_mib"] for r in od]), median([r["rss_mib"] for r in three_rows])
        self.result["first"] = {
            "samples": rows,
            "eager_fetch_session_warmup_ms": eager,
            "eager_session_warmup_ms": median([r["session_warmup_ms"] for r in one]),
            "first_load_of_process": {"load_ms": first, "wall_ms": first_wall,
                                      "load_minus_eager_ms": _minus(first, eager),
                                      "wall_minus_eager_ms": _minus(first_wall, eager)},
            "later_loads": {"load_ms": later, "wall_ms": later_wall, "load_minus_eager_ms": _minus(later, eager),
                            "wall_minus_eager_ms": _minus(later_wall, eager)},
            "ready_s": {"on_demand_all_local": median([r["ready_s"] for r in od]),
                        "eager_1_local": median([r["ready_s"] for r in one]),
                        "eager_3_local": median([r["ready_s"] for r in three_rows])},
            "index_log_s_local": median([r["index_log_s"] for r in od]),
            "rss_mib": {"on_demand_all_3_loaded": rss_od, "eager_3": rss_eager,
                        "on_demand_all_idle": median([r["rss_idle_mib"] for r in od]),
                        "eager_1_after_first": median([r["rss_mib"] for r in one])},
            "rss_ratio": ratio(rss_od, rss_eager),
        }  # fmt: skip

    def _first_load_launch(self, kind: str, three: list[str]) -> dict[str, Any]:
        if kind == "eager_1":
            with zp.serving("eager-1", str(self.repo / three[0]), [], self.log("eager-1"), model_name=three[0]) as (
                server, ready_s,
            ):  # fmt: skip
                answer = zp.infer(server, three[0])
                self.check(answer, three[0], "eager first request")
                server.wait_idle()
                return {"model": three[0], "ready_s": round(ready_s, 4), "timing_ms": answer.timing,
                        "fetch_session_warmup_ms": round(answer.fetch_session_warmup(), 2),
                        "session_warmup_ms": round(answer.fetch_session_warmup() - answer.timing.get("fetch", 0), 2),
                        "rss_mib": server.rss_mib()}  # fmt: skip
        if kind == "eager_3":
            repo = model_repos.copy_models(self.repo, three, self.scratch("three"))
            with zp.serving("eager-3", str(repo), [], self.log("eager-3")) as (server, ready_s):
                for model in three:
                    self.check(zp.infer(server, model), model, "eager-3 request")
                server.wait_idle()
                row = {"models": three, "ready_s": round(ready_s, 4), "rss_mib": server.rss_mib()}
            shutil.rmtree(repo)
            return row
        with zp.serving("on-demand", str(self.repo), ON_DEMAND, self.log("od-local")) as (server, ready_s):
            server.wait_idle()
            rss_idle = server.rss_mib()
            answers = [zp.infer(server, model) for model in three]
            for model, answer in zip(three, answers):
                self.check(answer, model, "on-demand first request")
                if not answer.loaded:
                    self.flag(f"on-demand first request for {model} carried no load timing: {answer.timing}")
            again = [zp.infer(server, model) for model in three]  # loaded now: no load on these
            if any(a.loaded or a.status != 200 for a in again):
                self.flag(f"on-demand: a second request loaded again or failed: {[a.timing for a in again]}")
            server.wait_idle()
            samples = zp.metrics(server)
            found = zp.indexed(server)
            loaded = zp.metric(samples, "zeroserve_models_loaded")
            if loaded != 3:
                self.flag(f"on-demand: zeroserve_models_loaded is {loaded} with 3 models requested")

            def one(a: zp.Answer) -> dict[str, Any]:
                return {"load_ms": a.timing.get("load"), "wall_ms": round(a.wall_ms, 2), "timing_ms": a.timing}

            return {
                "models": three, "ready_s": round(ready_s, 4), "index_log_s": found[1] if found else None,
                "first": one(answers[0]), "later": [one(a) for a in answers[1:]],
                "rss_idle_mib": rss_idle, "rss_mib": server.rss_mib(), "models_loaded": loaded,
                "models_loaded_bytes": zp.metric(samples, "zeroserve_models_loaded_bytes"),
            }  # fmt: skip

    # --- herd ---

    def herd(self) -> None:
        out: list[dict[str, Any]] = []
        env = self.moto.aws_env()
        with (
            zp.serving("herd-local", str(self.repo), ON_DEMAND, self.log("herd-local")) as (local, _),
            zp.serving("herd-s3", "s3://many", [*ON_DEMAND, "--cache_dir", str(self.scratch("cache"))],
                       self.log("herd-s3"), env) as (remote, _),
        ):  # fmt: skip
            for i in range(3):
                for where, server in (("local", local), ("s3", remote)):
                    model = self.names[-1 - i]
                    herd = zp.herd(server, model, self.args.herd)
                    samples = zp.metrics(server)
                    row = {
                        "where": where, "model": model, "size": self.args.herd,
                        "ok": sum(s == 200 for s in herd.statuses), "statuses": sorted(set(herd.statuses)),
                        "loads_ready": zp.metric(samples, "zeroserve_model_loads_total", model=model, outcome="ready"),
                        "loads_failed": zp.metric(samples, "zeroserve_model_loads_total", model=model,
                                                  outcome="failed"),
                        "waited_for_load": herd.waited_for_load, "send_spread_ms": round(herd.send_spread_ms, 2),
                        "wall_ms_median": median(herd.wall_ms), "wall_ms_max": max(herd.wall_ms, default=None),
                    }  # fmt: skip
                    out.append(row)
                    if row["ok"] != self.args.herd or row["loads_ready"] != 1 or row["loads_failed"]:
                        self.flag(f"herd {where} {model}: {row['ok']}/{self.args.herd} answered 200, "
                                  f"{row['loads_ready']:g} loads ready, {row['loads_failed']:g} failed")  # fmt: skip
        self.result["herd"] = out
        self.say("herd done")

    # --- warm path ---

    def warm(self) -> None:
        model = self.names[500 % len(self.names)]
        body = self.work / "tiny.json"
        body.write_bytes(zp.TINY.data)
        scenario = load.Scenario("tiny_json_c16", "json.lua", body, 16, 2)
        rounds: dict[str, list[dict[str, Any]]] = {"on_demand_all": [], "eager_1": [], "on_demand_1": []}
        one = model_repos.copy_models(self.repo, [model], self.scratch("one"))
        with (
            zp.serving("warm-od", str(self.repo), ON_DEMAND, self.log("warm-od")) as (od, _),
            zp.serving("warm-eager", str(self.repo / model), [], self.log("warm-eager"), model_name=model) as (
                eager, _,
            ),
            zp.serving("warm-od-1", str(one), ON_DEMAND, self.log("warm-od-1")) as (od_one, _),
        ):  # fmt: skip
            # on_demand_1 (an on-demand server of this one model) tells the on-demand path's cost from the index's.
            servers_by_kind = {"on_demand_all": od, "eager_1": eager, "on_demand_1": od_one}
            for kind, server in servers_by_kind.items():
                self.check(zp.infer(server, model), model, f"warm {kind}")
                load.run(scenario, f"{server.url}/v2/models/{model}/infer", 1.0)  # discarded
            for round_ in range(self.args.warm_rounds):
                for kind in alternate(list(servers_by_kind), round_):
                    server = servers_by_kind[kind]
                    server.wait_idle()
                    cpu = server.cpu_seconds()
                    report = load.run(scenario, f"{server.url}/v2/models/{model}/infer", self.args.warm_duration)
                    cpu_after = server.cpu_seconds()
                    if report["has_errors"]:
                        self.flag(f"warm {kind} round {round_}: {report['errors']}")
                    per_request = None
                    if cpu is not None and cpu_after is not None and report["requests"]:
                        per_request = round((cpu_after - cpu) * 1000 / report["requests"], 4)
                    rounds[kind].append({
                        "ok_requests_per_s": round(report["ok_requests_per_s"], 1),
                        "p50_us": report["latency_us"]["percentiles"]["50"],
                        "p99_us": report["latency_us"]["percentiles"]["99"],
                        "server_cpu_ms_per_request": per_request, "loadavg_after": os.getloadavg()[0],
                    })  # fmt: skip
                self.say(f"warm round {round_ + 1}/{self.args.warm_rounds} done")

        def med(kind: str, key: str) -> float | None:
            return median([r[key] for r in rounds[kind]])

        self.result["warm"] = {
            "model": model, "rounds": rounds,
            "rps": {k: med(k, "ok_requests_per_s") for k in rounds},
            "p99_us": {k: med(k, "p99_us") for k in rounds},
            "cpu_ms_per_request": {k: med(k, "server_cpu_ms_per_request") for k in rounds},
            "rps_ratio": ratio(med("on_demand_all", "ok_requests_per_s"), med("eager_1", "ok_requests_per_s")),
            "rps_ratio_one": ratio(med("on_demand_1", "ok_requests_per_s"), med("eager_1", "ok_requests_per_s")),
            "p99_ratio": ratio(med("on_demand_all", "p99_us"), med("eager_1", "p99_us")),
            "cpu_ratio": ratio(med("on_demand_all", "server_cpu_ms_per_request"),
                               med("eager_1", "server_cpu_ms_per_request")),
        }  # fmt: skip

    # --- reload with and without the artifact cache ---

    def reload(self) -> None:
        repo = self.work / "reload"
        paths = model_repos.write_reload_repo(repo)
        bodies = {name: model_repos.tensor_body(shape) for name, shape in model_repos.RELOAD_INPUTS.items()}
        measured = [name for name in paths if name != "primer"]
        rows: list[dict[str, Any]] = []
        for round_ in range(self.args.reload_rounds):
            cache_uri = self.scratch("artifacts")
            for kind in alternate(["cache", "plain"], round_):
                flags = [*ON_DEMAND, "--cache_dir", str(self.scratch("cache"))]
                if kind == "cache":
                    flags += ["--cache_uri", str(cache_uri)]
                rows += self._reload_launch(kind, str(repo), flags, measured, bodies, round_)
            # A second process on the cache the first one filled (a new pod, say): its first loads.
            flags = [*ON_DEMAND, "--cache_dir", str(self.scratch("cache")), "--cache_uri", str(cache_uri)]
            rows += self._reload_launch("cache_filled", str(repo), flags, measured, bodies, round_, reloads=0)
            self.say(f"reload round {round_ + 1}/{self.args.reload_rounds} done")
        summary: dict[str, Any] = {}
        for model in measured:
            for kind in ("cache", "plain", "cache_filled"):
                mine = [r for r in rows if r["model"] == model and r["kind"] == kind]
                for what, keep in (("first", lambda r: r["what"] == "first"), ("reload", lambda r: r["nth"] > 0),
                                   ("reload_1", lambda r: r["nth"] == 1), ("reload_later", lambda r: r["nth"] > 1)):
                    picked = [r for r in mine if keep(r)]
                    if picked:
                        summary.setdefault(model, {})[f"{kind}_{what}"] = {
                            key: median([r[key] for r in picked]) for key in ("load_ms", "session_ms", "warmup_ms")
                        }
            per = summary[model]
            for kind in ("cache", "plain"):
                for key in ("load_ms", "session_ms"):
                    per[f"{kind}_reload_over_first_{key[:-3]}"] = ratio(per[f"{kind}_reload"][key],
                                                                         per[f"{kind}_first"][key])  # fmt: skip
            # The cache's first load is a miss (it also writes the entry): against loads without a cache too.
            per["cache_reload_over_plain_reload_load"] = ratio(per["cache_reload"]["load_ms"],
                                                               per["plain_reload"]["load_ms"])
            per["cache_reload_over_plain_first_load"] = ratio(per["cache_reload"]["load_ms"],
                                                              per["plain_first"]["load_ms"])
        self.result["reload"] = {"samples": rows, "summary": summary,
                                 "model_mb": {m: round(paths[m].stat().st_size / 1e6, 2) for m in measured}}

    def _reload_launch(
        self, kind: str, repo: str, flags: list[str], measured: list[str], bodies: dict[str, Any], round_: int,
        reloads: int | None = None,
    ) -> list[dict[str, Any]]:
        rows = []

        def record(what: str, model: str, answer: zp.Answer, nth: int = 0) -> None:
            if answer.status != 200 or not answer.loaded:
                self.flag(f"reload {kind} {what} {model}: HTTP {answer.status}, timing {answer.timing}")
            rows.append({"kind": kind, "what": what, "nth": nth, "model": model, "round": round_,
                         "load_ms": answer.timing.get("load"), "session_ms": answer.timing.get("load.session"),
                         "warmup_ms": answer.timing.get("load.warmup"), "wall_ms": round(answer.wall_ms, 2)})

        with zp.serving(f"reload-{kind}", repo, flags, self.log(f"reload-{kind}")) as (server, _):
            zp.infer(server, "primer", bodies["primer"])  # the process's first session is not one measured
            for model in measured:
                record("first", model, zp.infer(server, model, bodies[model]))
            # Past the digest memo's 2 s "racy" window (digests.py): the first reload hashes the optimized graph
            # written by the first load once and remembers it; the later reloads show the steady state.
            time.sleep(2.1)
            for nth in range(1, 1 + (self.args.reloads if reloads is None else reloads)):
                for model in measured:
                    status = zp.unload(server, model)
                    if status != 200:
                        self.flag(f"reload {kind}: unload {model} answered {status}")
                    record("reload", model, zp.infer(server, model, bodies[model]), nth)
        return rows


def _minus(a: float | None, b: float | None) -> float | None:
    return round(a - b, 2) if a is not None and b is not None else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000, help="models in the repository (default 1000)")
    parser.add_argument("--rounds", type=int, default=5, help="launches per kind, s3 and first (default 5)")
    parser.add_argument("--herd", type=int, default=32, help="concurrent first requests (default 32)")
    parser.add_argument("--warm-rounds", type=int, default=5)
    parser.add_argument("--warm-duration", type=float, default=3.0, help="seconds per warm window (default 3)")
    parser.add_argument("--reload-rounds", type=int, default=5)
    parser.add_argument("--reloads", type=int, default=5, help="unload + load per model and process (default 5)")
    parser.add_argument("--probe-launches", type=int, default=3, help="index_probe.py launches (default 3; 0: none)")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 2 warm windows of 2 s, 1 reload round, 1 probe")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections (default {','.join(SECTIONS)})")
    parser.add_argument("--keep", action="store_true", help="keep the models and caches (printed folder)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warm_rounds, args.warm_duration, args.reload_rounds, args.probe_launches = 2, 2, 2.0, 1, 1
    sections = [s for s in args.only.split(",") if s]
    if set(sections) - set(SECTIONS) or args.count < 40:
        parser.error(f"sections are {', '.join(SECTIONS)}; --count must be at least 40")
    if "warm" in sections and load.wrk_version() is None:
        parser.error("wrk not found on PATH; install it: apt-get install -y wrk")
    out_dir = BENCH / "results" / f"multi-model-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True)
    work = Path(tempfile.mkdtemp(prefix="zeroserve-multi-model-"))
    bench = Bench(args, out_dir, work)
    try:
        with s3.moto_server(out_dir / "logs" / "moto.log") as moto:
            bench.moto = moto
            bench.prepare()
            steps = {"s3": bench.s3_start, "first": bench.first_load, "herd": bench.herd, "warm": bench.warm,
                     "reload": bench.reload}  # fmt: skip
            for section in sections:
                steps[section]()
    finally:
        if args.keep:
            print(f"models and caches kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    bench.result["loadavg_after"] = os.getloadavg()
    bench.result["goals"] = report.goals(bench.result)
    text = report.markdown(bench.result)
    (out_dir / "results.json").write_text(json.dumps(bench.result, indent=1, default=str) + "\n")
    (out_dir / "report.md").write_text(text + "\n")
    print(text)
    print(f"\nresults: {out_dir}", file=sys.stderr)
    return 1 if bench.flags else 0


if __name__ == "__main__":
    sys.exit(main())
