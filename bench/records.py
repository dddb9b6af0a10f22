"""The results format: one long CSV per device kind, one row per case x provider x metric.

Files: `<results dir>/<device kind>.csv`, device kind "cpu" or "cuda-<gpu name slug>", rows appended run after run.
Rows of one run share `run_id`. Plots, BENCHMARKS.md tables and baselines are all derived from these rows.

Metrics (p20 <= p50 <= p80 in every row; for rates the p20 comes from the slow end, p80 from the fast end):
    time_ms               ms per call
    gflops, gbps          useful FLOPs / minimum bytes of the case (ours) per second of this provider
    pct_flops_ceiling     gflops as % of the run's GEMM ceiling;  pct_bw_ceiling: gbps as % of the copy ceiling
    items_per_s           samples per second (cases with `items`)
    ratio                 time(provider) / time(baseline provider): > 1 means the baseline ("ours") is faster
Ceilings are rows too: case "ceiling.gemm" / "ceiling.copy", provider "torch".
"""
from __future__ import annotations

import csv
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from resnas_kernels.cpu_allocator import cpu_allocator_state

COLUMNS = ("case", "provider", "backend", "mode", "shape", "dtype", "device", "device_name", "threads", "metric",
           "p20", "p50", "p80", "unit", "timer", "samples", "profile", "load1", "allocator", "torch", "triton", "date",
           "git_commit", "run_id", "notes")

CEILING_CASES = ("ceiling.gemm", "ceiling.copy")


# ---------------------------------------------------------------------------------------------------------------------
# Conditions of a run
# ---------------------------------------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_kind(device: torch.device) -> str:
    """The results file stem: 'cpu', or 'cuda-<gpu name>' so two GPU models never share a file."""
    device = torch.device(device)
    return "cpu" if device.type == "cpu" else f"{device.type}-{slug(device_name(device))}"


def git_commit(repo: Optional[Path]) -> str:
    """Short commit of the checkout, '-dirty' when the tree has uncommitted changes; 'unknown' outside git."""
    if repo is None:
        return "unknown"
    try:
        out = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty", "--abbrev=10"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def triton_version() -> str:
    from resnas_kernels import _ext

    return _ext.triton_version() or "none"


def conditions(device: torch.device, threads: int, profile: str, repo: Optional[Path]) -> Dict[str, str]:
    """Columns shared by every row of one run on one device."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {
        "device": torch.device(device).type,
        "device_name": device_name(device),
        "threads": str(threads),
        "profile": profile,
        "load1": f"{load1:.2f}",
        "allocator": cpu_allocator_state(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "date": now,
        "git_commit": git_commit(repo),
        "run_id": f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}",
    }


# ---------------------------------------------------------------------------------------------------------------------
# Reading and writing
# ---------------------------------------------------------------------------------------------------------------------
def fmt(value: float) -> str:
    return f"{value:.6g}"


def append_rows(path: Path, rows: Sequence[Dict[str, str]]) -> None:
    """Append rows to a results CSV, writing the header when the file is new.

    A file written with an older column set is rewritten once with the current columns (old extra columns are kept
    at the end, missing ones left empty), so the long format can gain columns without breaking earlier results.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(COLUMNS)
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            if header != columns:
                old_rows = list(reader)
                columns += [c for c in header if c not in columns]
                with open(path.with_suffix(".csv.tmp"), "w", newline="") as out:
                    writer = csv.DictWriter(out, fieldnames=columns, restval="")
                    writer.writeheader()
                    writer.writerows(old_rows)
                os.replace(path.with_suffix(".csv.tmp"), path)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="raise")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def result_files(results_dir: Path) -> List[Path]:
    """Every `<device kind>.csv` in the results directory, cpu first."""
    files = sorted(Path(results_dir).glob("*.csv"))
    return sorted(files, key=lambda p: (p.stem != "cpu", p.stem))


def latest(rows: Iterable[Dict[str, str]]) -> List[Dict[str, str]]:
    """For each (case name, device name, threads): the rows of the latest run that measured it.

    A quick run after a full one therefore replaces the full run's rows of the cases it measured (in plots and
    tables), while cases it did not measure keep their older rows. Ceilings come with each case's run.
    """
    rows = list(rows)
    newest: Dict[Tuple[str, str, str], Tuple[str, str]] = {}
    for r in rows:
        key = (r["case"], r["device_name"], r["threads"])
        stamp = (r["date"], r["run_id"])
        if key not in newest or stamp > newest[key]:
            newest[key] = stamp
    return [r for r in rows if (r["date"], r["run_id"]) == newest[(r["case"], r["device_name"], r["threads"])]]


def by_threads(rows: Iterable[Dict[str, str]]) -> Dict[str, List[Dict[str, str]]]:
    """{thread count: rows}, fewest threads first: tables and plots never mix timings of different thread counts."""
    out: Dict[str, List[Dict[str, str]]] = {}
    for r in rows:
        out.setdefault(r["threads"], []).append(r)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0))


def group_rows(rows: Iterable[Dict[str, str]], metric: str) -> Dict[Tuple[str, str, str], Dict[str, Dict[str, str]]]:
    """{(case, shape, dtype): {provider: row}} for one metric, in first-seen order."""
    out: Dict[Tuple[str, str, str], Dict[str, Dict[str, str]]] = {}
    for r in rows:
        if r["metric"] == metric and r["case"] not in CEILING_CASES:
            out.setdefault((r["case"], r["shape"], r["dtype"]), {})[r["provider"]] = r
    return out
