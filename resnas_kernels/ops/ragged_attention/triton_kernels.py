"""Triton kernels of the ragged attention and their launchers (the `triton` backend; also the backward of the `cuda`
backend); semantics in the package docstring."""
import functools
from typing import List, Optional, Tuple

import torch

from ... import _ext
from ..._triton import tl, triton
from ...ragged import sample_group_index
from ...reference.attention import levit_bias_index, levit_query_resolution


def _bias_chunk(batch: int, per_sample_dense: bool) -> int:
    """Samples per backward task whose score gradients are summed into one partial bias-gradient buffer.

    A function of the batch size only (never of the device or thread count), so the summation order and hence the
    bits of the bias gradient depend only on the input shape. A per-sample dense bias needs its own gradient per
    sample (chunk 1). Otherwise 8 samples per chunk keeps the partial buffer at 1/8 of a (B, H, Nq, Nk) tensor and
    still leaves B / 8 * H tasks to run in parallel.
    """
    return 1 if per_sample_dense else max(1, min(8, batch))


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels
#
# Two families, picked per shape by `_use_small`:
# - small-N (Nq, Nk <= 64; bf16 / fp16; the backward up to a 16 x 64 score tile): one program owns a run of samples
#   of one head and keeps the whole (Nq, Nk) score tile in registers: no online softmax, no 128-row padding (N =
#   16/17/49 pad to 16/32/64), several (sample, head) pairs per program. Its backward also sums the score gradient of
#   its samples in registers (the bias-gradient partial).
# - tiled (online softmax over key tiles): forward per (query tile, head, sample); backward in three kernels:
#   dq (also writes delta = rowsum(dO * O)), dk/dv (per key tile, loops over query tiles), and dbias (per score tile,
#   loops over the samples of a chunk, accumulating in registers). Splitting dq from dk/dv recomputes Q K^T once more
#   but needs no atomics; dbias recomputes it again but never read-modify-writes a (Nq, Nk) buffer per sample.
# The grids cover every head h < H_max (a static bound); each program reads its sample's head count on the device
# (`_active_heads`: the group's entry of the widths tensor, clamped to [0, H_max]), and inactive (sample, head) pairs
# only store zeros. Nothing about the heads is read on the host, so a new architecture is a new tensor value, never a
# new launch configuration. Softmax and accumulations are fp32; fp32 inputs use IEEE fp32 dots (no TF32: FMA units,
# hence their own tiles, see `_production_tile`), bf16/fp16 inputs feed P and dS to the tensor cores in the input
# dtype (FlashAttention's choice).
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
    if BIAS_KIND != 5:  # the same for every sample: gathered once, not re-addressed per sample (see the dbias kernel)
        shared_bias = _bias_tile(TABLE, INDEX, DENSE, 0, h, offs_m, offs_n, smask, Nq, Nk, H, T, grid_r, grid_s,
                                 grid_rq, BIAS_KIND, BLOCK_M, BLOCK_N)
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
                if BIAS_KIND == 5:
                    sc += _bias_tile(TABLE, INDEX, DENSE, b, h, offs_m, offs_n, smask, Nq, Nk, H, T, grid_r, grid_s,
                                     grid_rq, BIAS_KIND, BLOCK_M, BLOCK_N)
                else:
                    sc += shared_bias
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
def _dot_t_chunked(acc, A, sa, offs_a, mask_a, B, sb, offs_b, mask_b, D, BLOCK_D: tl.constexpr,
                   CHUNK_D: tl.constexpr, PRECISION: tl.constexpr):
    """acc + A[offs_a, :D] @ B[offs_b, :D]^T (row strides sa, sb), both operands read from memory CHUNK_D columns at a
    time. For fp32's FMA dots: Triton's FMA lowering holds a thread's rows of both operands over the whole reduction
    extent in registers, so a 64-wide head-dim dot alone needs ~768 registers per thread; 16-wide chunks fit. The
    chunks accumulate in order into acc, the same sequence of fp32 FMAs as one dot."""
    for d0 in tl.static_range(0, BLOCK_D, CHUNK_D):
        offs_d = d0 + tl.arange(0, CHUNK_D)
        a = tl.load(A + offs_a[:, None] * sa + offs_d[None, :], mask=mask_a[:, None] & (offs_d[None, :] < D),
                    other=0.0)
        b = tl.load(B + offs_b[:, None] * sb + offs_d[None, :], mask=mask_b[:, None] & (offs_d[None, :] < D),
                    other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _attn_fwd_tiled_kernel(Q, K, V, O, LSE, WIDTHS, SAMPLE_GROUP, TABLE, INDEX, DENSE, B, Nq, Nk, H, T, Dqk, Dv,
                           sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, scale, grid_r, grid_s, grid_rq,
                           BIAS_KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
                           CHUNK_D: tl.constexpr):
    """Program (query tile, h, b). CHUNK_D = 0: the Q K^T dot takes whole tiles (tensor cores); else Q and K are read
    CHUNK_D head-dim columns at a time (`_dot_t_chunked`)."""
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
        q_base = Q + b64 * sqb + h * sqh
        k_base = K + b64 * skb + h * skh
        if CHUNK_D == 0:
            q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :],
                        mask=mask_m[:, None] & (offs_d[None, :] < Dqk), other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        for n0 in range(0, Nk, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < Nk
            if CHUNK_D == 0:
                k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :],
                            mask=mask_n[:, None] & (offs_d[None, :] < Dqk), other=0.0)
                sc = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            else:
                sc = _dot_t_chunked(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), q_base, sqn, offs_m, mask_m,
                                    k_base, skn, offs_n, mask_n, Dqk, BLOCK_DQK, CHUNK_D, PRECISION)
            v = tl.load(V + b64 * svb + offs_n[:, None] * svn + h * svh + offs_e[None, :],
                        mask=mask_n[:, None] & (offs_e[None, :] < Dv), other=0.0)
            sc = sc * scale
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
    if BIAS_KIND != 5:  # the same for every sample: gathered once (see the dbias kernel)
        shared_bias = _bias_tile(TABLE, INDEX, DENSE, 0, h, offs_m, offs_n, smask, Nq, Nk, H, T, grid_r, grid_s,
                                 grid_rq, BIAS_KIND, BLOCK_M, BLOCK_N)
    for s in range(chunk):
        b = c * chunk + s
        if b < B:
            b64 = b.to(tl.int64)
            # Output addresses are formed at each store, not up front: three address tiles held across the body
            # (64-bit, one per element) took most of the registers and spilled.
            if h < _active_heads(WIDTHS, SAMPLE_GROUP, b, H):
                q = tl.load(Q + b64 * sqb + offs_m[:, None] * sqn + h * sqh + offs_d[None, :], mask=qmask, other=0.0)
                k = tl.load(K + b64 * skb + offs_n[:, None] * skn + h * skh + offs_d[None, :], mask=kmask, other=0.0)
                v = tl.load(V + b64 * svb + offs_n[:, None] * svn + h * svh + offs_e[None, :], mask=vmask, other=0.0)
                row = (b64 * Nq + offs_m[:, None]) * (H * Dv) + h * Dv + offs_e[None, :]
                do = tl.load(DO + row, mask=omask, other=0.0)
                delta = tl.sum(do.to(tl.float32) * tl.load(O + row, mask=omask, other=0.0).to(tl.float32), 1)
                lse = tl.load(LSE + (b64 * H + h) * Nq + offs_m, mask=mask_m, other=0.0)
                sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
                if BIAS_KIND == 5:
                    sc += _bias_tile(TABLE, INDEX, DENSE, b, h, offs_m, offs_n, smask, Nq, Nk, H, T, grid_r, grid_s,
                                     grid_rq, BIAS_KIND, BLOCK_M, BLOCK_N)
                else:
                    sc += shared_bias
                p = tl.where(smask, tl.exp(sc - lse[:, None]), 0.0)
                dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
                tl.store(DV + ((b64 * Nk + offs_n[:, None]) * H + h) * Dv + offs_e[None, :],
                         dv.to(DV.dtype.element_ty), mask=vmask)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
                tl.store(DQ + ((b64 * Nq + offs_m[:, None]) * H + h) * Dqk + offs_d[None, :],
                         dq.to(DQ.dtype.element_ty), mask=qmask)
                dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION) * scale
                tl.store(DK + ((b64 * Nk + offs_n[:, None]) * H + h) * Dqk + offs_d[None, :],
                         dk.to(DK.dtype.element_ty), mask=kmask)
                ds_acc += ds
            else:
                tl.store(DQ + ((b64 * Nq + offs_m[:, None]) * H + h) * Dqk + offs_d[None, :],
                         tl.zeros([BLOCK_M, BLOCK_DQK], dtype=DQ.dtype.element_ty), mask=qmask)
                tl.store(DK + ((b64 * Nk + offs_n[:, None]) * H + h) * Dqk + offs_d[None, :],
                         tl.zeros([BLOCK_N, BLOCK_DQK], dtype=DK.dtype.element_ty), mask=kmask)
                tl.store(DV + ((b64 * Nk + offs_n[:, None]) * H + h) * Dv + offs_e[None, :],
                         tl.zeros([BLOCK_N, BLOCK_DV], dtype=DV.dtype.element_ty), mask=vmask)
    if HAS_DS:
        part = DS_PART + (c.to(tl.int64) * H + h) * Nq * Nk
        tl.store(part + offs_m[:, None] * Nk + offs_n[None, :], ds_acc, mask=smask)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, O, DO, LSE, DELTA, DQ, WIDTHS, SAMPLE_GROUP, TABLE, INDEX, DENSE, B, Nq, Nk, H,
                        T, Dqk, Dv, sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, scale, grid_r, grid_s, grid_rq,
                        BIAS_KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
                        CHUNK_D: tl.constexpr):
    """Program (query tile, h, b): dq of the tile, and delta = rowsum(dO * O) for the dk/dv and dbias kernels.
    CHUNK_D as in the forward: Q K^T and dO V^T from whole tiles (0) or CHUNK_D head-dim columns at a time."""
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
        q_base = Q + b64 * sqb + h * sqh
        k_base = K + b64 * skb + h * skh
        v_base = V + b64 * svb + h * svh
        do_base = DO + b64 * Nq * (H * Dv) + h * Dv
        row = offs_m[:, None] * (H * Dv) + offs_e[None, :]
        do = tl.load(do_base + row, mask=omask, other=0.0)
        o = tl.load(O + b64 * Nq * (H * Dv) + h * Dv + row, mask=omask, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(delta_ptrs, delta, mask=mask_m)
        if CHUNK_D == 0:
            q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :], mask=qmask, other=0.0)
        lse = tl.load(LSE + (b64 * H + h) * Nq + offs_m, mask=mask_m, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
        for n0 in range(0, Nk, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < Nk
            smask = mask_m[:, None] & mask_n[None, :]
            k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :],
                        mask=mask_n[:, None] & (offs_d[None, :] < Dqk), other=0.0)
            if CHUNK_D == 0:
                v = tl.load(v_base + offs_n[:, None] * svn + offs_e[None, :],
                            mask=mask_n[:, None] & (offs_e[None, :] < Dv), other=0.0)
                sc = tl.dot(q, tl.trans(k), input_precision=PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            else:
                zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                sc = _dot_t_chunked(zero, q_base, sqn, offs_m, mask_m, k_base, skn, offs_n, mask_n, Dqk, BLOCK_DQK,
                                    CHUNK_D, PRECISION)
                dp = _dot_t_chunked(zero, do_base, H * Dv, offs_m, mask_m, v_base, svn, offs_n, mask_n, Dv,
                                    BLOCK_DV, CHUNK_D, PRECISION)
            sc = sc * scale
            sc += _bias_tile(TABLE, INDEX, DENSE, b, h, offs_m, offs_n, smask, Nq, Nk, H, T, grid_r, grid_s,
                             grid_rq, BIAS_KIND, BLOCK_M, BLOCK_N)
            p = tl.where(smask, tl.exp(sc - lse[:, None]), 0.0)
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
                          BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
                          CHUNK_D: tl.constexpr):
    """Program (key tile, h, b): dk and dv of the tile, looping over the query tiles. CHUNK_D as in the dq kernel."""
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
        q_base = Q + b64 * sqb + h * sqh
        k_base = K + b64 * skb + h * skh
        v_base = V + b64 * svb + h * svh
        do_base = DO + b64 * Nq * (H * Dv) + h * Dv
        if CHUNK_D == 0:
            k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :], mask=kmask, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * svn + offs_e[None, :], mask=vmask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        for m0 in range(0, Nq, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < Nq
            smask = mask_m[:, None] & mask_n[None, :]
            q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :],
                        mask=mask_m[:, None] & (offs_d[None, :] < Dqk), other=0.0)
            do = tl.load(do_base + offs_m[:, None] * (H * Dv) + offs_e[None, :],
                         mask=mask_m[:, None] & (offs_e[None, :] < Dv), other=0.0)
            lse = tl.load(LSE + (b64 * H + h) * Nq + offs_m, mask=mask_m, other=0.0)
            delta = tl.load(DELTA + (b64 * H + h) * Nq + offs_m, mask=mask_m, other=0.0)
            if CHUNK_D == 0:
                sc = tl.dot(q, tl.trans(k), input_precision=PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            else:
                zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                sc = _dot_t_chunked(zero, q_base, sqn, offs_m, mask_m, k_base, skn, offs_n, mask_n, Dqk, BLOCK_DQK,
                                    CHUNK_D, PRECISION)
                dp = _dot_t_chunked(zero, do_base, H * Dv, offs_m, mask_m, v_base, svn, offs_n, mask_n, Dv,
                                    BLOCK_DV, CHUNK_D, PRECISION)
            sc = sc * scale
            sc += _bias_tile(TABLE, INDEX, DENSE, b, h, offs_m, offs_n, smask, Nq, Nk, H, T, grid_r, grid_s,
                             grid_rq, BIAS_KIND, BLOCK_M, BLOCK_N)
            p = tl.where(smask, tl.exp(sc - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
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
                           PRECISION: tl.constexpr, CHUNK_D: tl.constexpr):
    """Program (score tile, h, c): DS_PART[c, h, tile] = sum over the chunk's samples, in order, of dS (registers).
    The bias tile is the same for every sample but with a per-sample dense bias: it is gathered once, before the
    sample loop (otherwise the compiler keeps its 64-bit address tile live across the loop instead)."""
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
    if BIAS_KIND != 5:
        shared_bias = _bias_tile(TABLE, INDEX, DENSE, 0, h, offs_m, offs_n, smask, Nq, Nk, H, T, grid_r, grid_s,
                                 grid_rq, BIAS_KIND, BLOCK_M, BLOCK_N)
    for s in range(chunk):
        b = c * chunk + s
        if b < B:
            if h < _active_heads(WIDTHS, SAMPLE_GROUP, b, H):
                b64 = b.to(tl.int64)
                q_base = Q + b64 * sqb + h * sqh
                k_base = K + b64 * skb + h * skh
                v_base = V + b64 * svb + h * svh
                do_base = DO + b64 * Nq * (H * Dv) + h * Dv
                lse = tl.load(LSE + (b64 * H + h) * Nq + offs_m, mask=mask_m, other=0.0)
                delta = tl.load(DELTA + (b64 * H + h) * Nq + offs_m, mask=mask_m, other=0.0)
                if CHUNK_D == 0:
                    q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :],
                                mask=mask_m[:, None] & (offs_d[None, :] < Dqk), other=0.0)
                    k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :],
                                mask=mask_n[:, None] & (offs_d[None, :] < Dqk), other=0.0)
                    v = tl.load(v_base + offs_n[:, None] * svn + offs_e[None, :],
                                mask=mask_n[:, None] & (offs_e[None, :] < Dv), other=0.0)
                    do = tl.load(do_base + offs_m[:, None] * (H * Dv) + offs_e[None, :],
                                 mask=mask_m[:, None] & (offs_e[None, :] < Dv), other=0.0)
                    sc = tl.dot(q, tl.trans(k), input_precision=PRECISION)
                    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                else:
                    zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                    sc = _dot_t_chunked(zero, q_base, sqn, offs_m, mask_m, k_base, skn, offs_n, mask_n, Dqk,
                                        BLOCK_DQK, CHUNK_D, PRECISION)
                    dp = _dot_t_chunked(zero, do_base, H * Dv, offs_m, mask_m, v_base, svn, offs_n, mask_n, Dv,
                                        BLOCK_DV, CHUNK_D, PRECISION)
                sc = sc * scale
                if BIAS_KIND == 5:
                    sc += _bias_tile(TABLE, INDEX, DENSE, b, h, offs_m, offs_n, smask, Nq, Nk, H, T, grid_r, grid_s,
                                     grid_rq, BIAS_KIND, BLOCK_M, BLOCK_N)
                else:
                    sc += shared_bias
                p = tl.where(smask, tl.exp(sc - lse[:, None]), 0.0)
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
_SMALL_BWD_MAX_SCORES = 16 * 64  # padded score tile up to which the small-N backward runs (see `_use_small`)
# fp32 runs its dots on FMA units, whose Triton lowering holds each thread's rows of both operands over the whole
# reduction extent in registers (at 64 x 64 x 64 about 768 per thread: the 15-37 KB spills). So fp32 reads head dims
# in 16-column chunks (`_dot_t_chunked`), keeps its tiles at 32 x 32 and the block a kernel reduces over in its
# tile-by-tile dots at 32 (keys: forward, dq), dk/dv at 16 x 16 (its two (keys, d) accumulators spilled at 32 keys).
_FP32_CHUNK_D = 16


def _use_small(n_q: int, n_k: int, dtype: torch.dtype, backward: bool = False,
               device: Optional[torch.device] = None, dense_bias: bool = False) -> bool:
    """The small-N kernels reduce over a whole padded sequence in one dot, which fp32's FMA dots cannot hold in
    registers: fp32 always takes the tiled kernels. The small backward keeps about ten score-sized tiles per sample
    live (and the dS sum across samples): beyond a 16 x 64 score tile it spilled even at 8 warps, so larger shapes
    take the tiled backward kernels; and it uses all 255 registers, which spill on sm_80 (not on sm_90: its AOT case is
    compiled for sm_90 only), so CUDA devices below compute capability 9 take the tiled backward too. `device`: the
    tensors' device (the interpreter's CPU runs every kernel). A dense bias (its addresses and values one more
    score-sized tile) spilled in the 64 x 64 forward and in the backward: it takes the small forward only up to
    16 x 64 score tiles, and never the small backward."""
    m, n = triton.next_power_of_2(n_q), triton.next_power_of_2(n_k)
    if dtype == torch.float32 or m > _SMALL_MAX or n > _SMALL_MAX:
        return False
    if not backward:
        return not dense_bias or max(m, 16) * max(n, 16) <= _SMALL_DENSE_FWD_MAX_SCORES
    if dense_bias:
        return False
    if device is not None and device.type == "cuda" and _capability(device) < _SMALL_BWD_MIN_CAPABILITY:
        return False
    return max(m, 16) * max(n, 16) <= _SMALL_BWD_MAX_SCORES


_SMALL_BWD_MIN_CAPABILITY = (9, 0)
_SMALL_DENSE_FWD_MAX_SCORES = 16 * 64


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _production_tile(dtype: torch.dtype, kernel: str = "fwd") -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, CHUNK_D) of a tiled kernel ("fwd", "dq", "dkdv", "dbias") on GPU. The tensor-core dtypes:
    whole-tile head-dim dots, 64 query rows and 32 keys per tile (dbias: 32 x 32 score tiles). At 64 x 64 the score,
    P, dP and dS tiles, the gathered bias and its addresses and the accumulators spilled on sm_80. fp32 as above."""
    if dtype != torch.float32:
        return {"fwd": (64, 32), "dq": (64, 32), "dkdv": (64, 32), "dbias": (32, 32)}[kernel] + (0,)
    return {"fwd": (32, 32), "dq": (32, 32), "dkdv": (16, 16), "dbias": (32, 32)}[kernel] + (_FP32_CHUNK_D,)


def _tile(dtype: torch.dtype, kernel: str = "fwd") -> Tuple[int, int, int]:
    """`_production_tile`, but 16 x 16 under the interpreter, so small test shapes still span several tiles."""
    bm, bn, chunk_d = _production_tile(dtype, kernel)
    return (16, 16, chunk_d) if _ext.interpreter_tiles() else (bm, bn, chunk_d)


def _num_warps(dtype: torch.dtype) -> int:
    """Warps per program: 8 for the tensor-core dtypes, whose 64-row tiles keep several fp32 score-sized tiles live at
    once (scores, P, dP, dS, the bias and its addresses, accumulators) and spilled at 4; 4 for fp32's small tiles."""
    return 4 if dtype == torch.float32 else 8


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
    if _use_small(n_q, n_k, q.dtype, dense_bias=dense is not None):
        bm, bn = max(16, triton.next_power_of_2(n_q)), max(16, triton.next_power_of_2(n_k))
        per = _SMALL_SAMPLES
        _attn_fwd_small_kernel[(triton.cdiv(batch, per), h_max)](
            q, k, v, out, lse, *args, per, BLOCK_M=bm, BLOCK_N=bn, **meta, num_warps=_num_warps(q.dtype))
    else:
        bm, bn, chunk_d = _tile(q.dtype)
        _attn_fwd_tiled_kernel[(triton.cdiv(n_q, bm), h_max, batch)](
            q, k, v, out, lse, *args, BLOCK_M=bm, BLOCK_N=bn, **meta, CHUNK_D=chunk_d, num_warps=_num_warps(q.dtype),
            num_stages=2)
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
        if _use_small(n_q, n_k, q.dtype, backward=True, device=q.device, dense_bias=dense is not None):
            bm, bn = max(16, triton.next_power_of_2(n_q)), max(16, triton.next_power_of_2(n_k))
            if not has_ds:
                chunk, n_chunks = _SMALL_SAMPLES, triton.cdiv(batch, _SMALL_SAMPLES)
            _attn_bwd_small_kernel[(n_chunks, h_max)](
                q, k, v, out, dout, lse, dq, dk, dv, ds_part if has_ds else q, *args, chunk,
                HAS_DS=has_ds, BLOCK_M=bm, BLOCK_N=bn, **meta, num_warps=_num_warps(q.dtype))
        else:
            bm, bn, chunk_d = _tile(q.dtype, "dq")
            tiled = dict(**meta, CHUNK_D=chunk_d, num_warps=_num_warps(q.dtype), num_stages=2)
            delta = torch.empty_like(lse)
            _attn_bwd_dq_kernel[(triton.cdiv(n_q, bm), h_max, batch)](
                q, k, v, out, dout, lse, delta, dq, *args, BLOCK_M=bm, BLOCK_N=bn, **tiled)
            bm, bn, _ = _tile(q.dtype, "dkdv")
            _attn_bwd_dkdv_kernel[(triton.cdiv(n_k, bn), h_max, batch)](
                q, k, v, dout, lse, delta, dk, dv, *args, BLOCK_M=bm, BLOCK_N=bn, **tiled)
            if has_ds:
                bm, bn, _ = _tile(q.dtype, "dbias")
                tiles_n = triton.cdiv(n_k, bn)
                _attn_bwd_dbias_kernel[(triton.cdiv(n_q, bm) * tiles_n, h_max, n_chunks)](
                    q, k, v, dout, lse, delta, ds_part, *args, chunk, tiles_n, BLOCK_M=bm, BLOCK_N=bn, **tiled)
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
