"""Token-layout im2col of the RSR conv: the patch tokens of u (B, n_cls + H*W, C) -> columns (B, Ho*Wo, C*k*k).

    cols[b, oh*Wo + ow, c*k*k + kh*k + kw] = u[b, n_cls + ih*W + iw, c],  ih = oh*s - p + kh, iw = ow*s - p + kw
                                             (0 when (ih, iw) is outside the grid: the conv's zero padding)

Column order is channel-major / tap-minor (F.unfold's order). With it, conv_weight.view(Co_max, Ci_max*k*k) holds
group g's sliced conv weight W[:co, :ci] as the top-left block [:co, :ci*k*k], so the conv of every group is one
ragged GEMM (`ragged_linear` with input widths ci*k*k) on the columns, straight from the token layout: no NCHW copy.

Part of the fused residual spatial reduction (`ops/residual_spatial_reduction/`) on CUDA / Triton: one op of its own so
autograd chains LN -> im2col -> ragged GEMM -> epilogue through separately registered custom ops. On CPU the fused RSR
uses `rsr_conv` instead (the same im2col + GEMM in blocks, never materialising the columns); this op's C++ CPU kernel
serves direct calls and shares its gather code with that conv.

Backends: reference (F.unfold / F.fold) | triton | cpu (csrc/cpu/rsr_im2col.cpp) | cuda (csrc/cuda/rsr_im2col.cu).

Dispatch: on the C++ backends the public function calls one C++-registered op, `torch.ops.resnas.rsr_im2col`
(csrc/rsr.cpp: autograd and argument checks in C++ over the device kernels `ext_rsr_im2col_fwd / _bwd`), one dispatcher
hop per call; the reference and Triton backends run the Python custom ops `resnas::rsr_im2col_fwd / _bwd`.

Caveats:
- u must be contiguous and obey the ragged contract (zero beyond each group's width ci); the columns are exactly zero
  for c >= ci and for padding taps. The cls row (has_cls) is not read.
- Backward (col2im) is a gather: every input token sums, in a fixed tap order, the columns that read it, so it is
  deterministic; du is zero on the cls row and beyond ci. The reference backward uses F.fold.
- The column tensor is k*k / stride^2 (~2.25x for 3x3 / 2) the size of u: memory is traded for one plain GEMM.
- fp64 on the Triton backend runs the reference, as for every op (the col2im kernel accumulates in fp32).
- Widths are data: the custom ops take them as an int32 (G,) tensor on u's device (`Ragged.widths_tensor`); grids
  and shapes come from the static sizes and C only. Values are checked on the host when that needs no device sync
  (CPU tensors; CUDA under `set_validate_metadata(True)`); every backend clamps a width to [0, C] (the reference by
  masks, Triton and C++ by masking channels with C too), so no metadata value can address memory outside the tensors.
- The custom ops check their arguments themselves (`_check_args`), on every backend.
- Double backward is not supported.

The op's roles, one file each (as `ragged_layer_norm/`): `__init__.py` (this file) the public function;
`registration.py` the backend entry, checks, custom ops, fakes, autograd and the C++ bridge; `triton_kernels.py` the
Triton kernels and launchers; `aot.py` their ahead-of-time compilation cases; `reference_backend.py` the explicit
PyTorch backend.
"""
from typing import Tuple

import torch

from ...ragged import Ragged, as_ragged
from .._checks import check_float_tensor
from . import aot  # noqa: F401  (importing it registers the AOT cases)
from .reference_backend import _reference_bwd, _reference_fwd  # noqa: F401
from .registration import (OP, _FLOAT_DTYPES, _check_args, _cxx_backend, check_widths_device,  # noqa: F401
                           conv_out_grid, rsr_im2col_bwd, rsr_im2col_fwd)
from .triton_kernels import _sample_width  # noqa: F401


def rsr_im2col(u: torch.Tensor, groups: Ragged, grid: Tuple[int, int], has_cls: bool = True, kernel_size: int = 3,
               stride: int = 2, padding: int = 1) -> torch.Tensor:
    """Columns (B, Ho*Wo, C*k*k) of the patch tokens of u for a k x k conv; see the module docstring.

    Args:
        u: (B, has_cls + H*W, C) contiguous, zero beyond each group's width.
        groups: Ragged(sizes, widths) over dim 0 of u (None: one group at full width).
        grid: (H, W) of the patch tokens.
    """
    check_float_tensor(u, "u", _FLOAT_DTYPES, min_dim=3)
    if u.dim() != 3:
        raise ValueError(f"u must have shape (B, tokens, C), got {tuple(u.shape)}")
    groups = as_ragged(groups, u.shape[0], u.shape[2])
    _check_args(u, groups, grid, has_cls, kernel_size, stride, padding, what="groups.widths")
    args = (list(groups.sizes), groups.widths_tensor(u.device), list(grid), kernel_size, stride, padding,
            bool(has_cls))
    if _cxx_backend(u.device):
        return torch.ops.resnas.rsr_im2col(u, *args)
    return rsr_im2col_fwd(u, *args)
