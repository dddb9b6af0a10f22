"""Benchmark harness of resnas-kernels (installed as `resnas_kernels.bench`).

    resnas bench --quick                  # every case, quick shapes, ratio table, CSV + plots in bench/results/
    resnas bench --case layer_norm        # cases whose name contains "layer_norm" (globs work too)
    resnas bench --report                 # regenerate the tables and plots of BENCHMARKS.md from the CSVs

Layout:
    harness.py     the `Case` contract, CPU / CUDA timers, device ceilings (sgemm + copy), input rotation
    runner.py      `resnas bench`: discovery, measuring, the printed table, CSV, plots, baselines
    records.py     the long-format CSV (one row per case x provider x metric) and "latest run" selection
    plots.py       PNGs from the CSVs (matplotlib, Agg)
    report.py      the generated part of BENCHMARKS.md (`python -m resnas_kernels.bench.report`)
    baseline.py    save a run as a baseline, compare a later run against it, flag regressions
    cases/         one small file per kernel issue: `def cases(ctx) -> list[Case]`

A kernel issue adds its benchmark by writing `bench/cases/<name>.py`; nothing else needs to change.
"""
