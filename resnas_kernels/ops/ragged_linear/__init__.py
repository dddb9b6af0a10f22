"""Ragged (variable-width) linear: every group of a batch through the top-left slice of one shared weight, one launch.

    y[rows of g, s*Nseg : s*Nseg + n_g] = epilogue(x[rows of g, :k_g] @ W[s*Nseg : s*Nseg + n_g, :k_g]^T + b[...])

Spec: `resnas_kernels.reference.ragged_linear` (the oracle). The op's roles, one file each:
- `__init__.py` (this file): the public function, and the backend pick of its calls;
- `registration.py`: the backend entry, the fake kernels of the C++ ops (csrc/cpu/ragged_linear.cpp), the argument
  checks of the Python path, and the `torch.library` custom ops of the reference / Triton backends with their fake
  implementations and autograd;
- `triton_kernels.py`: the Triton kernels, their launchers and autotune candidates; `aot.py`: their ahead-of-time
  compilation cases;
- `reference_backend.py`: the explicit PyTorch backend.

Backends: reference | triton | cpu. (No CUDA C++ kernel: on CUDA tensors the Triton kernels are the fast path.)
- cpu: the public function makes one call, `torch.ops.resnas.ragged_linear`, registered in C++ with its argument
  checks and autograd (one dispatcher hop; no Python between the call and the kernels).
- reference / triton: the Python custom op `resnas::ragged_linear_fwd` (checks, autograd) over the kernels of
  `reference_backend.py` / `triton_kernels.py`.

Metadata: the group sizes are static host ints; the widths k_g / n_g are int32 (G,) tensors on x's device (host
widths are turned into cached device copies). No backend reads them on the host for CUDA tensors: grids come from
the static bounds and the kernels clamp each width to [0, K_max] / [0, Nseg], so no width addresses memory outside
the tensors. CPU widths are read (free) and checked on the host with the errors of the public function.

Triton kernels (all deterministic, no atomics anywhere):
- forward: a 2-D grid of (row block, output column tile). The row blocks come from a static table of
  (group, first row), built once per group sizes; the column tiles cover every segment up to its static width. A
  tile that lies entirely beyond n_g runs no K loop and only stores zeros (the contract needs those zeros; storing
  them is cheaper than a separate memset launch), so the work is proportional to sum(b_g * k_g * n_g). Tiles never
  straddle a group's rows or a segment's columns. fp32 accumulation; epilogue bias -> pre-activation (saved for GELU
  backward) -> exact GELU -> row scale -> + residual, zeros beyond n_g.
- backward: (1) a ragged elementwise prologue, only when there is a residual or GELU: dresidual = dy masked to the
  active columns and dpre = dy * row_scale * gelu'(pre) on the active columns; (2) dx as the same (row block,
  column tile) grouped GEMM (dx = dpre @ W slice, summed over the segments); (3) dW and db as a grouped GEMM over
  W's tiles: tile (i, j) loops over the groups g with i*BN < n_g and j*BK < k_g in a fixed order, accumulating in
  registers. For parallelism the rows are cut into a fixed number of row splits chosen from the shapes only (never
  the device), each split writes fp32 partials, and the partials are summed in a fixed order, so two runs give
  bitwise-equal dW and db.

Caveats:
- x, residual and weight must be contiguous, row-major, with the ragged dimension last; weight and bias must have
  x's dtype (cast master weights before the call, as autocast does for F.linear). row_scale may be x's dtype or fp32.
- GELU backward needs the pre-activation h = x W^T + b. It is SAVED by the forward (one extra store of the output
  size, only when gradients are needed) rather than recomputed: recomputing would cost a second GEMM, and these
  GEMMs are ~80% of the supernet's FLOPs, while the extra activation memory is one fc1 output per MLP.
- row_scale (the drop-path keep mask / keep_prob) is treated as a constant: it gets no gradient, and passing one that
  requires grad is an error.
- fp32 on CUDA uses TF32 tensor cores exactly when PyTorch would for matmuls
  (`torch.get_float32_matmul_precision() != "highest"`), else IEEE fp32 dots. fp64 is supported by the reference
  and C++ backends (gradcheck); the Triton backend runs the reference for fp64, as for every op.
- bf16 on the Triton backend under TRITON_INTERPRET=1 raises BackendUnavailableError: Triton's interpreter computes
  bf16 `tl.dot` wrongly (off by orders of magnitude), while fp16 and fp32 are right. On a GPU bf16 runs normally.
- The custom ops check their metadata and shapes themselves (`_check_args`), so direct `torch.ops.resnas.*` calls
  and torch.compile's get the public function's errors on every backend.
- Triton tile sizes BLOCK_M x BLOCK_N are chosen on the host (the row-block table depends on them); the GPU
  autotuner picks only the reduction chunk of y (BLOCK_K) and dx (BLOCK_N) and launch parameters. dW/db tiling is
  fixed, so their summation order never depends on an autotuning outcome. Every autotune candidate fits its tile in
  registers without spilling on sm_80 / sm_90 (`triton_kernels._CANDIDATES`).
- k_g = 0 gives act(bias) on the group's rows (an empty product is zero); n_g = 0 gives zeros and costs no GEMM work.
- Double backward is not supported.
- cpu backend: see csrc/cpu/ragged_linear.cpp (dense calls take one multithreaded GEMM, like F.linear).
"""
import functools
from collections.abc import Hashable
from typing import Optional, Sequence, Tuple, Union

import torch

from ...backend import get_backend, resolve_backend_for, use_backend, why_unavailable
from ...ragged import Ragged
from .._checks import check_float_tensor, check_tensor
from . import aot  # noqa: F401  (importing aot registers the AOT cases)
from .registration import OP, _FLOAT_DTYPES, _check_args, _check_int, ragged_linear_bwd, ragged_linear_fwd
# Private names the tests read through the op's import path (tile tables and launcher choices); constants they
# patch live in `triton_kernels`, the module that reads them.
from .triton_kernels import _INTERP_BLOCKS, _autotune_spec, _row_blocks, _split_rows  # noqa: F401

__all__ = ["ragged_linear", "ragged_linear_fwd", "ragged_linear_bwd"]


# ---------------------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1024)
def _host_widths_tensor(sizes: Tuple[int, ...], widths: tuple, device: torch.device) -> torch.Tensor:
    """Host widths -> int32 device tensor, validated (one int >= 0 per group) on first use, then cached (keyed by the
    device object: cheaper per call than `Ragged.widths_tensor`'s)."""
    return Ragged(sizes, widths).widths_tensor(device)


def _out_widths_tensor(in_groups: Ragged, out_widths, device: torch.device) -> torch.Tensor:
    if isinstance(out_widths, Ragged):
        if out_widths.sizes != in_groups.sizes:
            raise ValueError(f"out_widths and in_groups must split the batch into the same groups: "
                             f"out_widths.sizes={out_widths.sizes} vs in_groups.sizes={in_groups.sizes}")
        return out_widths.widths_tensor(device)
    if isinstance(out_widths, torch.Tensor):
        return out_widths
    if type(out_widths) is not tuple:
        out_widths = tuple(out_widths)
    try:
        return _host_widths_tensor(in_groups.sizes, out_widths, device)
    except TypeError:
        if all(isinstance(w, Hashable) for w in out_widths):
            raise
        return in_groups.with_widths(out_widths).widths_tensor(device)  # unhashable entries: let Ragged name them


@functools.lru_cache(maxsize=None)
def _cpp_op_ready() -> bool:
    """Whether the C++ op can run CPU tensors: fixed once the extension has loaded (cached, so that the common call
    skips the general `resolve_backend_for`, a few microseconds)."""
    return why_unavailable(OP, "cpu", torch.device("cpu")) is None


@torch.compiler.assume_constant_result
def _backend_when_traced(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """`resolve_backend_for` under torch.compile, run once at trace time: Dynamo cannot trace the extension's lazy
    import. The caller reads the backend setting (`requested`), so Dynamo guards it: a new setting recompiles."""
    with use_backend(requested):
        return resolve_backend_for(OP.name, torch.empty(0, device=device, dtype=dtype))


def ragged_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], in_groups: Ragged,
                  out_widths: Union[Ragged, torch.Tensor, Sequence[int]], *, segments: int = 1,
                  activation: Optional[str] = None, residual: Optional[torch.Tensor] = None,
                  row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each group through the top-left slice of one shared weight; see `resnas_kernels.reference.ragged_linear`.

    Args:
        x: (B, ..., K_max) contiguous, zero beyond each group's input width (the ragged contract).
        weight: (N_max, K_max) contiguous shared weight, x's dtype; never copied or sliced into new memory.
        bias: None or (N_max,), x's dtype.
        in_groups: `Ragged(sizes, widths)` over dim 0 of x; widths are the input widths k_g <= K_max, host ints or an
            int32 (G,) tensor on x's device.
        out_widths: the output widths n_g, each <= N_max // segments: a sequence of ints, an int32 (G,) tensor on x's
            device, or a Ragged with the same sizes (host or device widths).
        segments: S; weight and output are S stacked blocks of Nseg = N_max // S rows / columns, each sliced to its
            first n_g (qkv: S = 3, and y.view(B, N, 3, H_max, d)[:, :, 0] is q, a strided view, no copy).
        activation: None or "gelu" (exact erf form).
        residual: optional (B, ..., N_max) like the output: out = residual + row_scale * act(x W^T + b) on the active
            columns, zeros beyond n_g.
        row_scale: optional (B,) per-sample scale (drop-path keep mask / keep_prob), x's dtype or fp32; needs residual.
            It is a constant: it gets no gradient.
    Returns (B, ..., N_max), exactly zero beyond n_g in every segment.

    Widths tensors are device metadata: a new architecture is a new tensor value (torch.compile does not recompile).
    Their values are checked on the host when that costs no device sync (host ints, CPU tensors; CUDA only under
    `set_validate_metadata(True)`); every backend clamps them to [0, K_max] / [0, Nseg] anyway, so no value addresses
    memory outside the tensors.
    """
    if not isinstance(x, torch.Tensor):
        check_tensor(x, "x")
    if not isinstance(in_groups, Ragged):
        raise TypeError(f"in_groups must be a resnas_kernels.Ragged, got {type(in_groups).__name__}")
    device = x.device
    in_widths = in_groups.widths if in_groups.on_device else _host_widths_tensor(in_groups.sizes, in_groups.widths,
                                                                                    device)
    n_widths = _out_widths_tensor(in_groups, out_widths, device)
    requested = get_backend()
    if torch.compiler.is_compiling():
        backend = _backend_when_traced(requested, device, x.dtype)
    elif device.type == "cpu" and requested in ("auto", "cpu") and _cpp_op_ready():
        backend = "cpu"
    else:
        backend = resolve_backend_for(OP.name, x)
    if backend == "cpu":  # one hop: checks, autograd and kernels in C++
        return torch.ops.resnas.ragged_linear(x, weight, bias, residual, row_scale, in_groups.sizes, in_widths,
                                              n_widths, segments, activation)
    check_float_tensor(x, "x", _FLOAT_DTYPES, min_dim=2)
    segments = _check_int(segments, "segments", 1)
    _check_args(x, weight, bias, residual, row_scale, in_groups.sizes, in_widths, n_widths, segments,
                in_name="in_groups.widths")
    if activation not in (None, "gelu"):
        raise ValueError(f"activation must be None or 'gelu', got {activation!r}")
    if row_scale is not None:
        if residual is None:
            raise ValueError("row_scale needs a residual: it scales the branch added to the residual (drop-path)")
        if row_scale.requires_grad:
            raise ValueError("row_scale must not require grad: ragged_linear treats it as a constant (detach it)")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, residual))
    return ragged_linear_fwd(x, weight, bias, residual, row_scale, list(in_groups.sizes), in_widths, n_widths,
                             segments, activation or "none", activation == "gelu" and needs_grad)[0]
