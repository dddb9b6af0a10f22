"""The ragged-batch contract shared by every op, and its metadata tables.

A batch of B samples is split into G contiguous groups of sizes b_g (sum B; a size may be 0). Group g runs its own
sub-network, so for a given op it has one active width w_g (channels, hidden units or heads). Activations stay in one
padded tensor, e.g. (B, N, C_max): the rows of group g use only their first w_g columns, and **the columns beyond w_g
are exactly zero in every op's output**. The padded tensor therefore equals both the original ViT-ResNAS code's masked
full-width activations and each sliced sub-network's activations zero-padded.

Architecture as data. The group sizes are static: host ints that fix every shape and grid. The widths are data: every
op takes them as a small int32 tensor (G,) on the activations' device, so a new sampled architecture is a new tensor
value, never a new host constant (torch.compile does not recompile, a captured CUDA graph replays, nothing syncs).
`Ragged(sizes, widths)` accepts either form:

- host widths (a sequence of ints): the convenience for users and tests; values are checked on the host and the ops
  get a cached device copy (`widths_tensor`), copied once per distinct architecture and device;
- device widths (a 1-D int32 tensor): the contract itself; what a supernet passes (rows of one architecture tensor).

Values of a widths tensor are checked on the host only when that costs no device sync: on CPU tensors, or anywhere
with `set_validate_metadata(True)` / `RESNAS_VALIDATE_METADATA=1` (a debug switch; it syncs). Kernels never trust
them: every backend clamps a width to [0, bound] (bound = the tensor's ragged dimension), so no value can address
memory outside the tensors.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch

from .config import set_validate_metadata, validate_metadata

__all__ = ["Ragged", "set_validate_metadata", "validate_metadata"]

WIDTH_DTYPE = torch.int32  # dtype of every widths tensor the ops accept

def _as_int_tuple(values: Iterable[int], name: str) -> Tuple[int, ...]:
    if isinstance(values, torch.Tensor):
        raise TypeError(f"{name} must be a sequence of Python ints (host-side: they fix shapes and grids), got a "
                        f"tensor; use {name}.tolist() once, outside the hot loop")
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


def _is_fake(t: torch.Tensor) -> bool:
    """True for tensors without values (fake / meta tensors of torch.compile tracing)."""
    from torch._subclasses.fake_tensor import is_fake
    return t.device.type == "meta" or is_fake(t)


def check_widths_tensor(widths: torch.Tensor, num_groups: int, device: torch.device, bound: int, *,
                        name: str = "widths", tensor_name: str = "x") -> None:
    """The checks of a device widths tensor: dtype int32, shape (G,), on the activations' device; values in
    [0, bound] when they can be read without a device sync (CPU) or when `validate_metadata()` is on."""
    if not isinstance(widths, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(widths).__name__}")
    if widths.dtype != WIDTH_DTYPE:
        raise TypeError(f"{name} must be an int32 tensor (device metadata), got dtype {widths.dtype}")
    if widths.dim() != 1 or widths.shape[0] != num_groups:
        raise ValueError(f"{name} must have shape ({num_groups},) (one width per group, len(sizes)={num_groups}), "
                         f"got {tuple(widths.shape)}")
    if widths.device != torch.device(device):
        raise ValueError(f"{name} must be on the same device as {tensor_name}: {tensor_name} is on {device}, {name} "
                         f"is on {widths.device}")
    # is_compiling first: Dynamo cannot trace _is_fake (torch._subclasses is on its skip list).
    if (widths.device.type == "cpu" or validate_metadata()) and not torch.compiler.is_compiling() \
            and not _is_fake(widths):
        values = widths.tolist()
        for g, w in enumerate(values):
            if w < 0 or w > bound:
                raise ValueError(f"{name}[{g}]={w} must lie in [0, {bound}] (the bound of {tensor_name})")


@dataclass(frozen=True, eq=False)
class Ragged:
    """Contiguous groups of a batch and each group's active width for one op.

    Args:
        sizes: samples per group, b_g >= 0; group g owns samples [sum(sizes[:g]), sum(sizes[:g+1])) of dim 0.
            Host ints: they fix shapes and grids.
        widths: active width per group, w_g >= 0 (channels, hidden units or heads, depending on the op). Width 0
            means the group skips the op: its rows are all zeros in the output and cost nothing. Either host ints or
            a 1-D int32 tensor of G entries on the activations' device (device metadata: see the module docstring).

    Equality and hashing: host metadata compares by value; device metadata by the identity of its tensor.
    """

    sizes: Tuple[int, ...]
    widths: Union[Tuple[int, ...], torch.Tensor]

    def __post_init__(self):
        sizes = _as_int_tuple(self.sizes, "sizes")
        if len(sizes) == 0:
            raise ValueError("sizes must name at least one group, got an empty sequence")
        if isinstance(self.widths, torch.Tensor):
            widths = self.widths
            if widths.dtype != WIDTH_DTYPE:
                raise TypeError(f"widths must be an int32 tensor (device metadata) or a sequence of ints, got a "
                                f"{widths.dtype} tensor")
            if widths.dim() != 1 or widths.shape[0] != len(sizes):
                raise ValueError(f"widths must have one entry per group: len(sizes)={len(sizes)}, widths has shape "
                                 f"{tuple(widths.shape)}")
        else:
            widths = _as_int_tuple(self.widths, "widths")
            if len(widths) != len(sizes):
                raise ValueError(f"widths must have one entry per group: len(sizes)={len(sizes)}, "
                                 f"len(widths)={len(widths)}")
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "widths", widths)

    def _key(self):
        return (self.sizes, id(self.widths) if self.on_device else self.widths)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Ragged):
            return NotImplemented
        if self.on_device or other.on_device:
            return self.sizes == other.sizes and self.widths is other.widths
        return self.sizes == other.sizes and self.widths == other.widths

    def __hash__(self) -> int:
        return hash(self._key())

    # -- construction helpers -------------------------------------------------------------------------------------
    @classmethod
    def uniform(cls, batch: int, width: int) -> "Ragged":
        """One group covering the whole batch at one width (the plain, non-ragged case)."""
        return cls((batch,), (width,))

    def with_widths(self, widths) -> "Ragged":
        """Same partition of the batch, another op's widths (e.g. a linear layer's output widths)."""
        return Ragged(self.sizes, widths if isinstance(widths, torch.Tensor) else tuple(widths))

    # -- derived facts ----------------------------------------------------------------------------------------------
    @property
    def on_device(self) -> bool:
        """True when the widths are a tensor (device metadata): no host value may be read from them."""
        return isinstance(self.widths, torch.Tensor)

    @property
    def num_groups(self) -> int:
        return len(self.sizes)

    @property
    def batch(self) -> int:
        return sum(self.sizes)

    @property
    def host_widths(self) -> Tuple[int, ...]:
        """The widths as host ints. Device metadata has none (reading them would sync): a clear error instead."""
        if self.on_device:
            raise ValueError("these widths are device metadata (a tensor); host values are not available without a "
                             "device sync. Use the op's static bound, or Ragged(sizes, widths.tolist()) outside the "
                             "hot path")
        return self.widths

    @property
    def max_width(self) -> int:
        return max(self.host_widths)

    @property
    def offsets(self) -> Tuple[int, ...]:
        """Sample offsets, length G + 1: group g owns samples [offsets[g], offsets[g+1])."""
        return _offsets(self.sizes)

    def row_counts(self, rows_per_sample: int) -> Tuple[int, ...]:
        """Rows per group once every sample is flattened to `rows_per_sample` rows (e.g. N tokens)."""
        return tuple(s * rows_per_sample for s in self.sizes)

    def active_elements(self, rows_per_sample: int = 1) -> int:
        """sum_g b_g * rows_per_sample * w_g: the work a ragged kernel does, in row-elements (host widths only)."""
        return sum(s * w for s, w in zip(self.sizes, self.host_widths)) * rows_per_sample

    def sample_widths(self) -> Tuple[int, ...]:
        """Width of every sample of the batch (length B; host widths only)."""
        return tuple(w for s, w in zip(self.sizes, self.host_widths) for _ in range(s))

    def sample_width_tensor(self, device) -> torch.Tensor:
        """(B,) int32 width of every sample, on `device`, without a device sync (gathered by the cached group index)."""
        return self.widths_tensor(device)[sample_group_index(self.sizes, device)]

    def mask(self, max_width: int, device=None, dtype=torch.bool) -> torch.Tensor:
        """(B, max_width) mask with the first w_g columns of group g's samples set: the original code's mask."""
        device = torch.device(device) if device is not None else (
            self.widths.device if self.on_device else torch.device("cpu"))
        widths = self.sample_width_tensor(device)
        cols = torch.arange(max_width, device=device)
        return (cols[None, :] < widths[:, None]).to(dtype)

    # -- validation -------------------------------------------------------------------------------------------------
    def check(self, batch: int, max_width: int, *, arg: str = "x", what: str = "widths",
              device: Optional[torch.device] = None) -> None:
        """Raise a ValueError naming the argument if this metadata does not fit a tensor of `batch` samples whose
        ragged dimension is `max_width` wide (on `device`, for device metadata)."""
        if self.batch != batch:
            raise ValueError(f"sum of group sizes ({self.batch}, sizes={self.sizes}) must equal the batch size of "
                             f"{arg} ({batch})")
        if self.on_device:
            check_widths_tensor(self.widths, self.num_groups, device if device is not None else self.widths.device,
                                max_width, name=what, tensor_name=arg)
            return
        too_wide = [(g, w) for g, w in enumerate(self.widths) if w > max_width]
        if too_wide:
            g, w = too_wide[0]
            raise ValueError(f"{what}[{g}]={w} exceeds the maximum width {max_width} of {arg}; {what} must lie in "
                             f"[0, {max_width}]")

    # -- device tables for kernels -------------------------------------------------------------------------------------
    def widths_tensor(self, device) -> torch.Tensor:
        """int32 (G,) widths on `device`: the tensor itself for device metadata, else a cached copy of the host
        values (one copy per distinct architecture and device, so steady-state launches copy nothing)."""
        if self.on_device:
            return self.widths
        return _widths_tensor(self.widths, str(torch.device(device)))

    def __repr__(self) -> str:
        widths = f"tensor({self.widths.tolist() if not _is_fake(self.widths) else '?'})" if self.on_device \
            else self.widths
        return f"Ragged(sizes={self.sizes}, widths={widths})"


# ---------------------------------------------------------------------------------------------------------------------
# Metadata tables: every op builds its device tables here, from the static sizes (cached per device)
# ---------------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1024)
def _offsets(sizes: Tuple[int, ...]) -> Tuple[int, ...]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return tuple(out)


@functools.lru_cache(maxsize=512)
def _widths_tensor(widths: Tuple[int, ...], device: str) -> torch.Tensor:
    return torch.tensor(widths, dtype=WIDTH_DTYPE).to(device)


def row_starts(sizes: Sequence[int], rows_per_sample: int, device) -> torch.Tensor:
    """int32 (G + 1,) first row of every group (and the total) once samples are flattened to `rows_per_sample` rows;
    cached per (sizes, rows, device), so it is a static input of every launch."""
    return _row_starts(tuple(sizes), int(rows_per_sample), str(torch.device(device)))


@functools.lru_cache(maxsize=512)
def _row_starts(sizes: Tuple[int, ...], rows_per_sample: int, device: str) -> torch.Tensor:
    starts = [o * rows_per_sample for o in _offsets(sizes)]
    if starts[-1] >= 2 ** 31:
        raise ValueError(f"{starts[-1]} rows do not fit the int32 row table")
    return torch.tensor(starts, dtype=torch.int32).to(device)


def sample_group_index(sizes: Sequence[int], device) -> torch.Tensor:
    """int64 (B,) group of every sample, cached: `widths[sample_group_index(...)]` spreads per-group values over the
    batch on the device (no sync, unlike repeat_interleave with tensor repeats)."""
    return _sample_group_index(tuple(sizes), str(torch.device(device)))


@functools.lru_cache(maxsize=512)
def _sample_group_index(sizes: Tuple[int, ...], device: str) -> torch.Tensor:
    return torch.tensor([g for g, s in enumerate(sizes) for _ in range(s)], dtype=torch.long).to(device)


def as_ragged(groups: Optional[Ragged], batch: int, width: int) -> Ragged:
    """`None` means one group over the whole batch at full width."""
    if groups is None:
        return Ragged.uniform(batch, width)
    if not isinstance(groups, Ragged):
        raise TypeError(f"groups must be a resnas_kernels.Ragged, got {type(groups).__name__}")
    return groups
