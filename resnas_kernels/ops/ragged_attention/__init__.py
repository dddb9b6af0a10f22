"""Fused ragged multi-head attention with per-group head counts and a learnable LeViT bias table.

Spec: `resnas_kernels.reference.ragged_attention` (the oracle). The op's roles, one file each:
- `__init__.py` (this file): the public function;
- `registration.py`: the backend entry, the argument checks, the bridge to the C++ kernels (`csrc/cpu/
  ragged_attention.cpp`, `csrc/cuda/ragged_attention_fwd.cu`) with their fake kernels, the auto pick of the CUDA
  forward, and the `torch.library` custom ops `resnas::ragged_attention_fwd/bwd` (fake implementations, autograd);
- `triton_kernels.py`: the Triton kernels and their launchers; `aot.py`: their ahead-of-time compilation cases;
- `reference_backend.py`: the explicit PyTorch backend; `auto_pick.py`: the measured per-shape choice between two
  interchangeable GPU implementations.

Dispatch. The heads per group are data: an int32 (G,) tensor on q's device (`Ragged` with host ints passes a cached
device copy). Group sizes, H_max and the shapes are static. Every backend reads the heads on the device (or, on CPU,
from the CPU tensor) and clamps them to [0, H_max]; grids and output shapes come from the static bounds, so a new
architecture never recompiles a torch.compile graph nor syncs the device.
- cpu backend: the public function makes ONE call, `torch.ops.resnas.ragged_attention`, registered in C++ with its
  autograd (csrc/cpu/ragged_attention.cpp): checks, kernels and backward without Python. Its inner ops
  `ext_ragged_attention_fwd/_bwd` have fake kernels registered here, so torch.compile traces through it.
- reference / triton / cuda backends: the Python custom ops `resnas::ragged_attention_fwd/_bwd` (a Triton launch
  needs Python anyway; the cuda backend pairs the CUDA C++ forward with the Triton backward).

Backends: reference | triton | cpu (C++, fwd + bwd) | cuda (CUDA C++ forward; its backward runs the Triton kernels).
- triton: a small-N kernel (Nq, Nk <= 64: whole score tile in registers, several samples per program; bf16 / fp16)
  and tiled online-softmax kernels (longer sequences, and every fp32 shape); fp32 / bf16 / fp16. fp64 runs the
  reference on the Triton and CUDA backends, as for every op (the kernels compute in fp32). bf16 under
  TRITON_INTERPRET=1 raises BackendUnavailableError: Triton's interpreter computes bf16 tl.dot wrongly (fp16 and fp32
  are right).
- cuda: a warp-per-query-row forward for Nk <= 256, d_qk, d_v <= 128 (inference); other shapes, and the backward, run
  the Triton kernels.
- auto on CUDA: the forward runs whichever of the Triton and CUDA C++ forwards was faster for this shape, measured
  once per (shape, batch bucket, dtype, bias kind, GPU) key on first use (`auto_pick.AutoPicker`; override with
  `config.set_attention_fwd`, persist with `config.set_autotune_cache`). Nothing of this runs on CPU.
- cpu: per (sample, head) pair of active heads, score rows kept in cache, vectorised, parallel over pairs; the
  LeViT CPU path (see csrc/cpu/ragged_attention.cpp).

Caveats:
- q, k, v need a unit stride on the head dim only: views of a segmented (B, N, 3, H, d) qkv tensor or of LeViT's
  per-head interleaved (B, N, H, 2D + d_v) tensor are read in place, without copies.
- The forward also returns the per-row log-sum-exp (B, H_max, Nq), fp32 (fp64 for fp64 inputs), 0 on inactive heads;
  the backward recomputes the probabilities from it (no (Nq, Nk) tensor is saved).
- Softmax, scores and every accumulation are fp32 (fp64 for fp64 inputs) whatever the input dtype. The Triton kernels
  use IEEE fp32 dots for fp32 inputs (no TF32); for bf16 / fp16 they feed P and dS to the dots in the input dtype.
- The bias-table gradient is deterministic: every (sample chunk, head) task accumulates its samples' score gradients
  into its own partial buffer, sequentially, and the partials are summed in a fixed order (chunk size depends on the
  batch size only). No float atomics, no (B, H, Nq, Nk) tensor (except the gradient of a per-sample dense bias, which
  is that tensor). The C++ backward keeps a (chunks, H, T) partial; the Triton backward a (chunks, H, Nq, Nk) fp32
  partial of the score gradient (chunks = ceil(B / 8)), mapped to the table by a fixed-order segmented sum.
- The C++ kernels gather the table into an (H, Nq, Nk) fp32 bias once per call when that is small (<= 4M elements):
  a per-row gather cost more than the rest of the row. The Triton and CUDA kernels read the table directly.
- bf16 / fp16 in Triton: P and dS are rounded to the input dtype for the tensor-core dots (fp32 accumulation, fp32
  softmax), as FlashAttention and SDPA's fused kernels do; tests hold the result to 2x the error of SDPA in that
  dtype (fp16 under the interpreter; bf16 on GPU only: the Triton 3.8 interpreter computes bf16 tl.dot wrongly).
- When a softmax row is exactly one-hot (P = 1 on one key, 0 elsewhere), the fused backward's score gradient is
  rounding noise rather than exact zeros: it uses FlashAttention's form dS = P * (dP - rowsum(dO * O)), where plain
  PyTorch's softmax backward gives exactly 0. Both are correct to rounding.
- Every op checks its arguments itself (the Python custom ops with `_check_args`, the C++ ops with the same checks
  in csrc/ragged_attention.h: shapes, sizes summing to B, the heads tensor's dtype / shape / device, the bias), so
  direct `torch.ops.resnas.*` calls and torch.compile's get the public function's errors on every backend. Head
  counts are checked against [0, H_max] on the host when that is free (host ints, CPU tensors, or any device with
  `set_validate_metadata(True)`); the kernels clamp them to [0, H_max] regardless and loop over heads h < H_max only.
- bias_index values are checked against [0, T) in the op (also under torch.compile; one device sync on CUDA: prefer
  bias_grid there, which computes the index in-kernel). The kernels also mask out-of-range table reads, so even an
  unchecked index can never read out of bounds.
- Double backward is not supported.
"""
import functools
from typing import List, Optional, Tuple

import torch

from ...ragged import Ragged, as_ragged
from ...reference.attention import levit_bias_index  # noqa: F401  (re-exported by resnas_kernels.ops)
from .._checks import check_groups, check_tensor
from . import aot  # noqa: F401  (importing aot registers the AOT cases)
from .registration import (FWD_PICKER, OP, _backend_for, _check_args, _check_qkv, _register_ext_fakes,  # noqa: F401
                           ragged_attention_bwd, ragged_attention_fwd)
# Private names the tests reach through the op's import path (the backends' forward and backward).
from .reference_backend import _reference_bwd, _reference_fwd  # noqa: F401
from .triton_kernels import _triton_bwd, _triton_fwd  # noqa: F401

__all__ = ["ragged_attention", "ragged_attention_fwd", "ragged_attention_bwd", "levit_bias_index"]


# ---------------------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------------------
def ragged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: Optional[Ragged] = None, *,
                     scale: Optional[float] = None, bias_table: Optional[torch.Tensor] = None,
                     bias_index: Optional[torch.Tensor] = None, bias_grid: Optional[Tuple[int, int]] = None,
                     dense_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fused attention where group g of the batch runs its first h_g heads; see `reference.ragged_attention`.

    Args:
        q: (B, Nq, H_max, d_qk); k: (B, Nk, H_max, d_qk); v: (B, Nk, H_max, d_v). Same dtype and device; unit stride
            on the last dim, any other strides (e.g. `qkv.view(B, N, 3, H, d)[:, :, 0]`).
        heads: Ragged(sizes, widths) over dim 0, widths[g] = active heads h_g (None: all H_max heads everywhere).
            The widths may be host ints or an int32 (G,) tensor on q's device (device metadata: a new architecture
            is a new tensor value, so torch.compile does not recompile and nothing syncs). Values are checked against
            [0, H_max] on the host when that is free (host ints, CPU tensors; CUDA only with
            `set_validate_metadata(True)`); every kernel also clamps them to [0, H_max], so no value reads or writes
            outside the tensors.
        scale: multiplies q.k; default d_qk ** -0.5.
        bias_table: (H_max, T) learnable table (q's dtype or fp32), used with exactly one of
        bias_index: (Nq, Nk) integer tensor with values in [0, T), or
        bias_grid: (R, stride), the LeViT geometry: the index |dy| * R + |dx| is computed in-kernel (no index read).
        dense_bias: (1 | H_max, Nq, Nk) or (B, H_max, Nq, Nk) additive bias (q's dtype or fp32), instead of a table.
    Returns:
        (B, Nq, H_max * d_v) in q's dtype, head-major, zeros for heads >= h_g. Differentiable w.r.t. q, k, v,
        bias_table (deterministic) and dense_bias.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name)
    if q.dim() != 4:
        _check_qkv(q, k, v)  # raises the error that names the problem
    batch, _, h_max, d_qk = q.shape
    heads = _all_heads(batch, h_max) if heads is None else as_ragged(heads, batch, h_max)
    if scale is None:
        scale = d_qk ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    grid = _grid_arg(bias_grid)
    if _backend_for(q) == "cpu":
        # One dispatcher hop: the C++ op checks every argument itself (with the messages of `_check_args`), reads
        # the heads tensor and registers its own autograd. Host widths are checked here first, once per value, so
        # their errors name `heads.widths` as on the other backends.
        if not heads.on_device:
            _check_host_heads(heads.sizes, heads.widths, batch, h_max)
        _register_ext_fakes()
        return torch.ops.resnas.ragged_attention(q, k, v, bias_table, bias_index, dense_bias, heads.sizes,
                                                 heads.widths_tensor(q.device), float(scale), grid)
    _check_args(q, k, v, heads, scale, bias_table, bias_index, bias_grid, dense_bias, what="heads.widths")
    out, _ = ragged_attention_fwd(q, k, v, bias_table, bias_index, dense_bias, list(heads.sizes),
                                  heads.widths_tensor(q.device), float(scale), grid)
    return out


@functools.lru_cache(maxsize=256)
def _all_heads(batch: int, h_max: int) -> Ragged:
    return Ragged.uniform(batch, h_max)


@functools.lru_cache(maxsize=1024)
def _check_host_heads(sizes: Tuple[int, ...], widths: Tuple[int, ...], batch: int, h_max: int) -> None:
    """`check_groups` of host heads, cached per value (a failing check raises every time: nothing is cached)."""
    check_groups(Ragged(sizes, widths), batch, h_max, batch_of="q", width_of="q (dim 2, H_max)", what="heads.widths")


def _grid_arg(bias_grid) -> List[int]:
    """bias_grid as the ops' `grid` argument: [] or [R, stride]."""
    if bias_grid is None:
        return []
    ok = (isinstance(bias_grid, (tuple, list)) and len(bias_grid) == 2
          and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in bias_grid))
    if not ok:
        raise ValueError(f"bias_grid must be a pair of ints (R, stride) >= 1, got {bias_grid!r}")
    return [int(bias_grid[0]), int(bias_grid[1])]
