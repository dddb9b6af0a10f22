"""The RSR conv (bias-free, ragged) as a blocked implicit GEMM on CPU: conv (B, Ho*Wo, Co) of u's patch tokens.

    conv[b, t, :co] = cols(u)[b, t, :ci*k*k] @ W2d[:co, :ci*k*k]^T,   W2d = conv_weight.view(Co_max, Ci_max*k*k)
    conv[b, t, co:] = 0

with cols the token-layout im2col of `rsr_im2col` (channel-major / tap-minor, so group g's W[:co, :ci] is the
top-left block of W2d). This is exactly `rsr_im2col` followed by `ragged_linear`, computed without materialising the
column tensor: the C++ kernel (csrc/cpu/rsr_conv.cpp) gathers blocks of whole samples into one reused buffer and
runs one BLAS GEMM per block. At ViT-ResNAS shapes the full column tensor is a fresh 40-150 MB allocation per call,
whose first-touch page faults can cost a third of the GEMM time (BENCHMARKS.md); this op is the fused
RSR's CPU path. On CUDA the fused RSR uses `rsr_im2col` + `ragged_linear` (Triton) instead.

For the fp32 forward on a torch built with oneDNN (the default x86 build) the C++ kernel takes a second route for large
groups: per group, oneDNN's direct convolution (`at::convolution`) on the channels-last image the token layout already
is (one compacting copy of the group's patch tokens, no NCHW round trip). Each call copies and reorders the group's
weight slice, a cost that grows with ci*co*k*k and not with the rows, so the route is taken only when the largest
group's GEMM has >= 2048 rows (samples x Ho*Wo); smaller calls (a few samples per group, as in the quick benchmark)
run the blocked path, whose GEMMs read the weight slice in place. The backward is always the blocked path: oneDNN's
convolution backward gave dweight 4-7x the error of an fp32 GEMM over the same rows.
`config.set_rsr_conv("blocked")` / `RESNAS_RSR_CONV=blocked` (read per call by `conv_route`, passed to C++ as the
ops' `route` argument) forces the blocked path; both routes are tested against the reference.

Backends: reference (im2col reference + one matmul per group) | cpu. No Triton / CUDA backend (see above).

Dispatch: on the C++ backends the public function calls one C++-registered op, `torch.ops.resnas.rsr_conv`
(csrc/rsr.cpp: autograd and argument checks in C++ over the device kernels `ext_rsr_conv_fwd / _bwd`), one dispatcher
hop per call; the reference and Triton backends run the Python custom ops `resnas::rsr_conv_fwd / _bwd`.

Caveats:
- u contiguous, zero beyond each group's input width; weight (Co_max, Ci_max*k*k) contiguous, u's dtype or fp32.
- fp16 / bf16 inputs are computed in fp32 (block buffers and GEMMs), fp64 in fp64; conv is rounded once to u's dtype.
- dweight: groups and blocks accumulate in a fixed order, so it is reproducible run to run at a fixed thread count;
  neither BLAS nor oneDNN promises bit-equality across thread counts (as for ragged_linear's CPU dW). The two routes
  agree to fp32 rounding, not bitwise.
- Widths are int32 (G,) tensors on u's device (data, not constants: see ragged.py); the C++ kernel reads the CPU
  tensor (and checks its values), the reference masks by it, so a width beyond its bound is clamped, never followed.
- The custom ops check their arguments themselves (`_check_args`, sharing `rsr_im2col`'s checks), on every backend.
- Double backward is not supported.

The op's roles, one file each: `__init__.py` (this file) the public function; `registration.py` the backend entry,
checks, custom ops, fakes, autograd and the C++ bridge; `reference_backend.py` the explicit PyTorch backend.
"""
from typing import Tuple

import torch

from ...ragged import Ragged
from .reference_backend import _reference_bwd, _reference_fwd  # noqa: F401
from .registration import OP, _cxx_backend, conv_route, rsr_conv_bwd, rsr_conv_fwd  # noqa: F401


def rsr_conv(u: torch.Tensor, weight2d: torch.Tensor, in_groups: Ragged, out_widths, grid: Tuple[int, int],
             has_cls: bool, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> torch.Tensor:
    """The ragged bias-free conv; called by `residual_spatial_reduction`, whose checks cover the arguments (the C++
    kernel re-checks shapes, dtypes and metadata and names the offending argument). out_widths: ints, an int32
    tensor on u's device, or a Ragged with in_groups' sizes."""
    args = (list(in_groups.sizes), in_groups.widths_tensor(u.device),
            in_groups.with_widths(out_widths.widths if isinstance(out_widths, Ragged) else out_widths)
            .widths_tensor(u.device), list(grid), kernel_size, stride, padding, bool(has_cls))
    if _cxx_backend(u.device):
        return torch.ops.resnas.rsr_conv(u, weight2d, *args, route=conv_route())
    return rsr_conv_fwd(u, weight2d, *args)
