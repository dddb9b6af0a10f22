"""Registration of the op: its backend entry, the bridge to the C++ kernels (with their fake kernels and the C++ public
op), and the Python custom ops `resnas::ragged_layer_norm_fwd / _bwd` (argument checks, fake implementations,
autograd) that the reference and Triton backends run."""
from typing import List, Optional, Tuple

import torch

from ...backend import OpInfo, register_op, resolve_backend_for
from ...ragged import Ragged
from ...reference.layer_norm import compute_dtype
from .._checks import check_float_tensor, check_groups, check_same_device, check_vector
from .reference_backend import _reference_bwd, _reference_fwd
from .triton_kernels import _triton_bwd, _triton_fwd

OP = register_op(OpInfo(
    name="ragged_layer_norm",
    backends=("triton", "cpu", "cuda"),
    auto_cuda=("triton", "cuda"),  # provisional order: no GPU benchmark has been run yet to decide it
    ext_ops=("ext_ragged_layer_norm_fwd", "ext_ragged_layer_norm_bwd"),
))

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------------------------------------
# C++ backends (csrc/cpu, csrc/cuda): same contract on 2-D rows with per-group row counts
# ---------------------------------------------------------------------------------------------------------------------
# The public function calls torch.ops.resnas.ragged_layer_norm (C++ checks and autograd) for these backends; the custom
# ops below reach the device kernels directly only when called themselves with the cpu / cuda backend forced.
def _ext_fwd(x2, r2, weight, bias, groups: Ragged, rows_per_sample: int, eps: float):
    return torch.ops.resnas.ext_ragged_layer_norm_fwd(x2, r2, weight, bias, groups.row_counts(rows_per_sample),
                                                      groups.widths_tensor(x2.device), eps)


def _ext_bwd(dy2, dz2, z2, weight, mean, rstd, groups: Ragged, rows_per_sample: int):
    return torch.ops.resnas.ext_ragged_layer_norm_bwd(dy2, dz2, z2, weight, mean, rstd,
                                                      groups.row_counts(rows_per_sample), groups.widths_tensor(z2.device))


def _stats_like(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x.new_empty((rows,), dtype=compute_dtype(x.dtype))


def _ext_fwd_fake(x, residual, weight, bias, row_counts, widths, eps):
    z = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
    return x.new_empty(x.shape), z, _stats_like(x, x.shape[0]), _stats_like(x, x.shape[0])


def _ext_bwd_fake(dy, dz, z, weight, mean, rstd, row_counts, widths):
    return z.new_empty(z.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


_cxx_op = None  # torch.ops.resnas.ragged_layer_norm.default once the extension is loaded (an overload: cheaper to call)


def _bind_cxx_op() -> None:
    """Looks up the C++ op and registers the fake kernels of the ext_* ops, which torch.compile meets inside its C++
    autograd. Both need the extension's ops defined: the public function's `_resolve_backend` calls this when it
    first picks a C++ backend (the extension loads lazily, when such a backend is first resolved)."""
    global _cxx_op
    if _cxx_op is None:
        torch.library.register_fake("resnas::ext_ragged_layer_norm_fwd")(_ext_fwd_fake)
        torch.library.register_fake("resnas::ext_ragged_layer_norm_bwd")(_ext_bwd_fake)
        _cxx_op = torch.ops.resnas.ragged_layer_norm.default


_FWD = {"reference": _reference_fwd, "triton": _triton_fwd, "cpu": _ext_fwd, "cuda": _ext_fwd}
_BWD = {"reference": _reference_bwd, "triton": _triton_bwd, "cpu": _ext_bwd, "cuda": _ext_bwd}


# ---------------------------------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile, with fake implementations and autograd)
# ---------------------------------------------------------------------------------------------------------------------
def _rows(x: torch.Tensor, batch: int) -> int:
    return x.numel() // (batch * x.shape[-1]) if batch and x.shape[-1] else 0


def _check_args(x, residual, weight, bias, groups: Ragged, what: str = "widths") -> None:
    """The argument checks of `ragged_layer_norm`, run again by the custom op (direct calls, torch.compile)."""
    check_float_tensor(x, "x", _FLOAT_DTYPES, min_dim=2)
    c_max = x.shape[-1]
    check_groups(groups, x.shape[0], c_max, batch_of="x", width_of="x", what=what)
    if groups.on_device:
        check_same_device(x, groups.widths, "x", what)
    if residual is not None:
        check_float_tensor(residual, "residual", _FLOAT_DTYPES, min_dim=2)
        check_same_device(x, residual, "x", "residual")
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual must match x in shape and dtype: x is {tuple(x.shape)} {x.dtype}, residual is "
                             f"{tuple(residual.shape)} {residual.dtype}")
    for name, p in (("weight", weight), ("bias", bias)):
        check_vector(p, name, c_max, (x.dtype, torch.float32))
        check_same_device(x, p, "x", name)


def _check_bwd_args(dy, dz, z, weight, mean, rstd, groups: Ragged) -> None:
    check_float_tensor(z, "z", _FLOAT_DTYPES, min_dim=2)
    c_max = z.shape[-1]
    check_groups(groups, z.shape[0], c_max, batch_of="z", width_of="z")
    if groups.on_device:
        check_same_device(z, groups.widths, "z", "widths")
    for name, t in (("dy", dy), ("dz", dz)):
        if t is not None and (t.shape != z.shape or t.dtype != z.dtype):
            raise ValueError(f"{name} must match z in shape and dtype: z is {tuple(z.shape)} {z.dtype}, {name} is "
                             f"{tuple(t.shape)} {t.dtype}")
    check_vector(weight, "weight", c_max, (z.dtype, torch.float32))
    rows = z.numel() // c_max if c_max else 0
    for name, t in (("mean", mean), ("rstd", rstd)):
        check_vector(t, name, rows, (compute_dtype(z.dtype),))


@torch.library.custom_op("resnas::ragged_layer_norm_fwd", mutates_args=())
def ragged_layer_norm_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                          sizes: List[int], widths: torch.Tensor, eps: float
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, z, mean, rstd); z = x + residual (empty without a residual); mean/rstd per row, fp32 (fp64 for
    fp64 inputs). `widths`: int32 (G,) on x's device."""
    groups = Ragged(tuple(sizes), widths)
    _check_args(x, residual, weight, bias, groups)
    c_max = x.shape[-1]
    x2 = x.reshape(-1, c_max)
    r2 = residual.reshape(-1, c_max) if residual is not None else None
    impl = _FWD[resolve_backend_for(OP.name, x)]
    y, z, mean, rstd = impl(x2, r2, weight, bias, groups, _rows(x, groups.batch), eps)
    return y.view(x.shape), (z.view(x.shape) if residual is not None else z), mean, rstd


@ragged_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, sizes, widths, eps):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    z = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
    return x.new_empty(x.shape), z, _stats_like(x, rows), _stats_like(x, rows)


@torch.library.custom_op("resnas::ragged_layer_norm_bwd", mutates_args=())
def ragged_layer_norm_bwd(dy: torch.Tensor, dz: Optional[torch.Tensor], z: torch.Tensor, weight: torch.Tensor,
                          mean: torch.Tensor, rstd: torch.Tensor, sizes: List[int], widths: torch.Tensor
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dweight, dbias). `z` is the normalised input (x + residual when fused); `dz`, the gradient of the
    fused sum output, is added to dx in the same pass."""
    groups = Ragged(tuple(sizes), widths)
    _check_bwd_args(dy, dz, z, weight, mean, rstd, groups)
    c_max = z.shape[-1]
    impl = _BWD[resolve_backend_for(OP.name, z)]
    dx, dw, db = impl(dy.reshape(-1, c_max).contiguous(), dz.reshape(-1, c_max).contiguous() if dz is not None else None,
                      z.reshape(-1, c_max), weight, mean, rstd, groups, _rows(z, groups.batch))
    return dx.view(z.shape), dw, db


@ragged_layer_norm_bwd.register_fake
def _(dy, dz, z, weight, mean, rstd, sizes, widths):
    return z.new_empty(z.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, sizes, widths, eps = inputs
    _, z, mean, rstd = output
    ctx.save_for_backward(z if residual is not None else x, weight, mean, rstd, widths)
    ctx.has_residual = residual is not None
    ctx.sizes = sizes


def _backward(ctx, dy, dz, _dmean, _drstd):
    z, weight, mean, rstd, widths = ctx.saved_tensors
    dz = dz if ctx.has_residual else None
    dx, dw, db = ragged_layer_norm_bwd(dy, dz, z, weight, mean, rstd, ctx.sizes, widths)
    return dx, (dx if ctx.has_residual else None), dw, db, None, None, None


ragged_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
