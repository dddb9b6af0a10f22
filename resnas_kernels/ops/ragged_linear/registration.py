"""Registration of the op: its backend entry, the fake kernels of the C++ ops (csrc/cpu/ragged_linear.cpp), the
argument checks of the Python path, and the `torch.library` custom ops `resnas::ragged_linear_fwd / _bwd` (fake
implementations, autograd) that the reference and Triton backends run."""
from typing import List, Optional, Tuple

import torch
from torch._subclasses.fake_tensor import is_fake

from ... import _ext
from ...backend import BackendUnavailableError, OpInfo, register_op, resolve_backend_for
from ...ragged import WIDTH_DTYPE, validate_metadata
from .._checks import check_float_tensor, check_same_device, check_tensor
from .reference_backend import _reference_bwd, _reference_fwd
from .triton_kernels import _triton_bwd, _triton_fwd

OP = register_op(OpInfo(
    name="ragged_linear",
    backends=("triton", "cpu"),
    auto_cuda=("triton",),
    ext_ops=("ragged_linear", "ext_ragged_linear_fwd", "ext_ragged_linear_bwd"),
))

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ACTIVATIONS = ("none", "gelu")


def _triton_or_reference(triton_impl, reference_impl):
    """fp64 goes to the reference: the Triton kernels target tensor-core dtypes (see the caveats above)."""
    def impl(*args):
        dtype = args[1].dtype
        if dtype == torch.bfloat16 and _ext.triton_interpreting():
            raise BackendUnavailableError(
                "ragged_linear: bf16 on the Triton backend under TRITON_INTERPRET=1 is refused: Triton's interpreter "
                "computes bf16 tl.dot wrongly. Use fp16 / fp32 there, or another backend (reference, cpu)")
        return (reference_impl if dtype == torch.float64 else triton_impl)(*args)
    return impl


_FWD = {"reference": _reference_fwd, "triton": _triton_or_reference(_triton_fwd, _reference_fwd)}
_BWD = {"reference": _reference_bwd, "triton": _triton_or_reference(_triton_bwd, _reference_bwd)}


# ---------------------------------------------------------------------------------------------------------------------
# C++ backend (csrc/cpu/ragged_linear.cpp): resnas::ragged_linear (checks + autograd in C++) over the ext_* kernels,
# whose fake implementations live here so that torch.compile traces through the C++ autograd
# ---------------------------------------------------------------------------------------------------------------------
def _ext_fwd_fake(x, weight, bias, residual, row_scale, sizes, in_widths, out_widths, segments, gelu, save_pre):
    out_shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(out_shape), (x.new_empty(out_shape) if save_pre else x.new_empty((0,)))


def _ext_bwd_fake(dy, x, weight, pre, row_scale, sizes, in_widths, out_widths, segments, gelu, has_bias,
                  has_residual):
    db = weight.new_empty((weight.shape[0],)) if has_bias else weight.new_empty((0,))
    dr = dy.new_empty(dy.shape) if has_residual else dy.new_empty((0,))
    return x.new_empty(x.shape), weight.new_empty(weight.shape), db, dr


def _op_fake(x, weight, bias, residual, row_scale, sizes, in_widths, out_widths, segments=1, activation=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# The ops exist once the extension is loaded; registering here (import time) rather than on first use keeps the
# registration out of any torch.compile trace.
_ext.register_cxx_fakes({"resnas::ext_ragged_linear_fwd": _ext_fwd_fake, "resnas::ext_ragged_linear_bwd": _ext_bwd_fake,
                         "resnas::ragged_linear": _op_fake})



# ---------------------------------------------------------------------------------------------------------------------
# torch.library custom ops of the reference and Triton backends (opaque to torch.compile, with fake implementations
# and autograd). On the cpu backend they run the C++ kernels, for direct calls (tests, opcheck).
# ---------------------------------------------------------------------------------------------------------------------
def _rows_per_sample(x: torch.Tensor) -> int:
    return x.numel() // (x.shape[0] * x.shape[-1]) if x.shape[0] and x.shape[-1] else 1


def _row_counts(sizes: List[int], rows_per_sample: int) -> Tuple[int, ...]:
    return tuple(int(s) * rows_per_sample for s in sizes)


@torch.library.custom_op("resnas::ragged_linear_fwd", mutates_args=())
def ragged_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      residual: Optional[torch.Tensor], row_scale: Optional[torch.Tensor], sizes: List[int],
                      in_widths: torch.Tensor, out_widths: torch.Tensor, segments: int, activation: str,
                      save_pre: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (y, pre). pre = x W^T + b (the GELU input, zeros beyond n_g) when activation == "gelu" and save_pre,
    else an empty tensor. in_widths / out_widths: int32 (G,) on x's device. Arguments are checked as by
    `ragged_linear` (`_check_args`)."""
    _check_args(x, weight, bias, residual, row_scale, sizes, in_widths, out_widths, segments)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    gelu = activation == "gelu"
    backend = resolve_backend_for(OP.name, x)
    if backend == "cpu":
        return torch.ops.resnas.ext_ragged_linear_fwd(x, weight, bias, residual, row_scale, sizes, in_widths,
                                                      out_widths, segments, gelu, gelu and save_pre)
    rps = _rows_per_sample(x)
    k_max, n_max = x.shape[-1], weight.shape[0]
    y, pre = _FWD[backend](x.reshape(-1, k_max), weight, bias,
                           residual.reshape(-1, n_max) if residual is not None else None, row_scale,
                           _row_counts(sizes, rps), in_widths.contiguous(), out_widths.contiguous(), segments, rps,
                           gelu, gelu and save_pre)
    out_shape = (*x.shape[:-1], n_max)
    return y.view(out_shape), (pre.view(out_shape) if gelu and save_pre else pre)


@ragged_linear_fwd.register_fake
def _(x, weight, bias, residual, row_scale, sizes, in_widths, out_widths, segments, activation, save_pre):
    out_shape = (*x.shape[:-1], weight.shape[0])
    pre = x.new_empty(out_shape) if activation == "gelu" and save_pre else x.new_empty((0,))
    return x.new_empty(out_shape), pre


@torch.library.custom_op("resnas::ragged_linear_bwd", mutates_args=())
def ragged_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, pre: Optional[torch.Tensor],
                      row_scale: Optional[torch.Tensor], sizes: List[int], in_widths: torch.Tensor,
                      out_widths: torch.Tensor, segments: int, activation: str, has_bias: bool, has_residual: bool
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dweight, dbias, dresidual); dbias / dresidual are empty without a bias / residual.
    `pre` (the saved GELU input) is required when activation == "gelu"."""
    _check_args(x, weight, None, None, row_scale, sizes, in_widths, out_widths, segments)
    out_shape = (*x.shape[:-1], weight.shape[0])
    if tuple(dy.shape) != out_shape or dy.dtype != x.dtype:
        raise ValueError(f"dy must have the output's shape {out_shape} and x's dtype {x.dtype}, got "
                         f"{tuple(dy.shape)} {dy.dtype}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    gelu = activation == "gelu"
    if gelu and (pre is None or pre.numel() != dy.numel()):
        raise RuntimeError("ragged_linear_bwd: activation='gelu' needs the saved pre-activation; run the forward "
                           "with save_pre=True when gradients are needed")
    backend = resolve_backend_for(OP.name, x)
    if backend == "cpu":
        return torch.ops.resnas.ext_ragged_linear_bwd(dy, x, weight, pre if gelu else None, row_scale, sizes,
                                                      in_widths, out_widths, segments, gelu, has_bias, has_residual)
    rps = _rows_per_sample(x)
    k_max, n_max = x.shape[-1], weight.shape[0]
    dx, dw, db, dr = _BWD[backend](dy.reshape(-1, n_max).contiguous(), x.reshape(-1, k_max), weight,
                                   pre.reshape(-1, n_max) if gelu else None, row_scale, _row_counts(sizes, rps),
                                   in_widths.contiguous(), out_widths.contiguous(), segments, rps, gelu, has_bias,
                                   has_residual)
    return dx.view(x.shape), dw, db, (dr.view(dy.shape) if has_residual else dr)


@ragged_linear_bwd.register_fake
def _(dy, x, weight, pre, row_scale, sizes, in_widths, out_widths, segments, activation, has_bias, has_residual):
    db = weight.new_empty((weight.shape[0],)) if has_bias else weight.new_empty((0,))
    dr = dy.new_empty(dy.shape) if has_residual else dy.new_empty((0,))
    return x.new_empty(x.shape), weight.new_empty(weight.shape), db, dr


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, row_scale, sizes, in_widths, out_widths, segments, activation, save_pre = inputs
    _, pre = output
    gelu_saved = activation == "gelu" and save_pre
    ctx.save_for_backward(x, weight, pre if gelu_saved else None, row_scale, in_widths, out_widths)
    ctx.meta = (sizes, segments, activation)
    ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
    ctx.missing_pre = activation == "gelu" and not save_pre
    # `pre` is an internal output that gets no gradient: without this, autograd would allocate and zero-fill a
    # gradient of the output's size for it on every backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _dpre):
    x, weight, pre, row_scale, in_widths, out_widths = ctx.saved_tensors
    if dy is None:  # only `pre` was used downstream; y gets a zero gradient
        dy = x.new_zeros((*x.shape[:-1], weight.shape[0]))
    if ctx.missing_pre:
        raise RuntimeError("resnas::ragged_linear_fwd was called with activation='gelu' and save_pre=False, so it "
                           "cannot be differentiated; ragged_linear(...) sets save_pre when gradients are needed")
    if ctx.needs_input_grad[4]:
        raise RuntimeError("row_scale gets no gradient from ragged_linear (a drop-path scale is a constant); detach it")
    sizes, segments, activation = ctx.meta
    dx, dw, db, dr = ragged_linear_bwd(dy, x, weight, pre, row_scale, sizes, in_widths, out_widths, segments,
                                       activation, ctx.has_bias, ctx.has_residual)
    return (dx, dw, db if ctx.has_bias else None, dr if ctx.has_residual else None, None, None, None, None, None,
            None, None)


ragged_linear_fwd.register_autograd(_backward, setup_context=_setup_context)



# ---------------------------------------------------------------------------------------------------------------------
# Argument checks of the Python path (the C++ op checks the same in C++, with the same messages)
# ---------------------------------------------------------------------------------------------------------------------
def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__") or int(value) < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _width_values(widths: torch.Tensor) -> Optional[List[int]]:
    """Host values of a widths tensor when reading them costs no device sync (CPU; or the debug switch), else None.
    Never while tracing (fake tensors have no values)."""
    if widths.device.type != "cpu" and not validate_metadata():
        return None
    if torch.compiler.is_compiling() or is_fake(widths):
        return None
    return widths.tolist()


def _check_widths(widths, num_groups: int, x: torch.Tensor, bound: int, name: str, exceeds: str) -> None:
    """dtype, shape and device of a widths tensor, and its values when they are host-readable (`_width_values`)."""
    if not isinstance(widths, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor (device metadata), got {type(widths).__name__}")
    if widths.dtype != WIDTH_DTYPE:
        raise TypeError(f"{name} must be an int32 tensor (device metadata), got dtype {widths.dtype}")
    if widths.dim() != 1 or widths.shape[0] != num_groups:
        raise ValueError(f"{name} must have shape ({num_groups},) (one width per group), got {tuple(widths.shape)}")
    if widths.device != x.device:
        raise ValueError(f"{name} must be on the same device as x: x is on {x.device}, {name} is on {widths.device}")
    for g, w in enumerate(_width_values(widths) or ()):
        if w < 0:
            raise ValueError(f"{name}[{g}] must be >= 0, got {w}")
        if w > bound:
            raise ValueError(f"{name}[{g}]={w} exceeds {exceeds}; {name} must lie in [0, {bound}]")


def _check_args(x, weight, bias, residual, row_scale, sizes, in_widths: torch.Tensor, out_widths: torch.Tensor,
                segments, in_name: str = "in_widths") -> None:
    """The argument checks of `ragged_linear`, run by the custom ops (direct calls, torch.compile's)."""
    check_float_tensor(x, "x", _FLOAT_DTYPES, min_dim=2)
    check_tensor(weight, "weight")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"weight must have shape (N_max >= 1, K_max) with K_max = x.shape[-1] = {x.shape[-1]} >= 1, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype} (cast it before the call)")
    check_same_device(x, weight, "x", "weight")
    if not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous (row-major (N_max, K_max)), got strides {weight.stride()}")
    k_max, n_max = x.shape[-1], weight.shape[0]
    segments = _check_int(segments, "segments", 1)
    if n_max % segments:
        raise ValueError(f"segments={segments} must divide N_max = weight.shape[0] = {n_max}")
    seg_width = n_max // segments
    if bias is not None:
        check_tensor(bias, "bias")
        if bias.dim() != 1 or bias.shape[0] != n_max:
            raise ValueError(f"bias must have shape ({n_max},) (N_max = weight.shape[0]), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
        check_same_device(x, bias, "x", "bias")
        if not bias.is_contiguous():
            raise ValueError("bias must be contiguous")
    sizes = tuple(sizes)
    if not sizes:
        raise ValueError("sizes must name at least one group, got an empty sequence")
    if any(s < 0 for s in sizes):
        raise ValueError(f"sizes must be >= 0, got {sizes}")
    if sum(sizes) != x.shape[0]:
        raise ValueError(f"sum of group sizes ({sum(sizes)}, sizes={sizes}) must equal the batch size of x "
                         f"(dim 0: {x.shape[0]})")
    _check_widths(in_widths, len(sizes), x, k_max, in_name, f"the maximum width {k_max} of x")
    _check_widths(out_widths, len(sizes), x, seg_width, "out_widths",
                  f"the segment width {seg_width} (N_max={n_max} / segments={segments})")
    out_shape = (*x.shape[:-1], n_max)
    if residual is not None:
        check_float_tensor(residual, "residual", _FLOAT_DTYPES, min_dim=2)
        check_same_device(x, residual, "x", "residual")
        if tuple(residual.shape) != out_shape or residual.dtype != x.dtype:
            raise ValueError(f"residual must have the output's shape {out_shape} and x's dtype {x.dtype}, got "
                             f"{tuple(residual.shape)} {residual.dtype}")
    if row_scale is not None:
        check_tensor(row_scale, "row_scale")
        if row_scale.dim() != 1 or row_scale.shape[0] != x.shape[0]:
            raise ValueError(f"row_scale must have shape ({x.shape[0]},) (one scale per sample), got "
                             f"{tuple(row_scale.shape)}")
        if row_scale.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"row_scale must have dtype {x.dtype} or torch.float32, got {row_scale.dtype}")
        check_same_device(x, row_scale, "x", "row_scale")
        if not row_scale.is_contiguous():
            raise ValueError("row_scale must be contiguous")
