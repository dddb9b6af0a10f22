"""The RSR conv (bias-free, ragged) as a blocked implicit GEMM on CPU: conv (B, Ho*Wo, Co) of u's patch tokens.

    conv[b, t, :co] = cols(u)[b, t, :ci*k*k] @ W2d[:co, :ci*k*k]^T,   W2d = conv_weight.view(Co_max, Ci_max*k*k)
    conv[b, t, co:] = 0

with cols the token-layout im2col of `rsr_im2col.py` (channel-major / tap-minor, so group g's W[:co, :ci] is the
top-left block of W2d). This is exactly `rsr_im2col` followed by `ragged_linear`, computed without materialising the
column tensor: the C++ kernel (csrc/cpu/rsr_conv.cpp) gathers blocks of whole samples into one reused buffer and
runs one BLAS GEMM per block. At ViT-ResNAS shapes the full column tensor is a fresh 40-150 MB allocation per call,
whose first-touch page faults cost up to a third of the GEMM time on the development machine; this op is the fused
RSR's CPU path. On CUDA the fused RSR uses `rsr_im2col` + `ragged_linear` (Triton) instead.

For fp32 on a torch built with oneDNN (the default x86 build) the C++ kernel takes a second route: per group, oneDNN's
direct convolution (`at::convolution`) on the channels-last image the token layout already is (one compacting copy
of the group's patch tokens, no NCHW round trip); the backward takes it for output grids of 8x8 patches or more.
On the 2-core AMD development machine oneDNN's conv ran ~1.3x faster than the blocked path's MKL GEMMs on
16x16 -> 8x8, and its backward ~10 % faster there but ~20 % slower on 8x8 -> 4x4, hence the split.
`RESNAS_RSR_CONV=blocked` (read per call by `conv_route`, passed to C++ as the ops' `route` argument) forces the
blocked path; both routes are tested against the reference.

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
"""
import os
from typing import List, Tuple

import torch

from .. import _ext
from ..backend import OpInfo, register_op, resolve_backend
from ..ragged import Ragged
from ..reference.layer_norm import compute_dtype
from ._checks import check_groups, check_tensor
from .rsr_im2col import _check_args as _check_im2col_args
from .rsr_im2col import _reference_bwd as _im2col_reference_bwd
from .rsr_im2col import _reference_fwd as _im2col_reference_fwd
from .rsr_im2col import check_widths_device, conv_out_grid

OP = register_op(OpInfo(
    name="rsr_conv",
    backends=("cpu",),
    auto_cuda=(),
    ext_ops=("ext_rsr_conv_fwd", "ext_rsr_conv_bwd"),
))


def _geometry(grid, kernel_size, stride, padding, has_cls):
    return tuple(grid), kernel_size, stride, padding, int(has_cls), conv_out_grid(grid, kernel_size, stride, padding)


def _out_mask(out_groups: Ragged, co_max: int, device) -> torch.Tensor:
    """(B, 1, Co_max) bool: output channel c is active for the sample's group (c < co; clamps co to Co_max)."""
    return out_groups.mask(co_max, device=device)[:, None, :]


# The reference runs the whole batch as one GEMM on masked columns (zero beyond ci*k*k per sample) and masks the
# output by co: tensor masks only, so device widths never reach the host.
def _reference_fwd(u, weight, in_groups: Ragged, out_groups: Ragged, geo):
    acc = compute_dtype(u.dtype)
    cols = _im2col_reference_fwd(u, in_groups, geo).to(acc)
    out = cols @ weight.to(acc).t()
    zero = torch.zeros((), dtype=acc, device=u.device)
    return torch.where(_out_mask(out_groups, weight.shape[0], u.device), out, zero).to(u.dtype)


def _reference_bwd(dout, u, weight, in_groups: Ragged, out_groups: Ragged, geo):
    acc = compute_dtype(u.dtype)
    cols = _im2col_reference_fwd(u, in_groups, geo).to(acc)
    w = weight.to(acc)
    zero = torch.zeros((), dtype=acc, device=u.device)
    dy = torch.where(_out_mask(out_groups, weight.shape[0], u.device), dout.to(acc), zero)
    # dy is zero beyond co and cols beyond ci*k*k: group g only reaches dW[:co, :ci*k*k].
    dw = dy.reshape(-1, dy.shape[-1]).t() @ cols.reshape(-1, cols.shape[-1])
    # im2col's adjoint masks du by ci; a group with co = 0 gets dy = 0, hence du = 0.
    du = _im2col_reference_bwd(dy @ w, in_groups, geo)
    return du.to(u.dtype), dw


# Taken once at trace time under torch.compile (as every backend decision), per call in eager: tests switch it within
# one process.
@torch.compiler.assume_constant_result
def conv_route() -> str:
    """The C++ CPU conv's algorithm: "blocked" (RESNAS_RSR_CONV=blocked) forces the blocked implicit GEMM, "auto" lets
    it take oneDNN's conv for fp32 where torch has oneDNN."""
    return "blocked" if os.environ.get("RESNAS_RSR_CONV") == "blocked" else "auto"


def _ext_fwd(u, weight, in_groups: Ragged, out_groups: Ragged, geo):
    grid, k, s, p, n_cls, _ = geo
    return torch.ops.resnas.ext_rsr_conv_fwd(u, weight, list(in_groups.sizes), in_groups.widths_tensor(u.device),
                                             out_groups.widths_tensor(u.device), list(grid), k, s, p, bool(n_cls),
                                             route=conv_route())


def _ext_bwd(dout, u, weight, in_groups: Ragged, out_groups: Ragged, geo):
    grid, k, s, p, n_cls, _ = geo
    return torch.ops.resnas.ext_rsr_conv_bwd(dout, u, weight, list(in_groups.sizes), in_groups.widths_tensor(u.device),
                                             out_groups.widths_tensor(u.device), list(grid), k, s, p, bool(n_cls),
                                             route=conv_route())


_FWD = {"reference": _reference_fwd, "cpu": _ext_fwd}
_BWD = {"reference": _reference_bwd, "cpu": _ext_bwd}


def _check_args(u, weight, groups: Ragged, out_groups: Ragged, grid, kernel_size, stride, padding, has_cls) -> None:
    _check_im2col_args(u, groups, grid, has_cls, kernel_size, stride, padding, what="in_widths")
    check_tensor(weight, "weight")
    kk = u.shape[2] * kernel_size * kernel_size
    if weight.dim() != 2 or weight.shape[1] != kk:
        raise ValueError(f"weight must be 2-D (Co_max, C*k*k) = (Co_max, {kk}), got {tuple(weight.shape)}")
    check_groups(out_groups, u.shape[0], weight.shape[0], batch_of="u", width_of="weight (dim 0, Co_max)",
                 what="out_widths")
    check_widths_device(out_groups, u, "out_widths", "u")


@torch.library.custom_op("resnas::rsr_conv_fwd", mutates_args=())
def rsr_conv_fwd(u: torch.Tensor, weight: torch.Tensor, sizes: List[int], in_widths: torch.Tensor,
                 out_widths: torch.Tensor, grid: List[int], kernel_size: int, stride: int, padding: int,
                 has_cls: bool) -> torch.Tensor:
    """conv (B, Ho*Wo, Co_max) of u (B, has_cls + H*W, Ci_max) with weight (Co_max, Ci_max*k*k); widths: int32 (G,)
    tensors on u's device. See the module docstring."""
    groups, out_groups = Ragged(tuple(sizes), in_widths), Ragged(tuple(sizes), out_widths)
    _check_args(u, weight, groups, out_groups, grid, kernel_size, stride, padding, has_cls)
    impl = _FWD[resolve_backend(OP.name, u.device)]
    return impl(u, weight, groups, out_groups, _geometry(grid, kernel_size, stride, padding, has_cls))


@rsr_conv_fwd.register_fake
def _fake_fwd(u, weight, sizes, in_widths, out_widths, grid, kernel_size, stride, padding, has_cls, route="auto"):
    ho, wo = conv_out_grid(grid, kernel_size, stride, padding)
    return u.new_empty((u.shape[0], ho * wo, weight.shape[0]))


@torch.library.custom_op("resnas::rsr_conv_bwd", mutates_args=())
def rsr_conv_bwd(dout: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, sizes: List[int],
                 in_widths: torch.Tensor, out_widths: torch.Tensor, grid: List[int], kernel_size: int, stride: int,
                 padding: int, has_cls: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(du, dweight): du like u (zero cls row, zero beyond ci); dweight in fp32 (fp64 for fp64 inputs)."""
    groups, out_groups = Ragged(tuple(sizes), in_widths), Ragged(tuple(sizes), out_widths)
    _check_args(u, weight, groups, out_groups, grid, kernel_size, stride, padding, has_cls)
    ho, wo = conv_out_grid(grid, kernel_size, stride, padding)
    check_tensor(dout, "dout")
    if tuple(dout.shape) != (u.shape[0], ho * wo, weight.shape[0]):
        raise ValueError(f"dout must have shape {(u.shape[0], ho * wo, weight.shape[0])}, got {tuple(dout.shape)}")
    impl = _BWD[resolve_backend(OP.name, u.device)]
    return impl(dout, u, weight, groups, out_groups, _geometry(grid, kernel_size, stride, padding, has_cls))


@rsr_conv_bwd.register_fake
def _fake_bwd(dout, u, weight, sizes, in_widths, out_widths, grid, kernel_size, stride, padding, has_cls,
              route="auto"):
    return u.new_empty(u.shape), weight.new_empty(weight.shape, dtype=compute_dtype(u.dtype))


def _setup_context(ctx, inputs, output):
    u, weight, *meta = inputs
    ctx.save_for_backward(u, weight)
    ctx.meta = meta


def _backward(ctx, dout):
    u, weight = ctx.saved_tensors
    du, dw = rsr_conv_bwd(dout.contiguous(), u, weight, *ctx.meta)
    return (du, dw.to(weight.dtype)) + (None,) * 8


rsr_conv_fwd.register_autograd(_backward, setup_context=_setup_context)


# The C++ backend: one C++-registered op, resnas::rsr_conv (csrc/rsr.cpp: autograd and checks in C++), over the
# device kernels ext_rsr_conv_fwd / _bwd. Their fake kernels live here so torch.compile traces through the C++ autograd.
_ext.register_cxx_fakes({"resnas::rsr_conv": _fake_fwd, "resnas::ext_rsr_conv_fwd": _fake_fwd,
                         "resnas::ext_rsr_conv_bwd": _fake_bwd})


# Taken once at trace time under torch.compile (as every backend decision: see residual_spatial_reduction.py).
@torch.compiler.assume_constant_result
def _cxx_backend(device: torch.device) -> bool:
    return resolve_backend(OP.name, device) == "cpu"


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
