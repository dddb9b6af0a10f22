"""The ragged-batch contract shared by every op.

A batch of B samples is split into G contiguous groups of sizes b_g (sum B; a size may be 0). Group g runs its own
sub-network, so for a given op it has one active width w_g (channels, hidden units or heads). Activations stay in one
padded tensor, e.g. (B, N, C_max): the rows of group g use only their first w_g columns, and **the columns beyond w_g
are exactly zero in every op's output**. The padded tensor therefore equals both the original ViT-ResNAS code's masked
full-width activations and each sliced sub-network's activations zero-padded.

`Ragged` holds that metadata as host-side tuples (launching a kernel never syncs with the device) and hands kernels a
cached device copy. It is immutable and hashable, so it can key caches and be shared by all layers of a stage.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple

import torch

__all__ = ["Ragged"]


def _as_int_tuple(values: Iterable[int], name: str) -> Tuple[int, ...]:
    if isinstance(values, torch.Tensor):
        raise TypeError(f"{name} must be a sequence of Python ints (host-side metadata, so launching needs no device "
                        f"sync), got a tensor; use {name}.tolist() once, outside the hot loop")
    try:
        out = tuple(values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}") from None
    for i, v in enumerate(out):
        if isinstance(v, bool) or not hasattr(v, "__index__"):  # ints and numpy ints; not floats or bools
            raise TypeError(f"{name}[{i}] must be an int, got {type(v).__name__} ({v!r})")
    out = tuple(int(v) for v in out)
    for i, v in enumerate(out):
        if v < 0:
            raise ValueError(f"{name}[{i}] must be >= 0, got {v}")
    return out


@dataclass(frozen=True)
class Ragged:
    """Contiguous groups of a batch and each group's active width for one op.

    Args:
        sizes: samples per group, b_g >= 0; group g owns samples [sum(sizes[:g]), sum(sizes[:g+1])) of dim 0.
        widths: active width per group, w_g >= 0 (channels, hidden units or heads, depending on the op). Width 0
            means the group skips the op: its rows are all zeros in the output and cost nothing.
    """

    sizes: Tuple[int, ...]
    widths: Tuple[int, ...]

    def __post_init__(self):
        sizes = _as_int_tuple(self.sizes, "sizes")
        widths = _as_int_tuple(self.widths, "widths")
        if len(sizes) == 0:
            raise ValueError("sizes must name at least one group, got an empty sequence")
        if len(widths) != len(sizes):
            raise ValueError(f"widths must have one entry per group: len(sizes)={len(sizes)}, len(widths)={len(widths)}")
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "widths", widths)

    # -- construction helpers -------------------------------------------------------------------------------------
    @classmethod
    def uniform(cls, batch: int, width: int) -> "Ragged":
        """One group covering the whole batch at one width (the plain, non-ragged case)."""
        return cls((batch,), (width,))

    def with_widths(self, widths: Sequence[int]) -> "Ragged":
        """Same partition of the batch, another op's widths (e.g. a linear layer's output widths)."""
        return Ragged(self.sizes, tuple(widths))

    # -- derived facts ----------------------------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return len(self.sizes)

    @property
    def batch(self) -> int:
        return sum(self.sizes)

    @property
    def max_width(self) -> int:
        return max(self.widths)

    @property
    def offsets(self) -> Tuple[int, ...]:
        """Sample offsets, length G + 1: group g owns samples [offsets[g], offsets[g+1])."""
        out = [0]
        for s in self.sizes:
            out.append(out[-1] + s)
        return tuple(out)

    def row_counts(self, rows_per_sample: int) -> Tuple[int, ...]:
        """Rows per group once every sample is flattened to `rows_per_sample` rows (e.g. N tokens)."""
        return tuple(s * rows_per_sample for s in self.sizes)

    def active_elements(self, rows_per_sample: int = 1) -> int:
        """sum_g b_g * rows_per_sample * w_g: the work a ragged kernel does, in row-elements."""
        return sum(s * w for s, w in zip(self.sizes, self.widths)) * rows_per_sample

    def sample_widths(self) -> Tuple[int, ...]:
        """Width of every sample of the batch (length B)."""
        return tuple(w for s, w in zip(self.sizes, self.widths) for _ in range(s))

    def mask(self, max_width: int, device=None, dtype=torch.bool) -> torch.Tensor:
        """(B, max_width) mask with the first w_g columns of group g's samples set: the original code's mask."""
        widths = torch.tensor(self.sample_widths(), device=device, dtype=torch.long)
        cols = torch.arange(max_width, device=device)
        return (cols[None, :] < widths[:, None]).to(dtype)

    # -- validation -------------------------------------------------------------------------------------------------
    def check(self, batch: int, max_width: int, *, arg: str = "x", what: str = "widths") -> None:
        """Raise a ValueError naming the argument if this metadata does not fit a tensor of `batch` samples whose
        ragged dimension is `max_width` wide."""
        if self.batch != batch:
            raise ValueError(f"sum of group sizes ({self.batch}, sizes={self.sizes}) must equal the batch size of "
                             f"{arg} ({batch})")
        too_wide = [(g, w) for g, w in enumerate(self.widths) if w > max_width]
        if too_wide:
            g, w = too_wide[0]
            raise ValueError(f"{what}[{g}]={w} exceeds the maximum width {max_width} of {arg}; {what} must lie in "
                             f"[0, {max_width}]")

    # -- device copy for kernels -------------------------------------------------------------------------------------
    def row_table(self, rows_per_sample: int, device: torch.device) -> torch.Tensor:
        """int32 (G, 3) device tensor [row_start, row_end, width] per group, cached per (metadata, device).

        Kernels read it to find their group; it is built once per distinct architecture and device, so steady-state
        launches copy nothing to the device.
        """
        return _row_table(self.sizes, self.widths, int(rows_per_sample), str(torch.device(device)))

    def __repr__(self) -> str:
        return f"Ragged(sizes={self.sizes}, widths={self.widths})"


@functools.lru_cache(maxsize=512)
def _row_table(sizes: Tuple[int, ...], widths: Tuple[int, ...], rows_per_sample: int, device: str) -> torch.Tensor:
    starts, rows = [], 0
    for s in sizes:
        starts.append(rows)
        rows += s * rows_per_sample
    ends = starts[1:] + [rows]
    table = torch.tensor(list(zip(starts, ends, widths)), dtype=torch.int32)
    return table.to(device)


def check_same_partition(a: Ragged, b: Ragged, name_a: str, name_b: str) -> None:
    """Two Ragged objects that describe the same batch must split it identically."""
    if a.sizes != b.sizes:
        raise ValueError(f"{name_a} and {name_b} must split the batch into the same groups: "
                         f"{name_a}.sizes={a.sizes} vs {name_b}.sizes={b.sizes}")


def as_ragged(groups: Optional[Ragged], batch: int, width: int) -> Ragged:
    """`None` means one group over the whole batch at full width."""
    if groups is None:
        return Ragged.uniform(batch, width)
    if not isinstance(groups, Ragged):
        raise TypeError(f"groups must be a resnas_kernels.Ragged, got {type(groups).__name__}")
    return groups
