"""`resnas bench`: run the benchmark cases on the devices present, print ours vs each peer, write CSV and plots.

    resnas bench --quick                     # quick shapes and budgets (about 2-3 min on 2 CPU cores)
    resnas bench                             # full shapes and budgets
    resnas bench --case layer_norm --case 'ragged_*.fwd' --device cpu --threads 1
    resnas bench --module layer_norm         # only the cases of bench/cases/layer_norm.py
    resnas bench --list                      # the cases and providers each device would run (builds nothing;
                                             # `resnas` keeps the list, so asking again answers without torch)
    resnas bench --report                    # only regenerate plots and BENCHMARKS.md tables from the CSVs
    resnas bench --quick --save-baseline main ... later: resnas bench --quick --compare main --fail-on-regression

Exit status: 0 done; 1 a regression was flagged with --fail-on-regression; 2 bad arguments or nothing matched;
3 with --strict, some case file, case or provider failed (they are always reported and skipped).
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import baseline as baselines
from . import bounds, plots, records, report
from .harness import (SMALL_LAUNCH_MS, Case, Ceilings, Context, LazyCase, Timing, measure_ceilings,
                      time_cpu_interleaved, time_cuda, timer_for)

# Per profile: timing budget per provider (s) on CPU and CUDA, CPU warm-up (s), min samples, ceiling size.
PROFILES = {
    "full": dict(cpu_budget=2.0, cuda_budget=0.5, warmup=0.5, min_samples=10, ceilings="full"),
    "quick": dict(cpu_budget=0.4, cuda_budget=0.1, warmup=0.1, min_samples=3, ceilings="quick"),
    "smoke": dict(cpu_budget=0.03, cuda_budget=0.02, warmup=0.01, min_samples=3, ceilings="smoke"),
}


class UsageError(Exception):
    """Bad command-line input; the message names the argument."""


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resnas bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="quick shapes and short budgets (the README's main command)")
    p.add_argument("--smoke", action="store_true", help="one tiny shape per case and tiny budgets: proves the "
                   "harness runs (used by tests/test_bench_smoke.py); its numbers mean nothing")
    p.add_argument("--case", action="append", default=[], metavar="PATTERN",
                   help="run cases whose name contains PATTERN or matches it as a glob, or whose label "
                   "'NAME [SHAPE DTYPE]' does (e.g. 'supernet_train.train*bfloat16'); repeatable")
    p.add_argument("--module", action="append", default=None, metavar="FILE",
                   help="take cases only from bench/cases/FILE.py (e.g. layer_norm); repeatable. Cases are built "
                   "only once selected (--case), so this mostly saves importing the other case files")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "all"),
                   help="auto: cuda when present, else cpu; all: cpu and, when present, cuda (default auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads to pin torch to (default: all cores available to this process)")
    p.add_argument("--backend", default=None, choices=("auto", "reference", "triton", "cpu", "cuda"),
                   help="force the backend of 'ours' (default: the library's auto choice, recorded per row)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="timing budget per provider (default: 2.0 CPU / 0.5 CUDA; --quick 0.4 / 0.1)")
    p.add_argument("--out", type=Path, default=None,
                   help="results directory (default: bench/results/ of the repository checkout)")
    p.add_argument("--list", action="store_true", help="list the cases and their providers, run nothing (the "
                   "`resnas` command keeps the list in ~/.cache/resnas-kernels until a source file, an installed "
                   "package or the environment changes)")
    p.add_argument("--no-plots", action="store_true", help="do not redraw the PNG plots after the run")
    p.add_argument("--report", action="store_true",
                   help="run nothing: redraw the plots and regenerate the tables of BENCHMARKS.md from the CSVs")
    p.add_argument("--markdown", type=Path, default=None, help="markdown file for --report (default: BENCHMARKS.md "
                   "of the repository checkout)")
    p.add_argument("--save-baseline", metavar="NAME", default=None,
                   help="save this run's timings as baseline NAME (<out>/baselines/NAME.json)")
    p.add_argument("--compare", metavar="NAME", default=None,
                   help="compare this run with baseline NAME and flag cases slower than the measured spread")
    p.add_argument("--fail-on-regression", action="store_true", help="with --compare: exit 1 if any case is slower")
    p.add_argument("--strict", action="store_true", help="exit 3 if any case file, case or provider failed")
    p.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failures")
    return p


def default_out() -> Path:
    results, _ = report.default_paths()
    return results if results is not None else Path.cwd() / "resnas-bench-results"


def resolve_devices(choice: str) -> List[torch.device]:
    has_cuda = torch.cuda.is_available()
    if choice == "cuda" and not has_cuda:
        raise UsageError(f"--device cuda was requested but no CUDA device is available (torch {torch.__version__}, "
                         f"built for CUDA {torch.version.cuda}, torch.cuda.is_available() is False); use --device cpu")
    if choice == "cpu":
        return [torch.device("cpu")]
    if choice == "cuda":
        return [torch.device("cuda", torch.cuda.current_device())]
    if choice == "all":
        return [torch.device("cpu")] + ([torch.device("cuda", torch.cuda.current_device())] if has_cuda else [])
    return [torch.device("cuda", torch.cuda.current_device())] if has_cuda else [torch.device("cpu")]


def available_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def matches(name: str, patterns: Sequence[str]) -> bool:
    return not patterns or any(p in name or fnmatch.fnmatchcase(name, p) for p in patterns)


def case_selected(case, patterns: Sequence[str]) -> bool:
    """--case selection: by the case's name, or by its label `name [shape dtype]` (to pick one shape or dtype)."""
    return matches(case.name, patterns) or matches(f"{case.name} [{case.shape} {case.dtype}]", patterns)


# ---------------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Failure:
    where: str
    error: str
    details: str = ""


@dataclass
class ProviderResult:
    provider: str
    backend: str
    timing: Timing
    graph: Optional[Timing] = None


@dataclass
class CaseResult:
    case: Case
    results: List[ProviderResult] = field(default_factory=list)

    def get(self, provider: str) -> Optional[ProviderResult]:
        return next((r for r in self.results if r.provider == provider), None)


def backend_of(case: Case, provider: str, device: torch.device) -> str:
    """Which implementation ran: resolve_backend for 'ours' (raises if a forced backend cannot run), else the
    case's label, else 'torch'."""
    if provider == case.baseline and case.op:
        from resnas_kernels import resolve_backend

        return resolve_backend(case.op, device)
    return case.backends.get(provider, "torch")


def wants_graph(case: Case, eager: Timing) -> bool:
    if case.cuda_graph is not None:
        return case.cuda_graph
    return case.mode in ("fwd", "infer") and eager.p50 < SMALL_LAUNCH_MS


def measure_case(case: Case, device: torch.device, timer, budget: float, failures: List[Failure],
                 interleaved=None) -> CaseResult:
    """Times every provider of `case`: with `interleaved(fns, on_error)` (CPU) all providers together in interleaved
    rounds (`time_cpu_interleaved`), else one after another with `timer(fn)`. A failing provider is recorded in
    `failures` and left out; the others are still measured."""
    out = CaseResult(case)

    def where(provider: str) -> str:
        return f"{case.name} [{case.shape} {case.dtype}] provider {provider!r}"

    def failed(provider: str, exc: BaseException) -> None:
        details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        failures.append(Failure(where(provider), f"{type(exc).__name__}: {exc}", details))

    backends: Dict[str, str] = {}
    for provider in case.providers:
        try:
            backends[provider] = backend_of(case, provider, device)
        except Exception as exc:  # noqa: BLE001 - one failing provider must not stop the run
            failed(provider, exc)
    fns = {provider: case.providers[provider] for provider in backends}
    if interleaved is not None:
        timings = interleaved(fns, failed)
    else:
        timings = {}
        for provider, fn in fns.items():
            try:
                timings[provider] = timer(fn)
            except Exception as exc:  # noqa: BLE001 - one failing provider must not stop the run
                failed(provider, exc)
    for provider, fn in fns.items():
        if provider not in timings:
            continue
        result = ProviderResult(provider, backends[provider], timings[provider])
        if device.type == "cuda" and wants_graph(case, result.timing):
            try:
                result.graph = time_cuda(fn, budget_s=budget, graph=True)
            except Exception as exc:  # noqa: BLE001 - e.g. the callable syncs with the host: keep the eager time
                failures.append(Failure(where(provider) + " under CUDA-graph replay", f"{type(exc).__name__}: {exc}",
                                        traceback.format_exc()))
        out.results.append(result)
    return out


def _rate_row(value: float, timing: Timing, scale: float = 1.0) -> Tuple[float, float, float]:
    """A rate's p20/p50/p80 from a time's: the slow end of the time is the low end of the rate."""
    return value / timing.p80 * scale, value / timing.p50 * scale, value / timing.p20 * scale


def rows_for(result: CaseResult, ceilings: Ceilings, cond: Dict[str, str]) -> List[Dict[str, str]]:
    case = result.case
    base = result.get(case.baseline)
    notes = "; ".join([case.notes] * bool(case.notes) + [f"{peer} skipped: {why}"
                                                           for peer, why in case.skipped.items()])
    rows = []
    for r in result.results:
        def row(metric, values, unit, timing=r.timing):
            p20, p50, p80 = values
            return {**cond, "case": case.name, "provider": r.provider, "backend": r.backend, "mode": case.mode,
                    "shape": case.shape, "dtype": case.dtype, "metric": metric, "p20": records.fmt(p20),
                    "p50": records.fmt(p50), "p80": records.fmt(p80), "unit": unit, "timer": timing.timer,
                    "samples": str(timing.samples), "notes": notes}

        t = r.timing
        gflops = _rate_row(case.flops, t, 1e-6)          # flops / ms -> GFLOP/s
        gbps = _rate_row(case.bytes, t, 1e-6)            # bytes / ms -> GB/s
        rows += [row("time_ms", (t.p20, t.p50, t.p80), "ms"),
                 row("gflops", gflops, "GFLOP/s"),
                 row("gbps", gbps, "GB/s"),
                 row("pct_flops_ceiling", tuple(100 * v / ceilings.gflops for v in gflops), f"% of {ceilings.gemm}"),
                 row("pct_bw_ceiling", tuple(100 * v / ceilings.gbps for v in gbps), f"% of {ceilings.copy}")]
        if cond.get("device") == "cuda":  # against the H200's peaks (bench/bounds.py), whatever GPU ran it
            rows.append(row("pct_h200_bound", tuple(bounds.pct_of_bound(case.flops, case.bytes, case.dtype, v)
                                                    for v in (t.p80, t.p50, t.p20)),
                            f"% of H200 lower bound ({bounds.bound_ms(case.flops, case.bytes, case.dtype)[1]})"))
        if case.items:
            rows.append(row("items_per_s", _rate_row(case.items, t, 1e3), "items/s"))
        if base is not None and r is not base:
            b = base.timing
            rows.append(row("ratio", (t.p20 / b.p80, t.p50 / b.p50, t.p80 / b.p20), f"time/time({case.baseline})"))
        if r.graph is not None:
            g = r.graph
            rows.append(row("time_ms_graph", (g.p20, g.p50, g.p80), "ms", timing=g))
            if base is not None and base.graph is not None and r is not base:
                bg = base.graph
                rows.append(row("ratio_graph", (g.p20 / bg.p80, g.p50 / bg.p50, g.p80 / bg.p20),
                                f"time/time({case.baseline}), CUDA graph", timing=g))
    return rows


def ceiling_rows(c: Ceilings, cond: Dict[str, str]) -> List[Dict[str, str]]:
    rows = []
    for case, desc, timing, metric, unit, amount in (
            ("ceiling.gemm", c.gemm, c.gemm_timing, "gflops", "GFLOP/s", c.gemm_flops),
            ("ceiling.copy", c.copy, c.copy_timing, "gbps", "GB/s", c.copy_bytes)):
        for m, values, u in (("time_ms", (timing.p20, timing.p50, timing.p80), "ms"),
                             (metric, _rate_row(amount, timing, 1e-6), unit)):
            rows.append({**cond, "case": case, "provider": "torch", "backend": "torch", "mode": "", "shape": desc,
                         "dtype": desc.split()[1], "metric": m, "p20": records.fmt(values[0]),
                         "p50": records.fmt(values[1]), "p80": records.fmt(values[2]), "unit": u,
                         "timer": timing.timer, "samples": str(timing.samples), "notes": ""})
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------------------------------
def format_case(result: CaseResult, ceilings: Ceilings, device: torch.device) -> List[str]:
    case = result.case
    base = result.get(case.baseline)
    lines = [f"{case.name}  {case.shape}  {case.dtype}"]
    for r in sorted(result.results, key=lambda r: (r.provider != case.baseline, r.provider)):
        t = r.timing
        gbps = case.bytes / (t.p50 * 1e-3) / 1e9
        gflops = case.flops / (t.p50 * 1e-3) / 1e9
        if r is base:
            vs = "baseline"
        elif base is not None:
            vs = f"{r.provider}/{case.baseline} = {t.p50 / base.timing.p50:.2f}x"
        else:
            vs = f"({case.baseline} failed)"
        graph = ""
        if device.type == "cuda":
            graph = f"  graph {r.graph.p50:9.4f} ms" if r.graph is not None else f"  {'':18s}"
            best = min(t.p50, r.graph.p50) if r.graph is not None else t.p50
            graph += f" {bounds.pct_of_bound(case.flops, case.bytes, case.dtype, best):5.1f}%bound"
        lines.append(f"  {r.provider:10s} {r.backend:10s} {t.p50:10.4f} ms [{t.p20:.4g}-{t.p80:.4g}]{graph}  "
                     f"{gbps:8.3g} GB/s {100 * gbps / ceilings.gbps:5.1f}%BW  {gflops:8.3g} GFLOP/s "
                     f"{100 * gflops / ceilings.gflops:5.1f}%FL  {vs}")
    lines += [f"  {peer:10s} skipped: {why}" for peer, why in case.skipped.items()]
    return lines


def format_summary(all_results: List[CaseResult]) -> List[str]:
    """Geometric mean of time(peer)/time(ours) per peer over the cases where both ran."""
    ratios: Dict[str, List[float]] = {}
    for res in all_results:
        base = res.get(res.case.baseline)
        if base is None:
            continue
        for r in res.results:
            if r is not base:
                ratios.setdefault(f"{r.provider}/{res.case.baseline}", []).append(r.timing.p50 / base.timing.p50)
    lines = []
    for name, values in sorted(ratios.items()):
        geo = math.exp(sum(math.log(v) for v in values) / len(values))
        lines.append(f"  {name:18s} geomean {geo:5.2f}x over {len(values)} case(s) "
                     f"(min {min(values):.2f}x, max {max(values):.2f}x)")
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------
def collect_cases(modules, ctx: Context, patterns: Sequence[str], failures: List[Failure]
                  ) -> List[Union[Case, LazyCase]]:
    """The selected cases of every module; a LazyCase stays unbuilt (it is validated once built, in `build_case`)."""
    out = []
    for module in modules:
        try:
            built = list(module.cases(ctx))
        except Exception as exc:  # noqa: BLE001 - e.g. a peer that fails its agreement check
            failures.append(Failure(f"{module.__name__}.cases() on {ctx.device}", f"{type(exc).__name__}: {exc}",
                                    traceback.format_exc()))
            continue
        for case in built:
            if isinstance(case, LazyCase):
                if case_selected(case, patterns):
                    out.append(case)
                continue
            try:
                case.validate()
            except ValueError as exc:
                failures.append(Failure(f"{module.__name__}", str(exc)))
                continue
            if case_selected(case, patterns):
                out.append(case)
    return out


def build_case(case: Union[Case, LazyCase], failures: List[Failure]) -> Optional[Case]:
    """The Case to measure: a LazyCase is built (and validated) now; a failure is recorded and gives None."""
    if not isinstance(case, LazyCase):
        return case
    try:
        built = case.case()
        built.validate()
        return built
    except Exception as exc:  # noqa: BLE001 - e.g. a peer that fails its agreement check: the other cases go on
        failures.append(Failure(f"{case.name} [{case.shape} {case.dtype}] build", f"{type(exc).__name__}: {exc}",
                                traceback.format_exc()))
        return None


def run(args, out_dir: Path) -> int:
    run_started = time.perf_counter()
    profile = "smoke" if args.smoke else ("quick" if args.quick else "full")
    settings = PROFILES[profile]
    devices = resolve_devices(args.device)
    threads = args.threads if args.threads is not None else available_threads()
    torch.set_num_threads(threads)

    from .cases import case_files, discover

    if args.module:
        unknown = sorted(set(args.module) - set(case_files()))
        if unknown:
            raise UsageError(f"--module {', '.join(unknown)}: no such case file; available: {', '.join(case_files())}")
    modules, import_errors = discover(only=args.module)
    failures = [Failure(f"case file {e.module}", f"import failed: {e.error}", e.details) for e in import_errors]
    checkout_markdown = report.default_paths()[1]
    repo = checkout_markdown.parent if checkout_markdown is not None else None  # for the git commit column
    all_rows: List[Dict[str, str]] = []
    all_results: List[CaseResult] = []
    matched_any = False
    written = set()
    for device in devices:
        ctx = Context(device=device, quick=profile != "full", threads=threads, smoke=profile == "smoke")
        started = time.perf_counter()
        cases = collect_cases(modules, ctx, args.case, failures)
        declared_in = time.perf_counter() - started
        matched_any |= bool(cases)
        if args.list:
            print(f"{device} ({records.device_name(device)}): {len(cases)} case(s)")
            for c in cases:
                print(f"  {c.name:28s} {c.shape:36s} {c.dtype:9s} providers: {', '.join(c.provider_names)}")
            continue
        if not cases:
            continue
        cond = records.conditions(device, torch.get_num_threads(), profile, repo)
        budget = args.budget if args.budget is not None else settings[f"{device.type}_budget"]
        timer = timer_for(device, budget, settings["warmup"], settings["min_samples"])
        interleaved = None
        if device.type == "cpu":  # providers interleaved: the VM's drift cancels out of same-run ratios
            def interleaved(fns, on_error):
                return time_cpu_interleaved(fns, budget_s=budget, warmup_s=settings["warmup"],
                                            min_samples=settings["min_samples"], on_error=on_error)
        csv_path = out_dir / f"{records.device_kind(device)}.csv"
        print(f"== resnas bench on {device} ({cond['device_name']}): {torch.get_num_threads()} thread(s), profile "
              f"{profile}, torch {cond['torch']}, triton {cond['triton']}, commit {cond['git_commit']}, "
              f"load average {cond['load1']}")
        if float(cond["load1"]) > available_threads():
            print(f"   note: load average {cond['load1']} exceeds the {available_threads()} core(s) of this process: "
                  f"the machine is busy and timings are noisy")
        if os.environ.get("TRITON_INTERPRET") == "1":
            print("   note: TRITON_INTERPRET=1 is set: Triton kernels run in the (slow) interpreter")
        print(f"   selected {len(cases)} case(s) from {len(modules)} case file(s) in {declared_in:.1f} s (lazy cases "
              f"are built as they are measured)")
        ceilings = measure_ceilings(device, timer, settings["ceilings"])
        print(f"   ceilings: {ceilings.gemm} {ceilings.gflops:.4g} GFLOP/s; {ceilings.copy} {ceilings.gbps:.4g} GB/s "
              f"(read + write)")
        records.append_rows(csv_path, ceiling_rows(ceilings, cond))
        print(f"   {'provider':10s} {'backend':10s} {'p50':>13s} [p20-p80]   achieved rates on our work "
              f"(% of ceilings)   ratio")
        measured = []
        for case in cases:
            started = time.perf_counter()
            case = build_case(case, failures)
            if case is None:
                continue
            built_in = time.perf_counter() - started
            measured.append(case)
            result = measure_case(case, device, timer, budget, failures, interleaved)
            rows = rows_for(result, ceilings, cond)
            records.append_rows(csv_path, rows)  # per case, so an interrupted run keeps what it measured
            all_rows += rows
            all_results.append(result)
            lines = format_case(result, ceilings, device)
            lines[0] += f"   ({built_in:.1f} s to build, {time.perf_counter() - started - built_in:.1f} s to measure)"
            print("\n".join("   " + line for line in lines), flush=True)
        written.add(csv_path)
        this_device = all_results[len(all_results) - len(measured):]
        notes = sorted({f"'ours' of {r.case.op} ran on the {p.backend} backend" for r in this_device
                        for p in r.results if p.provider == r.case.baseline and p.backend == "reference"})
        for note in notes:
            print(f"   note: {note} (PyTorch reference: no ragged kernel available on {device.type}; see `resnas info`)")
    if args.list:
        if not matched_any and args.case:
            raise UsageError(f"--case {args.case} matched no case")
        return report_failures(failures, args)
    if not matched_any:
        if args.case:
            raise UsageError(f"--case {args.case} matched no case on {', '.join(map(str, devices))} (see --list)")
        print("no benchmark case found", file=sys.stderr)
        report_failures(failures, args)
        return 2
    print(f"measured {len(all_results)} case(s) in {time.perf_counter() - run_started:.0f} s")
    summary = format_summary(all_results)
    if summary:
        print("summary: time(peer) / time(ours), > 1 means ours is faster")
        print("\n".join(summary))
    for path in sorted(written):
        print(f"wrote {path}")
    if not args.no_plots:
        for png in plots.make_plots(out_dir):
            print(f"wrote {png}")
    status = report_failures(failures, args)
    if args.save_baseline:
        path = baselines.baseline_path(out_dir, args.save_baseline)
        n = baselines.save_baseline(path, all_rows, args.save_baseline)
        print(f"saved baseline {args.save_baseline!r} ({n} timings) to {path}")
    if args.compare:
        path = baselines.baseline_path(out_dir, args.compare)
        saved = baselines.load_baseline(path)
        comparison = baselines.compare(saved, all_rows)
        print(baselines.format_comparison(comparison, args.compare))
        warning = baselines.load_warning(saved, all_rows)
        if warning:
            print(warning)
        if args.fail_on_regression and any(c.regressed for c in comparison):
            print("regression flagged (--fail-on-regression): exit 1")
            return 1
    if status == 0:
        print("regenerate BENCHMARKS.md from the CSVs with `resnas bench --report`")
    return status


def report_failures(failures: List[Failure], args) -> int:
    if not failures:
        return 0
    print(f"{len(failures)} failure(s), reported and skipped:", file=sys.stderr)
    for f in failures:
        print(f"  {f.where}: {f.error}", file=sys.stderr)
        if args.verbose and f.details:
            print("    " + f.details.replace("\n", "\n    "), file=sys.stderr)
    return 3 if args.strict else 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.threads is not None and args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        if args.budget is not None and not args.budget > 0:
            raise UsageError(f"--budget must be > 0 seconds, got {args.budget}")
        if args.quick and args.smoke:
            raise UsageError("--quick and --smoke are two profiles; give one")
        if args.fail_on_regression and not args.compare:
            raise UsageError("--fail-on-regression needs --compare NAME")
        for flag, name in (("--save-baseline", args.save_baseline), ("--compare", args.compare)):
            if name is not None:
                try:
                    baselines.check_name(name, flag)
                except ValueError as exc:
                    raise UsageError(str(exc)) from None
        out_dir = (args.out if args.out is not None else default_out()).resolve()
        if args.compare and not baselines.baseline_path(out_dir, args.compare).exists():
            raise UsageError(f"--compare {args.compare}: no baseline at "
                             f"{baselines.baseline_path(out_dir, args.compare)} (save one with --save-baseline)")
        if args.report:
            markdown = args.markdown if args.markdown is not None else report.default_paths()[1]
            if markdown is None:
                raise UsageError("--report needs --markdown FILE outside the repository checkout")
            if not out_dir.is_dir():
                raise UsageError(f"--out {out_dir} is not a directory of results")
            print(f"updated {report.update_markdown(markdown, out_dir)} from {out_dir}")
            return 0
        from resnas_kernels import use_backend

        threads_before = torch.get_num_threads()
        try:
            # A forced backend is undone when the run ends.
            with use_backend(args.backend) if args.backend is not None else contextlib.nullcontext():
                return run(args, out_dir)
        finally:
            torch.set_num_threads(threads_before)  # main() may be called in-process (tests): leave no pinning behind
    except UsageError as exc:
        print(f"resnas bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
