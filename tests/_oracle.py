"""Shared comparison rule for kernels against the reference oracle.

Tolerance rule (after FlashAttention's tests): the oracle is the reference evaluated in fp64. A kernel output in
dtype D passes if its max error against the oracle is at most `factor` times the error of the reference evaluated in
D itself (same math, PyTorch ops, dtype D), plus a floor of a few ulps of D at the oracle's magnitude. So the bound
scales with the dtype's precision and with the conditioning of the particular input, instead of a magic atol: a
kernel may round differently from PyTorch, but not be materially less accurate. factor = 2 for outputs, 3 for
gradients (one more accumulation), as FlashAttention uses.
"""
from typing import Optional

import torch

ULP_FLOOR = 8  # ulps of the dtype at the oracle's max magnitude


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_oracle(actual: torch.Tensor, oracle: torch.Tensor, same_dtype_ref: torch.Tensor, name: str,
                           factor: float = 2.0, same_dtype_err: Optional[float] = None) -> None:
    """same_dtype_err: the same-dtype reference's error when measured over several rounding samples (the caller's
    largest); default: max_err(same_dtype_ref, oracle), one sample."""
    assert actual.shape == oracle.shape, f"{name}: shape {tuple(actual.shape)} != oracle {tuple(oracle.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    eps = torch.finfo(actual.dtype).eps
    scale = max(1.0, oracle.abs().max().item()) if oracle.numel() else 1.0
    ref_err = max_err(same_dtype_ref, oracle) if same_dtype_err is None else same_dtype_err
    bound = factor * ref_err + ULP_FLOOR * eps * scale
    err = max_err(actual, oracle)
    assert err <= bound, f"{name}: max error {err:.3e} exceeds bound {bound:.3e} ({actual.dtype})"
