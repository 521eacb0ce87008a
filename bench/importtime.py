"""Import cost of zeroserve and KServe, each measured in fresh interpreters.

Usage: .venv/bin/python bench/importtime.py [--runs 5] [--top 5] [--json OUT] [MODULE[,MODULE] ...]

For each module: ``python -X importtime -c "import X"`` gives the import time the interpreter
itself accounts (the sum of the top-level entries that a bare ``python -c pass`` does not have)
and the number of modules it adds; wall time is the median of ``--runs`` runs of
``python -c "import X"``, shown raw and net of a bare interpreter start. ``--top`` lists the
heaviest imports inside each module. Modules that do not import are reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

# "a,b" measures `import a, b` together. `zeroserve.runtime.__main__` defers its imports to main(),
# so the app module plus uvicorn stands for the server stack that `serve()` loads before the model
# (onnxruntime excluded, as it is from `kserve`).
DEFAULT_MODULES = (
    "zeroserve",
    "zeroserve.runtime",
    "zeroserve.runtime.__main__",
    "zeroserve.runtime.app,uvicorn",
    "kserve",
)
# `sys` is built in and already loaded: this prints the module count without importing anything.
COUNT = "import sys; print(len(sys.modules))"


@dataclass(slots=True)
class Entry:
    """One line of ``-X importtime`` output."""

    name: str
    self_us: int
    cumulative_us: int
    depth: int
    children: list[Entry] = field(default_factory=list)


@dataclass(slots=True)
class ModuleCost:
    module: str
    error: str | None = None
    importtime_ms: float | None = None
    modules_added: int | None = None
    wall_median_ms: float | None = None
    wall_net_ms: float | None = None
    wall_samples_ms: list[float] = field(default_factory=list)
    heaviest: list[tuple[str, float]] = field(default_factory=list)  # direct imports: (name, ms)


def parse_importtime(stderr: str) -> list[Entry]:
    """Entries of ``-X importtime`` output: ``import time: self | cumulative | <indent>name``.

    Lines come in post-order (an import after the imports it caused, which are one level
    deeper), so each entry adopts the pending deeper entries as its children.
    """
    entries: list[Entry] = []
    pending: list[Entry] = []
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        parts = line[len("import time:") :].split("|", 2)
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue  # the header line
        raw_name = parts[2][1:]  # one space follows the bar; nesting adds two per level
        name = raw_name.lstrip(" ")
        depth = (len(raw_name) - len(name)) // 2
        entry = Entry(name, int(parts[0]), int(parts[1]), depth)
        while pending and pending[-1].depth > depth:
            entry.children.insert(0, pending.pop())
        pending.append(entry)
        entries.append(entry)
    return entries


def direct_imports(roots: Sequence[Entry], targets: set[str]) -> list[Entry]:
    """What the target modules import themselves, looking through the targets' own entries."""
    found: list[Entry] = []
    for entry in roots:
        if entry.name in targets:
            found += direct_imports(entry.children, targets)
        else:
            found.append(entry)
    return found


def _run(python: str, code: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([python, *flags, "-c", code], capture_output=True, text=True, timeout=120, check=False)


def _wall_ms(python: str, code: str, runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        done = _run(python, code)
        samples.append((time.perf_counter() - start) * 1e3)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
    return samples


def measure(
    python: str, module: str, startup: set[str], bare_count: int, bare_wall: float, runs: int, top: int
) -> ModuleCost:
    cost = ModuleCost(module)
    names = module.split(",")
    statement = f"import {', '.join(names)}"
    done = _run(python, f"{statement}; {COUNT}", "-X", "importtime")
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        cost.error = next((ln for ln in reversed(lines) if not ln.startswith("import time:")), "import failed")
        return cost
    entries = [e for e in parse_importtime(done.stderr) if e.name not in startup]
    cost.importtime_ms = sum(e.cumulative_us for e in entries if e.depth == 0) / 1e3
    cost.modules_added = int(done.stdout.strip().splitlines()[-1]) - bare_count
    targets = {name.rsplit(".", i)[0] for name in names for i in range(name.count(".") + 1)}
    roots = [e for e in entries if e.depth == 0]
    inner = sorted(direct_imports(roots, targets), key=lambda e: e.cumulative_us, reverse=True)
    cost.heaviest = [(e.name, e.cumulative_us / 1e3) for e in inner[:top]]
    cost.wall_samples_ms = _wall_ms(python, statement, runs)
    cost.wall_median_ms = statistics.median(cost.wall_samples_ms)
    cost.wall_net_ms = cost.wall_median_ms - bare_wall
    return cost


def markdown(costs: Sequence[ModuleCost], bare_wall: float, runs: int) -> str:
    lines = [
        f"| import | -X importtime (ms) | modules added | wall, median of {runs} (ms) | wall minus bare python (ms) |",
        "|---|---|---|---|---|",
        f"| (bare `python -c pass`) | – | – | {bare_wall:.0f} | 0 |",
    ]
    for c in costs:
        if c.error:
            lines.append(f"| `{c.module}` | not importable: {c.error} | | | |")
            continue
        cells = [f"`{c.module}`", f"{c.importtime_ms:.0f}", f"{c.modules_added:,}"]
        cells += [f"{c.wall_median_ms:.0f}", f"{c.wall_net_ms:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    heavy = [c for c in costs if c.heaviest]
    if heavy:
        lines.append("")
        for c in heavy:
            listed = ", ".join(f"{name} {ms:.0f}" for name, ms in c.heaviest)
            lines.append(f"- heaviest direct imports of `{c.module}` (ms, cumulative): {listed}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=list(DEFAULT_MODULES))
    parser.add_argument("--runs", type=int, default=5, help="wall-time runs per module (median)")
    parser.add_argument("--top", type=int, default=5, help="heaviest inner imports listed per module")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)

    bare = _run(args.python, COUNT, "-X", "importtime")
    startup = {e.name for e in parse_importtime(bare.stderr)}
    bare_count = int(bare.stdout.strip())
    bare_wall = statistics.median(_wall_ms(args.python, "pass", args.runs))
    costs = [measure(args.python, m, startup, bare_count, bare_wall, args.runs, args.top) for m in args.modules]
    print(markdown(costs, bare_wall, args.runs))
    if args.json:
        payload = {"python": args.python, "bare_wall_ms": bare_wall, "modules": [asdict(c) for c in costs]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
