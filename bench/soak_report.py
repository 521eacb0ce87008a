"""The soak's report: per-case counts and verdicts, the SIGTERM's outcome, memory and liveness over time, and the
failures that make ``soak.py`` exit 1; as a dict (``report.json``) and as text."""

from __future__ import annotations

import statistics
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from soak_cases import EXPECTED, LOST, NOT_ACCEPTED, SERVER_ERROR, UNEXPECTED, WRONG, Case, Outcome, verdict

EXAMPLES_SHOWN = 40
EXAMPLES_PER_WORKER = 20


@dataclass(slots=True)
class Control:
    """What the main thread tells the workers, and the moment of the SIGTERM."""

    origin: float
    bucket_s: float
    stop_phase: threading.Event = field(default_factory=threading.Event)  # outcomes are kept whole from here on
    stop_load: threading.Event = field(default_factory=threading.Event)
    sigterm_at: float | None = None


@dataclass(slots=True)
class Tally:
    """One worker's counts, its first outcomes that were not as expected, and every outcome of the stop phase."""

    results: Counter[tuple[str, str]] = field(default_factory=Counter)  # (case, result)
    verdicts: Counter[tuple[str, str]] = field(default_factory=Counter)  # (case, verdict), before the stop phase
    per_bucket: Counter[int] = field(default_factory=Counter)  # outcomes finished per report bucket
    examples: list[tuple[str, Outcome]] = field(default_factory=list)
    late: list[Outcome] = field(default_factory=list)
    requests: int = 0

    def record(self, case: Case, outcome: Outcome, control: Control) -> None:
        self.requests += 1
        self.results[case.name, outcome.result] += 1
        self.per_bucket[int((outcome.finished - control.origin) // control.bucket_s)] += 1
        if control.stop_phase.is_set():
            self.late.append(outcome)  # judged once the SIGTERM's moment is known
            return
        judged = verdict(case, outcome, None)
        self.verdicts[case.name, judged] += 1
        if judged != EXPECTED and len(self.examples) < EXAMPLES_PER_WORKER:
            self.examples.append((judged, outcome))


def _percentile(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def _outcome_json(judged: str, outcome: Outcome, origin: float) -> dict[str, Any]:
    def at(moment: float | None) -> float | None:
        return None if moment is None else round(moment - origin, 3)

    return {"verdict": judged, "case": outcome.case, "result": outcome.result, "started_s": at(outcome.started),
            "sent_s": at(outcome.sent_at), "finished_s": at(outcome.finished), "wrong": outcome.wrong,
            "detail": outcome.detail}  # fmt: skip


def cases_table(cases: list[Case], tallies: list[Tally], late: list[tuple[str, Outcome]]) -> dict[str, Any]:
    results: Counter[tuple[str, str]] = Counter()
    verdicts: Counter[tuple[str, str]] = Counter()
    for tally in tallies:
        results.update(tally.results)
        verdicts.update(tally.verdicts)
    for judged, outcome in late:
        verdicts[outcome.case, judged] += 1
    table = {}
    for case in cases:
        mine = {result: n for (name, result), n in sorted(results.items()) if name == case.name}
        table[case.name] = {
            "group": case.group,
            "sent": sum(mine.values()),
            "expects": sorted(case.expected),
            "results": mine,
            "verdicts": {judged: n for (name, judged), n in sorted(verdicts.items()) if name == case.name},
        }
    return table


def shutdown_table(
    shutdown: dict[str, Any] | None, late: list[tuple[str, Outcome]], control: Control
) -> dict[str, Any]:
    """The SIGTERM: the exit, and what became of the requests in flight at that moment and after it."""
    if shutdown is None or control.sigterm_at is None:
        return {"sent": False}
    sigterm = control.sigterm_at
    in_flight = [(j, o) for j, o in late if o.sent_at is not None and o.sent_at < sigterm <= o.finished]
    after = [(j, o) for j, o in late if o.started >= sigterm]
    return {
        "sent": True,
        "sigterm_at_s": round(sigterm - control.origin, 3),
        **shutdown,
        "in_flight_at_sigterm": len(in_flight),
        "in_flight_results": dict(Counter(o.result for _, o in in_flight)),
        "started_after_sigterm": len(after),
        "after_results": dict(Counter(o.result for _, o in after)),
        "lost": sum(1 for j, _ in late if j == LOST),
    }


def _buckets(series: list[list[Any]], bucket_s: float) -> dict[int, list[list[Any]]]:
    grouped: dict[int, list[list[Any]]] = {}
    for row in series:
        grouped.setdefault(int(row[0] // bucket_s), []).append(row)
    return grouped


def memory_table(memory: list[list[float]], warmup_s: float, bucket_s: float, requests: Counter[int]) -> dict[str, Any]:
    """RSS summary and per-bucket table (with the requests finished in each bucket); the slope is a least-squares
    fit over the samples after warm-up."""
    if not memory:
        return {"samples": 0}
    rss = [row[1] for row in memory]
    after = [row for row in memory if row[0] >= warmup_s] or memory[-1:]
    times = np.asarray([row[0] for row in after]) / 60
    slope = float(np.polyfit(times, [row[1] for row in after], 1)[0]) if len(after) > 2 else 0.0
    per_bucket = [{"from_s": index * bucket_s, "rss_min_mib": round(min(r[1] for r in rows), 1),
                   "rss_median_mib": round(statistics.median(r[1] for r in rows), 1),
                   "rss_max_mib": round(max(r[1] for r in rows), 1), "peak_mib": round(rows[-1][2], 1),
                   "requests": requests.get(index, 0)}
                  for index, rows in sorted(_buckets(memory, bucket_s).items())]  # fmt: skip
    return {
        "samples": len(memory),
        "start_mib": round(rss[0], 1),
        "after_warmup_mib": round(after[0][1], 1),
        "warmup_s": warmup_s,
        "min_mib": round(min(rss), 1),
        "median_mib": round(statistics.median(rss), 1),
        "max_mib": round(max(rss), 1),
        "end_mib": round(rss[-1], 1),
        "peak_hwm_mib": round(memory[-1][2], 1),
        "slope_after_warmup_mib_per_min": round(slope, 2),
        "per_bucket": per_bucket,
        "series": memory,
    }


def liveness_table(liveness: list[list[Any]], bucket_s: float) -> dict[str, Any]:
    latencies = [row[1] for row in liveness if row[1] is not None and row[2] == "200"]
    failures = [row for row in liveness if row[1] is None or row[2] != "200"]
    per_bucket = []
    for index, rows in sorted(_buckets(liveness, bucket_s).items()):
        values = [row[1] for row in rows if row[1] is not None and row[2] == "200"]
        per_bucket.append({"from_s": index * bucket_s, "p50_ms": _percentile(values, 50),
                           "p99_ms": _percentile(values, 99), "max_ms": round(max(values), 2) if values else None,
                           "failures": len(rows) - len(values)})  # fmt: skip
    return {"probes": len(liveness), "p50_ms": _percentile(latencies, 50), "p99_ms": _percentile(latencies, 99),
            "max_ms": round(max(latencies), 2) if latencies else None, "failures": len(failures),
            "failure_examples": failures[:10], "per_bucket": per_bucket, "series": liveness}  # fmt: skip


def failures_of(report: dict[str, Any]) -> list[str]:
    """Why the soak failed; empty when it passed."""
    totals, crash, shutdown = report["totals"], report["crash"], report["shutdown"]
    found = [f"{totals[word]} {word}" for word in (SERVER_ERROR, LOST, WRONG, UNEXPECTED) if totals.get(word)]
    if crash["crashed"]:
        found.append(f"the server died at {crash['at_s']} s with exit code {crash['exit_code']}")
    if shutdown.get("sent"):
        if shutdown["exit_code"] != 0:
            found.append(f"exit code {shutdown['exit_code']} after SIGTERM (killed: {shutdown['killed']})")
        if shutdown["drain_s"] > shutdown["shutdown_timeout_s"]:
            found.append(f"drain took {shutdown['drain_s']} s, over --shutdown_timeout "
                         f"{shutdown['shutdown_timeout_s']}")  # fmt: skip
    if report["liveness"]["failures"]:
        found.append(f"{report['liveness']['failures']} liveness probes failed")
    if report["stuck_workers"]:
        found.append(f"workers still running at the end: {', '.join(report['stuck_workers'])}")
    return found


def build(*, config: dict[str, Any], cases: list[Case], tallies: list[Tally], control: Control,
          series: dict[str, Any], crash: dict[str, Any], shutdown: dict[str, Any] | None,
          stuck_workers: list[str], log_errors: list[str]) -> dict[str, Any]:  # fmt: skip
    by_name = {case.name: case for case in cases}
    late = [(verdict(by_name[o.case], o, control.sigterm_at), o) for tally in tallies for o in tally.late]
    table = cases_table(cases, tallies, late)
    totals: Counter[str] = Counter()
    for row in table.values():
        totals.update(row["verdicts"])
    examples = [pair for tally in tallies for pair in tally.examples]
    examples += [(j, o) for j, o in late if j not in (EXPECTED, NOT_ACCEPTED)]
    examples.sort(key=lambda pair: pair[1].started)
    warmup_s = min(60.0, config["duration_s"] / 6)
    report = {
        "config": config,
        "cases": table,
        "totals": {"requests": sum(row["sent"] for row in table.values()), **totals},
        "crash": crash,
        "shutdown": shutdown_table(shutdown, late, control),
        "memory": memory_table(series["memory"], warmup_s, control.bucket_s,
                               sum((tally.per_bucket for tally in tallies), Counter())),
        "liveness": liveness_table(series["liveness"], control.bucket_s),
        "examples": [_outcome_json(j, o, control.origin) for j, o in examples[:EXAMPLES_SHOWN]],
        "stuck_workers": stuck_workers,
        "server_log_errors": {"count": len(log_errors), "first": log_errors[:20]},
    }
    report["failures"] = failures_of(report)
    return report


def _counts(mapping: dict[str, int]) -> str:
    return ", ".join(f"{key} {n:,}" for key, n in mapping.items()) or "-"


def render(report: dict[str, Any]) -> str:
    config, totals = report["config"], report["totals"]
    lines = [f"# Soak: {config['duration_s']:.0f} s, {config['clients']} worker(s) per group "
             f"(server flags: {' '.join(f'{k} {v}' for k, v in config['server_flags'].items())})", ""]  # fmt: skip
    lines += ["## Cases", "", "| case | group | sent | results | verdicts |", "|---|---|---|---|---|"]
    for name, row in report["cases"].items():
        verdicts = {k: v for k, v in row["verdicts"].items() if k != EXPECTED}
        shown = f"expected {row['verdicts'].get(EXPECTED, 0):,}" + (f"; {_counts(verdicts)}" if verdicts else "")
        lines.append(f"| {name} | {row['group']} | {row['sent']:,} | {_counts(row['results'])} | {shown} |")
    lines += ["", f"requests {totals['requests']:,}; " + "; ".join(
        f"{word}: {totals.get(word, 0):,}" for word in (SERVER_ERROR, LOST, WRONG, UNEXPECTED, NOT_ACCEPTED))]
    crash = report["crash"]
    lines += ["", f"crashed before SIGTERM: {'YES at ' + str(crash['at_s']) + ' s' if crash['crashed'] else 'no'}"]
    if crash["crashed"]:
        lines += ["```", crash["log_tail"], "```"]
    lines += _render_shutdown(report["shutdown"]) + _render_memory(report["memory"]) + _render_liveness(report)
    errors = report["server_log_errors"]
    lines += ["", f"server log: {errors['count']} ERROR/CRITICAL/traceback lines"]
    lines += [f"    {line[:200]}" for line in errors["first"][:10]]
    if report["examples"]:
        lines += ["", "## Outcomes not as expected (first ones)", ""]
        lines += [f"- {e['verdict']}: {e['case']} -> {e['result']} at {e['started_s']} s (sent {e['sent_s']}, "
                  f"finished {e['finished_s']}) {e['wrong'] or ''} {e['detail'][:120]}" for e in report["examples"]]
    lines += ["", ("FAILED: " + "; ".join(report["failures"])) if report["failures"] else "PASSED"]
    return "\n".join(lines)


def _render_shutdown(shutdown: dict[str, Any]) -> list[str]:
    if not shutdown.get("sent"):
        return ["", "SIGTERM: not sent (the server was gone)"]
    return ["", "## SIGTERM under load", "",
            f"sent at {shutdown['sigterm_at_s']} s; exit code {shutdown['exit_code']}; drain {shutdown['drain_s']} s "
            f"(--shutdown_timeout {shutdown['shutdown_timeout_s']})",
            f"in flight at SIGTERM: {shutdown['in_flight_at_sigterm']} ({_counts(shutdown['in_flight_results'])})",
            f"started after SIGTERM: {shutdown['started_after_sigterm']} ({_counts(shutdown['after_results'])})",
            f"lost (sent in full before SIGTERM, no answer): {shutdown['lost']}"]  # fmt: skip


def _render_memory(memory: dict[str, Any]) -> list[str]:
    if not memory.get("samples"):
        return ["", "RSS: no samples"]
    lines = ["", "## Server RSS (MiB)", "",
             f"start {memory['start_mib']}, after warm-up ({memory['warmup_s']:.0f} s) {memory['after_warmup_mib']}, "
             f"min {memory['min_mib']}, median {memory['median_mib']}, max {memory['max_mib']}, "
             f"end {memory['end_mib']}, peak (VmHWM) {memory['peak_hwm_mib']}; slope after warm-up "
             f"{memory['slope_after_warmup_mib_per_min']} MiB/min", "",
             "| from | RSS min | median | max | VmHWM | requests finished |", "|---|---|---|---|---|---|"]
    lines += [f"| {row['from_s']:.0f} s | {row['rss_min_mib']} | {row['rss_median_mib']} | {row['rss_max_mib']} | "
              f"{row['peak_mib']} | {row['requests']:,} |" for row in memory["per_bucket"]]  # fmt: skip
    return lines


def _render_liveness(report: dict[str, Any]) -> list[str]:
    live = report["liveness"]
    lines = ["", "## Liveness (GET /v2/health/live every 250 ms)", "",
             f"{live['probes']} probes: p50 {live['p50_ms']} ms, p99 {live['p99_ms']} ms, max {live['max_ms']} ms, "
             f"failures {live['failures']}", "", "| from | p50 ms | p99 ms | max ms | failures |",
             "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {row['from_s']:.0f} s | {row['p50_ms']} | {row['p99_ms']} | {row['max_ms']} | {row['failures']} |"
              for row in live["per_bucket"]]  # fmt: skip
    return lines
