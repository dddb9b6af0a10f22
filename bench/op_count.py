"""Count the dispatcher calls one run of a callable makes: aten ops and resnas custom ops, nested calls included.

The op layer's host cost grows with the number of calls that cross the dispatcher, whatever their size: a view made
inside a C++ kernel (`narrow`, then `slice`, then `as_strided`) costs a dispatch each, like a GEMM. The profiler
records every call at every nesting level (a TorchDispatchMode would see only the outermost ones), so it counts
what the dispatcher actually does. Counts, not times: the profiler's own overhead does not matter here.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Tuple


@dataclass(frozen=True)
class OpCount:
    aten: int             # aten:: calls, nested ones included
    resnas: int           # resnas:: custom-op calls (the Python-registered ops and the C++ ext_* ops they call)
    top_aten: Tuple[Tuple[str, int], ...]  # the most frequent aten ops, most frequent first

    @property
    def total(self) -> int:
        return self.aten + self.resnas

    def summary(self, top: int = 3) -> str:
        """e.g. 'calls/step 48375 = aten 47863 + resnas 512 (as_strided 11851, slice 10091, narrow 10081)'."""
        names = ", ".join(f"{name.split('::', 1)[1]} {n}" for name, n in self.top_aten[:top])
        return f"calls/step {self.total} = aten {self.aten} + resnas {self.resnas} ({names})"


def count_op_calls(fn: Callable[[], Any]) -> OpCount:
    """Run `fn` once under the CPU profiler and count its aten:: and resnas:: calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = Counter(event.name for event in prof.events())
    aten = Counter({name: n for name, n in counts.items() if name.startswith("aten::")})
    resnas = sum(n for name, n in counts.items() if name.startswith("resnas::"))
    return OpCount(aten=sum(aten.values()), resnas=resnas, top_aten=tuple(aten.most_common(5)))
