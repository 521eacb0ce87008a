"""Ratios and the markdown table for one ``run.py`` result.

The result dict is the JSON that ``run.py`` writes; this module only reads it. Every ratio is
``zeroserve / kserve`` or ``<server> / raw onnxruntime`` of numbers measured in the same run.
"""

from __future__ import annotations

from typing import Any

Result = dict[str, Any]

# scenario key -> table label; the order is the table's.
SCENARIOS = {
    "tiny_json_c16": "tiny, REST JSON, 16 connections",
    "tiny_json_c1": "tiny, REST JSON, 1 connection",
    "image_binary_c16": "image, REST binary, 16 connections",
    "image_json_c16": "image, REST JSON, 16 connections",
    "tiny_grpc_c1": "tiny, gRPC, 1 call in flight",
    "tiny_grpc_c16": "tiny, gRPC, 16 calls in flight",
    "image_grpc_c1": "image, gRPC, 1 call in flight",
    "image_grpc_c16": "image, gRPC, 16 calls in flight",
}


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or data.get(key) is None:
            return None
        data = data[key]
    return data


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def image_ceiling(result: Result) -> float | None:
    """The raw onnxruntime image throughput ceiling: the better of 1 and 2 calling threads."""
    rates = [_get(result, "baseline", "image", k) for k in ("throughput_1thread_per_s", "throughput_2threads_per_s")]
    known = [r for r in rates if r is not None]
    return max(known) if known else None


def per_server(result: Result, server: str) -> dict[str, float | None]:
    """The headline numbers of one server, including its ratios to raw onnxruntime."""
    data = _get(result, "servers", server) or {}
    load = data.get("load") or {}
    raw_tiny_p50 = _get(result, "baseline", "tiny", "latency", "p50_us")
    numbers: dict[str, float | None] = {}
    for scenario in SCENARIOS:
        numbers[f"{scenario}_per_s"] = _get(load, scenario, "ok_requests_per_s")
        numbers[f"{scenario}_p50_us"] = _get(load, scenario, "latency_us", "percentiles", "50")
        numbers[f"{scenario}_p99_us"] = _get(load, scenario, "latency_us", "percentiles", "99")
        numbers[f"{scenario}_cpu_ms_per_request"] = _get(load, scenario, "server_cpu_ms_per_request")
    c1_p50 = numbers["tiny_json_c1_p50_us"]
    numbers["cold_start_median_s"] = _get(data, "cold_start", "median_s")
    numbers["tiny_c1_overhead_us"] = c1_p50 - raw_tiny_p50 if c1_p50 is not None and raw_tiny_p50 else None
    numbers["tiny_c1_vs_raw_p50"] = _ratio(c1_p50, raw_tiny_p50)
    numbers["image_binary_fraction_of_raw_ceiling"] = _ratio(numbers["image_binary_c16_per_s"], image_ceiling(result))
    # gRPC: the same two against raw onnxruntime; the image one is the goal "within 2x of session.run".
    grpc_p50 = numbers["tiny_grpc_c1_p50_us"]
    numbers["tiny_grpc_c1_overhead_us"] = grpc_p50 - raw_tiny_p50 if grpc_p50 is not None and raw_tiny_p50 else None
    # Against session.run measured just before the run (the load drifts within a run), else the start baseline.
    raw_image_p50 = _get(load, "image_grpc_c1", "raw_p50_us_adjacent") or _get(
        result, "baseline", "image", "latency", "p50_us"
    )
    numbers["image_grpc_c1_raw_p50_us"] = raw_image_p50
    numbers["image_grpc_c1_vs_raw_p50"] = _ratio(numbers["image_grpc_c1_p50_us"], raw_image_p50)
    numbers["image_grpc_c16_fraction_of_raw_ceiling"] = _ratio(numbers["image_grpc_c16_per_s"], image_ceiling(result))
    return numbers


def ratios(result: Result) -> dict[str, Any]:
    """``zeroserve / kserve`` for every headline number both servers have, plus each server's own."""
    servers = {name: per_server(result, name) for name in result.get("servers", {})}
    out: dict[str, Any] = {"per_server": servers}
    zs, ks = servers.get("zeroserve"), servers.get("kserve")
    if zs and ks:
        out["zeroserve_over_kserve"] = {
            key: _ratio(zs[key], ks[key])
            for key in zs
            if not key.endswith(("_vs_raw_p50", "_fraction_of_raw_ceiling"))
            and zs[key] is not None
            and ks[key] is not None
        }
    return out


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "–" if value is None else f"{value * scale:,.{digits}f}"


def markdown(result: Result) -> str:
    """The result as a markdown table (one column per server), followed by machine facts and flags."""
    names = list(result.get("servers", {}))
    computed = result.get("ratios") or ratios(result)
    numbers = computed["per_server"]
    both = "zeroserve" in names and "kserve" in names
    header = ["metric", "raw onnxruntime", *names] + (["zeroserve / kserve"] if both else [])
    rows: list[list[str]] = []

    def row(label: str, key: str, raw: str = "", scale: float = 1.0, digits: int = 1) -> None:
        cells = [label, raw]
        for name in names:
            skipped = _get(result, "servers", name, "skipped")
            cells.append("skipped" if skipped else _fmt(numbers[name].get(key), scale, digits))
        if both:
            ratio = _get(computed, "zeroserve_over_kserve", key)
            cells.append("–" if ratio is None else f"{ratio:.2f}x")
        rows.append(cells)

    def base(*keys: str) -> Any:
        return _get(result, "baseline", *keys)

    tiny_mean = base("tiny", "latency", "mean_us")
    tiny_rate = f"{_fmt(1e6 / tiny_mean)} (1 thread)" if tiny_mean else "–"
    image_p50 = base("image", "latency", "p50_us")
    ceiling = image_ceiling(result)
    end = {"baseline": result.get("baseline_end")}
    end_ceiling = image_ceiling(end)
    end_tiny_p50 = _get(end, "baseline", "tiny", "latency", "p50_us")

    row("cold start to first inference, tiny (s, median)", "cold_start_median_s", digits=3)
    row("tiny JSON c16 throughput (req/s)", "tiny_json_c16_per_s", tiny_rate)
    row("tiny JSON c16 server CPU per request (ms)", "tiny_json_c16_cpu_ms_per_request", digits=3)
    row("tiny JSON c1 latency p50 (µs)", "tiny_json_c1_p50_us", _fmt(base("tiny", "latency", "p50_us")), digits=0)
    row("tiny JSON c1 latency p99 (µs)", "tiny_json_c1_p99_us", _fmt(base("tiny", "latency", "p99_us")), digits=0)
    row("tiny c1 overhead over session.run p50 (µs)", "tiny_c1_overhead_us", digits=0)
    row("image binary c16 throughput (inf/s)", "image_binary_c16_per_s", f"{_fmt(ceiling)} (ceiling)")
    row("image binary c16 % of raw ceiling", "image_binary_fraction_of_raw_ceiling", scale=100)
    row(
        "image binary c16 latency p50 (ms)",
        "image_binary_c16_p50_us",
        f"{_fmt(image_p50, 1e-3, 2)} (1 call)",
        scale=1e-3,
        digits=2,
    )
    row("image binary c16 server CPU per request (ms)", "image_binary_c16_cpu_ms_per_request", digits=2)
    if any(_get(result, "servers", n, "load", "image_json_c16") for n in names):
        row("image JSON c16 throughput (req/s)", "image_json_c16_per_s")
    if any(_get(result, "servers", n, "load", "tiny_grpc_c1") for n in names):
        row("tiny gRPC c1 throughput (calls/s)", "tiny_grpc_c1_per_s", tiny_rate)
        row("tiny gRPC c1 latency p50 (µs)", "tiny_grpc_c1_p50_us", _fmt(base("tiny", "latency", "p50_us")), digits=0)
        row("tiny gRPC c1 latency p99 (µs)", "tiny_grpc_c1_p99_us", _fmt(base("tiny", "latency", "p99_us")), digits=0)
        row("tiny gRPC c1 overhead over session.run p50 (µs)", "tiny_grpc_c1_overhead_us", digits=0)
        row("tiny gRPC c16 throughput (calls/s)", "tiny_grpc_c16_per_s")
        row("tiny gRPC c16 server CPU per call (ms)", "tiny_grpc_c16_cpu_ms_per_request", digits=3)
    if any(_get(result, "servers", n, "load", "image_grpc_c1") for n in names):
        row("image gRPC c1 throughput (calls/s)", "image_grpc_c1_per_s")
        row(
            "image gRPC c1 latency p50 (ms)",
            "image_grpc_c1_p50_us",
            f"{_fmt(image_p50, 1e-3, 2)} (1 call)",
            scale=1e-3,
            digits=2,
        )
        row(
            "image session.run p50 just before that run (ms)", "image_grpc_c1_raw_p50_us", scale=1e-3, digits=2
        )
        row("image gRPC c1 p50 / that session.run p50 (goal < 2)", "image_grpc_c1_vs_raw_p50", digits=2)
        row("image gRPC c16 throughput (calls/s)", "image_grpc_c16_per_s", f"{_fmt(ceiling)} (ceiling)")
        row("image gRPC c16 % of raw ceiling", "image_grpc_c16_fraction_of_raw_ceiling", scale=100)
        row("image gRPC c16 server CPU per call (ms)", "image_grpc_c16_cpu_ms_per_request", digits=2)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]

    machine = result.get("machine", {})
    lines += [
        "",
        f"Machine: {machine.get('nproc')} CPUs ({machine.get('cpu_model')}), Python {machine.get('python')}, "
        f"onnxruntime {machine.get('onnxruntime')}, kserve {machine.get('kserve')}, {machine.get('wrk')}; "
        f"load average {machine.get('loadavg_start')} at start, {machine.get('loadavg_end')} at end.",
        f"Raw image ceiling: {_fmt(base('image', 'throughput_1thread_per_s'))} inf/s with 1 thread, "
        f"{_fmt(base('image', 'throughput_2threads_per_s'))} with 2 threads calling session.run."
        + (
            f" Again at the end of the run: ceiling {_fmt(end_ceiling)} inf/s, tiny p50 {_fmt(end_tiny_p50)} µs."
            if end_ceiling is not None
            else ""
        ),
    ]
    for name in names:
        skipped = _get(result, "servers", name, "skipped")
        if skipped:
            lines.append(f"{name}: skipped: {skipped}")
        rss = _get(result, "servers", name, "rss_mib") or {}
        if rss:
            lines.append(f"{name}: RSS after load " + ", ".join(f"{m} {v:.0f} MiB" for m, v in rss.items()))
    flags = result.get("flags") or []
    lines.append("")
    lines.append("FLAGS (numbers above are suspect):" if flags else "No errors: every request answered 2xx.")
    lines += [f"- {flag}" for flag in flags]
    return "\n".join(lines)
