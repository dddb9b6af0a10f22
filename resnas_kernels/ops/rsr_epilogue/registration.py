"""The op's backend entry, argument checks, `torch.library` custom ops (reference / Triton backends) with fakes and
autograd, and the bridge to the C++ kernels (csrc/cpu/rsr_epilogue.cpp, csrc/cuda/rsr_epilogue.cu, csrc/rsr.cpp)."""
from typing import List, Optional, Tuple

import torch

from ... import _ext
from ...backend import OpInfo, register_op, resolve_backend, resolve_backend_for
from ...ragged import Ragged, _is_fake as is_fake, validate_metadata
from ...reference.layer_norm import compute_dtype
from ...reference.rsr import check_shortcut_widths
from .._checks import check_float_tensor, check_groups, check_same_device, check_tensor
from ..rsr_im2col.registration import check_widths_device
from .reference_backend import _reference_bwd, _reference_fwd
from .triton_kernels import _geometry, _triton_bwd, _triton_fwd, pool_out_grid

OP = register_op(OpInfo(
    name="rsr_epilogue",
    backends=("triton", "cpu", "cuda"),
    auto_cuda=("cuda", "triton"),
    ext_ops=("ext_rsr_epilogue_fwd", "ext_rsr_epilogue_bwd"),
))


def _ext_fwd(conv, x, pos, bias, cls, cls_bias, in_groups: Ragged, out_groups: Ragged, geo):
    grid, s, _, _ = geo
    return torch.ops.resnas.ext_rsr_epilogue_fwd(conv, x, pos, bias, cls, cls_bias, list(in_groups.sizes),
                                                 in_groups.widths_tensor(x.device), out_groups.widths_tensor(x.device),
                                                 list(grid), s)


def _ext_bwd(dout, in_groups: Ragged, out_groups: Ragged, geo, in_channels: int):
    grid, s, n_cls, _ = geo
    return torch.ops.resnas.ext_rsr_epilogue_bwd(dout, list(in_groups.sizes), in_groups.widths_tensor(dout.device),
                                                 out_groups.widths_tensor(dout.device), list(grid), s, bool(n_cls),
                                                 in_channels)


_FWD = {"reference": _reference_fwd, "triton": _triton_fwd, "cpu": _ext_fwd, "cuda": _ext_fwd}
_BWD = {"reference": _reference_bwd, "triton": _triton_bwd, "cpu": _ext_bwd, "cuda": _ext_bwd}


# ---------------------------------------------------------------------------------------------------------------------
# torch.library custom ops
# ---------------------------------------------------------------------------------------------------------------------
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_geometry(grid, stride) -> None:
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(v, int) and v > 0 for v in grid)):
        raise ValueError(f"grid must be a pair of positive ints (H, W), got {grid!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")


def check_shortcut(in_groups: Ragged, out_groups: Ragged, in_name: str = "in_widths") -> None:
    """The shortcut rule (c_in,g <= c_out,g; c_out,g = 0 where c_in,g = 0) on host widths, or on widths tensors whose
    values can be read without a device sync (CPU, or the debug switch). The kernels need no such guarantee to stay
    in bounds."""
    widths = []
    for groups in (in_groups, out_groups):
        if not groups.on_device:
            widths.append(groups.widths)
            continue
        t = groups.widths
        if torch.compiler.is_compiling() or (t.device.type != "cpu" and not validate_metadata()) or is_fake(t):
            return
        widths.append(t.tolist())
    check_shortcut_widths(widths[0], widths[1], in_name=in_name)


def _check_args(conv, x, pos_embed, conv_bias, cls, cls_bias, in_groups: Ragged, out_groups: Ragged, grid,
                stride) -> None:
    """Shapes, dtypes and metadata of `rsr_epilogue_fwd` (its public caller checks the parameters it is given)."""
    check_float_tensor(x, "x", _FLOAT_DTYPES, min_dim=3)
    check_float_tensor(conv, "conv", (x.dtype,), min_dim=3)
    _check_geometry(grid, stride)
    n_cls = int(cls is not None)
    ho, wo = pool_out_grid(grid, stride)
    if x.dim() != 3 or x.shape[1] != n_cls + grid[0] * grid[1]:
        raise ValueError(f"x must have shape (B, {n_cls} + H*W, Ci) = (B, {n_cls + grid[0] * grid[1]}, Ci) for "
                         f"grid={tuple(grid)}, got {tuple(x.shape)}")
    batch, ci_max = x.shape[0], x.shape[2]
    if conv.dim() != 3 or conv.shape[:2] != (batch, ho * wo) or conv.shape[2] < ci_max:
        raise ValueError(f"conv must have shape (B, Ho*Wo, Co >= Ci) = ({batch}, {ho * wo}, >= {ci_max}), got "
                         f"{tuple(conv.shape)}")
    co_max = conv.shape[2]
    for name, t, shape in (("pos_embed", pos_embed, (1, ho * wo, co_max)), ("conv_bias", conv_bias, (co_max,)),
                           ("cls", cls, (batch, 1, co_max)), ("cls_bias", cls_bias, (co_max,))):
        if t is None:
            continue
        check_tensor(t, name)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        check_same_device(x, t, "x", name)
    if (cls is None) != (cls_bias is None):
        raise ValueError("cls and cls_bias must be given together")
    if cls is not None:
        check_float_tensor(cls, "cls", (x.dtype,))
    check_groups(in_groups, batch, ci_max, batch_of="x", width_of="x", what="in_widths")
    check_groups(out_groups, batch, co_max, batch_of="x", width_of="conv (dim 2, Co)", what="out_widths")
    check_widths_device(in_groups, x, "in_widths", "x")
    check_widths_device(out_groups, x, "out_widths", "x")
    check_shortcut(in_groups, out_groups)


@torch.library.custom_op("resnas::rsr_epilogue_fwd", mutates_args=())
def rsr_epilogue_fwd(conv: torch.Tensor, x: torch.Tensor, pos_embed: torch.Tensor, conv_bias: torch.Tensor,
                     cls: Optional[torch.Tensor], cls_bias: Optional[torch.Tensor], sizes: List[int],
                     in_widths: torch.Tensor, out_widths: torch.Tensor, grid: List[int], stride: int) -> torch.Tensor:
    """out (B, n + Ho*Wo, Co); see the module docstring. n = 1 when cls is given; widths: int32 (G,) on x's device."""
    in_groups = Ragged(tuple(sizes), in_widths)
    out_groups = Ragged(tuple(sizes), out_widths)
    _check_args(conv, x, pos_embed, conv_bias, cls, cls_bias, in_groups, out_groups, grid, stride)
    impl = _FWD[resolve_backend_for(OP.name, x)]
    return impl(conv, x, pos_embed, conv_bias, cls, cls_bias, in_groups, out_groups,
                _geometry(grid, stride, cls is not None))


@rsr_epilogue_fwd.register_fake
def _fake_fwd(conv, x, pos_embed, conv_bias, cls, cls_bias, sizes, in_widths, out_widths, grid, stride):
    return x.new_empty((x.shape[0], int(cls is not None) + conv.shape[1], conv.shape[2]))


@torch.library.custom_op("resnas::rsr_epilogue_bwd", mutates_args=())
def rsr_epilogue_bwd(dout: torch.Tensor, sizes: List[int], in_widths: torch.Tensor, out_widths: torch.Tensor,
                     grid: List[int], stride: int, has_cls: bool, in_channels: int
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dconv, dx, dpos, dconv_bias, dcls, dcls_bias); parameter gradients in fp32 (fp64 for fp64), dcls and
    dcls_bias empty without cls."""
    in_groups = Ragged(tuple(sizes), in_widths)
    out_groups = Ragged(tuple(sizes), out_widths)
    check_float_tensor(dout, "dout", _FLOAT_DTYPES, min_dim=3)
    _check_geometry(grid, stride)
    ho, wo = pool_out_grid(grid, stride)
    n_out = int(bool(has_cls)) + ho * wo
    if dout.dim() != 3 or dout.shape[1] != n_out or dout.shape[2] < in_channels:
        raise ValueError(f"dout must have shape (B, has_cls + Ho*Wo, Co >= in_channels) = (B, {n_out}, >= "
                         f"{in_channels}), got {tuple(dout.shape)}")
    check_groups(in_groups, dout.shape[0], in_channels, batch_of="dout", width_of="in_channels", what="in_widths")
    check_groups(out_groups, dout.shape[0], dout.shape[2], batch_of="dout", width_of="dout (dim 2, Co)",
                 what="out_widths")
    check_widths_device(in_groups, dout, "in_widths", "dout")
    check_widths_device(out_groups, dout, "out_widths", "dout")
    impl = _BWD[resolve_backend_for(OP.name, dout)]
    return impl(dout, in_groups, out_groups, _geometry(grid, stride, has_cls), in_channels)


@rsr_epilogue_bwd.register_fake
def _fake_bwd(dout, sizes, in_widths, out_widths, grid, stride, has_cls, in_channels):
    b, n_out, co = dout.shape
    n_cls = int(has_cls)
    acc = compute_dtype(dout.dtype)
    return (dout.new_empty((b, n_out - n_cls, co)), dout.new_empty((b, n_cls + grid[0] * grid[1], in_channels)),
            dout.new_empty((1, n_out - n_cls, co), dtype=acc), dout.new_empty((co,), dtype=acc),
            dout.new_empty((b, 1, co)) if has_cls else dout.new_empty((0,)),
            dout.new_empty((co,), dtype=acc) if has_cls else dout.new_empty((0,), dtype=acc))


def _setup_context(ctx, inputs, output):
    conv, x, pos_embed, conv_bias, cls, cls_bias, sizes, in_widths, out_widths, grid, stride = inputs
    ctx.args = (sizes, in_widths, out_widths, grid, stride, cls is not None, x.shape[2])
    ctx.dtypes = (pos_embed.dtype, conv_bias.dtype, cls_bias.dtype if cls_bias is not None else None)


def _backward(ctx, dout):
    dconv, dx, dpos, dbias, dcls, dcls_bias = rsr_epilogue_bwd(dout.contiguous(), *ctx.args)
    pos_dtype, bias_dtype, cls_bias_dtype = ctx.dtypes
    has_cls = ctx.args[5]
    return (dconv, dx, dpos.to(pos_dtype), dbias.to(bias_dtype), dcls if has_cls else None,
            dcls_bias.to(cls_bias_dtype) if has_cls else None, None, None, None, None, None)


rsr_epilogue_fwd.register_autograd(_backward, setup_context=_setup_context)

# The C++ backends: one C++-registered op, resnas::rsr_epilogue (csrc/rsr.cpp: autograd and checks in C++), over the
# device kernels ext_rsr_epilogue_fwd / _bwd. Their fake kernels live here so torch.compile traces through the C++
# autograd.
_ext.register_cxx_fakes({"resnas::rsr_epilogue": _fake_fwd, "resnas::ext_rsr_epilogue_fwd": _fake_fwd,
                         "resnas::ext_rsr_epilogue_bwd": _fake_bwd})


# Taken once at trace time under torch.compile (as every backend decision: see ops/residual_spatial_reduction/).
@torch.compiler.assume_constant_result
def _cxx_backend(device: torch.device) -> bool:
    return resolve_backend(OP.name, device) in ("cpu", "cuda")
