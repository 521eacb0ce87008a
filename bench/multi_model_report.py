"""multi_model.py's goals (issue 19's, each with its number and verdict) and its markdown report."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Issue 19's goals.
INDEX_MAX_S = 1.0
START_RATIO_MAX = 1.2
FIRST_SLACK_MS = 20.0
RSS_RATIO_MAX = 1.2
WARM_RATIO_MIN = 0.95  # "no slower beyond noise": within 5%, about the spread of one server's windows here


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal of issue 19 with its number and verdict ("met", "NOT met", or "not measured")."""
    rows: list[dict[str, Any]] = []

    def goal(name: str, value: Any, target: str, ok: Callable[[], bool] | None) -> None:
        verdict = "not measured" if ok is None or value is None else ("met" if ok() else "NOT met")
        rows.append({"goal": name, "value": value, "target": target, "verdict": verdict})

    n = f"{result['models']['count']:,}"
    s3_ = result.get("s3", {})
    index_s = s3_.get("index_log_s")
    goal(f"index {n} models from S3 (log line, median)", index_s, f"<= {INDEX_MAX_S} s",
         (lambda: index_s <= INDEX_MAX_S) if index_s is not None else None)
    start = s3_.get("ready_ratio")
    goal(f"start to ready: on_demand {n} on S3 / eager 1 on S3", start, f"<= {START_RATIO_MAX}x",
         (lambda: start <= START_RATIO_MAX) if start is not None else None)
    first = result.get("first", {})
    s3_first = s3_.get("first_request", {})
    wall_minus = {
        "local, first load of the process": first.get("first_load_of_process", {}).get("wall_minus_eager_ms"),
        "local, a later load": first.get("later_loads", {}).get("wall_minus_eager_ms"),
        "S3, first load of the process": s3_first.get("wall_minus_eager_ms"),
    }
    for label, value in wall_minus.items():
        goal(f"first request ({label}): its wall time - eager fetch+session+warmup (ms)", value,
             f"<= {FIRST_SLACK_MS:g} ms", (lambda v=value: v <= FIRST_SLACK_MS) if value is not None else None)
    rss = first.get("rss_ratio")
    goal(f"RSS: on_demand {n} indexed + 3 loaded / eager 3", rss, f"<= {RSS_RATIO_MAX}x",
         (lambda: rss <= RSS_RATIO_MAX) if rss is not None else None)
    herd = result.get("herd")
    if herd:
        summary = "; ".join(f"{h['where']} {h['model']}: {h['ok']}/{h['size']} ok, {h['loads_ready']:g} load(s)"
                            for h in herd)  # fmt: skip
        goal("herd of first requests: all 200, exactly one load", summary, "every herd",
             lambda: all(h["ok"] == h["size"] and h["loads_ready"] == 1 and not h["loads_failed"] for h in herd))
    else:
        goal("herd of first requests: all 200, exactly one load", None, "every herd", None)
    warm = result.get("warm", {}).get("rps_ratio")
    goal("warm path req/s: on_demand / eager single-model", warm, f">= {WARM_RATIO_MIN}x",
         (lambda: warm >= WARM_RATIO_MIN) if warm is not None else None)
    for model, per in result.get("reload", {}).get("summary", {}).items():
        value = per.get("cache_reload_over_first_load")
        goal(f"reload {model} with --cache_uri: reload / first load", value, "< 1",
             (lambda v=value: v < 1) if value is not None else None)
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,.3f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)


def _s3(s: dict[str, Any], rounds: int, n: str) -> list[str]:
    first = s["first_request"]
    lines = ["", f"## S3 start ({rounds} launches each, interleaved, medians)", "",
             f"- ready: on_demand {n} {_fmt(s['ready_s']['on_demand_all'])} s, eager 1 "
             f"{_fmt(s['ready_s']['eager_1'])} s (its fetch {_fmt(s['eager_fetch_ms'])} ms), ratio "
             f"{_fmt(s['ready_ratio'])}",
             f"- index (log) {_fmt(s['index_log_s'])} s (max {_fmt(s['index_log_s_max'])}), Server-Timing index "
             f"{_fmt(s['index_timing_ms'])} ms; S3 GETs / listings before ready: "
             + ", ".join(f"{r['s3_gets_at_ready']}/{r['s3_listings_at_ready']}" for r in s["samples"]
                         ["on_demand_all"]),
             f"- first request from S3: on_demand load {_fmt(first['on_demand_load_ms'])} ms, wall "
             f"{_fmt(first['on_demand_wall_ms'])} ms; eager fetch+session+warmup "
             f"{_fmt(first['eager_fetch_session_warmup_ms'])} ms (wall - eager "
             f"{_fmt(first['wall_minus_eager_ms'])} ms)"]
    parts = s.get("index_breakdown_ms")
    if parts:
        parse = parts.get("listing_parse") or {}
        shown = ("index_total", "botocore_import_and_client", "list_request", "http_send_and_wait", "botocore_parse",
                 "discover_listing", "onnx_model_objects", "gc")
        lines.append("- where the index goes (index_probe.py, medians, ms; the parts overlap: list_request holds the "
                     "HTTP wait and the parse, and gc falls inside the others): "
                     + ", ".join(f"{k} {_fmt(parts.get(k))}" for k in shown)
                     + f" ({_fmt(parts.get('gc_passes'))} gc passes)")
        if parse:
            lines.append(f"- the {parse['keys']}-key listing ({parse['body_bytes']:,} bytes): botocore's parser "
                         f"{_fmt(parse['botocore_ms'])} ms, ElementTree {_fmt(parse['element_tree_ms'])} ms "
                         "(this process)")
    return lines  # fmt: skip


def _first(f: dict[str, Any], n: str) -> list[str]:
    lines = ["", "## First request to an unloaded model (local repository, medians, ms)", "",
             "| | load;dur | wall | eager fetch+session+warmup | load - eager | wall - eager |",
             "|---|---|---|---|---|---|"]
    for label, key in (("first load of the process", "first_load_of_process"), ("later loads", "later_loads")):
        part = f[key]
        lines.append(f"| {label} | {_fmt(part['load_ms'])} | {_fmt(part['wall_ms'])} | "
                     f"{_fmt(f['eager_fetch_session_warmup_ms'])} | {_fmt(part['load_minus_eager_ms'])} | "
                     f"{_fmt(part['wall_minus_eager_ms'])} |")
    r = f["rss_mib"]
    lines += ["", f"Eager session+warmup alone (its local fetch reads nothing): {_fmt(f['eager_session_warmup_ms'])} "
              "ms.", "",
              f"RSS (MiB): on_demand {n} + 3 loaded {_fmt(r['on_demand_all_3_loaded'])}, eager 3 "
              f"{_fmt(r['eager_3'])} (ratio {_fmt(f['rss_ratio'])}); on_demand before any load "
              f"{_fmt(r['on_demand_all_idle'])}, eager 1 {_fmt(r['eager_1_after_first'])}. Local start to ready (s): "
              + ", ".join(f"{k} {_fmt(v)}" for k, v in f["ready_s"].items())
              + f"; local index (log) {_fmt(f['index_log_s_local'])} s"]
    return lines  # fmt: skip


def _herd(herd: list[dict[str, Any]]) -> list[str]:
    lines = ["", "## Herd", "", "| where | model | 200s | loads ready | waited for the load | send spread ms "
             "| wall ms median / max |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {h['where']} | {h['model']} | {h['ok']}/{h['size']} | {h['loads_ready']:g} | "
              f"{h['waited_for_load']} | {_fmt(h['send_spread_ms'])} | {_fmt(h['wall_ms_median'])} / "
              f"{_fmt(h['wall_ms_max'])} |" for h in herd]
    return lines  # fmt: skip


def _warm(w: dict[str, Any]) -> list[str]:
    lines = ["", f"## Warm path ({len(w['rounds']['eager_1'])} alternating windows each, wrk -c16 -t2, medians)", "",
             "| | req/s | p99 us | server CPU ms/request |", "|---|---|---|---|"]
    for kind in ("on_demand_all", "on_demand_1", "eager_1"):
        lines.append(f"| {kind} | {_fmt(w['rps'][kind])} | {_fmt(w['p99_us'][kind])} | "
                     f"{_fmt(w['cpu_ms_per_request'][kind])} |")
    lines.append(f"| on_demand_all / eager_1 | {_fmt(w['rps_ratio'])} | {_fmt(w['p99_ratio'])} | "
                 f"{_fmt(w['cpu_ratio'])} |")
    lines.append(f"| on_demand_1 / eager_1 | {_fmt(w['rps_ratio_one'])} | | |")
    return lines  # fmt: skip


def _reload(r: dict[str, Any]) -> list[str]:
    lines = ["", "## Reload (medians, ms: load;dur / load.session)", "",
             "| model | cache: first | cache: reload (load: 1st, later) | no cache: first | no cache: reload "
             "| new process, filled cache: first | reload / first, cache | reload / first, no cache |",
             "|---|---|---|---|---|---|---|---|"]
    for model, per in r["summary"].items():
        cell = {key: f"{_fmt(value['load_ms'])} / {_fmt(value['session_ms'])}" for key, value in per.items()
                if isinstance(value, dict)}
        cells = [cell["cache_first"], f"{cell['cache_reload']} (1st {_fmt(per['cache_reload_1']['load_ms'])}, "
                 f"later {_fmt(per['cache_reload_later']['load_ms'])})", cell["plain_first"], cell["plain_reload"],
                 cell["cache_filled_first"]]
        cells += [f"{_fmt(per[f'{kind}_reload_over_first_load'])} ({_fmt(per[f'{kind}_reload_over_first_session'])} "
                  "session)" for kind in ("cache", "plain")]
        lines.append(f"| {model} ({r['model_mb'][model]} MB) | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {model}: a reload with the cache / a load without one: "
              f"{_fmt(per['cache_reload_over_plain_first_load'])} of the first, "
              f"{_fmt(per['cache_reload_over_plain_reload_load'])} of a reload"
              for model, per in r["summary"].items()]
    return lines  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    n = f"{result['models']['count']:,}"  # on_demand_all in the JSON: an on-demand server of every model
    lines = ["## Goals (issue 19)", "", "| goal | value | target | verdict |", "|---|---|---|---|"]
    lines += [f"| {g['goal']} | {_fmt(g['value'])} | {g['target']} | {g['verdict']} |" for g in result["goals"]]
    if "s3" in result:
        lines += _s3(result["s3"], result["args"]["rounds"], n)
    if "first" in result:
        lines += _first(result["first"], n)
    if "herd" in result:
        lines += _herd(result["herd"])
    if "warm" in result:
        lines += [line.replace("on_demand_all", f"on_demand ({n})") for line in _warm(result["warm"])]
    if "reload" in result:
        lines += _reload(result["reload"])
    if result["flags"]:
        lines += ["", "FLAGS:", *(f"- {f}" for f in result["flags"])]
    return "\n".join(lines)
