"""PNG plots from the results CSVs (latest run per case and device; see records.latest).

Per results file `<device kind>.csv` and CPU thread count T (timings of different thread counts are never mixed):
    <device kind>_<T>t_speedup.png     time(peer) / time(ours) per case and shape, whiskers from the p20/p80 spread
    <device kind>_<T>t_bandwidth.png   achieved GB/s of every provider, with the copy ceiling of the same run
    <device kind>_<T>t_gflops.png      achieved GFLOP/s of every provider, with the GEMM ceiling of the same run
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

from . import records


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _label(key: Tuple[str, str, str], providers: Dict[str, Dict[str, str]], width: int = 70) -> str:
    case, shape, dtype = key
    ours = providers.get("ours", {}).get("backend", "")
    shape = shape if len(shape) <= width else shape[:width - 3] + "..."  # the CSV keeps the full shape
    return f"{case} [{dtype}]" + (f" (ours: {ours})" if ours else "") + f"\n{shape}"


def _title(rows: List[Dict[str, str]], what: str) -> str:
    names = sorted({r["device_name"] for r in rows})
    threads = sorted({r["threads"] for r in rows})
    dates = sorted({r["date"][:10] for r in rows})
    dev = ", ".join(names) + (f", {'/'.join(threads)} CPU thread(s)" if rows and rows[0]["device"] == "cpu" else "")
    return f"{what}\n{dev}; {dates[0]}{' .. ' + dates[-1] if len(dates) > 1 else ''}" if dates else what


def _grouped_barh(ax, groups, series, value_fmt, origin=0.0) -> None:
    """Horizontal grouped bars from `origin`: one block per (case, shape, dtype) holding a bar for each series
    present there, p20/p80 whiskers at the bar's end (the median). Colours are fixed per series."""
    palette = [f"C{i}" for i in range(10)]
    color = {name: palette[i % len(palette)] for i, name in enumerate(series)}
    labelled, ticks, y = set(), [], 0.0
    for key, providers in groups:
        present = [name for name in series if name in providers]
        start = y
        for name in present:
            row = providers[name]
            p20, p50, p80 = float(row["p20"]), float(row["p50"]), float(row["p80"])
            ax.barh(y, p50 - origin, left=origin, height=0.85, xerr=[[p50 - p20], [p80 - p50]], capsize=2,
                    error_kw=dict(ecolor="0.35", elinewidth=0.8), color=color[name],
                    label=name if name not in labelled else None)
            labelled.add(name)
            ax.text(p50, y, " " + value_fmt(p50), va="center", fontsize=7)
            y += 1.0
        ticks.append((start + y - 1.0) / 2 if present else start)
        y += 0.8  # gap between blocks
    ax.set_yticks(ticks)
    ax.set_yticklabels([_label(k, p) for k, p in groups], fontsize=7)
    ax.set_ylim(y - 0.4, -0.8)  # first block on top
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never hides a bar


def _figure(plt, groups, series):
    bars = sum(sum(1 for name in series if name in p) for _, p in groups)
    return plt.subplots(figsize=(12, 1.4 + 0.24 * bars + 0.16 * len(groups)))


def plot_speedup(rows: List[Dict[str, str]], path: Path) -> bool:
    """Bar chart of time(peer)/time(ours); False (and no file) when the rows hold no ratios."""
    grouped = list(records.group_rows(rows, "ratio").items())
    if not grouped:
        return False
    times = records.group_rows(rows, "time_ms")
    groups = [(k, {**times.get(k, {}), **p}) for k, p in grouped]  # ours' row (for its backend) + peers' ratios
    peers = sorted({name for _, p in grouped for name in p})
    plt = _pyplot()
    fig, ax = _figure(plt, groups, peers)
    ax.set_xscale("log")  # ratios are multiplicative: 0.5x and 2x sit at the same distance from 1
    _grouped_barh(ax, groups, peers, lambda v: f"{v:.2f}x", origin=1.0)  # bars grow from 1x: left = peer faster
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("time(peer) / time(ours), log scale, median with p20-p80 whiskers   (> 1: ours is faster)")
    ax.set_title(_title(rows, "ragged kernels vs peers: speed-up of ours"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _plot_rate(rows: List[Dict[str, str]], path: Path, metric: str, ceiling_case: str, unit: str, what: str) -> bool:
    """Achieved rate per provider (`metric` rows) with the run's ceiling (`ceiling_case`) as a vertical line."""
    groups = list(records.group_rows(rows, metric).items())
    if not groups:
        return False
    providers = []
    for _, p in groups:
        providers += [name for name in p if name not in providers]
    providers.sort(key=lambda n: (n != "ours", n))
    plt = _pyplot()
    fig, ax = _figure(plt, groups, providers)
    _grouped_barh(ax, groups, providers, lambda v: f"{v:.3g}")
    values = [float(r["p50"]) for r in rows if r["metric"] == metric and r["case"] not in records.CEILING_CASES]
    ceilings = [float(r["p50"]) for r in rows if r["case"] == ceiling_case and r["metric"] == metric]
    if max(values + ceilings) > 20 * max(min(values), 1e-12):
        ax.set_xscale("log")  # peers can sit orders of magnitude below the ceiling
    if ceilings:
        desc = next(r["shape"] for r in rows if r["case"] == ceiling_case)
        ax.axvline(max(ceilings), color="red", linestyle="--", linewidth=1,
                   label=f"ceiling: {desc}, {max(ceilings):.3g} {unit}")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_xlabel(f"achieved {unit} ({what} of our op / time of each provider)" +
                  (", log scale" if ax.get_xscale() == "log" else ""))
    ax.set_title(_title(rows, f"achieved {unit}"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_bandwidth(rows: List[Dict[str, str]], path: Path) -> bool:
    """Achieved GB/s (what memory-bound ops are judged by) with the copy ceiling of the same run."""
    return _plot_rate(rows, path, "gbps", "ceiling.copy", "GB/s", "minimum bytes")


def plot_gflops(rows: List[Dict[str, str]], path: Path) -> bool:
    """Achieved GFLOP/s (what GEMM-bound ops are judged by) with the GEMM ceiling of the same run."""
    return _plot_rate(rows, path, "gflops", "ceiling.gemm", "GFLOP/s", "useful FLOPs")


KINDS = ("speedup", "bandwidth", "gflops")


def plot_path(csv_path: Path, threads: str, kind: str) -> Path:
    """e.g. bench/results/cpu_2t_speedup.png: one plot per results file, CPU thread count and kind."""
    return Path(csv_path).with_name(f"{Path(csv_path).stem}_{threads}t_{kind}.png")


def make_plots(results_dir: Path) -> List[Path]:
    """(Re)draw the plots of every results CSV in `results_dir`; returns the files written."""
    written = []
    for csv_path in records.result_files(results_dir):
        for threads, rows in records.by_threads(records.latest(records.read_rows(csv_path))).items():
            for kind, draw in zip(KINDS, (plot_speedup, plot_bandwidth, plot_gflops)):
                png = plot_path(csv_path, threads, kind)
                if draw(rows, png):
                    written.append(png)
    return written
