"""The benchmark contract and the timers: what a case file builds and how the runner measures it.

A case file (`bench/cases/<name>.py`) exposes `cases(ctx) -> list[Case]`. Each `Case` names one workload (op, mode,
shape, dtype), says how much useful work it is (`flops`, `bytes`), and maps provider names ("ours", "masked",
"loop", "sdpa", ...) to zero-argument callables that do one full run. The harness does everything else: warm-up,
repeats, synchronisation, thread pinning, ceilings, CSV rows. A case whose set-up costs anything (models, large
tensors, torch.compile, agreement checks) is returned as a `LazyCase`: name, shape, dtype and provider names up front,
the rest built by its `build()` only when the case is measured, so `resnas bench --list` and `--case` filtering
build nothing.

Timing:
- CPU: `time_cpu_interleaved` for a case's providers: warm-up of each, then rounds that take one timed sample
  (`time.perf_counter`) of every provider, rotating which goes first, until they together have spent the time budget
  of each (at least `min_samples` each), so the VM's drift hits all providers alike and same-run ratios hold; very
  fast calls are batched several per sample so the timer's resolution does not dominate. `time_cpu` times one
  callable with the same loop (the ceilings). The garbage collector is off while timing. Reported: p20 / p50 / p80
  of ms per call. CPU inputs are not rotated: CPU numbers are warm-cache numbers (stated in BENCHMARKS.md).
- CUDA: `time_cuda`: `triton.testing.do_bench` (CUDA events, L2 flushed between repeats), and for small launches
  (fwd / infer cases whose median is under `SMALL_LAUNCH_MS`) also `do_bench_cudagraph`, which replays the calls in
  a CUDA graph and so removes launch overhead. Both are recorded; the CSV's `timer` column says which is which.
- Input rotation is the case's job: build several input sets with `rotation_copies` and cycle through them with
  `rotating`, so a small shape is not served from L2 on every repeat. Under CUDA-graph replay the rotation still
  works, because do_bench_cudagraph captures many successive calls of the callable in one graph.

FLOPs and bytes are those of OUR (ragged) work; every provider's time is divided by the same numbers, so GFLOP/s and
GB/s are "useful work per second" and a peer that computes padded columns gets no credit for them.
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["Case", "LazyCase", "Context", "Timing", "Ceilings", "MODES", "QUANTILES", "time_cpu",
           "time_cpu_interleaved", "time_cuda", "timer_for", "measure_ceilings", "rotating", "rotation_copies",
           "synchronize"]

MODES = ("fwd", "fwd+bwd", "infer", "train")
QUANTILES = (0.5, 0.2, 0.8)  # the order triton.testing returns them in
SMALL_LAUNCH_MS = 0.1        # under this median a CUDA call is launch-bound: also time it under CUDA-graph replay


@dataclass
class Context:
    """What a case file may look at when it builds its cases."""

    device: torch.device
    quick: bool = False   # quick shapes (the `resnas bench --quick` profile, under ~2 minutes on 2 CPU cores)
    threads: int = 1      # CPU threads the run is pinned to (torch.set_num_threads)
    smoke: bool = False   # optional: the smoke test only checks the harness runs; one small shape is enough


@dataclass
class Case:
    """One workload and the providers that compute it.

    Required: name ("<op>.<mode>", mode in MODES), shape (free text), dtype, flops (useful FLOPs of our ragged work),
    bytes (minimum bytes our op must move), providers (name -> zero-argument callable doing one full run).
    Optional:
        baseline: the provider ratios are taken against: time(peer) / time(baseline).
        op: registered op name of "ours", so the CSV records which backend actually ran (resolve_backend).
        items: samples processed per call (model throughput cases); adds an items_per_s metric.
        cuda_graph: None = also replay under a CUDA graph when the call is small and the mode is fwd / infer;
            True = always try it; False = never (e.g. the callable syncs with the host).
        backends: backend label per peer for the CSV (e.g. {"sdpa": "math"}); peers default to "torch".
        notes: free text kept in the CSV.
        skipped: optional peer -> why it is not among the providers (e.g. not installed); printed with the case's
            results and added to the CSV notes.
    """

    name: str
    shape: str
    dtype: str
    flops: int
    bytes: int
    providers: Dict[str, Callable[[], Any]]
    baseline: str = "ours"
    op: Optional[str] = None
    items: int = 0
    cuda_graph: Optional[bool] = None
    backends: Dict[str, str] = field(default_factory=dict)
    notes: str = ""
    skipped: Dict[str, str] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    def validate(self) -> None:
        """Raise a ValueError naming the offending field."""
        if not isinstance(self.name, str) or "." not in self.name:
            raise ValueError(f"Case.name must look like '<op>.<mode>', got {self.name!r}")
        if self.mode not in MODES:
            raise ValueError(f"Case.name {self.name!r}: mode {self.mode!r} must be one of {MODES}")
        for attr in ("flops", "bytes", "items"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"Case {self.name}: {attr} must be an int >= 0, got {value!r}")
        if not self.providers:
            raise ValueError(f"Case {self.name}: providers is empty")
        for provider, fn in self.providers.items():
            if not callable(fn):
                raise ValueError(f"Case {self.name}: provider {provider!r} is not callable")
        if self.baseline not in self.providers:
            raise ValueError(f"Case {self.name}: baseline {self.baseline!r} is not one of the providers "
                             f"{sorted(self.providers)}")

    @property
    def provider_names(self) -> Tuple[str, ...]:
        return tuple(self.providers)


class LazyCase:
    """A case declared by what `resnas bench --list` shows (name, shape, dtype, provider names), built only when
    needed: `build()` returns the `Case` (tensors, models, torch.compile, agreement checks), called once, the first
    time anything else is asked of it. Listing and `--case` filtering therefore build nothing; the runner builds each
    selected case just before measuring it. Anything not declared (providers, flops, validate(), ...) is read from the
    built Case, so a LazyCase can stand wherever a Case is used.
    """

    def __init__(self, name: str, shape: str, dtype: str, provider_names: Sequence[str], build: Callable[[], Case]):
        self.name, self.shape, self.dtype = name, shape, dtype
        self.provider_names = tuple(provider_names)
        self._build: Optional[Callable[[], Case]] = build
        self._case: Optional[Case] = None

    @property
    def mode(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def built(self) -> bool:
        return self._case is not None

    def case(self) -> Case:
        """The built Case (built on the first call; its name must be the declared one)."""
        if self._case is None:
            case = self._build()
            if not isinstance(case, Case) or case.name != self.name:
                raise ValueError(f"LazyCase {self.name!r}: build() must return a Case named {self.name!r}, got "
                                 f"{getattr(case, 'name', type(case).__name__)!r}")
            self._case, self._build = case, None  # drop the closure: it may hold the set-up's inputs
        return self._case

    def __getattr__(self, attr: str):
        if attr.startswith("_"):  # never build for private / special look-ups (copy, pickle, repr internals)
            raise AttributeError(attr)
        return getattr(self.case(), attr)

    def __repr__(self) -> str:
        return f"LazyCase({self.name!r}, {self.shape!r}, built={self.built})"


@dataclass
class Timing:
    """Milliseconds per call: p20 <= p50 <= p80 over `samples` timed samples (0 when the timer does not say)."""

    p20: float
    p50: float
    p80: float
    samples: int
    timer: str  # perf_counter | do_bench | do_bench_cudagraph


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------------
# CPU timer
# ---------------------------------------------------------------------------------------------------------------------
def _warm_up(fn: Callable[[], Any], warmup_s: float) -> float:
    """Seconds per call after a warm-up: the first calls allocate, fill caches, compile (torch.compile) and spin up the
    OpenMP pool. A call longer than the warm-up budget is its own warm-up (keeps slow cases affordable)."""
    t0 = time.perf_counter()
    fn()
    per_call = time.perf_counter() - t0
    if per_call < warmup_s:
        start = time.perf_counter()
        calls = 0
        while time.perf_counter() - start < warmup_s:
            fn()
            calls += 1
        per_call = (time.perf_counter() - start) / calls
    return per_call


def _calls_per_sample(per_call: float, min_sample_s: float) -> int:
    """A sample of at least min_sample_s: below ~1 ms, perf_counter's call overhead and scheduler jitter dominate."""
    return max(1, min(1000, math.ceil(min_sample_s / max(per_call, 1e-9))))


def _timing(samples: List[float], timer: str) -> Timing:
    p20, p50, p80 = np.percentile(np.asarray(samples) * 1e3, [20, 50, 80])
    return Timing(float(p20), float(p50), float(p80), len(samples), timer)


def time_cpu(fn: Callable[[], Any], budget_s: float = 1.0, warmup_s: float = 0.2, min_samples: int = 5,
             max_samples: int = 10_000, min_sample_s: float = 1e-3) -> Timing:
    """Time `fn` on the CPU: warm-up, then samples until `budget_s` is spent and `min_samples` are taken."""
    return _time_rounds({"fn": fn}, budget_s, warmup_s, min_samples, max_samples, min_sample_s, None,
                        "perf_counter")["fn"]


def time_cpu_interleaved(fns: Dict[str, Callable[[], Any]], budget_s: float = 1.0, warmup_s: float = 0.2,
                         min_samples: int = 5, max_samples: int = 10_000, min_sample_s: float = 1e-3,
                         on_error: Optional[Callable[[str, BaseException], None]] = None) -> Dict[str, Timing]:
    """Time several providers of one case on the CPU in interleaved rounds: each round takes one sample of every
    provider, starting from a different provider each round, until the providers together have spent `budget_s` each
    (as long as timing them one after another) and each has at least `min_samples` samples.

    Why: a shared VM's speed drifts by 10-30 % over seconds to minutes. Timed one after another, each provider gets
    its own stretch of that drift, and a ratio of two medians can be off by the drift (a provider measured 0.85x in one
    run and 1.36x interleaved minutes later). Interleaved, every provider sees the same mix of fast and slow moments,
    so same-run ratios hold. Each provider still gets its own warm-up and calls-per-sample.

    A provider that raises (in warm-up or later) is passed to `on_error(name, exc)` (re-raised when None) and
    dropped; the others go on. Returns name -> Timing (timer "perf_counter_interleaved") for the providers that ran.
    """
    return _time_rounds(fns, budget_s, warmup_s, min_samples, max_samples, min_sample_s, on_error,
                        "perf_counter_interleaved")


def _time_rounds(fns: Dict[str, Callable[[], Any]], budget_s: float, warmup_s: float, min_samples: int,
                 max_samples: int, min_sample_s: float, on_error: Optional[Callable[[str, BaseException], None]],
                 timer: str) -> Dict[str, Timing]:
    """The CPU sampling loop of `time_cpu` (one provider) and `time_cpu_interleaved` (several)."""
    inner: Dict[str, int] = {}
    for name, fn in fns.items():
        try:
            inner[name] = _calls_per_sample(_warm_up(fn, warmup_s), min_sample_s)
        except Exception as exc:  # noqa: BLE001 - reported through on_error
            if on_error is None:
                raise
            on_error(name, exc)
    names = list(inner)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    spent: Dict[str, float] = {name: 0.0 for name in names}
    # A collection in the middle of a sample is noise, not the op's cost. (No gc.collect() first: with torch, triton
    # and the models imported, a full collection takes seconds, and would cost minutes over a run.)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        rnd = 0
        while names:
            order = names[rnd % len(names):] + names[:rnd % len(names)]  # no provider always goes first
            rnd += 1
            for name in order:
                fn, n = fns[name], inner[name]
                try:
                    t0 = time.perf_counter()
                    for _ in range(n):
                        fn()
                    elapsed = time.perf_counter() - t0
                except Exception as exc:  # noqa: BLE001
                    if on_error is None:
                        raise
                    on_error(name, exc)
                    names.remove(name)
                    del samples[name]
                    continue
                samples[name].append(elapsed / n)
                spent[name] += elapsed
            # Every provider has a sample per round, so stop on the providers' total time: the run takes as long as
            # timing them one after another would (budget_s each), whatever their speed ratio.
            if names and (len(samples[names[0]]) >= max_samples or (
                    len(samples[names[0]]) >= min_samples and sum(spent[n] for n in names) >= budget_s * len(names))):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: _timing(samples[name], timer) for name in names}


# ---------------------------------------------------------------------------------------------------------------------
# CUDA timer (kept small on purpose: it runs only where a GPU is present)
# ---------------------------------------------------------------------------------------------------------------------
def time_cuda(fn: Callable[[], Any], budget_s: float = 1.0, graph: bool = False) -> Timing:
    """Time `fn` on the current CUDA device with triton.testing (median and p20/p80 of CUDA-event timings).

    graph=False: `do_bench`, which flushes L2 between repeats and includes launch overhead (what eager code sees).
    graph=True: `do_bench_cudagraph`, the calls replayed from one CUDA graph (the kernels' own time).
    """
    from triton.testing import do_bench, do_bench_cudagraph

    rep_ms = max(1, int(budget_s * 1e3))
    if graph:
        p50, p20, p80 = do_bench_cudagraph(fn, rep=rep_ms, quantiles=list(QUANTILES))
        return Timing(float(p20), float(p50), float(p80), 0, "do_bench_cudagraph")
    p50, p20, p80 = do_bench(fn, warmup=max(1, rep_ms // 4), rep=rep_ms, quantiles=list(QUANTILES))
    return Timing(float(p20), float(p50), float(p80), 0, "do_bench")


def timer_for(device: torch.device, budget_s: float, warmup_s: float, min_samples: int = 5
              ) -> Callable[[Callable[[], Any]], Timing]:
    """The eager timer for `device`, with the run's budgets bound in."""
    if torch.device(device).type == "cuda":
        return lambda fn: time_cuda(fn, budget_s=budget_s)
    return lambda fn: time_cpu(fn, budget_s=budget_s, warmup_s=warmup_s, min_samples=min_samples)


# ---------------------------------------------------------------------------------------------------------------------
# Input rotation
# ---------------------------------------------------------------------------------------------------------------------
def rotation_copies(bytes_per_set: int, device: torch.device, max_copies: int = 32) -> int:
    """How many input sets a case should build so that cycling through them does not stay in cache.

    CUDA: enough sets to cover three times the L2 (capped at `max_copies`). CPU: 1 (CPU timings are warm-cache).
    """
    device = torch.device(device)
    if device.type != "cuda" or bytes_per_set <= 0:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return int(max(1, min(max_copies, math.ceil(3 * l2 / bytes_per_set))))


def rotating(fn: Callable[..., Any], input_sets: Sequence[Sequence[Any]]) -> Callable[[], Any]:
    """A zero-argument callable that calls fn(*input_sets[i]) with i cycling through the sets, one per call."""
    if len(input_sets) == 0:
        raise ValueError("rotating needs at least one input set, got none")
    sets = [tuple(s) for s in input_sets]
    state = {"i": 0}

    def call():
        args = sets[state["i"]]
        state["i"] = (state["i"] + 1) % len(sets)
        return fn(*args)

    return call


# ---------------------------------------------------------------------------------------------------------------------
# Device ceilings: a large GEMM and a large copy timed in the same run, same timer, same threads
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Ceilings:
    gflops: float        # GEMM GFLOP/s at its median time
    gbps: float          # copy GB/s (bytes read + bytes written) at its median time
    gemm: str            # what was timed, e.g. "sgemm float32 2048^3"
    copy: str            # e.g. "copy 128 MiB float32"
    gemm_timing: Timing
    copy_timing: Timing
    gemm_flops: int
    copy_bytes: int


def measure_ceilings(device: torch.device, timer: Callable[[Callable[[], Any]], Timing], size: str = "full"
                     ) -> Ceilings:
    """Time a large GEMM (fp32 on CPU: the faster of BLAS and oneDNN; bf16 on CUDA) and a large copy; size is
    full | quick | smoke."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = {"full": 8192 if cuda else 2048, "quick": 4096 if cuda else 1024, "smoke": 256}[size]
    copy_mib = {"full": 1024 if cuda else 256, "quick": 1024 if cuda else 128, "smoke": 8}[size]
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    # On CPU torch.mm is the BLAS library (MKL here), which on AMD CPUs can trail oneDNN's fp32 matmul (the library
    # behind F.conv2d and inductor's packed linears) by 10-20 %: the ceiling is the faster of the two, so a kernel is
    # judged against the best fp32-exact GEMM the machine offers, not the slower library.
    gemms = {"": lambda: torch.mm(a, b, out=c)}
    onednn = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if not cuda else None
    if onednn is not None and torch.backends.mkldnn.is_available():
        bt = b.t().contiguous()  # (out, in) like a linear weight: onednn(a, bt) = a @ b
        gemms[" (oneDNN)"] = lambda: onednn(a, bt, None, "none", [], "")
    timings = {lib: timer(fn) for lib, fn in gemms.items()}
    lib = min(timings, key=lambda k: timings[k].p50)
    gemm_timing = timings[lib]
    del a, b, c, gemms
    numel = copy_mib * 2**20 // 4
    src = torch.ones(numel, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_timing = timer(lambda: dst.copy_(src))
    del src, dst
    gemm_flops = 2 * n ** 3
    copy_bytes = 2 * numel * 4
    name = "sgemm" if dtype == torch.float32 else "gemm"
    return Ceilings(gflops=gemm_flops / (gemm_timing.p50 * 1e-3) / 1e9, gbps=copy_bytes / (copy_timing.p50 * 1e-3) / 1e9,
                    gemm=f"{name} {str(dtype).replace('torch.', '')} {n}^3{lib}", copy=f"copy {copy_mib} MiB float32",
                    gemm_timing=gemm_timing, copy_timing=copy_timing, gemm_flops=gemm_flops, copy_bytes=copy_bytes)
