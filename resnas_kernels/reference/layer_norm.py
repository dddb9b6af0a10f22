"""Reference ragged LayerNorm: the oracle for every LayerNorm kernel, written for reading, not speed."""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..ragged import Ragged


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reductions run in fp32 for half types (as every kernel does) and in fp64 for fp64 (for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def ragged_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: Ragged, eps: float = 1e-6,
                      residual: Optional[torch.Tensor] = None) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """LayerNorm of each group's rows over that group's first c_g channels.

    Spec, for x of shape (B, ..., C_max) and group g owning samples [o_g, o_g + b_g) with width c_g = groups.widths[g]:
        z = x + residual                      (z = x without a residual)
        y[o_g:o_g+b_g, ..., :c_g] = F.layer_norm(z[..., :c_g], (c_g,), weight[:c_g], bias[:c_g], eps)
        y[..., c_g:] = 0 and, with a residual, the returned sum is z with z[..., c_g:] = 0.
    Statistics use the c_g active channels only (the original MaskedLayerNorm semantics), computed in fp32 for
    fp16/bf16 inputs. Width 0 gives all-zero rows. Returns y, or (y, z) when a residual is given.
    """
    z = x if residual is None else x + residual
    acc = compute_dtype(x.dtype)
    c_max = x.shape[-1]
    ys, zs = [], []
    for (start, end), c in zip(zip(groups.offsets[:-1], groups.offsets[1:]), groups.widths):
        part = z[start:end, ..., :c].to(acc)
        if c > 0:
            normed = F.layer_norm(part, (c,), weight[:c].to(acc), bias[:c].to(acc), eps)
        else:
            normed = part
        ys.append(F.pad(normed, (0, c_max - c)).to(x.dtype))
        zs.append(F.pad(z[start:end, ..., :c], (0, c_max - c)))
    y = torch.cat(ys, dim=0)
    return y if residual is None else (y, torch.cat(zs, dim=0))


def masked_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor,
                      eps: float = 1e-6) -> torch.Tensor:
    """The original ViT-ResNAS `MaskedLayerNorm`: full-width math with statistics over the active channels.

    x: (B, ..., C), zero outside the mask; mask: bool, broadcastable to x, true on each sample's first c channels.
    mean = sum(x) / c and var = sum(x^2) / c - mean^2 over the active channels; the output is re-masked.
    A sample with no active channel gives zeros (the original code would divide by zero).
    """
    acc = compute_dtype(x.dtype)
    m = mask.to(acc)
    xf = x.to(acc) * m
    count = m.sum(-1, keepdim=True).expand(*xf.shape[:-1], 1).clamp_min(1.0)
    mean = xf.sum(-1, keepdim=True) / count
    var = (xf * xf).sum(-1, keepdim=True) / count - mean * mean
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.to(acc) + bias.to(acc)
    return (y * m).to(x.dtype)
