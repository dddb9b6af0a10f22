"""Reference residual spatial reduction (RSR), the block between ViT-ResNAS stages (vit_resnas.md section 2).

Written with stock functional ops per group (layer_norm, conv2d, avg_pool2d, linear, pad), for reading, not speed.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..ragged import Ragged
from .layer_norm import masked_layer_norm


def check_shortcut_widths(in_widths: Sequence[int], out_widths: Sequence[int], in_name: str = "in_widths") -> None:
    """c_in,g <= c_out,g, and c_out,g = 0 where c_in,g = 0 (the spec's rule, shared with every RSR op's checks)."""
    for g, (ci, co) in enumerate(zip(in_widths, out_widths)):
        if co < ci:
            raise ValueError(f"out_widths[{g}]={co} must be >= {in_name}[{g}]={ci}: the shortcut carries all "
                             f"input channels")
        if ci == 0 and co > 0:
            raise ValueError(f"{in_name}[{g}] is 0 but out_widths[{g}]={co}: a group with no input channels "
                             f"has nothing to reduce; give it output width 0")


def rsr_output_grid(grid: Tuple[int, int], kernel_size: int = 3, stride: int = 2, padding: int = 1) -> Tuple[int, int]:
    """Output grid of the RSR: the conv's output size, which must equal the pooled shortcut's ceil(H / stride).

    Even grids halve (16 -> 8 -> 4, 14 -> 7); odd grids round up (7 -> 4), the last pooling window then averaging
    only the tokens that exist.
    """
    out = []
    for size in grid:
        conv = (size + 2 * padding - kernel_size) // stride + 1
        pooled = -(-size // stride)
        if conv != pooled:
            raise ValueError(f"kernel_size={kernel_size}, stride={stride}, padding={padding} map a grid side of "
                             f"{size} to {conv} by the conv but to {pooled} by the pooled shortcut; choose padding "
                             f"= (kernel_size - 1) // 2 with an odd kernel_size")
        out.append(conv)
    return out[0], out[1]


def _tokens_to_image(t: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    b, n, c = t.shape
    return t.transpose(1, 2).reshape(b, c, grid[0], grid[1])


def _image_to_tokens(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(2).transpose(1, 2)


def residual_spatial_reduction(x: torch.Tensor, in_groups: Ragged, out_widths: Sequence[int], ln_weight: torch.Tensor,
                               ln_bias: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor,
                               pos_embed: torch.Tensor, cls_weight: Optional[torch.Tensor] = None,
                               cls_bias: Optional[torch.Tensor] = None, *, grid: Tuple[int, int], has_cls: bool = True,
                               eps: float = 1e-6, kernel_size: int = 3, stride: int = 2,
                               padding: int = 1) -> torch.Tensor:
    """Residual spatial reduction of each group from width c_in,g to c_out,g >= c_in,g.

    Shapes: x (B, has_cls + H*W, Ci_max), zero beyond c_in,g; ln_weight/ln_bias (Ci_max,); conv_weight
    (Co_max, Ci_max, k, k); conv_bias (Co_max,); pos_embed (1, Ho*Wo, Co_max); cls_weight (Co_max, Ci_max) and
    cls_bias (Co_max,) when has_cls. Returns (B, has_cls + Ho*Wo, Co_max), zero beyond c_out,g.

    Per group g, with ci = c_in,g, co = c_out,g:
        u       = LayerNorm(x[..., :ci]) with ln_weight[:ci], ln_bias[:ci], eps   (cls and patch tokens alike)
        patches = Conv2d(u_patches as (b, ci, H, W), conv_weight[:co, :ci], conv_bias[:co], stride, padding)
                  + pos_embed[..., :co]
                  + zero-pad_to_co(AvgPool2d(stride, stride, ceil_mode=True)(x_patches[..., :ci]))   (un-normalised x)
        cls     = u_cls @ cls_weight[:co, :ci]^T + cls_bias[:co] + zero-pad_to_co(x_cls[..., :ci])
        out     = concat(cls, patches) along tokens, zero-padded from co to Co_max.
    The cls token gets no positional embedding. A group with co = 0 outputs zeros; ci = 0 requires co = 0.
    """
    out_groups = in_groups.with_widths(out_widths)
    check_shortcut_widths(in_groups.widths, out_groups.widths, in_name="in_groups.widths")
    n_cls = 1 if has_cls else 0
    co_max = conv_weight.shape[0]
    out_grid = rsr_output_grid(grid, kernel_size, stride, padding)
    if x.shape[1] != n_cls + grid[0] * grid[1]:
        raise ValueError(f"x has {x.shape[1]} tokens but grid={tuple(grid)} with has_cls={has_cls} needs "
                         f"{n_cls + grid[0] * grid[1]}")
    if tuple(pos_embed.shape) != (1, out_grid[0] * out_grid[1], co_max):
        raise ValueError(f"pos_embed must have shape (1, {out_grid[0] * out_grid[1]}, {co_max}), got "
                         f"{tuple(pos_embed.shape)}")
    in_groups.check(x.shape[0], x.shape[-1], arg="x", what="in_groups.widths")
    out_groups.check(x.shape[0], co_max, arg="conv_weight (out channels)", what="out_widths")
    acc = torch.promote_types(x.dtype, torch.float32)
    outs = []
    for (start, end), ci, co in zip(zip(in_groups.offsets, in_groups.offsets[1:]), in_groups.widths,
                                    out_groups.widths):
        xg = x[start:end, :, :ci].to(acc)
        b = xg.shape[0]
        if co == 0 or b == 0:
            outs.append(x.new_zeros(b, n_cls + out_grid[0] * out_grid[1], co_max))
            continue
        u = F.layer_norm(xg, (ci,), ln_weight[:ci].to(acc), ln_bias[:ci].to(acc), eps)
        patches = F.conv2d(_tokens_to_image(u[:, n_cls:], grid), conv_weight[:co, :ci].to(acc), conv_bias[:co].to(acc),
                           stride=stride, padding=padding)
        shortcut = F.avg_pool2d(_tokens_to_image(xg[:, n_cls:], grid), stride, stride, ceil_mode=True)
        patches = _image_to_tokens(patches) + pos_embed[:, :, :co].to(acc) + F.pad(_image_to_tokens(shortcut),
                                                                                   (0, co - ci))
        tokens = [patches]
        if has_cls:
            cls = F.linear(u[:, :1], cls_weight[:co, :ci].to(acc), cls_bias[:co].to(acc)) + F.pad(xg[:, :1], (0, co - ci))
            tokens.insert(0, cls)
        outs.append(F.pad(torch.cat(tokens, dim=1), (0, co_max - co)).to(x.dtype))
    return torch.cat(outs, dim=0)


def masked_residual_spatial_reduction(x: torch.Tensor, in_mask: torch.Tensor, out_mask: torch.Tensor,
                                      ln_weight: torch.Tensor, ln_bias: torch.Tensor, conv_weight: torch.Tensor,
                                      conv_bias: torch.Tensor, pos_embed: torch.Tensor,
                                      cls_weight: Optional[torch.Tensor] = None, cls_bias: Optional[torch.Tensor] = None,
                                      *, grid: Tuple[int, int], has_cls: bool = True, eps: float = 1e-6,
                                      kernel_size: int = 3, stride: int = 2, padding: int = 1) -> torch.Tensor:
    """The original code's RSR: everything at full width, masks applied (in_mask/out_mask: (B, 1, Ci_max/Co_max)).

    MaskedLayerNorm over the active input channels, the full conv (inactive input channels are zero, which equals
    slicing the weight), a cat of zeros for the channel padding, then the output ChannelDrop mask.
    """
    n_cls = 1 if has_cls else 0
    ci_max, co_max = x.shape[-1], conv_weight.shape[0]
    u = masked_layer_norm(x, ln_weight, ln_bias, in_mask, eps)
    conv = _image_to_tokens(F.conv2d(_tokens_to_image(u[:, n_cls:], grid), conv_weight, conv_bias, stride=stride,
                                     padding=padding))
    pooled = _image_to_tokens(F.avg_pool2d(_tokens_to_image(x[:, n_cls:] * in_mask, grid), stride, stride,
                                           ceil_mode=True))
    pad = x.new_zeros(x.shape[0], pooled.shape[1], co_max - ci_max)
    tokens = [conv + pos_embed + torch.cat([pooled, pad], dim=-1)]
    if has_cls:
        cls_pad = x.new_zeros(x.shape[0], 1, co_max - ci_max)
        tokens.insert(0, F.linear(u[:, :1], cls_weight, cls_bias) + torch.cat([x[:, :1] * in_mask, cls_pad], dim=-1))
    return torch.cat(tokens, dim=1) * out_mask
