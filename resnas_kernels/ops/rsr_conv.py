"""The RSR conv (bias-free, ragged) as a blocked implicit GEMM on CPU: conv (B, Ho*Wo, Co) of u's patch tokens.

    conv[b, t, :co] = cols(u)[b, t, :ci*k*k] @ W2d[:co, :ci*k*k]^T,   W2d = conv_weight.view(Co_max, Ci_max*k*k)
    conv[b, t, co:] = 0

with cols the token-layout im2col of `rsr_im2col.py` (channel-major / tap-minor, so group g's W[:co, :ci] is the
top-left block of W2d). This is exactly `rsr_im2col` followed by `ragged_linear`, computed without materialising the
column tensor: the C++ kernel (csrc/cpu/rsr_im2col.cpp) gathers blocks of whole samples into one reused buffer and
runs one BLAS GEMM per block. At ViT-ResNAS shapes the full column tensor is a fresh 40-150 MB allocation per call,
whose first-touch page faults cost up to a third of the GEMM time on the development machine; this op is the fused
RSR's CPU path. On CUDA the fused RSR uses `rsr_im2col` + `ragged_linear` (Triton) instead.

For fp32 on a torch built with oneDNN (the default x86 build) the C++ kernel takes a second route: per group, oneDNN's
direct convolution (`at::convolution`) on the channels-last image the token layout already is (one compacting copy
of the group's patch tokens, no NCHW round trip); the backward takes it for output grids of 8x8 patches or more.
On the 2-core AMD development machine oneDNN's conv ran ~1.3x faster than the blocked path's MKL GEMMs on
16x16 -> 8x8, and its backward ~10 % faster there but ~20 % slower on 8x8 -> 4x4, hence the split.
`RESNAS_RSR_CONV=blocked` (read per call) forces the blocked path; both routes are tested against the reference.

Backends: reference (im2col reference + one matmul per group) | cpu. No Triton / CUDA backend (see above).

Caveats:
- u contiguous, zero beyond each group's input width; weight (Co_max, Ci_max*k*k) contiguous, u's dtype or fp32.
- fp16 / bf16 inputs are computed in fp32 (block buffers and GEMMs), fp64 in fp64; conv is rounded once to u's dtype.
- dweight: groups and blocks accumulate in a fixed order, so it is reproducible run to run at a fixed thread count;
  neither BLAS nor oneDNN promises bit-equality across thread counts (as for ragged_linear's CPU dW). The two routes
  agree to fp32 rounding, not bitwise.
- The custom ops check their arguments themselves (`_check_args`, sharing `rsr_im2col`'s checks), on every backend.
- Double backward is not supported.
"""
from typing import List, Tuple

import torch

from ..backend import OpInfo, register_op, resolve_backend
from ..ragged import Ragged
from ..reference.layer_norm import compute_dtype
from ._checks import check_groups, check_tensor
from .rsr_im2col import _check_args as _check_im2col_args
from .rsr_im2col import _reference_bwd as _im2col_reference_bwd
from .rsr_im2col import _reference_fwd as _im2col_reference_fwd
from .rsr_im2col import conv_out_grid

OP = register_op(OpInfo(
    name="rsr_conv",
    backends=("cpu",),
    auto_cuda=(),
    ext_ops=("ext_rsr_conv_fwd", "ext_rsr_conv_bwd"),
))


def _geometry(grid, kernel_size, stride, padding, has_cls):
    return tuple(grid), kernel_size, stride, padding, int(has_cls), conv_out_grid(grid, kernel_size, stride, padding)


def _spans(groups: Ragged):
    return zip(zip(groups.offsets, groups.offsets[1:]), groups.widths)


def _reference_fwd(u, weight, in_groups: Ragged, out_widths, geo):
    k = geo[1]
    acc = compute_dtype(u.dtype)
    cols = _im2col_reference_fwd(u, in_groups, geo).to(acc)
    w = weight.to(acc)
    out = u.new_zeros((u.shape[0], cols.shape[1], weight.shape[0]), dtype=acc)
    for ((start, end), ci), co in zip(_spans(in_groups), out_widths):
        if end > start and co and ci:
            out[start:end, :, :co] = cols[start:end, :, :ci * k * k] @ w[:co, :ci * k * k].t()
    return out.to(u.dtype)


def _reference_bwd(dout, u, weight, in_groups: Ragged, out_widths, geo):
    k = geo[1]
    acc = compute_dtype(u.dtype)
    cols = _im2col_reference_fwd(u, in_groups, geo).to(acc)
    w = weight.to(acc)
    dy = dout.to(acc)
    dw = torch.zeros(weight.shape, dtype=acc, device=u.device)
    dcols = torch.zeros(cols.shape, dtype=acc, device=u.device)
    for ((start, end), ci), co in zip(_spans(in_groups), out_widths):
        kk = ci * k * k
        if end > start and co and ci:
            dyg = dy[start:end, :, :co].reshape(-1, co)
            dw[:co, :kk] += dyg.t() @ cols[start:end, :, :kk].reshape(-1, kk)
            dcols[start:end, :, :kk] = (dyg @ w[:co, :kk]).view(end - start, -1, kk)
    du = _im2col_reference_bwd(dcols, in_groups, geo)
    # Groups with no output channels took no part in the conv: zero gradient (F.fold gives zeros there already).
    return du.to(u.dtype), dw


def _ext_fwd(u, weight, in_groups: Ragged, out_widths, geo):
    grid, k, s, p, n_cls, _ = geo
    return torch.ops.resnas.ext_rsr_conv_fwd(u, weight, list(in_groups.sizes), list(in_groups.widths), list(out_widths),
                                             list(grid), k, s, p, bool(n_cls))


def _ext_bwd(dout, u, weight, in_groups: Ragged, out_widths, geo):
    grid, k, s, p, n_cls, _ = geo
    return torch.ops.resnas.ext_rsr_conv_bwd(dout, u, weight, list(in_groups.sizes), list(in_groups.widths),
                                             list(out_widths), list(grid), k, s, p, bool(n_cls))


_FWD = {"reference": _reference_fwd, "cpu": _ext_fwd}
_BWD = {"reference": _reference_bwd, "cpu": _ext_bwd}


def _check_args(u, weight, groups: Ragged, out_widths, grid, kernel_size, stride, padding, has_cls) -> None:
    _check_im2col_args(u, groups, grid, has_cls, kernel_size, stride, padding, what="in_widths")
    check_tensor(weight, "weight")
    kk = u.shape[2] * kernel_size * kernel_size
    if weight.dim() != 2 or weight.shape[1] != kk:
        raise ValueError(f"weight must be 2-D (Co_max, C*k*k) = (Co_max, {kk}), got {tuple(weight.shape)}")
    check_groups(groups.with_widths(out_widths), u.shape[0], weight.shape[0], batch_of="u",
                 width_of="weight (dim 0, Co_max)", what="out_widths")


@torch.library.custom_op("resnas::rsr_conv_fwd", mutates_args=())
def rsr_conv_fwd(u: torch.Tensor, weight: torch.Tensor, sizes: List[int], in_widths: List[int],
                 out_widths: List[int], grid: List[int], kernel_size: int, stride: int, padding: int,
                 has_cls: bool) -> torch.Tensor:
    """conv (B, Ho*Wo, Co_max) of u (B, has_cls + H*W, Ci_max) with weight (Co_max, Ci_max*k*k); see the docstring."""
    groups = Ragged(tuple(sizes), tuple(in_widths))
    _check_args(u, weight, groups, out_widths, grid, kernel_size, stride, padding, has_cls)
    impl = _FWD[resolve_backend(OP.name, u.device)]
    return impl(u, weight, groups, tuple(out_widths), _geometry(grid, kernel_size, stride, padding, has_cls))


@rsr_conv_fwd.register_fake
def _(u, weight, sizes, in_widths, out_widths, grid, kernel_size, stride, padding, has_cls):
    ho, wo = conv_out_grid(grid, kernel_size, stride, padding)
    return u.new_empty((u.shape[0], ho * wo, weight.shape[0]))


@torch.library.custom_op("resnas::rsr_conv_bwd", mutates_args=())
def rsr_conv_bwd(dout: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, sizes: List[int], in_widths: List[int],
                 out_widths: List[int], grid: List[int], kernel_size: int, stride: int, padding: int,
                 has_cls: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(du, dweight): du like u (zero cls row, zero beyond ci); dweight in fp32 (fp64 for fp64 inputs)."""
    groups = Ragged(tuple(sizes), tuple(in_widths))
    _check_args(u, weight, groups, out_widths, grid, kernel_size, stride, padding, has_cls)
    ho, wo = conv_out_grid(grid, kernel_size, stride, padding)
    check_tensor(dout, "dout")
    if tuple(dout.shape) != (u.shape[0], ho * wo, weight.shape[0]):
        raise ValueError(f"dout must have shape {(u.shape[0], ho * wo, weight.shape[0])}, got {tuple(dout.shape)}")
    impl = _BWD[resolve_backend(OP.name, u.device)]
    return impl(dout, u, weight, groups, tuple(out_widths), _geometry(grid, kernel_size, stride, padding, has_cls))


@rsr_conv_bwd.register_fake
def _(dout, u, weight, sizes, in_widths, out_widths, grid, kernel_size, stride, padding, has_cls):
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


def rsr_conv(u: torch.Tensor, weight2d: torch.Tensor, in_groups: Ragged, out_widths, grid: Tuple[int, int],
             has_cls: bool, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> torch.Tensor:
    """The ragged bias-free conv; called by `residual_spatial_reduction`, whose checks cover the arguments (the C++
    kernel re-checks shapes and dtypes and names the offending argument)."""
    return rsr_conv_fwd(u, weight2d, list(in_groups.sizes), list(in_groups.widths), list(out_widths), list(grid),
                        kernel_size, stride, padding, bool(has_cls))
