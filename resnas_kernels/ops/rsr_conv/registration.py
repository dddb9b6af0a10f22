"""The op's backend entry, argument checks, `torch.library` custom ops (reference backend) with fakes and autograd,
and the bridge to the C++ kernels (csrc/cpu/rsr_conv.cpp, csrc/rsr.cpp)."""
from typing import List, Tuple

import torch

from ... import _ext, config
from ...backend import OpInfo, register_op, resolve_backend
from ...ragged import Ragged
from ...reference.layer_norm import compute_dtype
from .._checks import check_groups, check_tensor
from ..rsr_im2col.registration import _check_args as _check_im2col_args
from ..rsr_im2col.registration import check_widths_device, conv_out_grid
from .reference_backend import _reference_bwd, _reference_fwd

OP = register_op(OpInfo(
    name="rsr_conv",
    backends=("cpu",),
    auto_cuda=(),
    ext_ops=("ext_rsr_conv_fwd", "ext_rsr_conv_bwd"),
))


def _geometry(grid, kernel_size, stride, padding, has_cls):
    return tuple(grid), kernel_size, stride, padding, int(has_cls), conv_out_grid(grid, kernel_size, stride, padding)


# Taken once at trace time under torch.compile (as every backend decision), per call in eager: tests switch it within
# one process.
@torch.compiler.assume_constant_result
def conv_route() -> str:
    """The C++ CPU conv's algorithm, passed to C++ as the ops' `route` argument: "blocked"
    (`config.set_rsr_conv("blocked")` / RESNAS_RSR_CONV=blocked) forces the blocked implicit GEMM, "auto" lets it take
    oneDNN's conv for large fp32 groups where torch has oneDNN."""
    return config.rsr_conv()


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


# Taken once at trace time under torch.compile (as every backend decision: see ops/residual_spatial_reduction/).
@torch.compiler.assume_constant_result
def _cxx_backend(device: torch.device) -> bool:
    return resolve_backend(OP.name, device) == "cpu"
