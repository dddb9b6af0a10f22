"""RSR epilogue: conv output + bias + pos_embed + zero-padded AvgPool of the raw tokens, and the cls row, in one pass.

Per sample of group g (ci = c_in,g <= co = c_out,g), with n = 1 when there is a cls token (else 0), t = oh*Wo + ow:

    out[b, n + t, c] = conv[b, t, c] + conv_bias[c] + pos_embed[0, t, c] + (c < ci ? avgpool(x)[b, t, c] : 0)   c < co
    out[b, 0, c]     = cls[b, 0, c]  + cls_bias[c]                        + (c < ci ? x[b, 0, c] : 0)            c < co
    out[b, :, c]     = 0                                                                                     c >= co

avgpool: stride x stride windows of x's patch tokens (the un-normalised input); the grid's edge may cut the last
window (odd grids, 7 -> 4): it averages only the tokens inside the grid, as AvgPool2d(ceil_mode=True) does. `conv` and
`cls` are the bias-free outputs of the ragged GEMMs (`ragged_linear`). The biases are added here rather than in the
GEMMs because their gradients then come for free from the column sums that pos_embed's gradient needs anyway.

Backends: reference (plain PyTorch) | triton | cpu (csrc/cpu/rsr_epilogue.cpp) | cuda (csrc/cuda/rsr_epilogue.cu).

Dispatch: on the C++ backends the public function calls one C++-registered op, `torch.ops.resnas.rsr_epilogue`
(csrc/rsr.cpp: autograd and argument checks in C++ over the device kernels `ext_rsr_epilogue_fwd / _bwd`), one dispatcher
hop per call; the reference and Triton backends run the Python custom ops `resnas::rsr_epilogue_fwd / _bwd`.

Caveats:
- conv, x and cls must be contiguous and share a dtype; pos_embed / biases may be x's dtype or fp32. Sums are in fp32
  (fp64 for fp64); the output is x's dtype.
- fp64 on the Triton backend runs the reference, as for every op (the kernels' shortcut gradient is fp32).
- Widths are data: int32 (G,) tensors on x's device (ragged.py). Their values (bounds, the shortcut rule) are checked
  on the host only where that needs no device sync (CPU tensors; CUDA under `set_validate_metadata(True)`); every
  backend clamps ci to [0, Ci] and co to [0, Co] (masks by the static bounds), so no metadata value can address
  memory outside the tensors.
- The custom ops check their arguments themselves (`_check_args`), on every backend.
- Backward: dconv / dcls are dout's rows masked to co (a copy: a custom op may not return a view of its input); dx is
  the pooling adjoint (a gather: each input token lies in exactly one window) plus the cls shortcut, masked to ci.
  d(pos_embed), d(conv_bias), d(cls_bias) are batch sums taken per output token with the samples in a fixed order and
  no atomics: bitwise reproducible run to run and across thread counts.
- Double backward is not supported.

The op's roles, one file each (as `ragged_layer_norm/`): `__init__.py` (this file) the public function;
`registration.py` the backend entry, checks, custom ops, fakes, autograd and the C++ bridge; `triton_kernels.py` the
Triton kernels and launchers; `aot.py` their ahead-of-time compilation cases; `reference_backend.py` the explicit
PyTorch backend.
"""
from typing import Optional, Tuple

import torch

from ...ragged import Ragged
from . import aot  # noqa: F401  (importing it registers the AOT cases)
from .reference_backend import _reference_bwd, _reference_fwd  # noqa: F401
from .registration import OP, _cxx_backend, check_shortcut, rsr_epilogue_bwd, rsr_epilogue_fwd  # noqa: F401
from .triton_kernels import pool_out_grid  # noqa: F401


def rsr_epilogue(conv: torch.Tensor, x: torch.Tensor, pos_embed: torch.Tensor, conv_bias: torch.Tensor,
                 cls: Optional[torch.Tensor], cls_bias: Optional[torch.Tensor], in_groups: Ragged,
                 out_widths, grid: Tuple[int, int], stride: int = 2) -> torch.Tensor:
    """The fused epilogue; see the module docstring. Called by `residual_spatial_reduction`, whose public checks
    cover the parameters; the C++ backends re-check shapes and dtypes and raise with the argument's name."""
    if isinstance(out_widths, Ragged):
        out_widths = out_widths.widths
    args = (list(in_groups.sizes), in_groups.widths_tensor(x.device),
            in_groups.with_widths(out_widths).widths_tensor(x.device), list(grid), stride)
    if _cxx_backend(x.device):
        return torch.ops.resnas.rsr_epilogue(conv, x, pos_embed, conv_bias, cls, cls_bias, *args)
    return rsr_epilogue_fwd(conv, x, pos_embed, conv_bias, cls, cls_bias, *args)
