"""Residual spatial reduction (RSR): the ragged block between ViT-ResNAS stages.

Spec: `resnas_kernels.reference.residual_spatial_reduction` (the oracle; vit_resnas.md section 2).

Status: this file fixes the public API and argument checks; the computation currently runs through the reference
(stock functional ops per group). The fused path (token-layout im2col with the LayerNorm applied, the conv as a
ragged GEMM with K = 9 * c_in,g, and a fused pooling/pos-embed/cls epilogue) is issue #6.
"""
from typing import Optional, Sequence, Tuple

import torch

from ..ragged import Ragged, as_ragged
from ..reference.rsr import residual_spatial_reduction as _reference_rsr
from ..reference.rsr import rsr_output_grid
from ._checks import check_float_tensor, check_same_device, check_tensor

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_param(t, name: str, shape: Tuple[int, ...], x: torch.Tensor) -> None:
    check_tensor(t, name)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{name} must have x's dtype ({x.dtype}) or float32, got {t.dtype}")
    check_same_device(x, t, "x", name)


def residual_spatial_reduction(x: torch.Tensor, in_groups: Optional[Ragged], out_widths: Sequence[int],
                               ln_weight: torch.Tensor, ln_bias: torch.Tensor, conv_weight: torch.Tensor,
                               conv_bias: torch.Tensor, pos_embed: torch.Tensor,
                               cls_weight: Optional[torch.Tensor] = None, cls_bias: Optional[torch.Tensor] = None, *,
                               grid: Tuple[int, int], has_cls: bool = True, eps: float = 1e-6, kernel_size: int = 3,
                               stride: int = 2, padding: int = 1) -> torch.Tensor:
    """Ragged RSR from c_in,g to c_out,g >= c_in,g channels per group; see the reference for the exact spec.

    Args:
        x: (B, has_cls + H*W, Ci_max) contiguous, zero beyond each group's input width.
        in_groups: Ragged(sizes, c_in widths) over dim 0 (None: one group at full width).
        out_widths: c_out,g per group (a sequence, or a Ragged with the same sizes), c_in,g <= c_out,g <= Co_max.
        ln_weight, ln_bias: (Ci_max,); conv_weight: (Co_max, Ci_max, k, k); conv_bias: (Co_max,);
        pos_embed: (1, Ho*Wo, Co_max); cls_weight: (Co_max, Ci_max) and cls_bias: (Co_max,) when has_cls.
        grid: (H, W) of the input patch tokens; Ho, Wo = ceil(H / stride), ceil(W / stride).
    Returns:
        (B, has_cls + Ho*Wo, Co_max), zero beyond c_out,g.
    """
    check_float_tensor(x, "x", _FLOAT_DTYPES, min_dim=3)
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, tokens, C), got {tuple(x.shape)}")
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(v, int) and v > 0 for v in grid)):
        raise ValueError(f"grid must be a pair of positive ints (H, W), got {grid!r}")
    ci_max = x.shape[-1]
    in_groups = as_ragged(in_groups, x.shape[0], ci_max)
    if isinstance(out_widths, Ragged):
        if out_widths.sizes != in_groups.sizes:
            raise ValueError(f"out_widths must split the batch like in_groups: {out_widths.sizes} vs "
                             f"{in_groups.sizes}")
        out_widths = out_widths.widths
    check_tensor(conv_weight, "conv_weight")
    if conv_weight.dim() != 4 or conv_weight.shape[1] != ci_max or conv_weight.shape[2:] != (kernel_size, kernel_size):
        raise ValueError(f"conv_weight must have shape (Co_max, {ci_max}, {kernel_size}, {kernel_size}), got "
                         f"{tuple(conv_weight.shape)}")
    co_max = conv_weight.shape[0]
    if co_max < ci_max:
        raise ValueError(f"conv_weight has {co_max} output channels, fewer than x's {ci_max}: the shortcut needs "
                         f"Co_max >= Ci_max")
    out_grid = rsr_output_grid(tuple(grid), kernel_size, stride, padding)
    _check_param(conv_weight, "conv_weight", tuple(conv_weight.shape), x)
    _check_param(ln_weight, "ln_weight", (ci_max,), x)
    _check_param(ln_bias, "ln_bias", (ci_max,), x)
    _check_param(conv_bias, "conv_bias", (co_max,), x)
    _check_param(pos_embed, "pos_embed", (1, out_grid[0] * out_grid[1], co_max), x)
    if has_cls:
        if cls_weight is None or cls_bias is None:
            raise ValueError("cls_weight and cls_bias are required when has_cls=True")
        _check_param(cls_weight, "cls_weight", (co_max, ci_max), x)
        _check_param(cls_bias, "cls_bias", (co_max,), x)
    return _reference_rsr(x, in_groups, out_widths, ln_weight, ln_bias, conv_weight, conv_bias, pos_embed, cls_weight,
                          cls_bias, grid=tuple(grid), has_cls=has_cls, eps=eps, kernel_size=kernel_size,
                          stride=stride, padding=padding)
