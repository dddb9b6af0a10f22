"""The op's backend entry, argument checks, `torch.library` custom ops (reference / Triton backends) with fakes and
autograd, and the bridge to the C++ kernels (csrc/cpu/rsr_im2col.cpp, csrc/cuda/rsr_im2col.cu, csrc/rsr.cpp)."""
from typing import List, Sequence, Tuple

import torch

from ... import _ext
from ...backend import OpInfo, register_op, resolve_backend, resolve_backend_for
from ...ragged import Ragged
from .._checks import check_float_tensor, check_groups
from .reference_backend import _reference_bwd, _reference_fwd
from .triton_kernels import _triton_bwd, _triton_fwd

OP = register_op(OpInfo(
    name="rsr_im2col",
    backends=("triton", "cpu", "cuda"),
    auto_cuda=("triton", "cuda"),
    ext_ops=("ext_rsr_im2col_fwd", "ext_rsr_im2col_bwd"),
))

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def conv_out_grid(grid: Sequence[int], kernel_size: int, stride: int, padding: int) -> Tuple[int, int]:
    """(Ho, Wo) of a conv with this geometry; raises ValueError when the kernel does not fit the padded grid."""
    out = []
    for side in grid:
        if side + 2 * padding < kernel_size:
            raise ValueError(f"kernel_size={kernel_size} exceeds the padded grid side {side} + 2 * {padding}")
        out.append((side + 2 * padding - kernel_size) // stride + 1)
    return out[0], out[1]


def _ext_fwd(u, groups: Ragged, geo):
    grid, k, s, p, n_cls, _ = geo
    return torch.ops.resnas.ext_rsr_im2col_fwd(u, list(groups.sizes), groups.widths_tensor(u.device), list(grid), k,
                                               s, p, bool(n_cls))


def _ext_bwd(dcols, groups: Ragged, geo):
    grid, k, s, p, n_cls, _ = geo
    return torch.ops.resnas.ext_rsr_im2col_bwd(dcols, list(groups.sizes), groups.widths_tensor(dcols.device),
                                               list(grid), k, s, p, bool(n_cls))


_FWD = {"reference": _reference_fwd, "triton": _triton_fwd, "cpu": _ext_fwd, "cuda": _ext_fwd}
_BWD = {"reference": _reference_bwd, "triton": _triton_bwd, "cpu": _ext_bwd, "cuda": _ext_bwd}


# ---------------------------------------------------------------------------------------------------------------------
# torch.library custom ops
# ---------------------------------------------------------------------------------------------------------------------
def _geometry(grid: List[int], kernel_size: int, stride: int, padding: int, has_cls: bool):
    return (tuple(grid), kernel_size, stride, padding, int(has_cls),
            conv_out_grid(grid, kernel_size, stride, padding))


def _check_geometry(grid, kernel_size, stride, padding) -> None:
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(v, int) and v > 0 for v in grid)):
        raise ValueError(f"grid must be a pair of positive ints (H, W), got {grid!r}")
    for name, v, low in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    conv_out_grid(grid, kernel_size, stride, padding)


def check_widths_device(groups: Ragged, t: torch.Tensor, what: str, t_name: str) -> None:
    """A widths tensor must live on the device of the activations it describes (the kernels read it there)."""
    if groups.on_device and groups.widths.device != t.device:
        raise ValueError(f"{what} must be on the same device as {t_name}: {t_name} is on {t.device}, {what} is on "
                         f"{groups.widths.device}")


def _check_args(u, groups: Ragged, grid, has_cls, kernel_size, stride, padding, what: str = "widths") -> None:
    """The argument checks of `rsr_im2col`, run again by the custom op (direct calls, torch.compile)."""
    check_float_tensor(u, "u", _FLOAT_DTYPES, min_dim=3)
    if u.dim() != 3:
        raise ValueError(f"u must have shape (B, tokens, C), got {tuple(u.shape)}")
    _check_geometry(grid, kernel_size, stride, padding)
    n = int(bool(has_cls)) + grid[0] * grid[1]
    if u.shape[1] != n:
        raise ValueError(f"u has {u.shape[1]} tokens but grid={tuple(grid)} with has_cls={bool(has_cls)} needs {n}")
    check_groups(groups, u.shape[0], u.shape[2], batch_of="u", width_of="u", what=what)
    check_widths_device(groups, u, what, "u")


def _check_bwd_args(dcols, groups: Ragged, grid, kernel_size, stride, padding) -> None:
    check_float_tensor(dcols, "dcols", _FLOAT_DTYPES, min_dim=3)
    _check_geometry(grid, kernel_size, stride, padding)
    ho, wo = conv_out_grid(grid, kernel_size, stride, padding)
    kk = kernel_size * kernel_size
    if dcols.dim() != 3 or dcols.shape[1] != ho * wo or dcols.shape[2] % kk:
        raise ValueError(f"dcols must have shape (B, Ho*Wo, C*k*k) = (B, {ho * wo}, C*{kk}), got {tuple(dcols.shape)}")
    check_groups(groups, dcols.shape[0], dcols.shape[2] // kk, batch_of="dcols", width_of="dcols (C = dim 2 / k*k)")
    check_widths_device(groups, dcols, "widths", "dcols")


@torch.library.custom_op("resnas::rsr_im2col_fwd", mutates_args=())
def rsr_im2col_fwd(u: torch.Tensor, sizes: List[int], widths: torch.Tensor, grid: List[int], kernel_size: int,
                   stride: int, padding: int, has_cls: bool) -> torch.Tensor:
    """cols (B, Ho*Wo, C*k*k) of u (B, has_cls + H*W, C); widths: int32 (G,) on u's device. See the module
    docstring."""
    groups = Ragged(tuple(sizes), widths)
    _check_args(u, groups, grid, has_cls, kernel_size, stride, padding)
    impl = _FWD[resolve_backend_for(OP.name, u)]
    return impl(u, groups, _geometry(grid, kernel_size, stride, padding, has_cls))


@rsr_im2col_fwd.register_fake
def _fake_fwd(u, sizes, widths, grid, kernel_size, stride, padding, has_cls):
    ho, wo = conv_out_grid(grid, kernel_size, stride, padding)
    return u.new_empty((u.shape[0], ho * wo, u.shape[2] * kernel_size * kernel_size))


@torch.library.custom_op("resnas::rsr_im2col_bwd", mutates_args=())
def rsr_im2col_bwd(dcols: torch.Tensor, sizes: List[int], widths: torch.Tensor, grid: List[int], kernel_size: int,
                   stride: int, padding: int, has_cls: bool) -> torch.Tensor:
    """du (B, has_cls + H*W, C): the adjoint of rsr_im2col_fwd (zero cls row, zero beyond the widths)."""
    groups = Ragged(tuple(sizes), widths)
    _check_bwd_args(dcols, groups, grid, kernel_size, stride, padding)
    impl = _BWD[resolve_backend_for(OP.name, dcols)]
    return impl(dcols, groups, _geometry(grid, kernel_size, stride, padding, has_cls))


@rsr_im2col_bwd.register_fake
def _fake_bwd(dcols, sizes, widths, grid, kernel_size, stride, padding, has_cls):
    c = dcols.shape[2] // (kernel_size * kernel_size)
    return dcols.new_empty((dcols.shape[0], int(has_cls) + grid[0] * grid[1], c))


def _setup_context(ctx, inputs, output):
    _, sizes, widths, grid, kernel_size, stride, padding, has_cls = inputs
    ctx.args = (sizes, widths, grid, kernel_size, stride, padding, has_cls)


def _backward(ctx, dcols):
    return (rsr_im2col_bwd(dcols.contiguous(), *ctx.args),) + (None,) * 7


rsr_im2col_fwd.register_autograd(_backward, setup_context=_setup_context)

# The C++ backends: one C++-registered op, resnas::rsr_im2col (csrc/rsr.cpp: autograd and checks in C++), over the
# device kernels ext_rsr_im2col_fwd / _bwd. Their fake kernels live here so torch.compile traces through the C++
# autograd.
_ext.register_cxx_fakes({"resnas::rsr_im2col": _fake_fwd, "resnas::ext_rsr_im2col_fwd": _fake_fwd,
                         "resnas::ext_rsr_im2col_bwd": _fake_bwd})


# Taken once at trace time under torch.compile (as every backend decision: see ops/residual_spatial_reduction/).
@torch.compiler.assume_constant_result
def _cxx_backend(device: torch.device) -> bool:
    return resolve_backend(OP.name, device) in ("cpu", "cuda")
