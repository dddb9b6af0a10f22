"""Argument checks shared by the public op functions: every message names the argument and what was expected."""
from typing import Sequence

import torch

from ..ragged import Ragged


def _dtype_names(dtypes: Sequence[torch.dtype]):
    return list(dict.fromkeys(str(d) for d in dtypes))  # once each: (x.dtype, float32) may name float32 twice


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float_tensor(t, name: str, dtypes: Sequence[torch.dtype], min_dim: int = 1, contiguous: bool = True) -> None:
    check_tensor(t, name)
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {_dtype_names(dtypes)}, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()}); "
                         f"call .contiguous() first")


def check_vector(t, name: str, length: int, dtypes: Sequence[torch.dtype]) -> None:
    check_tensor(t, name)
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {_dtype_names(dtypes)}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_same_device(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b} must be on the same device as {name_a}: {name_a} is on {a.device}, "
                         f"{name_b} is on {b.device}")


def check_groups(groups: Ragged, batch: int, max_width: int, *, batch_of: str, width_of: str,
                 what: str = "widths") -> Ragged:
    """The metadata check of every op (public functions and the registered custom ops alike, on every backend):
    sum(sizes) must equal dim 0 of `batch_of` and every width lie in [0, max_width] (the bound of `width_of`); the
    group count and the signs were checked when `groups` was built. Host tuples only: no device sync."""
    if groups.batch != batch:
        raise ValueError(f"sum of group sizes ({groups.batch}, sizes={groups.sizes}) must equal the batch size of "
                         f"{batch_of} (dim 0: {batch})")
    groups.check(batch, max_width, arg=width_of, what=what)
    return groups


def op_groups(sizes, widths, batch: int, max_width: int, *, batch_of: str, width_of: str,
              what: str = "widths") -> Ragged:
    """`check_groups` for a custom op's list arguments (a direct `torch.ops.resnas.*` call is checked like a public
    one): builds the Ragged, which names `sizes` / `widths` when their lengths differ or a value is negative."""
    return check_groups(Ragged(tuple(sizes), tuple(widths)), batch, max_width, batch_of=batch_of, width_of=width_of,
                        what=what)
