"""Argument checks shared by the public op functions: every message names the argument and what was expected."""
from typing import Sequence

import torch


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float_tensor(t, name: str, dtypes: Sequence[torch.dtype], min_dim: int = 1, contiguous: bool = True) -> None:
    check_tensor(t, name)
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
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
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_same_device(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b} must be on the same device as {name_a}: {name_a} is on {a.device}, "
                         f"{name_b} is on {b.device}")
