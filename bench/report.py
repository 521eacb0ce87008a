"""Ratios, goals and the markdown report for one ``run.py`` result.

The result dict is the JSON that ``run.py`` writes; this module only reads it. Every ratio is
``<server> / kserve`` or ``<server> / raw onnxruntime`` of numbers measured in the same run.
"""

from __future__ import annotations

from typing import Any

import matrix

Result = dict[str, Any]
# The servers the goals are computed for.
ZEROSERVES = ("zeroserve", "zeroserve+batching", "zeroserve+latency", "zeroserve+asyncio")


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or data.get(key) is None:
            return None
        data = data[key]
    return data


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ceiling(baseline: Any, model: str) -> float | None:
    """A model's raw onnxruntime throughput ceiling: the best of 1 and 2 threads calling session.run, and 2
    threads on a single-thread session (absent from runs before it was measured)."""
    keys = ("throughput_1thread_per_s", "throughput_2threads_per_s", "throughput_2threads_1intra_per_s")
    rates = [_get(baseline, model, k) for k in keys]
    known = [r for r in rates if r is not None]
    return max(known) if known else None


def cells(result: Result) -> list[tuple[str, str, int]]:
    """(model, protocol, concurrency) of every cell the run's settings asked for, in table order."""
    settings = result.get("settings") or {}
    models = settings.get("models") or matrix.MODELS
    protocols = [p for p in matrix.PROTOCOLS if p in (settings.get("protocols") or matrix.PROTOCOLS)]
    concurrency = settings.get("concurrency") or matrix.CONCURRENCY
    return [(m, p, c) for m in models for p in protocols for c in concurrency]


def per_server(result: Result, server: str) -> dict[str, float | None]:
    """The numbers of one server: every cell's rate, percentiles and CPU, and its ratios to raw onnxruntime."""
    data = _get(result, "servers", server) or {}
    load = data.get("load") or {}
    baseline = result.get("baseline")
    numbers: dict[str, float | None] = {"cold_start_median_s": _get(data, "cold_start", "median_s")}
    for model, protocol, concurrency in cells(result):
        key = matrix.cell(model, protocol, concurrency)
        numbers[f"{key}_per_s"] = _get(load, key, "ok_requests_per_s")
        for p in ("50", "90", "99"):
            numbers[f"{key}_p{p}_us"] = _get(load, key, "latency_us", "percentiles", p)
        numbers[f"{key}_cpu_ms_per_request"] = _get(load, key, "server_cpu_ms_per_request")
        numbers[f"{key}_fraction_of_raw_ceiling"] = _ratio(numbers[f"{key}_per_s"], ceiling(baseline, model))
    for model in matrix.MODELS:
        numbers[f"{model}_rss_idle_mib"] = _get(data, "rss_idle_mib", model)
        numbers[f"{model}_rss_idle_grpc_mib"] = _get(data, "rss_idle_grpc_mib", model)
    # What a server adds to one tiny call: its single-connection p50 over session.run's p50.
    raw_tiny_p50 = _get(baseline, "tiny", "latency", "p50_us")
    for protocol in ("json", "grpc"):
        p50 = numbers.get(f"tiny_{protocol}_c1_p50_us")
        numbers[f"tiny_{protocol}_c1_overhead_us"] = p50 - raw_tiny_p50 if p50 is not None and raw_tiny_p50 else None
    # Image gRPC single call against session.run measured just before it (the load drifts within a run).
    raw_image_p50 = _get(load, "image_grpc_c1", "raw_p50_us_adjacent") or _get(baseline, "image", "latency", "p50_us")
    numbers["image_grpc_c1_vs_raw_p50"] = _ratio(numbers.get("image_grpc_c1_p50_us"), raw_image_p50)
    return numbers


def ratios(result: Result) -> dict[str, Any]:
    """Each server's numbers, and every server's over KServe's for each number both have."""
    servers = {name: per_server(result, name) for name in result.get("servers", {})}
    out: dict[str, Any] = {"per_server": servers, "over_kserve": {}}
    ks = servers.get("kserve")
    if not ks:
        return out
    for name, numbers in servers.items():
        if name == "kserve":
            continue
        out["over_kserve"][name] = {
            key: _ratio(value, ks[key])
            for key, value in numbers.items()
            if not key.endswith(("_vs_raw_p50", "_fraction_of_raw_ceiling")) and value is not None and ks[key]
        }
    if "zeroserve" in out["over_kserve"]:
        out["zeroserve_over_kserve"] = out["over_kserve"]["zeroserve"]
    return out


def _goal(goal: str, target: str, value: float | None, met: bool | None, detail: str) -> dict[str, Any]:
    return {"goal": goal, "target": target, "value": value, "met": met, "detail": detail}


def goals_for(result: Result, server: str) -> list[dict[str, Any]]:
    """The issue's goals for ``server`` (zeroserve or a variant), from this run's numbers. ``met`` is None when a
    number is missing (a cell not run, a server skipped)."""
    numbers = per_server(result, server)
    ks = per_server(result, "kserve")

    def against_kserve(goal: str, key: str, factor: float, unit: str) -> dict[str, Any]:
        ratio = _ratio(numbers.get(key), ks.get(key))
        detail = f"{_fmt(numbers.get(key))} vs {_fmt(ks.get(key))} {unit}"
        return _goal(goal, f">= {factor:g}x", ratio, None if ratio is None else ratio >= factor, detail)

    out = [
        against_kserve("tiny, REST JSON, c16: throughput over KServe's", "tiny_json_c16_per_s", 4, "req/s"),
        against_kserve("image, REST binary, c16: throughput over KServe's", "image_binary_c16_per_s", 5, "req/s"),
    ]
    fraction = numbers.get("image_binary_c16_fraction_of_raw_ceiling")
    raw, raw_end = ceiling(result.get("baseline"), "image"), ceiling(result.get("baseline_end"), "image")
    out.append(_goal(
        "image, REST binary, c16: share of raw onnxruntime's ceiling",
        ">= 85%",
        fraction,
        None if fraction is None else fraction >= 0.85,
        # The ceiling at the end of the run shows how far the machine's load drifted meanwhile.
        f"{_fmt(numbers.get('image_binary_c16_per_s'))} vs {_fmt(raw)} inf/s; {_fmt(raw_end)} at the end of the run",
    ))
    out.append(against_kserve("image, gRPC, c16: throughput over KServe's", "image_grpc_c16_per_s", 1.2, "calls/s"))
    # p99 no worse than KServe's in every cell both measured.
    compared: list[tuple[float, str]] = []
    for model, protocol, concurrency in cells(result):
        key = f"{matrix.cell(model, protocol, concurrency)}_p99_us"
        ratio = _ratio(numbers.get(key), ks.get(key))
        if ratio is not None:
            compared.append((ratio, f"{model} {matrix.label(protocol, concurrency)}"))
    worse = sorted((c for c in compared if c[0] > 1.0), reverse=True)
    worst = max(compared) if compared else None
    detail = f"{len(compared) - len(worse)} of {len(compared)} cells no worse"
    if worse:
        detail += "; worse: " + ", ".join(f"{where} {ratio:.2f}x" for ratio, where in worse[:4])
        detail += " ..." if len(worse) > 4 else ""
    out.append(_goal("p99 latency over KServe's, every cell", "<= 1x", worst[0] if worst else None,
                     None if not compared else not worse, detail))
    # Idle RSS, per model, in the REST phase (zeroserve REST only, KServe as shipped) and the gRPC phase (both on).
    pairs = []
    for model in matrix.MODELS:
        for key, phase in ((f"{model}_rss_idle_mib", "REST"), (f"{model}_rss_idle_grpc_mib", "gRPC")):
            if numbers.get(key) is not None and ks.get(key):
                pairs.append((numbers[key] / ks[key], f"{model} {phase} {numbers[key]:.0f} vs {ks[key]:.0f} MiB"))
    worst_rss = max(pairs) if pairs else None
    out.append(_goal("idle RSS over KServe's, every model", "<= 1x", worst_rss[0] if worst_rss else None,
                     None if not pairs else all(r <= 1.0 for r, _ in pairs), "; ".join(d for _, d in pairs)))
    return out


def goals(result: Result) -> dict[str, list[dict[str, Any]]]:
    return {name: goals_for(result, name) for name in ZEROSERVES if _measured(result, name)}


def _measured(result: Result, server: str) -> bool:
    data = _get(result, "servers", server)
    return isinstance(data, dict) and not data.get("skipped")


def _fmt(value: float | None, digits: int | None = None) -> str:
    if value is None:
        return "–"
    if digits is None:
        digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    return f"{value:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def _goal_cell(goal: dict[str, Any]) -> str:
    value = goal["value"]
    shown = "–" if value is None else f"{value * 100:.0f}%" if goal["target"].endswith("%") else f"{value:.2f}x"
    verdict = {True: "**met**", False: "**not met**", None: "not measured"}[goal["met"]]
    return f"{verdict}: {shown} ({goal['detail']})"


def _cell_text(result: Result, server: str, key: str, field: str) -> str:
    data = _get(result, "servers", server) or {}
    if data.get("skipped"):
        return "skipped"
    stats = _get(data, "load", key)
    if stats is None:
        return "–"
    if "unsupported" in stats:
        return "unsupported"
    if field == "rate":
        text = _fmt(stats.get("ok_requests_per_s"))
    else:
        p99 = _get(stats, "latency_us", "percentiles", "99")
        text = _fmt(None if p99 is None else p99 / 1e3)
    return text + (" (!)" if stats.get("has_errors") else "")


def markdown(result: Result) -> str:
    """The whole report: goals, raw onnxruntime, one matrix table per model, cold starts, memory, flags."""
    names = list(result.get("servers", {}))
    computed = result.get("ratios") or ratios(result)
    goal_sets = result.get("goals") or goals(result)
    settings = result.get("settings") or {}
    machine = result.get("machine", {})
    lines = [
        "# Throughput matrix",
        "",
        f"{settings.get('duration_s')} s per cell after {settings.get('warmup_s')} s of discarded warm-up; "
        f"concurrency = wrk connections (REST) or calls in flight on one channel (gRPC); servers: {', '.join(names)}.",
        "",
    ]
    if goal_sets:
        lines += ["## Goals (issue 7: concurrency 16, against KServe with per-request logging off)", ""]
        variants = list(goal_sets)
        rows = []
        for index, first in enumerate(goal_sets[variants[0]]):
            rows.append([first["goal"], first["target"], *(_goal_cell(goal_sets[v][index]) for v in variants)])
        lines += _table(["goal", "target", *variants], rows) + [""]

    baseline, end = result.get("baseline") or {}, result.get("baseline_end") or {}
    lines += ["## Raw onnxruntime (no server; session.run in its own process)", ""]
    rows = []
    for model in settings.get("models") or matrix.MODELS:
        rows.append([
            model,
            _fmt(_get(baseline, model, "latency", "p50_us")),
            _fmt(_get(baseline, model, "throughput_1thread_per_s")),
            _fmt(_get(baseline, model, "throughput_2threads_per_s")),
            _fmt(_get(baseline, model, "throughput_2threads_1intra_per_s")),
            _fmt(ceiling(baseline, model)),
            _fmt(ceiling(end, model)),
        ])
    header = ["model", "session.run p50 (µs)", "1 thread (inf/s)", "2 threads (inf/s)",
              "2 threads, 1 intra-op thread each (inf/s)", "ceiling (inf/s)", "ceiling at end of run"]
    lines += _table(header, rows) + [""]

    ratio_names = [n for n in names if n != "kserve" and n in computed.get("over_kserve", {})]
    for model in settings.get("models") or matrix.MODELS:
        lines += [f"## {model} model: throughput (req/s) and p99 latency (ms)", ""]
        header = ["protocol, concurrency"]
        for name in names:
            header += [f"{name} req/s", f"{name} p99"]
        header += [f"{n} / kserve req/s" for n in ratio_names] + [f"{n} / kserve p99" for n in ratio_names]
        rows = []
        for m, protocol, concurrency in cells(result):
            if m != model:
                continue
            key = matrix.cell(model, protocol, concurrency)
            row = [matrix.label(protocol, concurrency)]
            for name in names:
                row += [_cell_text(result, name, key, "rate"), _cell_text(result, name, key, "p99")]
            for suffix in ("_per_s", "_p99_us"):
                for name in ratio_names:
                    ratio = _get(computed, "over_kserve", name, key + suffix)
                    row.append("–" if ratio is None else f"{ratio:.2f}x")
            rows.append(row)
        lines += _table(header, rows)
        lines += ["", f"Raw onnxruntime ceiling for {model}: {_fmt(ceiling(baseline, model))} inf/s.", ""]

    lines += ["## Cold start and memory", ""]
    header = ["server", "cold start, tiny (s, median)"]
    models = settings.get("models") or matrix.MODELS
    header += [f"{m} idle RSS (MiB)" for m in models] + [f"{m} RSS after load" for m in models]
    header += [f"{m} idle RSS, gRPC on" for m in models]
    rows = []
    for name in names:
        data = _get(result, "servers", name) or {}
        if data.get("skipped"):
            rows.append([name, *(["skipped"] * (len(header) - 1))])
            continue
        row = [name, _fmt(_get(data, "cold_start", "median_s"), 3)]
        for field in ("rss_idle_mib", "rss_mib", "rss_idle_grpc_mib"):
            row += [_fmt(_get(data, field, m), 0) for m in models]
        rows.append(row)
    lines += _table(header, rows) + [""]

    lines += [
        f"Machine: {machine.get('nproc')} CPUs ({machine.get('cpu_model')}), Python {machine.get('python')}, "
        f"onnxruntime {machine.get('onnxruntime')}, kserve {machine.get('kserve')}, "
        f"mlserver {machine.get('mlserver')}, "
        f"{machine.get('wrk')}; load average {machine.get('loadavg_start')} at start, "
        f"{machine.get('loadavg_end')} at end. RSS sums the server's processes (MLServer runs a worker process). "
        "p99 counts the requests completed within the window: a server that answers only a few of 64 requests "
        "in flight shows the p99 of those few. (!) marks a cell with failed requests.",
    ]
    for name in names:
        data = _get(result, "servers", name) or {}
        if data.get("skipped"):
            lines.append(f"- {name}: skipped: {data['skipped']}")
        if "binary_extension" in data:
            ext = data["binary_extension"]
            state = "supported" if ext["supported"] else "unsupported"
            answer = f"one binary {ext['model']} request: {ext['answer']}"
            lines.append(f"- {name}: binary tensor extension {state}; {answer}")
    flags = result.get("flags") or []
    lines.append("")
    lines.append("FLAGS (numbers above are suspect):" if flags else "No errors: every request answered 2xx.")
    lines += [f"- {flag}" for flag in flags]
    return "\n".join(lines)
