"""`FusedResidualSpatialReduction`: drop-in nn.Module for the ViT-ResNAS RSR block (vit_resnas.md section 2), ragged.

Parameters are stock-shaped so checkpoints map one to one: `ln` (LayerNorm weight/bias, Ci_max), `conv` (a real
nn.Conv2d: weight (Co_max, Ci_max, k, k), bias), `pos_embed` (1, Ho*Wo, Co_max) and `cls` (nn.Linear Ci_max -> Co_max,
absent without a cls token). The forward runs `resnas_kernels.residual_spatial_reduction` (fused kernels, or the
reference under `set_backend("reference")`); `ln`, `conv` and `cls` are never called as modules.

Not to be confused with `models.vit_resnas.subnet.ResidualSpatialReduction`, the stock-PyTorch module of an
extracted sub-network (parameter names of the original code: norm, conv, cls_proj, pos_embed).
"""
from typing import Optional, Tuple

import torch
from torch import nn

from ..ops.residual_spatial_reduction import residual_spatial_reduction
from ..ragged import Ragged
from ..reference.rsr import rsr_output_grid


class FusedResidualSpatialReduction(nn.Module):
    """Residual spatial reduction from `in_dim` to `out_dim` >= `in_dim` channels over an (H, W) = `grid` of patches.

    forward(x, in_groups=None, out_widths=None, grid=None):
        x: (B, has_cls + H*W, in_dim), zero beyond each group's input width.
        in_groups: Ragged(sizes, c_in widths); None = one group at full width (the plain, non-supernet block).
        out_widths: c_out,g per group (ints, an int32 tensor on x's device, or a Ragged); None = out_dim for every
            group with a non-zero input width (0 for the others), a tensor when in_groups has device widths.
        grid: (H, W) of x's patch tokens; None = the grid given at construction (pos_embed is sized for it).
    Returns (B, has_cls + Ho*Wo, out_dim), zero beyond c_out,g.
    """

    def __init__(self, in_dim: int, out_dim: int, grid: Tuple[int, int] = (16, 16), has_cls: bool = True,
                 kernel_size: int = 3, stride: int = 2, padding: int = 1, eps: float = 1e-6, device=None,
                 dtype=None):
        super().__init__()
        if out_dim < in_dim:
            raise ValueError(f"out_dim={out_dim} must be >= in_dim={in_dim}: the shortcut carries all input channels")
        dd = dict(device=device, dtype=dtype)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.grid = (int(grid[0]), int(grid[1]))
        self.out_grid = rsr_output_grid(self.grid, kernel_size, stride, padding)
        self.has_cls = bool(has_cls)
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.ln = nn.LayerNorm(in_dim, eps=eps, **dd)
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size, stride, padding, **dd)  # default init, as the original
        self.pos_embed = nn.Parameter(torch.zeros(1, self.out_grid[0] * self.out_grid[1], out_dim, **dd))
        self.cls = nn.Linear(in_dim, out_dim, **dd) if self.has_cls else None
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls is not None:
            nn.init.trunc_normal_(self.cls.weight, std=0.02)
            nn.init.zeros_(self.cls.bias)

    def forward(self, x: torch.Tensor, in_groups: Optional[Ragged] = None, out_widths=None,
                grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        if in_groups is None:
            in_groups = Ragged.uniform(x.shape[0], self.in_dim)
        if out_widths is None and in_groups.on_device:  # computed on the device: no host value of the widths
            out_widths = torch.where(in_groups.widths > 0, self.out_dim, 0).to(in_groups.widths.dtype)
        elif out_widths is None:
            out_widths = tuple(self.out_dim if w > 0 else 0 for w in in_groups.widths)
        return residual_spatial_reduction(
            x, in_groups, out_widths, self.ln.weight, self.ln.bias, self.conv.weight, self.conv.bias, self.pos_embed,
            self.cls.weight if self.cls is not None else None, self.cls.bias if self.cls is not None else None,
            grid=tuple(grid) if grid is not None else self.grid, has_cls=self.has_cls, eps=self.ln.eps,
            kernel_size=self.kernel_size, stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, out_dim={self.out_dim}, grid={self.grid} -> {self.out_grid}, "
                f"has_cls={self.has_cls}")
