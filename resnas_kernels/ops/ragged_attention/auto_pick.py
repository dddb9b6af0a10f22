"""Per-shape choice between interchangeable GPU implementations, measured once on first use (auto dispatch uses
whichever wins per shape).

Used by `ragged_attention`'s forward on CUDA under the auto backend, to choose between the CUDA C++ small-N forward and
the Triton forward. Not used on CPU (one CPU implementation) nor when a backend is forced (`set_backend`,
`config.set_backend`): forcing always wins.

How a choice is made, for a key (the op's shape bucket, dtype, bias kind, device name, library versions):
1. `override` (a getter such as `config.attention_fwd`: RESNAS_ATTENTION_FWD=triton|cuda|auto) names a candidate:
   use it ("auto": go on).
2. The in-process cache has the key: use its winner.
3. The on-disk cache (JSON at `cache_path()`, by default `config.autotune_cache()`: RESNAS_AUTOTUNE_CACHE; only
   when it names a file) has the key: use it.
4. Otherwise measure: every candidate runs `warmup` times, then `reps` times under the timer (CUDA events by
   default, on the current stream, after a synchronize); the lowest median wins, and a candidate must beat the
   default (the first one) by more than `margin` (5%) to be picked, so noise does not flip a tie. The decision is
   stored in both caches. A candidate that raises is dropped from the measurement (and the error kept in `why`).
   When measuring is impossible (CUDA graph capture in progress), the default is used without caching.
The inputs of the real call are reused for the measurement: the candidates must be pure (no mutation of their inputs),
which forward kernels are. Measuring costs (warmup + reps) calls of each candidate, once per key per process.
"""
from __future__ import annotations

import json
import statistics
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from ... import config

from resnas_kernels._atomic import atomic_write

Timer = Callable[[Callable[[], object]], float]  # runs fn once, returns its duration in seconds


def cuda_event_timer(fn: Callable[[], object]) -> float:
    """Duration of one call of fn on the current CUDA stream, by CUDA events (seconds)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3


@dataclass
class Decision:
    winner: str
    times: Dict[str, float]         # median seconds per measured candidate (empty when not measured)
    source: str                     # "override", "memory", "disk", "measured" or "default"
    why: Dict[str, str] = field(default_factory=dict)  # candidates dropped, with the reason


class AutoPicker:
    """Chooses among `candidates` (names; the first is the default) per key; see the module docstring.

    timer, sync and can_measure are injectable so the decision logic is testable without a GPU.
    """

    def __init__(self, name: str, candidates: Sequence[str], *, override: Optional[Callable[[], str]] = None,
                 timer: Optional[Timer] = None, sync: Optional[Callable[[], None]] = None,
                 can_measure: Optional[Callable[[], bool]] = None, warmup: int = 2, reps: int = 7,
                 margin: float = 0.05, cache_path: Callable[[], Optional[str]] = config.autotune_cache):
        if len(candidates) < 1:
            raise ValueError("candidates must name at least one implementation")
        self.name = name
        self.candidates = tuple(candidates)
        self.override = override
        self.timer = timer or cuda_event_timer
        self.sync = sync or (lambda: torch.cuda.synchronize() if torch.cuda.is_available() else None)
        self.can_measure = can_measure or _not_capturing
        self.warmup, self.reps, self.margin = warmup, reps, margin
        self.cache_path = cache_path
        self._memory: Dict[Hashable, Decision] = {}
        self._lock = threading.Lock()

    # -- public ------------------------------------------------------------------------------------------------------
    def pick(self, key: Hashable, runners: Dict[str, Callable[[], object]]) -> Decision:
        """The candidate to run for `key`; `runners[name]()` runs candidate `name` on the real inputs (used only when
        measuring). Candidates missing from `runners` cannot run this call and are never picked."""
        available = [c for c in self.candidates if c in runners]
        if not available:
            raise ValueError(f"{self.name}: no runnable candidate among {self.candidates}")
        forced = self._override()
        if forced is not None:
            if forced not in available:
                raise ValueError(f"{self.name}: the override names {forced!r}, which cannot run this call "
                                 f"(runnable here: {available})")
            return Decision(forced, {}, "override")
        if len(available) == 1:
            return Decision(available[0], {}, "default")
        full_key = (self.name, key, tuple(available))
        with self._lock:
            hit = self._memory.get(full_key)
        if hit is not None:
            return Decision(hit.winner, hit.times, "memory", hit.why)
        disk = self._disk_get(full_key)
        if disk is not None and disk in available:
            decision = Decision(disk, {}, "disk")
            with self._lock:
                self._memory[full_key] = decision
            return decision
        if not self.can_measure():
            return Decision(available[0], {}, "default")
        decision = self._measure(available, runners)
        with self._lock:
            self._memory[full_key] = decision
        self._disk_put(full_key, decision.winner)
        return decision

    def clear(self) -> None:
        """Forget the in-process decisions (the disk cache is left alone)."""
        with self._lock:
            self._memory.clear()

    def decisions(self) -> Dict[Hashable, Decision]:
        with self._lock:
            return dict(self._memory)

    # -- internals ---------------------------------------------------------------------------------------------------
    def _override(self) -> Optional[str]:
        if self.override is None:
            return None
        value = self.override()
        if value == "auto":
            return None
        if value not in self.candidates:
            raise ValueError(f"{self.name}: the override must be one of auto, {', '.join(self.candidates)}; "
                             f"got {value!r}")
        return value

    def _measure(self, available: List[str], runners: Dict[str, Callable[[], object]]) -> Decision:
        times: Dict[str, float] = {}
        why: Dict[str, str] = {}
        for name in available:
            try:
                for _ in range(self.warmup):  # compiles / loads the kernel, warms the caches
                    runners[name]()
                self.sync()
                times[name] = statistics.median(self.timer(runners[name]) for _ in range(self.reps))
            except Exception as exc:  # noqa: BLE001 - a candidate that fails here is simply not chosen
                why[name] = f"{type(exc).__name__}: {exc}"
        if not times:
            raise RuntimeError(f"{self.name}: every candidate failed: {why}")
        default = available[0]
        best = min(times, key=lambda n: (times[n], available.index(n)))
        if default in times and best != default and times[best] > (1.0 - self.margin) * times[default]:
            best = default  # within the noise margin of the default: keep the default
        return Decision(best, times, "measured", why)

    def _disk_path(self) -> Optional[str]:
        return self.cache_path() or None

    def _disk_get(self, full_key) -> Optional[str]:
        path = self._disk_path()
        if path is None:
            return None
        try:
            with open(path) as f:
                return json.load(f).get(repr(full_key))
        except (OSError, ValueError):
            return None  # missing or unreadable cache: measure again

    def _disk_put(self, full_key, winner: str) -> None:
        path = self._disk_path()
        if path is None:
            return
        with self._lock:
            try:
                with open(path) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                data = {}
            data[repr(full_key)] = winner
            try:  # atomic: concurrent processes never read half a file
                atomic_write(path, lambda f: json.dump(data, f, indent=1, sort_keys=True), binary=False)
            except OSError:
                pass  # a read-only cache location only costs a re-measurement next process


def _not_capturing() -> bool:
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def bucket(n: int) -> int:
    """Batch-size bucket for keys: the next power of two (a new batch size rarely changes the winner)."""
    return 1 << max(0, int(n) - 1).bit_length()


def versions() -> Tuple[str, ...]:
    """Part of every disk key: a new torch / triton may change which kernel wins."""
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    return (torch.__version__, tv)
