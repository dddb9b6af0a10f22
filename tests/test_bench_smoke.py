"""Smoke test of the benchmark harness (not marked `bench`: it runs in the default suite to keep bench/ from rotting).

One tiny ragged-LayerNorm case goes end to end through `resnas bench` into a tmp dir: CSV columns and rows, the
printed ratio table, plot files, BENCHMARKS.md generation, and the baseline comparison flagging a synthetic
regression. The harness pieces (timer, rotation, case validation, discovery, CSV migration, comparison rule) are
tested on their own. Nothing here asserts how fast anything is.
"""
import csv
import json
import textwrap

import pytest
import torch

from resnas_kernels import get_backend, resolve_backend
from resnas_kernels.bench import baseline, records, report, runner
from resnas_kernels.bench.cases import discover
from resnas_kernels.bench.harness import Case, rotating, time_cpu, time_cpu_interleaved

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMOKE = ["--smoke", "--module", "layer_norm", "--case", "ragged_layer_norm.fwd", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run into a tmp results dir, saving baseline 'smoke'; returns (out dir, exit code, stdout)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("bench_results")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = runner.main(SMOKE + ["--out", str(out), "--save-baseline", "smoke", "--strict"])
    return out, code, buf.getvalue()


def _rows(out):
    with open(out / "cpu.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_run_writes_csv_table_and_plots(smoke_run):
    out, code, stdout = smoke_run
    assert code == 0, stdout
    header, rows = _rows(out)
    assert tuple(header) == records.COLUMNS
    case_rows = [r for r in rows if r["case"] == "ragged_layer_norm.fwd"]
    assert {r["provider"] for r in case_rows} == {"ours", "masked", "loop"}
    times = {r["provider"]: r for r in case_rows if r["metric"] == "time_ms"}
    assert times["ours"]["backend"] == resolve_backend("ragged_layer_norm", torch.device("cpu"))
    assert {r["threads"] for r in rows} == {"1"} and {r["profile"] for r in rows} == {"smoke"}
    assert len({r["run_id"] for r in rows}) == 1
    for r in rows:
        assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"]), r
        assert r["device"] == "cpu" and r["torch"] == torch.__version__ and r["git_commit"] and r["date"]
    metrics = {(r["provider"], r["metric"]) for r in case_rows}
    for provider in ("ours", "masked", "loop"):
        for metric in ("time_ms", "gflops", "gbps", "pct_flops_ceiling", "pct_bw_ceiling"):
            assert (provider, metric) in metrics
    assert ("masked", "ratio") in metrics and ("loop", "ratio") in metrics and ("ours", "ratio") not in metrics
    ratio = next(r for r in case_rows if r["provider"] == "masked" and r["metric"] == "ratio")
    assert float(ratio["p50"]) == pytest.approx(float(times["masked"]["p50"]) / float(times["ours"]["p50"]), rel=1e-4)
    assert {r["case"] for r in rows} >= {"ceiling.gemm", "ceiling.copy"}
    assert "masked/ours = " in stdout and "loop/ours = " in stdout and "baseline" in stdout
    for name in ("cpu_1t_speedup.png", "cpu_1t_bandwidth.png", "cpu_1t_gflops.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert f"wrote {out / 'cpu.csv'}" in stdout


def test_report_keeps_hand_written_text(smoke_run, tmp_path):
    out, _, _ = smoke_run
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\nHand-written intro.\n\n{report.BEGIN}\nstale table\n{report.END}\n\nFooter.\n")
    assert runner.main(["--report", "--out", str(out), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nHand-written intro.") and text.rstrip().endswith("Footer.")
    assert "stale table" not in text and text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    assert "| ragged_layer_norm.fwd |" in text and "masked/ours = " in text
    assert "GPU**: not yet measured" in text
    for name in ("cpu_1t_speedup.png", "cpu_1t_bandwidth.png", "cpu_1t_gflops.png"):
        link = report._rel(out / name, tmp_path)
        assert f"({link})" in text and (tmp_path / link).exists()


def test_report_appends_block_without_markers(smoke_run, tmp_path):
    out, _, _ = smoke_run
    md = tmp_path / "B.md"
    md.write_text("# Intro only\n")
    report.update_markdown(md, out, redraw=False)
    text = md.read_text()
    assert text.startswith("# Intro only\n") and report.BEGIN in text and "| ragged_layer_norm.fwd |" in text


def test_compare_flags_synthetic_regression(smoke_run, capsys):
    out, _, _ = smoke_run
    saved = out / "baselines" / "smoke.json"
    entries = json.loads(saved.read_text())["entries"]
    _, rows = _rows(out)
    assert entries and all(c.verdict == "same" for c in baseline.compare(entries, rows))
    # A baseline 1000x faster than what was measured, with no spread: every timing must now be flagged slower
    # (the factor is far beyond any p20-p80 spread a busy machine produces, so this cannot flake).
    fast = json.loads(saved.read_text())
    for e in fast["entries"]:
        e["p20"] = e["p50"] = e["p80"] = str(float(e["p50"]) / 1000)
    (out / "baselines" / "fast.json").write_text(json.dumps(fast))
    verdicts = baseline.compare(fast["entries"], rows)
    assert verdicts and all(c.verdict == "slower" for c in verdicts)
    # End to end: a fresh run compared with the doctored baseline exits 1 with --fail-on-regression. It also forces
    # the reference backend, which must be recorded for 'ours' and undone when main() returns.
    code = runner.main(SMOKE + ["--out", str(out), "--no-plots", "--compare", "fast", "--fail-on-regression",
                                "--backend", "reference"])
    stdout = capsys.readouterr().out
    assert code == 1 and "SLOWER" in stdout and "regression flagged" in stdout
    assert get_backend() == "auto"
    _, rows = _rows(out)
    last_run = [r for r in rows if r["run_id"] == rows[-1]["run_id"] and r["provider"] == "ours"]
    assert last_run and {r["backend"] for r in last_run} == {"reference"}


def test_compare_rule():
    def entry(p20, p50, p80, provider="ours", case="x.fwd"):
        return {"case": case, "shape": "s", "dtype": "float32", "provider": provider, "device_name": "cpu",
                "threads": "2", "metric": "time_ms", "p20": str(p20), "p50": str(p50), "p80": str(p80)}

    base = [entry(0.9, 1.0, 1.1), entry(0.9, 1.0, 1.1, "masked"), entry(0.9, 1.0, 1.1, "loop"),
            entry(1, 1, 1, case="gone.fwd")]
    cur = [entry(1.45, 1.5, 1.55), entry(1.0, 1.05, 1.1, "masked"), entry(0.45, 0.5, 0.55, "loop"),
           entry(1, 1, 1, case="new.fwd")]
    verdicts = {c.key[0] + "/" + c.key[3]: c.verdict for c in baseline.compare(base, cur)}
    assert verdicts == {"x.fwd/ours": "slower", "x.fwd/masked": "same", "x.fwd/loop": "faster",
                        "new.fwd/ours": "new", "gone.fwd/ours": "not run"}
    # A change inside the measured spread is not a regression, however large the spread.
    wide = [entry(0.5, 1.0, 2.0)]
    assert baseline.compare(wide, [entry(1.4, 1.5, 1.6)])[0].verdict == "same"
    # Runs taken under clearly different machine load are called out.
    assert "load average" in baseline.load_warning([dict(load1="0.5")], [dict(load1="4.0")])
    assert baseline.load_warning([dict(load1="0.5")], [dict(load1="1.0")]) is None


@pytest.mark.parametrize("argv, needle", [
    (["--device", "cpu", "--threads", "0"], "--threads"),
    (["--compare", "x", "--fail-on-regression", "--out", "{tmp}"], "--compare x"),
    (["--fail-on-regression"], "--fail-on-regression"),
    (["--save-baseline", "../escape"], "--save-baseline"),
    (["--module", "no_such_file"], "--module no_such_file"),
    (["--smoke", "--module", "layer_norm", "--case", "no_such_case", "--device", "cpu", "--out", "{tmp}"], "--case"),
    (["--quick", "--smoke"], "--quick and --smoke"),
    (["--budget", "0"], "--budget"),
])
def test_bad_arguments_name_the_argument(argv, needle, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert runner.main(argv) == 2
    assert needle in capsys.readouterr().err


def test_bad_choice_and_missing_cuda(capsys):
    with pytest.raises(SystemExit) as exc:
        runner.main(["--device", "tpu"])
    assert exc.value.code == 2 and "--device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert runner.main(["--device", "cuda"]) == 2
        assert "--device cuda was requested but no CUDA device is available" in capsys.readouterr().err


def test_list_runs_nothing(tmp_path, capsys):
    assert runner.main(["--list", "--smoke", "--module", "layer_norm", "--device", "cpu", "--out", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    assert "ragged_layer_norm.fwd" in stdout and "providers: ours, masked, loop" in stdout
    assert not (tmp_path / "cpu.csv").exists()


def test_discovery_reports_and_skips_broken_case_files(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_bench_cases"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text("def cases(ctx):\n    return []\n")
    (pkg / "broken.py").write_text("import a_peer_that_is_not_installed\n")
    (pkg / "helper.py").write_text("X = 1\n")
    (pkg / "_private.py").write_text("raise RuntimeError('never imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    modules, errors = discover("fake_bench_cases")
    assert [m.__name__ for m in modules] == ["fake_bench_cases.good"]
    assert [e.module for e in errors] == ["fake_bench_cases.broken"]
    assert "ModuleNotFoundError" in errors[0].error and "a_peer_that_is_not_installed" in errors[0].error
    only, errors = discover("fake_bench_cases", only=["good"])
    assert [m.__name__ for m in only] == ["fake_bench_cases.good"] and errors == []


def test_failing_case_and_provider_are_reported_not_fatal(monkeypatch, tmp_path, capsys):
    """A case file whose cases() raises and a provider that raises are reported; the other providers still run."""
    import types

    def boom():
        raise RuntimeError("provider exploded")

    good = types.ModuleType("good_cases")
    good.cases = lambda ctx: [Case(name="demo.fwd", shape="n=1", dtype="float32", flops=1, bytes=4,
                                   providers={"ours": lambda: None, "bad": boom})]
    bad = types.ModuleType("bad_cases")
    bad.cases = lambda ctx: 1 / 0
    monkeypatch.setattr("resnas_kernels.bench.cases.discover", lambda only=None: ([good, bad], []))
    argv = ["--smoke", "--device", "cpu", "--threads", "1", "--out", str(tmp_path), "--no-plots"]
    assert runner.main(argv) == 0
    err = capsys.readouterr().err
    assert "provider exploded" in err and "ZeroDivisionError" in err
    assert runner.main(argv + ["--strict"]) == 3
    _, rows = _rows(tmp_path)
    assert {r["provider"] for r in rows if r["case"] == "demo.fwd"} == {"ours"}


def test_time_cpu_statistics():
    import time

    calls = []

    def sleepy():
        calls.append(1)
        time.sleep(0.002)

    t = time_cpu(sleepy, budget_s=0.03, warmup_s=0.005, min_samples=4)
    assert t.timer == "perf_counter" and t.samples >= 4 and len(calls) >= t.samples + 1
    assert t.p20 <= t.p50 <= t.p80
    assert t.p20 >= 2.0 * 0.95  # a sleep never returns early: the timer cannot under-report


def test_time_cpu_interleaved_alternates_providers():
    """Every round samples each provider once, rotating which goes first: no provider gets a long run of its own."""
    import time

    log = []

    def sleeper(name, ms):
        def call():
            log.append(name)
            time.sleep(ms / 1e3)
        return call

    t = time_cpu_interleaved({"a": sleeper("a", 2), "b": sleeper("b", 4)}, budget_s=0.04, warmup_s=0.005,
                             min_samples=4)
    assert set(t) == {"a", "b"} and all(x.timer == "perf_counter_interleaved" for x in t.values())
    assert t["a"].samples >= 4 and t["b"].samples >= 4
    assert t["a"].p20 >= 2.0 * 0.95 and t["b"].p20 >= 4.0 * 0.95  # sleeps never return early
    timed = log[log.index("b") + 1:]  # past both warm-ups (a's, then b's: the rest of b's calls,
    timed = timed[next(i for i, n in enumerate(timed) if n == "a"):]  # then round 1 starts with a)
    longest = max(len(run) for run in "".join(timed).replace("ab", "a b").replace("ba", "b a").split())
    assert longest <= 2, f"a provider ran {longest} samples in a row: {''.join(timed)}"


def test_time_cpu_interleaved_cancels_drift():
    """Two identical providers on a machine that is 3x slower for the first part of the measurement: timed one after
    the other (time_cpu), the first looks ~3x slower; interleaved, their ratio stays near 1. The sequential control
    shows the test can fail."""
    import time

    def drifting_machine(slow_for_s):
        start = []

        def call():
            if not start:
                start.append(time.perf_counter())
            slow = time.perf_counter() - start[0] < slow_for_s
            time.sleep((6 if slow else 2) / 1e3)
        return call

    budget, slow_for_s = 0.12, 0.144  # sequential: the first provider is timed in the slow part only
    same = drifting_machine(slow_for_s)
    first, second = time_cpu(same, budget_s=budget, warmup_s=0), time_cpu(same, budget_s=budget, warmup_s=0)
    assert first.p50 / second.p50 > 2.0  # the control: sequential timing sees the drift as a difference
    same = drifting_machine(slow_for_s)
    t = time_cpu_interleaved({"x": same, "y": same}, budget_s=budget, warmup_s=0)
    assert 0.8 < t["x"].p50 / t["y"].p50 < 1.25


def test_time_cpu_interleaved_drops_failing_providers():
    """A provider that raises in its warm-up or mid-run is reported through on_error and dropped; the others are
    timed. Without on_error the exception propagates."""
    calls = {"late": 0}

    def late():
        calls["late"] += 1
        if calls["late"] > 3:
            raise ValueError("late failure")

    def early():
        raise RuntimeError("early failure")

    errors = []
    t = time_cpu_interleaved({"ok": lambda: None, "late": late, "early": early}, budget_s=0.01, warmup_s=0,
                             min_samples=5, on_error=lambda name, exc: errors.append((name, type(exc).__name__)))
    assert set(t) == {"ok"} and t["ok"].samples >= 5
    assert sorted(errors) == [("early", "RuntimeError"), ("late", "ValueError")]
    with pytest.raises(RuntimeError, match="early failure"):
        time_cpu_interleaved({"early": early}, budget_s=0.01, warmup_s=0)


def test_cpu_gemm_ceiling_is_the_faster_library():
    """The CPU GEMM ceiling times BLAS (torch.mm) and, where torch has it, oneDNN's fp32 matmul, and keeps the faster:
    a fake timer makes each library the faster one in turn; both really run once, and their products agree."""
    from resnas_kernels.bench.harness import Timing, measure_ceilings

    has_onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    for fast_call in (0, 1):
        calls, products = [], []

        def timer(fn):
            products.append(fn())
            ms = 1.0 if len(calls) == fast_call else 2.0
            calls.append(ms)
            return Timing(ms, ms, ms, 3, "perf_counter")

        c = measure_ceilings(torch.device("cpu"), timer, "smoke")
        gemm_calls = 2 if has_onednn else 1
        assert len(calls) == gemm_calls + 1  # the GEMM(s), then the copy
        picked_onednn = has_onednn and fast_call == 1
        assert c.gemm == "sgemm float32 256^3" + (" (oneDNN)" if picked_onednn else "")
        assert c.gflops == pytest.approx(2 * 256 ** 3 / (calls[1 if picked_onednn else 0] * 1e-3) / 1e9)
        if has_onednn:
            torch.testing.assert_close(products[1], products[0], rtol=1e-4, atol=1e-3)


def test_rotating_cycles_through_input_sets():
    seen = []
    fn = rotating(lambda a, b: seen.append((a, b)), [(1, "x"), (2, "y"), (3, "z")])
    for _ in range(7):
        fn()
    assert seen == [(1, "x"), (2, "y"), (3, "z"), (1, "x"), (2, "y"), (3, "z"), (1, "x")]
    with pytest.raises(ValueError, match="at least one input set"):
        rotating(lambda: None, [])


@pytest.mark.parametrize("kwargs, needle", [
    (dict(name="noop"), "'<op>.<mode>'"),
    (dict(name="op.backward"), "mode 'backward'"),
    (dict(flops=-1), "flops"),
    (dict(bytes=1.5), "bytes"),
    (dict(baseline="missing"), "baseline 'missing'"),
    (dict(providers={}), "providers is empty"),
    (dict(providers={"ours": 3}), "not callable"),
])
def test_case_validation_names_the_field(kwargs, needle):
    fields = dict(name="op.fwd", shape="s", dtype="float32", flops=1, bytes=1, providers={"ours": lambda: None})
    fields.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        Case(**fields).validate()


def test_csv_with_old_columns_is_migrated(tmp_path):
    path = tmp_path / "cpu.csv"
    path.write_text(textwrap.dedent("""\
        case,provider,metric,p50,legacy
        a.fwd,ours,time_ms,1.5,kept
    """))
    new_row = {c: "" for c in records.COLUMNS}
    new_row.update(case="b.fwd", provider="ours", metric="time_ms", p50="2")
    records.append_rows(path, [new_row])
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames[:len(records.COLUMNS)]) == records.COLUMNS and reader.fieldnames[-1] == "legacy"
    assert [(r["case"], r["p50"], r["legacy"]) for r in rows] == [("a.fwd", "1.5", "kept"), ("b.fwd", "2", "")]


def _synthetic_row(case, provider, metric, p50, threads, run_id, date):
    row = {c: "" for c in records.COLUMNS}
    row.update(case=case, provider=provider, backend="cpu" if provider == "ours" else "torch", mode="fwd",
               shape="s", dtype="float32", device="cpu", device_name="Test CPU", threads=threads, metric=metric,
               p20=str(p50 * 0.9), p50=str(p50), p80=str(p50 * 1.1), unit="ms", timer="perf_counter",
               profile="quick", run_id=run_id, date=date, git_commit="abc", torch="t", triton="tr", load1="0.5")
    return row


def test_tables_and_plots_use_latest_run_and_never_mix_thread_counts(tmp_path):
    rows = [_synthetic_row("op.fwd", "ours", "time_ms", 1.0, "2", "old", "2026-01-01T00:00:00"),
            _synthetic_row("op.fwd", "masked", "time_ms", 9.0, "2", "old", "2026-01-01T00:00:00"),
            _synthetic_row("op.fwd", "masked", "ratio", 9.0, "2", "old", "2026-01-01T00:00:00"),
            _synthetic_row("op.fwd", "ours", "time_ms", 1.0, "2", "new", "2026-02-01T00:00:00"),
            _synthetic_row("op.fwd", "masked", "time_ms", 3.0, "2", "new", "2026-02-01T00:00:00"),
            _synthetic_row("op.fwd", "masked", "ratio", 3.0, "2", "new", "2026-02-01T00:00:00"),
            _synthetic_row("op.fwd", "ours", "time_ms", 2.0, "1", "one", "2026-01-15T00:00:00"),
            _synthetic_row("op.fwd", "masked", "time_ms", 5.0, "1", "one", "2026-01-15T00:00:00"),
            _synthetic_row("op.fwd", "masked", "ratio", 2.5, "1", "one", "2026-01-15T00:00:00")]
    records.append_rows(tmp_path / "cpu.csv", rows)
    assert {r["run_id"] for r in records.latest(rows)} == {"new", "one"}
    written = {p.name for p in report.plots.make_plots(tmp_path)}
    assert {"cpu_1t_speedup.png", "cpu_2t_speedup.png"} <= written
    text = report.generate(tmp_path, tmp_path)
    one, two = text.split("### cpu, 1 CPU thread(s)")[1].split("### cpu, 2 CPU thread(s)")
    assert "masked/ours = 2.50x" in one and "masked/ours = 3.00x" in two and "9.00x" not in text
