"""Regression workflow: save a run as a named baseline, compare a later run against it.

    resnas bench --quick --save-baseline main          # bench/results/baselines/main.json
    resnas bench --quick --compare main [--fail-on-regression]

A case x provider is flagged SLOWER when its median time grew by more than the measured spread: the relative
p20-p80 width of the baseline or of the current timing, whichever is larger, and at least `min_change` (3 %) so a
very tight spread does not flag noise-level changes. FASTER is the mirror image; anything else is "same".
The p20-p80 width within one run stands in for the run-to-run spread; on a shared, busy machine both runs should be
taken under similar load (the CSV's load1 column records it). Only timings of the same device name and thread count
are compared.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from .records import CEILING_CASES

TIME_METRICS = ("time_ms", "time_ms_graph")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
Key = Tuple[str, str, str, str, str, str, str]  # case, shape, dtype, provider, device_name, threads, metric


def check_name(name: str, flag: str) -> str:
    if not NAME_RE.match(name or ""):
        raise ValueError(f"{flag} must be a name of letters, digits, '.', '_' or '-' (it becomes a file name), "
                         f"got {name!r}")
    return name


def baseline_path(results_dir: Path, name: str) -> Path:
    return Path(results_dir) / "baselines" / f"{name}.json"


def _key(row: Dict[str, str]) -> Key:
    return (row["case"], row["shape"], row["dtype"], row["provider"], row["device_name"], str(row["threads"]),
            row["metric"])


def save_baseline(path: Path, rows: Iterable[Dict[str, str]], name: str) -> int:
    """Write the timing rows of a run as a baseline; returns how many entries were saved."""
    entries = [{k: r.get(k, "") for k in ("case", "shape", "dtype", "provider", "backend", "device_name", "threads",
                                          "metric", "timer", "p20", "p50", "p80", "torch", "triton", "git_commit",
                                          "date", "load1")}
               for r in rows if r["metric"] in TIME_METRICS]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": name, "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "entries": entries},
                               indent=1) + "\n")
    return len(entries)


def load_baseline(path: Path) -> List[Dict[str, str]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no baseline at {path}; save one with `resnas bench --save-baseline NAME`")
    return json.loads(path.read_text())["entries"]


@dataclass
class Comparison:
    key: Key
    base_p50: Optional[float]
    cur_p50: Optional[float]
    change: Optional[float]   # cur / base - 1
    spread: Optional[float]   # the threshold the change was held against
    verdict: str              # slower | faster | same | new | not run

    @property
    def regressed(self) -> bool:
        return self.verdict == "slower"


def _rel_spread(entry: Dict[str, str]) -> float:
    p20, p50, p80 = float(entry["p20"]), float(entry["p50"]), float(entry["p80"])
    return (p80 - p20) / p50 if p50 > 0 else float("inf")


def compare(baseline: Iterable[Dict[str, str]], current: Iterable[Dict[str, str]], min_change: float = 0.03
            ) -> List[Comparison]:
    """Compare the timing rows of `current` against `baseline` entries (same key = same case, shape, dtype,
    provider, device name, threads and metric). Entries only in the baseline are "not run"; only current: "new"."""
    def timings(rows):  # the device ceilings are conditions of a run, not cases that can regress
        return {_key(r): r for r in rows if r["metric"] in TIME_METRICS and r["case"] not in CEILING_CASES}

    base, cur = timings(baseline), timings(current)
    out: List[Comparison] = []
    for key, c in cur.items():
        b = base.get(key)
        if b is None:
            out.append(Comparison(key, None, float(c["p50"]), None, None, "new"))
            continue
        b50, c50 = float(b["p50"]), float(c["p50"])
        change = c50 / b50 - 1.0
        threshold = max(_rel_spread(b), _rel_spread(c), min_change)
        verdict = "slower" if change > threshold else ("faster" if -change > threshold else "same")
        out.append(Comparison(key, b50, c50, change, threshold, verdict))
    compared_devices = {(k[4], k[5]) for k in cur}
    for key, b in base.items():
        # Cases of other devices / thread counts were not part of this comparison at all: leave them out.
        if key not in cur and (key[4], key[5]) in compared_devices:
            out.append(Comparison(key, float(b["p50"]), None, None, None, "not run"))
    return out


def load_warning(baseline: Iterable[Dict[str, str]], current: Iterable[Dict[str, str]]) -> Optional[str]:
    """A warning when the two runs started under clearly different machine load (1-minute load average)."""
    def loads(rows):
        return sorted({float(r["load1"]) for r in rows if r.get("load1") not in (None, "", "nan")})

    base, cur = loads(baseline), loads(current)
    if base and cur and abs(max(cur) - max(base)) > 1.0:
        return (f"warning: the baseline ran at load average {', '.join(map(str, base))} and this run at "
                f"{', '.join(map(str, cur))}: on a shared machine a verdict may reflect the load, not the code")
    return None


def format_comparison(results: List[Comparison], name: str) -> str:
    lines = [f"comparison against baseline {name!r} (slower/faster = median changed by more than the p20-p80 spread, "
             f"at least 3 %):"]
    header = f"  {'case':28s} {'shape':34s} {'dtype':9s} {'provider':10s} {'metric':13s} " \
             f"{'base ms':>9s} {'now ms':>9s} {'change':>8s} {'spread':>7s}  verdict"
    lines.append(header)
    order = {"slower": 0, "faster": 1, "same": 2, "new": 3, "not run": 4}
    for r in sorted(results, key=lambda r: (order[r.verdict], r.key)):
        case, shape, dtype, provider, _, _, metric = r.key
        base = f"{r.base_p50:.4g}" if r.base_p50 is not None else "-"
        now = f"{r.cur_p50:.4g}" if r.cur_p50 is not None else "-"
        change = f"{100 * r.change:+.1f}%" if r.change is not None else "-"
        spread = f"{100 * r.spread:.1f}%" if r.spread is not None else "-"
        flag = r.verdict.upper() if r.verdict == "slower" else r.verdict
        lines.append(f"  {case:28s} {shape:34s} {dtype:9s} {provider:10s} {metric:13s} {base:>9s} {now:>9s} "
                     f"{change:>8s} {spread:>7s}  {flag}")
    slower = sum(r.regressed for r in results)
    lines.append(f"  {slower} slower, {sum(r.verdict == 'faster' for r in results)} faster, "
                 f"{sum(r.verdict == 'same' for r in results)} same, {sum(r.verdict == 'new' for r in results)} new, "
                 f"{sum(r.verdict == 'not run' for r in results)} not run")
    return "\n".join(lines)
