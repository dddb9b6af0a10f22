"""Fused ragged multi-head attention with per-group head counts and a learnable LeViT bias table.

Spec: `resnas_kernels.reference.ragged_attention` (the oracle). This file holds the whole op: the Triton kernels and
launchers, the bridge to the C++ kernels (`csrc/cpu/ragged_attention.cpp`, `csrc/cuda/ragged_attention_fwd.cu`), the
`torch.library` custom ops `resnas::ragged_attention_fwd/bwd` with fake implementations and autograd, and the public
`ragged_attention` function.

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
- triton: a small-N kernel (Nq, Nk <= 64: whole score tile in registers, several samples per program) and tiled
  online-softmax kernels (longer sequences); fp32 / bf16 / fp16. fp64 runs the reference on the Triton and CUDA
  backends, as for every op (the kernels compute in fp32). bf16 under TRITON_INTERPRET=1 raises
  BackendUnavailableError: Triton's interpreter computes bf16 tl.dot wrongly (fp16 and fp32 are right).
- cuda: a warp-per-query-row forward for Nk <= 256, d_qk, d_v <= 128 (inference); other shapes, and the backward, run
  the Triton kernels.
- auto on CUDA: the forward runs whichever of the Triton and CUDA C++ forwards was faster for this shape, measured
  once per (shape, batch bucket, dtype, bias kind, GPU) key on first use (`_auto_pick.AutoPicker`; override with
  RESNAS_ATTENTION_FWD=triton|cuda, persist with RESNAS_AUTOTUNE_CACHE=file.json). Nothing of this runs on CPU.
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

from .. import _ext
from .._triton import tl, triton
from ..aot import register_aot
from ..backend import BackendUnavailableError, OpInfo, get_backend, register_op, resolve_backend, why_unavailable
from ..ragged import Ragged, as_ragged, sample_group_index
from ..reference.attention import levit_bias_index, levit_query_resolution
from ..reference.layer_norm import compute_dtype
from ._auto_pick import AutoPicker, bucket, versions
from ._checks import check_groups, check_same_device, check_tensor

OP = register_op(OpInfo(
    name="ragged_attention",
    backends=("triton", "cpu", "cuda"),
    # Triton has fwd + bwd; the CUDA C++ op is a forward only. Under auto, the forward is then picked per shape by
    # measurement between the two (FWD_PICKER below); this order is the fallback when Triton is missing.
    auto_cuda=("triton", "cuda"),
    ext_ops=("ext_ragged_attention_fwd", "ext_ragged_attention_bwd"),
))

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


# ---------------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------------
def _bias_chunk(batch: int, per_sample_dense: bool) -> int:
    """Samples per backward task whose score gradients are summed into one partial bias-gradient buffer.

    A function of the batch size only (never of the device or thread count), so the summation order and hence the
    bits of the bias gradient depend only on the input shape. A per-sample dense bias needs its own gradient per
    sample (chunk 1). Otherwise 8 samples per chunk keeps the partial buffer at 1/8 of a (B, H, Nq, Nk) tensor and
    still leaves B / 8 * H tasks to run in parallel.
    """
    return 1 if per_sample_dense else max(1, min(8, batch))


def _grid_index(grid: List[int], device) -> torch.Tensor:
    return levit_bias_index(int(grid[0]), int(grid[1]), device=device)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels
#
# Two families, picked per shape by `_use_small`:
# - small-N (Nq, Nk <= 64): one program owns a run of samples of one head and keeps the whole (Nq, Nk) score tile in
#   registers: no online softmax, no 128-row padding (N = 16/17/49 pad to 16/32/64), several (sample, head) pairs per
#   program. Its backward also sums the score gradient of its samples in registers (the bias-gradient partial).
# - tiled (online softmax over key tiles): forward per (query tile, head, sample); backward in three kernels:
#   dq (also writes delta = rowsum(dO * O)), dk/dv (per key tile, loops over query tiles), and dbias (per score tile,
#   loops over the samples of a chunk, accumulating in registers). Splitting dq from dk/dv recomputes Q K^T once more
#   but needs no atomics; dbias recomputes it again but never read-modify-writes a (Nq, Nk) buffer per sample.
# The grids cover every head h < H_max (a static bound); each program reads its sample's head count on the device
# (`_active_heads`: the group's entry of the widths tensor, clamped to [0, H_max]), and inactive (sample, head) pairs
# only store zeros. Nothing about the heads is read on the host, so a new architecture is a new tensor value, never a
# new launch configuration. Softmax and accumulations are fp32; fp32 inputs use
# IEEE fp32 dots (no TF32), bf16/fp16 inputs feed P and dS to the tensor cores in the input dtype (FlashAttention's
# choice).
# ---------------------------------------------------------------------------------------------------------------------
BIAS_NONE, BIAS_INDEX, BIAS_GRID, BIAS_DENSE_SHARED, BIAS_DENSE_HEAD, BIAS_DENSE_SAMPLE = range(6)


@triton.jit
def _bias_tile(TABLE, INDEX, DENSE, b, h, offs_m, offs_n, mask, Nq, Nk, H, T, grid_r, grid_s, grid_rq,
               BIAS_KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) bias of sample b, head h at query rows offs_m and key columns offs_n; 0 off `mask`.
    Table reads are masked to [0, T), so even an unchecked bad index cannot read out of bounds."""
    if BIAS_KIND == 1 or BIAS_KIND == 2:
        if BIAS_KIND == 1:
            idx = tl.load(INDEX + offs_m[:, None] * Nk + offs_n[None, :], mask=mask, other=0)
        else:  # LeViT grid, in-kernel: query (s * (i // R'), s * (i % R')), key (j // R, j % R)
            qy = (offs_m // grid_rq) * grid_s
            qx = (offs_m % grid_rq) * grid_s
            ky = offs_n // grid_r
            kx = offs_n % grid_r
            idx = tl.abs(qy[:, None] - ky[None, :]) * grid_r + tl.abs(qx[:, None] - kx[None, :])
        ok = mask & (idx >= 0) & (idx < T)
        bias = tl.load(TABLE + h * T + idx, mask=ok, other=0.0).to(tl.float32)
    elif BIAS_KIND == 3:
        bias = tl.load(DENSE + offs_m[:, None] * Nk + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    elif BIAS_KIND == 4:
        plane = h.to(tl.int64) * Nq * Nk
        bias = tl.load(DENSE + plane + offs_m[:, None] * Nk + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    elif BIAS_KIND == 5:
        plane = (b.to(tl.int64) * H + h) * Nq * Nk
        bias = tl.load(DENSE + plane + offs_m[:, None] * Nk + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    return bias


@triton.jit
def _active_heads(WIDTHS, SAMPLE_GROUP, b, H):
    """Active heads of sample b: its group's entry of the widths tensor (device metadata), clamped to [0, H], so no
    value can make a program touch a head outside the tensors."""
    w = tl.load(WIDTHS + tl.load(SAMPLE_GROUP + b))
    return tl.minimum(tl.maximum(w, 0), H)


@triton.jit
def _attn_fwd_small_kernel(Q, K, V, O, LSE, WIDTHS, SAMPLE_GROUP, TABLE, INDEX, DENSE, B, Nq, Nk, H, T, Dqk, Dv,
                           sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, scale, grid_r, grid_s, grid_rq,
                           samples_per_program, BIAS_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                           PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_DQK)
    offs_e = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < Nq
    mask_n = offs_n < Nk
    qmask = mask_m[:, None] & (offs_d[None, :] < Dqk)
    kmask = mask_n[:, None] & (offs_d[None, :] < Dqk)
    vmask = mask_n[:, None] & (offs_e[None, :] < Dv)
    omask = mask_m[:, None] & (offs_e[None, :] < Dv)
    smask = mask_m[:, None] & mask_n[None, :]
    for s in range(samples_per_program):
        b = pid * samples_per_program + s
        if b < B:
            b64 = b.to(tl.int64)
            o_ptrs = O + (b64 * Nq + offs_m[:, None]) * (H * Dv) + h * Dv + offs_e[None, :]
            lse_ptrs = LSE + (b64 * H + h) * Nq + offs_m
            if h < _active_heads(WIDTHS, SAMPLE_GROUP, b, H):
                q = tl.load(Q + b64 * sqb + offs_m[:, None] * sqn + h * sqh + offs_d[None, :], mask=qmask, other=0.0)
                k = tl.load(K + b64 * skb + offs_n[:, None] * skn + h * skh + offs_d[None, :], mask=kmask, other=0.0)
                v = tl.load(V + b64 * svb + offs_n[:, None] * svn + h * svh + offs_e[None, :], mask=vmask, other=0.0)
                sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
                sc += _bias_tile(TABLE, INDEX, DENSE, b, h, offs_m, offs_n, smask, Nq, Nk, H, T, grid_r, grid_s,
                                 grid_rq, BIAS_KIND, BLOCK_M, BLOCK_N)
                sc = tl.where(mask_n[None, :], sc, float("-inf"))
                m = tl.max(sc, 1)
                p = tl.exp(sc - m[:, None])
                l = tl.sum(p, 1)
                o = tl.dot(p.to(v.dtype), v, input_precision=PRECISION) / l[:, None]
                tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=omask)
                tl.store(lse_ptrs, m + tl.log(l), mask=mask_m)
            else:
                tl.store(o_ptrs, tl.zeros([BLOCK_M, BLOCK_DV], dtype=O.dtype.element_ty), mask=omask)
                tl.store(lse_ptrs, tl.zeros([BLOCK_M], dtype=tl.float32), mask=mask_m)


@triton.jit
def _attn_fwd_tiled_kernel(Q, K, V, O, LSE, WIDTHS, SAMPLE_GROUP, TABLE, INDEX, DENSE, B, Nq, Nk, H, T, Dqk, Dv,
                           sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, scale, grid_r, grid_s, grid_rq,
                           BIAS_KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DQK)
    offs_e = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < Nq
    omask = mask_m[:, None] & (offs_e[None, :] < Dv)
    o_ptrs = O + (b64 * Nq + offs_m[:, None]) * (H * Dv) + h * Dv + offs_e[None, :]
    lse_ptrs = LSE + (b64 * H + h) * Nq + offs_m
    if h < _active_heads(WIDTHS, SAMPLE_GROUP, b, H):
        q = tl.load(Q + b64 * sqb + offs_m[:, None] * sqn + h * sqh + offs_d[None, :],
                    mask=mask_m[:, None] & (offs_d[None, :] < Dqk), other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        for n0 in range(0, Nk, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < Nk
            k = tl.load(K + b64 * skb + offs_n[:, None] * skn + h * skh + offs_d[None, :],
                        mask=mask_n[:, None] & (offs_d[None, :] < Dqk), other=0.0)
            v = tl.load(V + b64 * svb + offs_n[:, None] * svn + h * svh + offs_e[None, :],
                        mask=mask_n[:, None] & (offs_e[None, :] < Dv), other=0.0)
            sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            sc += _bias_tile(TABLE, INDEX, DENSE, b, h, offs_m, offs_n, mask_m[:, None] & mask_n[None, :], Nq, Nk,
                             H, T, grid_r, grid_s, grid_rq, BIAS_KIND, BLOCK_M, BLOCK_N)
            sc = tl.where(mask_n[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))  # finite: every key tile has at least one real key
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        tl.store(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=omask)
        tl.store(lse_ptrs, m_i + tl.log(l_i), mask=mask_m)
    else:
        tl.store(o_ptrs, tl.zeros([BLOCK_M, BLOCK_DV], dtype=O.dtype.element_ty), mask=omask)
        tl.store(lse_ptrs, tl.zeros([BLOCK_M], dtype=tl.float32), mask=mask_m)


@triton.jit
def _attn_bwd_small_kernel(Q, K, V, O, DO, LSE, DQ, DK, DV, DS_PART, WIDTHS, SAMPLE_GROUP, TABLE, INDEX, DENSE,
                           B, Nq, Nk, H, T, Dqk, Dv, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, scale, grid_r,
                           grid_s, grid_rq, chunk, BIAS_KIND: tl.constexpr, HAS_DS: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                           PRECISION: tl.constexpr):
    """Program (c, h): samples [c * chunk, (c + 1) * chunk) of head h, whole score tiles. With HAS_DS it stores the
    sum over its samples of dS into DS_PART[c, h] (fixed order: deterministic)."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_DQK)
    offs_e = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < Nq
    mask_n = offs_n < Nk
    qmask = mask_m[:, None] & (offs_d[None, :] < Dqk)
    kmask = mask_n[:, None] & (offs_d[None, :] < Dqk)
    vmask = mask_n[:, None] & (offs_e[None, :] < Dv)
    omask = mask_m[:, None] & (offs_e[None, :] < Dv)
    smask = mask_m[:, None] & mask_n[None, :]
    ds_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in range(chunk):
        b = c * chunk + s
        if b < B:
            b64 = b.to(tl.int64)
            dq_ptrs = DQ + ((b64 * Nq + offs_m[:, None]) * H + h) * Dqk + offs_d[None, :]
            dk_ptrs = DK + ((b64 * Nk + offs_n[:, None]) * H + h) * Dqk + offs_d[None, :]
            dv_ptrs = DV + ((b64 * Nk + offs_n[:, None]) * H + h) * Dv + offs_e[None, :]
            if h < _active_heads(WIDTHS, SAMPLE_GROUP, b, H):
                q = tl.load(Q + b64 * sqb + offs_m[:, None] * sqn + h * sqh + offs_d[None, :], mask=qmask, other=0.0)
                k = tl.load(K + b64 * skb + offs_n[:, None] * skn + h * skh + offs_d[None, :], mask=kmask, other=0.0)
                v = tl.load(V + b64 * svb + offs_n[:, None] * svn + h * svh + offs_e[None, :], mask=vmask, other=0.0)
                row = (b64 * Nq + offs_m[:, None]) * (H * Dv) + h * Dv + offs_e[None, :]
                do = tl.load(DO + row, mask=omask, other=0.0)
                o = tl.load(O + row, mask=omask, other=0.0)
                lse = tl.load(LSE + (b64 * H + h) * Nq + offs_m, mask=mask_m, other=0.0)
                sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
                sc += _bias_tile(TABLE, INDEX, DENSE, b, h, offs_m, offs_n, smask, Nq, Nk, H, T, grid_r, grid_s,
                                 grid_rq, BIAS_KIND, BLOCK_M, BLOCK_N)
                p = tl.where(smask, tl.exp(sc - lse[:, None]), 0.0)
                delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
                dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION) * scale
                dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
                tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=qmask)
                tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kmask)
                tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=vmask)
                ds_acc += ds
            else:
                tl.store(dq_ptrs, tl.zeros([BLOCK_M, BLOCK_DQK], dtype=DQ.dtype.element_ty), mask=qmask)
                tl.store(dk_ptrs, tl.zeros([BLOCK_N, BLOCK_DQK], dtype=DK.dtype.element_ty), mask=kmask)
                tl.store(dv_ptrs, tl.zeros([BLOCK_N, BLOCK_DV], dtype=DV.dtype.element_ty), mask=vmask)
    if HAS_DS:
        part = DS_PART + (c.to(tl.int64) * H + h) * Nq * Nk
        tl.store(part + offs_m[:, None] * Nk + offs_n[None, :], ds_acc, mask=smask)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, O, DO, LSE, DELTA, DQ, WIDTHS, SAMPLE_GROUP, TABLE, INDEX, DENSE, B, Nq, Nk, H,
                        T, Dqk, Dv, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, scale, grid_r, grid_s, grid_rq,
                        BIAS_KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """Program (query tile, h, b): dq of the tile, and delta = rowsum(dO * O) for the dk/dv and dbias kernels."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DQK)
    offs_e = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < Nq
    qmask = mask_m[:, None] & (offs_d[None, :] < Dqk)
    omask = mask_m[:, None] & (offs_e[None, :] < Dv)
    dq_ptrs = DQ + ((b64 * Nq + offs_m[:, None]) * H + h) * Dqk + offs_d[None, :]
    delta_ptrs = DELTA + (b64 * H + h) * Nq + offs_m
    if h < _active_heads(WIDTHS, SAMPLE_GROUP, b, H):
        q = tl.load(Q + b64 * sqb + offs_m[:, None] * sqn + h * sqh + offs_d[None, :], mask=qmask, other=0.0)
        row = (b64 * Nq + offs_m[:, None]) * (H * Dv) + h * Dv + offs_e[None, :]
        do = tl.load(DO + row, mask=omask, other=0.0)
        o = tl.load(O + row, mask=omask, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(delta_ptrs, delta, mask=mask_m)
        lse = tl.load(LSE + (b64 * H + h) * Nq + offs_m, mask=mask_m, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
        for n0 in range(0, Nk, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < Nk
            smask = mask_m[:, None] & mask_n[None, :]
            k = tl.load(K + b64 * skb + offs_n[:, None] * skn + h * skh + offs_d[None, :],
                        mask=mask_n[:, None] & (offs_d[None, :] < Dqk), other=0.0)
            v = tl.load(V + b64 * svb + offs_n[:, None] * svn + h * svh + offs_e[None, :],
                        mask=mask_n[:, None] & (offs_e[None, :] < Dv), other=0.0)
            sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            sc += _bias_tile(TABLE, INDEX, DENSE, b, h, offs_m, offs_n, smask, Nq, Nk, H, T, grid_r, grid_s,
                             grid_rq, BIAS_KIND, BLOCK_M, BLOCK_N)
            p = tl.where(smask, tl.exp(sc - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=qmask)
    else:
        tl.store(dq_ptrs, tl.zeros([BLOCK_M, BLOCK_DQK], dtype=DQ.dtype.element_ty), mask=qmask)
        tl.store(delta_ptrs, tl.zeros([BLOCK_M], dtype=tl.float32), mask=mask_m)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, WIDTHS, SAMPLE_GROUP, TABLE, INDEX, DENSE, B, Nq, Nk,
                          H, T, Dqk, Dv, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, scale, grid_r, grid_s, grid_rq,
                          BIAS_KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """Program (key tile, h, b): dk and dv of the tile, looping over the query tiles."""
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_DQK)
    offs_e = tl.arange(0, BLOCK_DV)
    mask_n = offs_n < Nk
    kmask = mask_n[:, None] & (offs_d[None, :] < Dqk)
    vmask = mask_n[:, None] & (offs_e[None, :] < Dv)
    dk_ptrs = DK + ((b64 * Nk + offs_n[:, None]) * H + h) * Dqk + offs_d[None, :]
    dv_ptrs = DV + ((b64 * Nk + offs_n[:, None]) * H + h) * Dv + offs_e[None, :]
    if h < _active_heads(WIDTHS, SAMPLE_GROUP, b, H):
        k = tl.load(K + b64 * skb + offs_n[:, None] * skn + h * skh + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(V + b64 * svb + offs_n[:, None] * svn + h * svh + offs_e[None, :], mask=vmask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        for m0 in range(0, Nq, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < Nq
            smask = mask_m[:, None] & mask_n[None, :]
            q = tl.load(Q + b64 * sqb + offs_m[:, None] * sqn + h * sqh + offs_d[None, :],
                        mask=mask_m[:, None] & (offs_d[None, :] < Dqk), other=0.0)
            do = tl.load(DO + (b64 * Nq + offs_m[:, None]) * (H * Dv) + h * Dv + offs_e[None, :],
                         mask=mask_m[:, None] & (offs_e[None, :] < Dv), other=0.0)
            lse = tl.load(LSE + (b64 * H + h) * Nq + offs_m, mask=mask_m, other=0.0)
            delta = tl.load(DELTA + (b64 * H + h) * Nq + offs_m, mask=mask_m, other=0.0)
            sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            sc += _bias_tile(TABLE, INDEX, DENSE, b, h, offs_m, offs_n, smask, Nq, Nk, H, T, grid_r, grid_s,
                             grid_rq, BIAS_KIND, BLOCK_M, BLOCK_N)
            p = tl.where(smask, tl.exp(sc - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
        tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=kmask)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=vmask)
    else:
        tl.store(dk_ptrs, tl.zeros([BLOCK_N, BLOCK_DQK], dtype=DK.dtype.element_ty), mask=kmask)
        tl.store(dv_ptrs, tl.zeros([BLOCK_N, BLOCK_DV], dtype=DV.dtype.element_ty), mask=vmask)


@triton.jit
def _attn_bwd_dbias_kernel(Q, K, V, DO, LSE, DELTA, DS_PART, WIDTHS, SAMPLE_GROUP, TABLE, INDEX, DENSE, B, Nq,
                           Nk, H, T, Dqk, Dv, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, scale, grid_r, grid_s,
                           grid_rq, chunk, n_tiles_n, BIAS_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
                           PRECISION: tl.constexpr):
    """Program (score tile, h, c): DS_PART[c, h, tile] = sum over the chunk's samples, in order, of dS (registers)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    c = tl.program_id(2)
    offs_m = (pid // n_tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % n_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_DQK)
    offs_e = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < Nq
    mask_n = offs_n < Nk
    smask = mask_m[:, None] & mask_n[None, :]
    ds_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in range(chunk):
        b = c * chunk + s
        if b < B:
            if h < _active_heads(WIDTHS, SAMPLE_GROUP, b, H):
                b64 = b.to(tl.int64)
                q = tl.load(Q + b64 * sqb + offs_m[:, None] * sqn + h * sqh + offs_d[None, :],
                            mask=mask_m[:, None] & (offs_d[None, :] < Dqk), other=0.0)
                k = tl.load(K + b64 * skb + offs_n[:, None] * skn + h * skh + offs_d[None, :],
                            mask=mask_n[:, None] & (offs_d[None, :] < Dqk), other=0.0)
                v = tl.load(V + b64 * svb + offs_n[:, None] * svn + h * svh + offs_e[None, :],
                            mask=mask_n[:, None] & (offs_e[None, :] < Dv), other=0.0)
                do = tl.load(DO + (b64 * Nq + offs_m[:, None]) * (H * Dv) + h * Dv + offs_e[None, :],
                             mask=mask_m[:, None] & (offs_e[None, :] < Dv), other=0.0)
                lse = tl.load(LSE + (b64 * H + h) * Nq + offs_m, mask=mask_m, other=0.0)
                delta = tl.load(DELTA + (b64 * H + h) * Nq + offs_m, mask=mask_m, other=0.0)
                sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
                sc += _bias_tile(TABLE, INDEX, DENSE, b, h, offs_m, offs_n, smask, Nq, Nk, H, T, grid_r, grid_s,
                                 grid_rq, BIAS_KIND, BLOCK_M, BLOCK_N)
                p = tl.where(smask, tl.exp(sc - lse[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds_acc += p * (dp - delta[:, None])
    part = DS_PART + (c.to(tl.int64) * H + h) * Nq * Nk
    tl.store(part + offs_m[:, None] * Nk + offs_n[None, :], ds_acc, mask=smask)


@triton.jit
def _bias_table_grad_kernel(DS_PART, PERM, SEG, DTABLE, n_chunks, H, T, NQK, BLOCK: tl.constexpr):
    """Program (t, h): DTABLE[h, t] = sum over chunks c, then over the score positions p with index == t (CSR: PERM
    sorted by index, SEG[t]:SEG[t+1] the run of t), of DS_PART[c, h, p]. Fixed order, no atomics."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    start = tl.load(SEG + t)
    end = tl.load(SEG + t + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(n_chunks):
        base = DS_PART + (c * H + h).to(tl.int64) * NQK
        for p0 in range(start, end, BLOCK):
            offs = p0 + tl.arange(0, BLOCK)
            live = offs < end
            pos = tl.load(PERM + offs, mask=live, other=0)
            acc += tl.load(base + pos, mask=live, other=0.0)
    tl.store(DTABLE + h * T + t, tl.sum(acc, 0))


# -- launchers ------------------------------------------------------------------------------------------------------
_SMALL_MAX = 64          # small-N kernel when both sequence lengths pad to <= 64
_SMALL_SAMPLES = 4       # samples (of one head) per small-N forward program


def _use_small(n_q: int, n_k: int) -> bool:
    return triton.next_power_of_2(n_q) <= _SMALL_MAX and triton.next_power_of_2(n_k) <= _SMALL_MAX


def _tile(n_q: int, n_k: int) -> Tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the tiled kernels. Under the interpreter 16 x 16, so small test shapes still span several
    tiles; on GPU 64 x 64 (FlashAttention-2's short-head choice)."""
    if _ext.interpreter_tiles():
        return 16, 16
    return 64, 64


def _dot_block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))  # tl.dot needs every dim >= 16


@functools.lru_cache(maxsize=64)
def _grid_csr(r: int, s: int, t: int, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(perm, seg) of the LeViT grid index for a table of t >= R^2 columns, built once per geometry: `_index_csr`."""
    return _index_csr(levit_bias_index(r, s), t, device)


def _index_csr(index: torch.Tensor, t: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Score positions grouped by table column: perm (Nq*Nk,) int32 sorted by index (stable), seg (T+1,) int32 with
    column t owning perm[seg[t]:seg[t+1]]."""
    flat = index.reshape(-1).long()
    perm = torch.sort(flat, stable=True).indices.to(torch.int32)
    counts = torch.bincount(flat, minlength=t)
    seg = torch.zeros(t + 1, dtype=torch.int64, device=flat.device)
    seg[1:] = torch.cumsum(counts, 0)
    return perm.to(device), seg.to(torch.int32).to(device)


def _bias_launch_args(q, table, index, dense, grid: List[int]):
    """(BIAS_KIND, TABLE, INDEX, DENSE, T, grid_r, grid_s, grid_rq); unused pointers get q (never read)."""
    if table is not None:
        if grid:
            r, s = int(grid[0]), int(grid[1])
            return BIAS_GRID, table, q, q, table.shape[1], r, s, levit_query_resolution(r, s)
        return BIAS_INDEX, table, index, q, table.shape[1], 1, 1, 1
    if dense is not None:
        kind = BIAS_DENSE_SAMPLE if dense.dim() == 4 else (BIAS_DENSE_SHARED if dense.shape[0] == 1
                                                           else BIAS_DENSE_HEAD)
        return kind, q, q, dense, 1, 1, 1, 1
    return BIAS_NONE, q, q, q, 1, 1, 1, 1


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for bf16 / fp16 operands


def _common_args(q, k, v, sizes: List[int], widths: torch.Tensor, table, index, dense, grid, scale):
    """The launch arguments every kernel shares, from WIDTHS on: the widths tensor and the cached sample -> group
    index (the heads metadata, read on the device), the bias pointers, the shapes and strides."""
    batch, n_q, h_max, d_qk = q.shape
    n_k, d_v = k.shape[1], v.shape[3]
    kind, t_ptr, i_ptr, d_ptr, t_cols, gr, gs, grq = _bias_launch_args(q, table, index, dense, grid)
    args = (widths, sample_group_index(sizes, q.device), t_ptr, i_ptr, d_ptr, batch, n_q, n_k, h_max, t_cols, d_qk,
            d_v, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], scale, gr, gs, grq)
    meta = dict(BIAS_KIND=kind, BLOCK_DQK=_dot_block(d_qk), BLOCK_DV=_dot_block(d_v), PRECISION=_precision(q.dtype))
    return args, meta


def _triton_fwd(q, k, v, table, index, dense, sizes: List[int], widths: torch.Tensor, scale: float,
                grid: List[int]):
    batch, n_q, h_max, _ = q.shape
    n_k, d_v = k.shape[1], v.shape[3]
    out = q.new_empty((batch, n_q, h_max * d_v))
    lse = q.new_empty((batch, h_max, n_q), dtype=torch.float32)
    if batch == 0:
        return out, lse
    args, meta = _common_args(q, k, v, sizes, widths, table, index, dense, grid, scale)
    if _use_small(n_q, n_k):
        bm, bn = max(16, triton.next_power_of_2(n_q)), max(16, triton.next_power_of_2(n_k))
        per = _SMALL_SAMPLES
        _attn_fwd_small_kernel[(triton.cdiv(batch, per), h_max)](
            q, k, v, out, lse, *args, per, BLOCK_M=bm, BLOCK_N=bn, **meta, num_warps=4)
    else:
        bm, bn = _tile(n_q, n_k)
        _attn_fwd_tiled_kernel[(triton.cdiv(n_q, bm), h_max, batch)](
            q, k, v, out, lse, *args, BLOCK_M=bm, BLOCK_N=bn, **meta, num_warps=4, num_stages=2)
    return out, lse


def _triton_bwd(dout, q, k, v, out, lse, table, index, dense, sizes: List[int], widths: torch.Tensor, scale: float,
                grid: List[int], need_table: bool, need_dense: bool):
    batch, n_q, h_max, d_qk = q.shape
    n_k, d_v = k.shape[1], v.shape[3]
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    table_grad = need_table and table is not None
    dense_grad = need_dense and dense is not None
    per_sample = dense_grad and dense.dim() == 4
    has_ds = table_grad or dense_grad
    chunk = _bias_chunk(batch, per_sample) if has_ds else 1
    n_chunks = triton.cdiv(batch, chunk) if batch else 0
    ds_part = q.new_empty((n_chunks if has_ds else 0, h_max, n_q, n_k), dtype=torch.float32)
    if batch:
        args, meta = _common_args(q, k, v, sizes, widths, table, index, dense, grid, scale)
        if _use_small(n_q, n_k):
            bm, bn = max(16, triton.next_power_of_2(n_q)), max(16, triton.next_power_of_2(n_k))
            if not has_ds:
                chunk, n_chunks = _SMALL_SAMPLES, triton.cdiv(batch, _SMALL_SAMPLES)
            _attn_bwd_small_kernel[(n_chunks, h_max)](
                q, k, v, out, dout, lse, dq, dk, dv, ds_part if has_ds else q, *args, chunk,
                HAS_DS=has_ds, BLOCK_M=bm, BLOCK_N=bn, **meta, num_warps=4)
        else:
            bm, bn = _tile(n_q, n_k)
            delta = torch.empty_like(lse)
            _attn_bwd_dq_kernel[(triton.cdiv(n_q, bm), h_max, batch)](
                q, k, v, out, dout, lse, delta, dq, *args, BLOCK_M=bm, BLOCK_N=bn, **meta, num_warps=4,
                num_stages=2)
            _attn_bwd_dkdv_kernel[(triton.cdiv(n_k, bn), h_max, batch)](
                q, k, v, dout, lse, delta, dk, dv, *args, BLOCK_M=bm, BLOCK_N=bn, **meta, num_warps=4,
                num_stages=2)
            if has_ds:
                tiles_n = triton.cdiv(n_k, bn)
                _attn_bwd_dbias_kernel[(triton.cdiv(n_q, bm) * tiles_n, h_max, n_chunks)](
                    q, k, v, dout, lse, delta, ds_part, *args, chunk, tiles_n, BLOCK_M=bm, BLOCK_N=bn,
                    **meta, num_warps=4, num_stages=2)
    return dq, dk, dv, *_bias_grads_from_partials(ds_part, table, index, dense, grid, table_grad, dense_grad)


def _bias_grads_from_partials(ds_part, table, index, dense, grid: List[int], table_grad: bool, dense_grad: bool):
    """(dtable, ddense) from the (chunks, H, Nq, Nk) fp32 score-gradient partials, in fixed order."""
    def empty():  # a fresh tensor each time: custom-op outputs must not alias each other
        return ds_part.new_empty((0,))

    if table_grad:
        h_max, t_cols = table.shape
        n_chunks = ds_part.shape[0]
        perm, seg = (_grid_csr(int(grid[0]), int(grid[1]), t_cols, str(ds_part.device)) if grid
                     else _index_csr(index, t_cols, ds_part.device))
        dtable = torch.empty((h_max, t_cols), dtype=torch.float32, device=ds_part.device)
        if n_chunks:
            n_qk = ds_part.shape[2] * ds_part.shape[3]
            _bias_table_grad_kernel[(t_cols, h_max)](ds_part, perm, seg, dtable, n_chunks, h_max, t_cols, n_qk,
                                                     BLOCK=128)
        else:
            dtable.zero_()
        return dtable.to(table.dtype), empty()
    if dense_grad:
        if dense.dim() == 4:
            return empty(), ds_part.to(dense.dtype)  # chunk 1: the partials are the per-sample gradient
        per_head = ds_part.sum(0)  # torch's reductions are deterministic (no atomics)
        return empty(), (per_head if dense.shape[0] != 1 else per_head.sum(0, keepdim=True)).to(dense.dtype)
    return empty(), empty()


def _aot_signature(dtype: str, kernel: str):
    ptr = f"*{dtype}"
    strides = {n: "i32" for n in ("B", "Nq", "Nk", "H", "T", "Dqk", "Dv", "sqb", "sqn", "sqh", "skb", "skn", "skh",
                                  "svb", "svn", "svh")}
    tail = {"scale": "fp32", "grid_r": "i32", "grid_s": "i32", "grid_rq": "i32"}
    bias = {"WIDTHS": "*i32", "SAMPLE_GROUP": "*i64", "TABLE": "*fp32", "INDEX": "*i32", "DENSE": "*fp32"}
    const = {"BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_DQK": "constexpr", "BLOCK_DV": "constexpr",
             "PRECISION": "constexpr", "BIAS_KIND": "constexpr"}
    if kernel == "fwd_small":
        return {"Q": ptr, "K": ptr, "V": ptr, "O": ptr, "LSE": "*fp32", **bias, **strides, **tail,
                "samples_per_program": "i32", **const}
    if kernel == "fwd_tiled":
        return {"Q": ptr, "K": ptr, "V": ptr, "O": ptr, "LSE": "*fp32", **bias, **strides, **tail, **const}
    if kernel == "bwd_small":
        return {"Q": ptr, "K": ptr, "V": ptr, "O": ptr, "DO": ptr, "LSE": "*fp32", "DQ": ptr, "DK": ptr, "DV": ptr,
                "DS_PART": "*fp32", **bias, **strides, **tail, "chunk": "i32", "HAS_DS": "constexpr", **const}
    if kernel == "bwd_dq":
        return {"Q": ptr, "K": ptr, "V": ptr, "O": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32", "DQ": ptr,
                **bias, **strides, **tail, **const}
    if kernel == "bwd_dkdv":
        return {"Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32", "DK": ptr, "DV": ptr,
                **bias, **strides, **tail, **const}
    return {"Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32", "DS_PART": "*fp32", **bias,
            **strides, **tail, "chunk": "i32", "n_tiles_n": "i32", **const}


def _register_aot_cases():
    kernels = {"fwd_small": _attn_fwd_small_kernel, "fwd_tiled": _attn_fwd_tiled_kernel,
               "bwd_small": _attn_bwd_small_kernel, "bwd_dq": _attn_bwd_dq_kernel,
               "bwd_dkdv": _attn_bwd_dkdv_kernel, "bwd_dbias": _attn_bwd_dbias_kernel}
    # Representative specialisations: LeViT (d 16 / v 32 with the table via the grid; d 32 / v 64 via an index),
    # ViT-ResNAS (d 64, no bias), a dense bias; fp32 and bf16 for every kernel, fp16 for the forward ones; small-N
    # blocks of 16 x 64 and 64 x 64, tiles of 64 x 64.
    configs = ((BIAS_GRID, 16, 32), (BIAS_NONE, 64, 64), (BIAS_INDEX, 32, 64), (BIAS_DENSE_HEAD, 64, 64))
    for dtype, precision in (("fp32", "ieee"), ("bf16", "tf32"), ("fp16", "tf32")):
        for name, kernel in kernels.items():
            if dtype == "fp16" and not name.startswith("fwd"):
                continue
            small = name.endswith("small")
            for n, (bias, dqk, dv) in enumerate(configs):
                bm, bn = ((16, 64) if n % 2 == 0 else (64, 64)) if small else (64, 64)
                consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_DQK": dqk, "BLOCK_DV": dv, "PRECISION": precision,
                          "BIAS_KIND": bias}
                if name == "bwd_small":
                    consts["HAS_DS"] = bias != BIAS_NONE
                register_aot(kernel, _aot_signature(dtype, name), consts, num_warps=4,
                             num_stages=1 if small else 2)
    register_aot(_bias_table_grad_kernel, {"DS_PART": "*fp32", "PERM": "*i32", "SEG": "*i32", "DTABLE": "*fp32",
                                           "n_chunks": "i32", "H": "i32", "T": "i32", "NQK": "i32",
                                           "BLOCK": "constexpr"}, {"BLOCK": 128}, num_warps=4)


_register_aot_cases()


# ---------------------------------------------------------------------------------------------------------------------
# Reference backend of the op (explicit log-sum-exp and backward formula, plain PyTorch over the whole padded batch).
# The heads metadata becomes a (B, H_max) mask by tensor ops (no host read); inactive heads' inputs are replaced by
# zeros before use and their outputs by exact zeros after, so nothing of them leaks (NaN or inf included).
# ---------------------------------------------------------------------------------------------------------------------
def _active_mask(sizes: List[int], widths: torch.Tensor, h_max: int, device) -> torch.Tensor:
    """(B, H_max) bool, True where head h of sample b is active (any widths value acts as clamped to [0, H_max])."""
    sample_heads = widths[sample_group_index(sizes, device)]
    return torch.arange(h_max, device=device)[None, :] < sample_heads[:, None]


def _heads_major(t: torch.Tensor, active: torch.Tensor, acc) -> torch.Tensor:
    """(B, H, N, d) in `acc` of a (B, N, H, d) tensor, zeros on inactive heads."""
    return torch.where(active[:, None, :, None], t, 0).transpose(1, 2).to(acc)


def _full_bias(table, index, dense, grid: List[int], acc, device):
    """The bias, broadcastable to (B, H_max, Nq, Nk), in `acc`; None without one."""
    if table is not None:
        idx = _grid_index(grid, device) if grid else index.long()
        return table[:, idx].to(acc)[None]
    if dense is not None:
        return (dense if dense.dim() == 4 else dense[None]).to(acc)
    return None


def _reference_fwd(q, k, v, table, index, dense, sizes: List[int], widths: torch.Tensor, scale: float,
                   grid: List[int]):
    batch, n_q, h_max, _ = q.shape
    d_v = v.shape[3]
    acc = compute_dtype(q.dtype)
    active = _active_mask(sizes, widths, h_max, q.device)
    qa, ka, va = (_heads_major(t, active, acc) for t in (q, k, v))
    s = (qa @ ka.transpose(-2, -1)) * scale                                 # (B, H, Nq, Nk)
    bias = _full_bias(table, index, dense, grid, acc, q.device)
    if bias is not None:
        s = s + bias
    row_lse = torch.logsumexp(s, dim=-1)                                    # (B, H, Nq)
    o = torch.exp(s - row_lse[..., None]) @ va                              # (B, H, Nq, d_v)
    o = torch.where(active[:, :, None, None], o, 0)
    lse = torch.where(active[:, :, None], row_lse, 0)
    return o.transpose(1, 2).to(q.dtype).reshape(batch, n_q, h_max * d_v), lse


def _reference_bwd(dout, q, k, v, out, lse, table, index, dense, sizes: List[int], widths: torch.Tensor,
                   scale: float, grid: List[int], need_table: bool, need_dense: bool):
    batch, n_q, h_max, _ = q.shape
    d_v = v.shape[3]
    acc = compute_dtype(q.dtype)
    active = _active_mask(sizes, widths, h_max, q.device)
    qa, ka, va = (_heads_major(t, active, acc) for t in (q, k, v))
    dog, og = (_heads_major(t.reshape(batch, n_q, h_max, d_v), active, acc) for t in (dout, out))
    s = (qa @ ka.transpose(-2, -1)) * scale
    bias = _full_bias(table, index, dense, grid, acc, q.device)
    if bias is not None:
        s = s + bias
    p = torch.where(active[:, :, None, None], torch.exp(s - lse[..., None].to(acc)), 0)  # (B, H, Nq, Nk)
    delta = (dog * og).sum(-1, keepdim=True)                                # D_i = dO_i . O_i
    ds = p * (dog @ va.transpose(-2, -1) - delta)                           # dS = P * (dP - D); 0 where inactive
    dq, dk, dv = ((g.transpose(1, 2).to(t.dtype).contiguous())
                  for g, t in ((ds @ ka * scale, q), (ds.transpose(-2, -1) @ qa * scale, k),
                               (p.transpose(-2, -1) @ dog, v)))
    ds_sum = ds.sum(0)                                                      # (H, Nq, Nk): table / shared dense
    dtable = q.new_empty((0,))
    if need_table and table is not None:
        idx = (_grid_index(grid, q.device) if grid else index.long()).reshape(-1)
        # index_add_ is sequential on CPU; on CUDA it uses atomics (the reference backend is not a kernel).
        dtable = torch.zeros((h_max, table.shape[1]), dtype=acc, device=q.device)
        dtable = dtable.index_add_(1, idx, ds_sum.reshape(h_max, -1)).to(table.dtype)
    ddense = q.new_empty((0,))
    if need_dense and dense is not None:
        if dense.dim() == 4:
            ddense = ds
        else:
            ddense = ds_sum if dense.shape[0] == h_max else ds_sum.sum(0, keepdim=True)
        ddense = ddense.to(dense.dtype)
    return dq, dk, dv, dtable, ddense


# ---------------------------------------------------------------------------------------------------------------------
# C++ backends (csrc/cpu/ragged_attention.cpp; csrc/cuda/ragged_attention_fwd.cu is a forward only)
# ---------------------------------------------------------------------------------------------------------------------
_CUDA_MAX_GROUPS = 256  # kMaxGroups of csrc/cuda/ragged_attention_fwd.cu: group starts travel in the kernel parameters


def _cuda_fwd_supported(q, k, v, num_groups: int) -> bool:
    """Shapes the CUDA C++ warp-per-row forward takes (csrc/cuda/ragged_attention_fwd.cu: kMaxKeysPerLane,
    kMaxOutPerLane, kMaxSmemBytes, kMaxGroups); the others run the Triton forward."""
    n_k, d_qk, d_v = k.shape[1], q.shape[3], v.shape[3]
    smem = 4 * (n_k * (d_qk + 1) + n_k * d_v + 8 * (d_qk + n_k))
    return n_k <= 256 and d_qk <= 128 and d_v <= 128 and smem <= 96 * 1024 and num_groups <= _CUDA_MAX_GROUPS


def _ext_fwd(q, k, v, table, index, dense, sizes: List[int], widths: torch.Tensor, scale: float, grid: List[int]):
    if q.is_cuda and not _cuda_fwd_supported(q, k, v, len(sizes)):
        return _triton_fwd(q, k, v, table, index, dense, sizes, widths, scale, grid)
    return torch.ops.resnas.ext_ragged_attention_fwd(q, k, v, table, index, dense, sizes, widths, scale, grid)


def _ext_bwd(dout, q, k, v, out, lse, table, index, dense, sizes: List[int], widths: torch.Tensor, scale: float,
             grid: List[int], need_table: bool, need_dense: bool):
    chunk = _bias_chunk(q.shape[0], dense is not None and dense.dim() == 4)
    return torch.ops.resnas.ext_ragged_attention_bwd(dout, q, k, v, out, lse, table, index, dense, sizes, widths,
                                                     scale, grid, need_table, need_dense, chunk)


def _fwd_outputs(q, v):
    """Empty (out, lse) of a forward: the fake implementations' outputs."""
    batch, n_q, h_max, _ = q.shape
    return (q.new_empty((batch, n_q, h_max * v.shape[3])),
            q.new_empty((batch, h_max, n_q), dtype=compute_dtype(q.dtype)))


def _bwd_outputs(q, k, v, bias_table, dense_bias, need_table_grad: bool, need_dense_grad: bool):
    """Empty (dq, dk, dv, dtable, ddense) of a backward: the fake implementations' outputs."""
    dtable = (bias_table.new_empty(bias_table.shape) if (bias_table is not None and need_table_grad)
              else q.new_empty((0,)))
    ddense = (dense_bias.new_empty(dense_bias.shape) if (dense_bias is not None and need_dense_grad)
              else q.new_empty((0,)))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dtable, ddense


def _check_bwd_tensors(q, v, dout, out, lse) -> None:
    batch, n_q, h_max, _ = q.shape
    for name, t, shape, dtype in (("dout", dout, (batch, n_q, h_max * v.shape[3]), q.dtype),
                                  ("out", out, (batch, n_q, h_max * v.shape[3]), q.dtype),
                                  ("lse", lse, (batch, h_max, n_q), compute_dtype(q.dtype))):
        check_tensor(t, name)
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"{name} must have shape {shape} and dtype {dtype}, got {tuple(t.shape)} {t.dtype}")


def _ext_fwd_fake(q, k, v, bias_table, bias_index, dense_bias, sizes, widths, scale, grid):
    # The C++ kernel's checks, at trace time (torch.compile runs this instead of the kernel); values are not read.
    _check_args(q, k, v, Ragged(tuple(sizes), widths), scale, bias_table, bias_index, tuple(grid) if grid else None,
                dense_bias)
    return _fwd_outputs(q, v)


def _ext_bwd_fake(dout, q, k, v, out, lse, bias_table, bias_index, dense_bias, sizes, widths, scale, grid,
                  need_table_grad, need_dense_grad, chunk):
    _check_args(q, k, v, Ragged(tuple(sizes), widths), scale, bias_table, bias_index, tuple(grid) if grid else None,
                dense_bias)
    _check_bwd_tensors(q, v, dout, out, lse)
    return _bwd_outputs(q, k, v, bias_table, dense_bias, need_table_grad, need_dense_grad)


_ext_fakes_registered = False


@torch.compiler.assume_constant_result
def _register_ext_fakes() -> bool:
    """Registers the fake kernels of the C++ ops `resnas::ext_ragged_attention_fwd/_bwd` once, on the first call that
    takes the C++ path (the ops exist only once the extension is loaded, which happens lazily). torch.compile runs it
    at trace time instead of tracing it (`assume_constant_result`), before the op it is needed for is traced."""
    global _ext_fakes_registered
    if not _ext_fakes_registered:
        torch.library.register_fake("resnas::ext_ragged_attention_fwd", _ext_fwd_fake)
        torch.library.register_fake("resnas::ext_ragged_attention_bwd", _ext_bwd_fake)
        _ext_fakes_registered = True
    return True


_FWD = {"reference": _reference_fwd, "triton": _triton_fwd, "cpu": _ext_fwd, "cuda": _ext_fwd}

# Auto dispatch of the CUDA forward (backend auto, CUDA tensors, a shape both kernels take): the Triton forward and the
# CUDA C++ one are timed once per key on the real inputs (CUDA events) and the faster is kept; Triton stays unless the
# CUDA C++ kernel is > 5% faster (see `_auto_pick`). RESNAS_ATTENTION_FWD=triton|cuda|auto overrides the measurement;
# RESNAS_AUTOTUNE_CACHE=path.json keeps decisions across processes. The backward always runs Triton on CUDA.
FWD_PICKER = AutoPicker("ragged_attention_fwd", ("triton", "cuda"), env_override="RESNAS_ATTENTION_FWD")


@functools.lru_cache(maxsize=None)
def _device_name(index: Optional[int]) -> str:
    return torch.cuda.get_device_name(index)


def _fwd_key(q, k, v, table, index, dense, num_groups: int, grid: List[int]):
    """What the winner depends on: sequence lengths, head dims, heads, batch bucket, dtype, bias kind, whether the
    CUDA kernel can take the group count, the GPU and the library versions. Static shapes only: the head counts are
    device metadata (never read here) and only change the work per sample."""
    bias = "grid" if grid else ("index" if index is not None else ("dense%d" % dense.dim() if dense is not None
                                                                   else "none"))
    return (q.shape[1], k.shape[1], q.shape[2], q.shape[3], v.shape[3], bucket(q.shape[0]), str(q.dtype), bias,
            num_groups <= _CUDA_MAX_GROUPS, _device_name(q.device.index), *versions())


def _auto_cuda_fwd(q, k, v, table, index, dense, sizes: List[int], widths: torch.Tensor, scale: float,
                   grid: List[int]):
    args = (q, k, v, table, index, dense, sizes, widths, scale, grid)
    runners = {"triton": lambda: _triton_fwd(*args)}
    if why_unavailable(OP, "cuda", q.device) is None and _cuda_fwd_supported(q, k, v, len(sizes)):
        runners["cuda"] = lambda: _ext_fwd(*args)
    decision = FWD_PICKER.pick(_fwd_key(q, k, v, table, index, dense, len(sizes), grid), runners)
    return runners[decision.winner]()


# The CUDA C++ op is a forward only: on the cuda backend the backward runs the Triton kernels.
_BWD = {"reference": _reference_bwd, "triton": _triton_bwd, "cpu": _ext_bwd, "cuda": _triton_bwd}


# ---------------------------------------------------------------------------------------------------------------------
# torch.library custom ops of the Python backends (reference, triton, and cuda, whose backward is Triton): opaque to
# torch.compile, with fake implementations and autograd. The cpu backend's public path is the C++ op
# `resnas::ragged_attention` instead (one dispatcher hop); these ops also run it, for direct callers.
# ---------------------------------------------------------------------------------------------------------------------
def _backend_for(q: torch.Tensor) -> str:
    # get_backend() is read here, in code torch.compile traces, so a compiled graph is guarded on the requested
    # backend; the resolution itself (extension loading, availability) runs as a trace-time constant.
    return _resolve_backend(get_backend(), q.device, q.dtype)


@torch.compiler.assume_constant_result
def _resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    return _resolve_backend_cached(requested, device, dtype)


@functools.lru_cache(maxsize=64)
def _resolve_backend_cached(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs this call (`requested` is `get_backend()`, which `resolve_backend` applies). Cached: what
    can run where is fixed once the extension and Triton have been looked for (both are loaded once per process)."""
    backend = resolve_backend(OP.name, device)
    if backend == "triton" and dtype == torch.bfloat16 and _ext.triton_interpreting():
        raise BackendUnavailableError(
            "ragged_attention: bf16 on the Triton backend under TRITON_INTERPRET=1 is refused: Triton's interpreter "
            "computes bf16 tl.dot wrongly. Use fp16 / fp32 there, or another backend (reference, cpu)")
    # The GPU kernels take fp32 / bf16 / fp16; fp64 (gradient checking) runs the reference there.
    return "reference" if (dtype == torch.float64 and backend in ("triton", "cuda")) else backend


def _check_index_values(index: Optional[torch.Tensor], table: Optional[torch.Tensor]) -> None:
    """Values of bias_index must lie in [0, T). Runs inside the op body, so it also runs under torch.compile."""
    if index is None or table is None or index.numel() == 0:
        return
    lo, hi = int(index.min()), int(index.max())  # one device sync on CUDA
    if lo < 0 or hi >= table.shape[1]:
        raise ValueError(f"bias_index values must lie in [0, T) = [0, {table.shape[1]}) (T = bias_table.shape[1]), "
                         f"got values in [{lo}, {hi}]")


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


@torch.library.custom_op("resnas::ragged_attention_fwd", mutates_args=())
def ragged_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: Optional[torch.Tensor],
                         bias_index: Optional[torch.Tensor], dense_bias: Optional[torch.Tensor], sizes: List[int],
                         widths: torch.Tensor, scale: float, grid: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (B, Nq, H_max * d_v), lse (B, H_max, Nq) fp32 / fp64). `widths` is the int32 (G,) heads tensor on
    q's device; `grid` is [R, s] or [] (see `ragged_attention`); with a grid, bias_index is None."""
    _check_args(q, k, v, Ragged(tuple(sizes), widths), scale, bias_table, bias_index, tuple(grid) if grid else None,
                dense_bias)
    _check_index_values(bias_index, bias_table)
    if bias_index is not None:
        bias_index = bias_index.to(torch.int32).contiguous()  # the kernels read int32 (checked to fit above)
    table, dense = _contiguous(bias_table), _contiguous(dense_bias)
    backend = _backend_for(q)
    if q.is_cuda and backend in ("triton", "cuda") and get_backend() == "auto":
        return _auto_cuda_fwd(q, k, v, table, bias_index, dense, sizes, widths, scale, grid)
    return _FWD[backend](q, k, v, table, bias_index, dense, sizes, widths, scale, grid)


@ragged_attention_fwd.register_fake
def _(q, k, v, bias_table, bias_index, dense_bias, sizes, widths, scale, grid):
    return _fwd_outputs(q, v)


@torch.library.custom_op("resnas::ragged_attention_bwd", mutates_args=())
def ragged_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor, bias_table: Optional[torch.Tensor], bias_index: Optional[torch.Tensor],
                         dense_bias: Optional[torch.Tensor], sizes: List[int], widths: torch.Tensor, scale: float,
                         grid: List[int], need_table_grad: bool, need_dense_grad: bool
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv, dbias_table, ddense_bias): dq/dk/dv contiguous with q/k/v's shapes, zeros on inactive
    heads; dbias_table (H_max, T) in the table's dtype when a table is given and need_table_grad, else an empty (0,)
    tensor; ddense_bias like dense_bias when need_dense_grad, else empty."""
    _check_args(q, k, v, Ragged(tuple(sizes), widths), scale, bias_table, bias_index, tuple(grid) if grid else None,
                dense_bias)
    _check_bwd_tensors(q, v, dout, out, lse)
    if not (lse.is_contiguous() and out.is_contiguous()):
        raise ValueError("out and lse must be contiguous (as the forward returns them)")
    if bias_index is not None:
        bias_index = bias_index.to(torch.int32).contiguous()  # checked by the forward
    impl = _BWD[_backend_for(q)]
    return impl(dout.contiguous(), q, k, v, out, lse, _contiguous(bias_table), bias_index, _contiguous(dense_bias),
                sizes, widths, scale, grid, need_table_grad, need_dense_grad)


@ragged_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, bias_table, bias_index, dense_bias, sizes, widths, scale, grid, need_table_grad,
      need_dense_grad):
    return _bwd_outputs(q, k, v, bias_table, dense_bias, need_table_grad, need_dense_grad)


def _setup_context(ctx, inputs, output):
    q, k, v, bias_table, bias_index, dense_bias, sizes, widths, scale, grid = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias_table, bias_index, dense_bias, widths)
    ctx.args = (sizes, scale, grid)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, bias_table, bias_index, dense_bias, widths = ctx.saved_tensors
    sizes, scale, grid = ctx.args
    need_table = bias_table is not None and ctx.needs_input_grad[3]
    need_dense = dense_bias is not None and ctx.needs_input_grad[5]
    dq, dk, dv, dtable, ddense = ragged_attention_bwd(dout, q, k, v, out, lse, bias_table, bias_index, dense_bias,
                                                      sizes, widths, scale, grid, need_table, need_dense)
    return (dq, dk, dv, dtable if need_table else None, None, ddense if need_dense else None,
            None, None, None, None)


ragged_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------------------
def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, N, H_max, d), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must have dtype in {[str(d) for d in _FLOAT_DTYPES]}, got {t.dtype}")
        if t.shape[3] > 1 and t.stride(3) != 1:
            raise ValueError(f"{name} must have unit stride on its last (head) dim, got strides {t.stride()}; "
                             f"other strides may be arbitrary (views of a qkv tensor are fine)")
    for name, t in (("k", k), ("v", v)):
        check_same_device(q, t, "q", name)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype ({q.dtype}), got {t.dtype}")
    names = "q (B, Nq, H_max, d_qk), k (B, Nk, H_max, d_qk), v (B, Nk, H_max, d_v)"
    shapes = f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k and v must have the same batch size (dim 0): expected {names}, {shapes}")
    if not (q.shape[2] == k.shape[2] == v.shape[2]):
        raise ValueError(f"q, k and v must have the same number of heads H_max (dim 2): expected {names}, {shapes}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head dim d_qk (dim 3): expected {names}, {shapes}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of keys Nk (dim 1): expected {names}, {shapes}")
    if min(q.shape[1], k.shape[1], q.shape[3], v.shape[3]) < 1:
        raise ValueError(f"Nq, Nk, d_qk and d_v must be >= 1, {shapes}")


def _check_bias(q, k, bias_table, bias_index, bias_grid, dense_bias):
    batch, n_q, h_max, _ = q.shape
    n_k = k.shape[1]
    if bias_table is not None and dense_bias is not None:
        raise ValueError("give at most one bias: bias_table (with bias_index or bias_grid) or dense_bias, not both")
    if bias_table is None:
        if bias_index is not None or bias_grid is not None:
            raise ValueError("bias_index / bias_grid index a bias_table, but bias_table is None")
    else:
        check_tensor(bias_table, "bias_table")
        if bias_table.dim() != 2 or bias_table.shape[0] != h_max or bias_table.shape[1] < 1:
            raise ValueError(f"bias_table must have shape (H_max, T) = ({h_max}, T >= 1) (H_max = q.shape[2]), got "
                             f"{tuple(bias_table.shape)}")
        if bias_table.dtype not in (q.dtype, torch.float32):
            raise TypeError(f"bias_table must have q's dtype ({q.dtype}) or float32, got {bias_table.dtype}")
        check_same_device(q, bias_table, "q", "bias_table")
        if (bias_index is None) == (bias_grid is None):
            raise ValueError("with bias_table, give exactly one of bias_index (Nq, Nk) or bias_grid (R, stride), "
                             f"got {'both' if bias_index is not None else 'neither'}")
        if bias_index is not None:
            check_tensor(bias_index, "bias_index")
            if tuple(bias_index.shape) != (n_q, n_k):
                raise ValueError(f"bias_index must have shape (Nq, Nk) = ({n_q}, {n_k}), got {tuple(bias_index.shape)}")
            if bias_index.dtype not in _INDEX_DTYPES:
                raise TypeError(f"bias_index must be an integer tensor (int64 or int32), got {bias_index.dtype}")
            check_same_device(q, bias_index, "q", "bias_index")
        else:
            ok = (isinstance(bias_grid, (tuple, list)) and len(bias_grid) == 2
                  and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in bias_grid))
            if not ok:
                raise ValueError(f"bias_grid must be a pair of ints (R, stride) >= 1, got {bias_grid!r}")
            r, s = bias_grid
            rq = levit_query_resolution(r, s)
            if n_k != r * r or n_q != rq * rq:
                raise ValueError(f"bias_grid=({r}, {s}) means Nk = R^2 = {r * r} keys and Nq = ((R-1)//s+1)^2 = "
                                 f"{rq * rq} queries, got Nq={n_q}, Nk={n_k}")
            if bias_table.shape[1] < r * r:
                raise ValueError(f"bias_grid=({r}, {s}) indexes offsets up to R^2 - 1 = {r * r - 1}, so bias_table "
                                 f"needs T >= {r * r} columns, got T={bias_table.shape[1]}")
    if dense_bias is not None:
        check_tensor(dense_bias, "dense_bias")
        ok3 = dense_bias.dim() == 3 and dense_bias.shape[0] in (1, h_max) and tuple(dense_bias.shape[1:]) == (n_q, n_k)
        ok4 = dense_bias.dim() == 4 and tuple(dense_bias.shape) == (batch, h_max, n_q, n_k)
        if not (ok3 or ok4):
            raise ValueError(f"dense_bias must have shape (1 or H_max, Nq, Nk) = (1|{h_max}, {n_q}, {n_k}) or "
                             f"(B, H_max, Nq, Nk) = ({batch}, {h_max}, {n_q}, {n_k}), got {tuple(dense_bias.shape)}")
        if dense_bias.dtype not in (q.dtype, torch.float32):
            raise TypeError(f"dense_bias must have q's dtype ({q.dtype}) or float32, got {dense_bias.dtype}")
        check_same_device(q, dense_bias, "q", "dense_bias")


def _check_args(q, k, v, heads: Ragged, scale, bias_table, bias_index, bias_grid, dense_bias,
                what: str = "widths") -> None:
    """The argument checks of `ragged_attention`, run again by the custom ops (direct calls, torch.compile) and by the
    fake kernels of the C++ ops; `csrc/ragged_attention.h` (check_args) words its checks the same way."""
    _check_qkv(q, k, v)
    if heads.on_device:
        check_same_device(q, heads.widths, "q", what)
    check_groups(heads, q.shape[0], q.shape[2], batch_of="q", width_of="q (dim 2, H_max)", what=what)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (abs(scale) < float("inf")):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    _check_bias(q, k, bias_table, bias_index, bias_grid, dense_bias)


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
