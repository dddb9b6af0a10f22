"""Ragged LayerNorm, optionally fused with a residual add: y = LN_g(x [+ r]) over each group's first c_g channels.

Spec: `resnas_kernels.reference.ragged_layer_norm` (the oracle). The op's roles, one file each:
- `__init__.py` (this file): the public function, and the backend pick of its calls;
- `registration.py`: the backend entry, the bridge to the C++ kernels in `csrc/` (fake kernels, the C++ public op),
  and the `torch.library` custom ops of the reference / Triton backends with their fake implementations and autograd;
- `triton_kernels.py`: the Triton kernels and their launchers; `aot.py`: their ahead-of-time compilation cases;
- `reference_backend.py`: the explicit PyTorch backend.

Backends: reference | triton | cpu (csrc/cpu/ragged_layer_norm.cpp) | cuda (csrc/cuda/ragged_layer_norm.cu).

Dispatch: the cpu / cuda backends are one C++ op, `torch.ops.resnas.ragged_layer_norm` (csrc/ragged_layer_norm.cpp:
schema, argument checks, autograd and no-grad forward in C++, calling the device kernels `ext_ragged_layer_norm_fwd /
_bwd`); the public function only converts its arguments, picks the backend and calls it: one dispatcher hop. Their
fake kernels are registered here, so torch.compile traces through the C++ autograd. The reference and Triton
backends run the Python custom ops `resnas::ragged_layer_norm_fwd / _bwd` (Python is needed there anyway).

Metadata: the group sizes are host ints (static: they fix shapes and grids); the widths reach every backend as an
int32 (G,) tensor on x's device (`Ragged.widths_tensor`), so a new architecture is a new tensor value: torch.compile
does not recompile and nothing syncs. Width values are checked on the host only when that is free (host widths, CPU
tensors; CUDA tensors only with `set_validate_metadata(True)`), and never trusted: the reference masks by tensor
comparisons, the Triton and CUDA kernels clamp every width to [0, C_max] on the device, and the C++ CPU kernels read
and check the CPU tensor. No widths value can make a kernel address memory outside the tensors.

Caveats:
- x and residual must be contiguous with the ragged channels last; rows are flattened to (B * prod(middle), C_max).
- Statistics (and the saved mean/rstd) are fp32, fp64 for fp64 inputs; y is cast back to x's dtype. weight/bias may
  be x's dtype or fp32.
- Every backend centres twice (the corrected two-pass algorithm). The computed mean is off by its rounding error,
  up to ~u * |mean|, which shifts every z - mean alike; on rows with |mean| >> std, rstd turns that shift into an
  error of u * |mean| * rstd in y, and the backward's cancellation (dx is w * dy minus its projections on 1 and xhat,
  times rstd) amplifies it again. So the forward subtracts shift = mean(z - mean) (exact to ~u * std) before
  normalising, with var = mean((z - mean)^2) - shift^2, and the backward re-centres xhat = (z - mean) * rstd from the
  saved mean the same way. dx on such rows is then 10-100x closer to the exact gradient than with plain two-pass
  statistics, and than PyTorch's own LayerNorm backward.
- fp64 on the Triton backend runs the reference (the kernels compute in fp32), as for every op.
- The custom ops check their metadata and shapes themselves (`_check_args` in Python, `check_args` in C++), so
  direct `torch.ops.resnas.*` calls and torch.compile's get the public function's errors on every backend.
- mean/rstd of width-0 rows are stored as 0; those rows are all zeros in y, z and dx.
- dweight/dbias are deterministic: each program (Triton) or fixed chunk of rows (C++) writes its own partial row,
  and the partials are summed in a fixed order, so two runs give bitwise-equal gradients on the same device.
- The fused sum output z is defined as zero beyond c_g (not x + r there), so no gradient flows through those columns.
- With a residual, z = x + r is rounded to x's dtype first and the stored z is normalised (as unfused PyTorch does),
  so forward statistics and backward agree even on near-constant rows in fp16/bf16.
- Double backward is not supported.
"""
import functools
from typing import Optional, Tuple

import torch

from ...backend import get_backend, resolve_backend
from ...ragged import Ragged, validate_metadata
from .._checks import check_float_tensor, check_tensor
from . import aot, registration  # noqa: F401  (importing aot registers the AOT cases)
from .registration import OP, _FLOAT_DTYPES, _check_args, ragged_layer_norm_bwd, ragged_layer_norm_fwd
# Private names the tests reach through the op's import path (launchers and reference on 2-D rows).
from .reference_backend import _reference_bwd, _reference_fwd  # noqa: F401
from .triton_kernels import _triton_bwd, _triton_fwd  # noqa: F401

__all__ = ["ragged_layer_norm", "ragged_layer_norm_fwd", "ragged_layer_norm_bwd"]


# ---------------------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------------------
@torch.compiler.assume_constant_result
def _backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend of a call on x's device and dtype (`resolve_backend_for`). torch.compile runs it once, when it
    traces, and bakes the answer into the graph (backend resolution loads the extension: not traceable); a backend
    forced later applies to eager calls and to graphs compiled after it."""
    return _resolve_backend(get_backend(), device, dtype)


@functools.lru_cache(maxsize=64)
def _resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    # Cached per requested backend (set_backend / RESNAS_BACKEND, read again inside), device and dtype: the answer
    # depends on nothing else that changes in a process (what is built and importable is fixed once loaded).
    # A forced backend that cannot run raises, which is not cached.
    backend = resolve_backend(OP.name, device)
    if backend == "triton" and dtype == torch.float64:
        backend = "reference"  # resolve_backend_for's dtype rule: the Triton kernels compute in fp32
    if backend == "cpu" or backend == "cuda":
        registration._bind_cxx_op()
    return backend


@functools.lru_cache(maxsize=256)
def _host_widths_tensor(widths: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """`Ragged.widths_tensor(device)` of host widths (the same cached tensor), looked up by the widths tuple and the
    device as they are: hashing a Ragged and formatting the device name cost more than the C++ op's checks."""
    return Ragged((0,) * len(widths), widths).widths_tensor(device)


def ragged_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: Optional[Ragged] = None,
                      eps: float = 1e-6, residual: Optional[torch.Tensor] = None):
    """LayerNorm over each group's first c_g channels, zeros beyond; see `resnas_kernels.reference.ragged_layer_norm`.

    Args:
        x: (B, ..., C_max) contiguous, zero beyond each group's width (the ragged contract).
        weight, bias: (C_max,) shared affine parameters; group g uses their first c_g entries.
        groups: `Ragged(sizes, widths)` over dim 0 of x; None means one group at full width. The widths may be host
            ints or an int32 (G,) tensor on x's device (device metadata: no sync, no recompile per architecture).
            Values outside [0, C_max] raise where they can be read for free (host ints, CPU tensors); on CUDA they
            are clamped to [0, C_max] by the kernels (`set_validate_metadata(True)` checks them, at a sync per call).
        eps: added to the variance.
        residual: optional tensor like x; when given, the op normalises x + residual and returns (y, x + residual).
    """
    # Kept lean: on the C++ backends every argument check runs once, in C++ (csrc/ragged_layer_norm.cpp), with the
    # messages of the Python checks the other backends run below.
    check_tensor(x, "x")
    if groups is None:
        if x.dim() < 2:
            check_float_tensor(x, "x", _FLOAT_DTYPES, min_dim=2)
        groups = Ragged.uniform(x.shape[0], x.shape[-1])
    elif not isinstance(groups, Ragged):
        raise TypeError(f"groups must be a resnas_kernels.Ragged, got {type(groups).__name__}")
    if not isinstance(eps, (int, float)):
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    backend = _backend(x.device, x.dtype)
    if backend == "cpu" or backend == "cuda":
        if groups.on_device and validate_metadata():  # the debug switch: check CUDA values too (syncs)
            groups.check(x.shape[0], x.shape[-1], arg="x", what="groups.widths", device=x.device)
        widths = groups.widths if groups.on_device else _host_widths_tensor(groups.widths, x.device)
        y, z = registration._cxx_op(x, weight, bias, groups.sizes, widths, float(eps), residual)
        return y if residual is None else (y, z)
    check_float_tensor(x, "x", _FLOAT_DTYPES, min_dim=2)
    _check_args(x, residual, weight, bias, groups, what="groups.widths")
    if not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    y, z, _, _ = ragged_layer_norm_fwd(x, residual, weight, bias, list(groups.sizes), groups.widths_tensor(x.device),
                                       float(eps))
    return y if residual is None else (y, z)
