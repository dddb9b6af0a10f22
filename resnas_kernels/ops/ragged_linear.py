"""Ragged (variable-width) linear: every group of a batch through the top-left slice of one shared weight, one launch.

    y[rows of g, s*Nseg : s*Nseg + n_g] = epilogue(x[rows of g, :k_g] @ W[s*Nseg : s*Nseg + n_g, :k_g]^T + b[...])

Spec: `resnas_kernels.reference.ragged_linear` (the oracle). This file holds the whole op: Triton kernels and
launchers, the explicit PyTorch backend, the fake implementations of the C++ kernels (csrc/cpu/ragged_linear.cpp),
the `torch.library` custom ops of the Python backends with their fake implementations and autograd, and the public
function.

Backends: reference | triton | cpu. (No CUDA C++ kernel: on CUDA tensors the Triton kernels are the fast path.)
- cpu: the public function makes one call, `torch.ops.resnas.ragged_linear`, registered in C++ with its argument
  checks and autograd (one dispatcher hop; no Python between the call and the kernels).
- reference / triton: the Python custom op `resnas::ragged_linear_fwd` (checks, autograd) over the kernels below.

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
  fixed, so their summation order never depends on an autotuning outcome. Not yet run on a GPU: interpreter-tested
  and compiled ahead of time for sm_80/sm_90 only; block sizes and autotune configs are untuned guesses.
- k_g = 0 gives act(bias) on the group's rows (an empty product is zero); n_g = 0 gives zeros and costs no GEMM work.
- Double backward is not supported.
- cpu backend: see csrc/cpu/ragged_linear.cpp (dense calls take one multithreaded GEMM, like F.linear).
"""
import functools
from collections.abc import Hashable
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from .. import _ext
from .._triton import HAS_TRITON, tl, triton
from ..aot import register_aot
from ..backend import (BackendUnavailableError, OpInfo, get_backend, register_op, resolve_backend_for, use_backend,
                       why_unavailable)
from ..ragged import WIDTH_DTYPE, Ragged, row_starts, validate_metadata
from ..reference.layer_norm import compute_dtype
from ._checks import check_float_tensor, check_same_device, check_tensor

OP = register_op(OpInfo(
    name="ragged_linear",
    backends=("triton", "cpu"),
    auto_cuda=("triton",),
    ext_ops=("ragged_linear", "ext_ragged_linear_fwd", "ext_ragged_linear_bwd"),
))

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ACTIVATIONS = ("none", "gelu")
_SQRT1_2 = 0.7071067811865476       # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------------
@triton.jit
def _gelu(h):
    """Exact (erf) GELU, fp32."""
    return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))


@triton.jit
def _gelu_grad(h):
    """d gelu / dh = Phi(h) + h * phi(h), fp32."""
    return 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476)) + h * tl.exp(-0.5 * h * h) * 0.3989422804014327


@triton.jit
def _ragged_linear_fwd_kernel(X, W, BIAS, RES, SCALE, Y, PRE, ROW_BLOCKS, ROW_STARTS, IN_W, OUT_W, K_max, N_max,
                              seg_width, col_tiles, rows_per_sample, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
                              HAS_RESIDUAL: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, SAVE_PRE: tl.constexpr,
                              PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr):
    """One (BLOCK_M rows) x (BLOCK_N output columns) tile: row block ROW_BLOCKS[program 0] = (g, row0), column tile
    program 1 (col_tiles per segment).

    Group g owns rows [ROW_STARTS[g], ROW_STARTS[g+1]); IN_W[g] / OUT_W[g] are its widths k_g / n_g, clamped to
    [0, K_max] / [0, seg_width]. Column c of y belongs to segment c // seg_width and is active for group g iff
    c % seg_width < n_g; W row c produces it.
    """
    block = tl.program_id(0)
    col_tile = tl.program_id(1)
    g = tl.load(ROW_BLOCKS + 2 * block)
    row0 = tl.load(ROW_BLOCKS + 2 * block + 1)
    row_end = tl.load(ROW_STARTS + g + 1)
    k_g = tl.minimum(tl.maximum(tl.load(IN_W + g), 0), K_max)
    n_g = tl.minimum(tl.maximum(tl.load(OUT_W + g), 0), seg_width)
    seg_start = (col_tile // col_tiles) * seg_width
    col0 = seg_start + (col_tile % col_tiles) * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < seg_start + seg_width      # a tile never writes into the next segment
    col_active = cols < seg_start + n_g          # n_g <= seg_width: never past the segment
    # Idle tiles (every column beyond n_g) run no K iterations and just store zeros.
    k_len = tl.where(col0 < seg_start + n_g, k_g, 0)
    x_ptrs = X + rows.to(tl.int64)[:, None] * K_max     # int64: rows * K_max can pass 2^31
    w_ptrs = W + cols.to(tl.int64)[None, :] * K_max
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_len, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_g                                   # never read x or W beyond k_g <= K_max (masked: 0)
        a = tl.load(x_ptrs + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs + ks[:, None], mask=k_ok[:, None] & col_active[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_active, other=0.0).to(tl.float32)[None, :]
    offs = rows.to(tl.int64)[:, None] * N_max + cols[None, :]
    store_mask = row_ok[:, None] & col_ok[None, :]
    if SAVE_PRE:  # exactly 0 beyond n_g: the loads and the bias were masked
        tl.store(PRE + offs, acc.to(PRE.dtype.element_ty), mask=store_mask)
    if GELU:
        acc = _gelu(acc)
    if HAS_RESIDUAL:
        if HAS_ROW_SCALE:
            scale = tl.load(SCALE + rows // rows_per_sample, mask=row_ok, other=0.0).to(tl.float32)
            acc = acc * scale[:, None]
        acc += tl.load(RES + offs, mask=row_ok[:, None] & col_active[None, :], other=0.0).to(tl.float32)
    acc = tl.where(col_active[None, :], acc, 0.0)
    tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=store_mask)


@triton.jit
def _ragged_linear_bwd_prologue_kernel(DY, PRE, SCALE, DR, DP, ROW_STARTS, OUT_W, num_groups, num_rows, N_max,
                                       seg_width,
                                       rows_per_sample, GELU: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
                                       WRITE_DR: tl.constexpr, WRITE_DP: tl.constexpr, BLOCK_R: tl.constexpr,
                                       BLOCK_C: tl.constexpr):
    """dresidual = dy on the active columns (0 elsewhere); dpre = dy * row_scale * gelu'(pre) (0 elsewhere)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < num_rows
    col_ok = cols < N_max
    n_row = rows * 0  # output width of each row's group (0 for rows past the end)
    for g in range(num_groups):
        start = tl.load(ROW_STARTS + g)
        end = tl.load(ROW_STARTS + g + 1)
        n_g = tl.minimum(tl.maximum(tl.load(OUT_W + g), 0), seg_width)
        n_row = tl.where((rows >= start) & (rows < end), n_g, n_row)
    active = ((cols % seg_width)[None, :] < n_row[:, None]) & row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * N_max + cols[None, :]
    store_mask = row_ok[:, None] & col_ok[None, :]
    dy = tl.load(DY + offs, mask=active, other=0.0).to(tl.float32)
    if WRITE_DR:
        tl.store(DR + offs, dy.to(DR.dtype.element_ty), mask=store_mask)
    if WRITE_DP:
        d = dy
        if HAS_ROW_SCALE:
            d = d * tl.load(SCALE + rows // rows_per_sample, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        if GELU:
            d = d * _gelu_grad(tl.load(PRE + offs, mask=active, other=0.0).to(tl.float32))
        tl.store(DP + offs, d.to(DP.dtype.element_ty), mask=store_mask)


@triton.jit
def _ragged_linear_dx_kernel(DP, W, DX, ROW_BLOCKS, ROW_STARTS, IN_W, OUT_W, K_max, N_max, seg_width, num_segments,
                             PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK_N: tl.constexpr):
    """dx tile (BLOCK_M rows of row block ROW_BLOCKS[program 0] x BLOCK_K input columns, program 1) of one group:
    sum over segments s of dpre[rows, s*Nseg : s*Nseg + n_g] @ W[s*Nseg : s*Nseg + n_g, cols]; zeros beyond k_g."""
    block = tl.program_id(0)
    g = tl.load(ROW_BLOCKS + 2 * block)
    row0 = tl.load(ROW_BLOCKS + 2 * block + 1)
    k0 = tl.program_id(1) * BLOCK_K
    row_end = tl.load(ROW_STARTS + g + 1)
    k_g = tl.minimum(tl.maximum(tl.load(IN_W + g), 0), K_max)
    n_g = tl.minimum(tl.maximum(tl.load(OUT_W + g), 0), seg_width)
    rows = row0 + tl.arange(0, BLOCK_M)
    ks = k0 + tl.arange(0, BLOCK_K)
    row_ok = rows < row_end
    k_ok = ks < k_g
    n_len = tl.where(k0 < k_g, n_g, 0)  # idle tiles (all columns beyond k_g) only store zeros
    dp_ptrs = DP + rows.to(tl.int64)[:, None] * N_max
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for s in range(num_segments):
        for j0 in range(0, n_len, BLOCK_N):
            js = j0 + tl.arange(0, BLOCK_N)
            j_ok = js < n_g  # dy beyond n_g may be anything: never read it
            cols = s * seg_width + js
            a = tl.load(dp_ptrs + cols[None, :], mask=row_ok[:, None] & j_ok[None, :], other=0.0)
            b = tl.load(W + cols.to(tl.int64)[:, None] * K_max + ks[None, :], mask=j_ok[:, None] & k_ok[None, :],
                        other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(DX + rows.to(tl.int64)[:, None] * K_max + ks[None, :], acc.to(DX.dtype.element_ty),
             mask=row_ok[:, None] & (ks < K_max)[None, :])


@triton.jit
def _ragged_linear_dw_kernel(DP, X, DW, DB, ROW_STARTS, IN_W, OUT_W, num_groups, K_max, N_max, seg_width,
                             rows_per_split,
                             HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """One (BLOCK_N rows of W) x (BLOCK_K columns of W) tile of dW for one row split, summed over the groups that
    cover it, in group order: dW[i, j] += dpre[rows of g, i]^T x[rows of g, j] for g with i % Nseg < n_g, j < k_g.

    DW is (splits, N_max, K_max) and DB (splits, N_max): each split writes its own partial (fp32 when there is more
    than one split; the host sums them in a fixed order). db is accumulated by the programs of the first K tile.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    tiles_per_seg = tl.cdiv(seg_width, BLOCK_N)
    seg = pid_n // tiles_per_seg
    j0 = (pid_n % tiles_per_seg) * BLOCK_N
    js = j0 + tl.arange(0, BLOCK_N)        # rows of W within the segment
    w_rows = seg * seg_width + js
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    split_lo = split * rows_per_split
    split_hi = split_lo + rows_per_split
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for g in range(num_groups):
        start = tl.load(ROW_STARTS + g)
        end = tl.load(ROW_STARTS + g + 1)
        k_g = tl.minimum(tl.maximum(tl.load(IN_W + g), 0), K_max)
        n_g = tl.minimum(tl.maximum(tl.load(OUT_W + g), 0), seg_width)
        covers = pid_k * BLOCK_K < k_g
        if HAS_BIAS:
            covers = covers | (pid_k == 0)     # db needs groups with k_g = 0 too (their y is the bias)
        covers = covers & (j0 < n_g)
        lo = tl.maximum(start, split_lo)
        hi = tl.where(covers, tl.minimum(end, split_hi), lo)  # empty loop for groups that do not cover the tile
        j_ok = js < n_g
        k_ok = ks < k_g
        for m0 in range(lo, hi, BLOCK_M):
            ms = m0 + tl.arange(0, BLOCK_M)
            m_ok = ms < hi
            dp_t = tl.load(DP + ms.to(tl.int64)[None, :] * N_max + w_rows[:, None],
                           mask=j_ok[:, None] & m_ok[None, :], other=0.0)          # (BLOCK_N, BLOCK_M)
            x = tl.load(X + ms.to(tl.int64)[:, None] * K_max + ks[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)              # (BLOCK_M, BLOCK_K)
            acc = tl.dot(dp_t, x, acc, input_precision=PRECISION)
            if HAS_BIAS:
                db_acc += tl.sum(dp_t.to(tl.float32), axis=1)
    j_in = js < seg_width
    base = split.to(tl.int64) * N_max
    tl.store(DW + (base + w_rows)[:, None] * K_max + ks[None, :], acc.to(DW.dtype.element_ty),
             mask=j_in[:, None] & (ks < K_max)[None, :])
    if HAS_BIAS:
        tl.store(DB + base + w_rows, db_acc.to(DB.dtype.element_ty), mask=j_in & (pid_k == 0))


# ---------------------------------------------------------------------------------------------------------------------
# Triton launchers: tile tables, block sizes, autotuning
# ---------------------------------------------------------------------------------------------------------------------
def _to_device(table: torch.Tensor, device: str) -> torch.Tensor:
    """Host table -> device. On CUDA through pinned memory without blocking the host (the caching host allocator
    keeps the pinned block alive until the copy is done); happens once per distinct metadata."""
    if device.startswith("cuda"):
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


@functools.lru_cache(maxsize=512)
def _row_blocks(row_counts: Tuple[int, ...], block_m: int, device: str) -> torch.Tensor:
    """int32 (RB, 2) [group, first row] of every BLOCK_M-row block, row blocks never crossing groups: the static axis
    of the forward / dx grids (the other axis covers the output / input columns up to their static bound). Depends on
    the group sizes only, so one table serves every architecture; cached per (sizes, tile, device)."""
    entries, start = [], 0
    for g, rows in enumerate(row_counts):
        entries.extend((g, row0) for row0 in range(start, start + rows, block_m))
        start += rows
    return _to_device(torch.tensor(entries, dtype=torch.int32).reshape(-1, 2), device)


def _row_starts_of(row_counts, device: str) -> torch.Tensor:
    """int32 (G + 1,) first row of every group: `ragged.row_starts` with one row per "sample" (cached)."""
    return row_starts(tuple(row_counts), 1, device)


def _precision(dtype: torch.dtype) -> str:
    """TF32 for fp32 exactly when PyTorch's own matmuls would use it; irrelevant for half types."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


# Interpreter: one small fixed config (the interpreter is slow per program, so tiles are not tiny either).
_INTERP_BLOCKS = dict(fwd=(32, 32, 32), dx=(32, 32, 32), dw=(32, 32, 32), prologue=(32, 32))


def _gpu_blocks(dtype: torch.dtype, avg_rows: int) -> Tuple[int, int]:
    """Host-side (BLOCK_M, BLOCK_N) of the tile tables on GPU. BLOCK_N = 64: ViT-ResNAS widths (176, 220, 352, ...)
    are multiples of 16 but not of 128, so 64-wide tiles waste the least on partial tiles. BLOCK_M = 128 for half
    types on groups with many rows (more reuse per W tile), else 64 (fp32 tiles use twice the registers)."""
    if dtype != torch.float32 and avg_rows >= _TALL_GROUP_ROWS:
        return 128, 64
    return 64, 64


_TALL_GROUP_ROWS = 1024  # module constant so interpreter tests can reach the 128-row tiles with few rows


def _autotune_configs(names, values, warps=(4, 8), stages=(3, 4)):
    return [triton.Config(dict(zip(names, v)), num_warps=w, num_stages=s) for v in values for w in warps
            for s in stages]


def _autotune_spec(kind: str):
    """(kernel, autotune candidates, autotune key) of an autotuned kernel."""
    if kind == "fwd":
        return (_ragged_linear_fwd_kernel, _autotune_configs(("BLOCK_K",), [(32,), (64,)]),
                ["K_max", "N_max", "seg_width", "BLOCK_M", "BLOCK_N"])
    if kind == "dx":
        return (_ragged_linear_dx_kernel, _autotune_configs(("BLOCK_N",), [(32,), (64,)]),
                ["K_max", "N_max", "seg_width", "BLOCK_M", "BLOCK_K"])
    if kind == "dw":  # launch parameters only: the row blocking (summation order) stays fixed
        return (_ragged_linear_dw_kernel, _autotune_configs((), [()]),
                ["K_max", "N_max", "seg_width", "BLOCK_N", "BLOCK_K", "BLOCK_M"])
    raise KeyError(kind)


@functools.lru_cache(maxsize=None)
def _tuned(kind: str):
    """The GPU-autotuned variant of a kernel, created on first use: decorating at import would query the CUDA
    driver on machines that have none (and autotuning is meaningless under the interpreter)."""
    kernel, configs, key = _autotune_spec(kind)
    return triton.autotune(configs, key=key)(kernel)


def _launch_tuned(kind: str, grid, args, consts) -> None:
    """Production launch of an autotuned kernel. Under the interpreter (only with `_ext.production_tiles()`) there is
    no GPU to time candidates on: the pinned candidate runs instead, so tests can execute each one."""
    if _ext.triton_interpreting():
        kernel, configs, _ = _autotune_spec(kind)
        config = _ext.pinned_autotune_config(configs)
        kernel[grid](*args, **consts, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        _tuned(kind)[grid](*args, **consts)


def _split_rows(total_rows: int, dw_tiles: int, block_m: int) -> int:
    """Rows per dW split, from the shapes only (never the device), so the summation order is reproducible.
    Aim for about TARGET programs in all, each reducing at least MIN_BLOCKS row blocks."""
    target, min_blocks = (8, 1) if _ext.interpreter_tiles() else (1024, 8)
    splits = max(1, min(-(-target // max(dw_tiles, 1)), total_rows // (min_blocks * block_m)))
    per_split = -(-total_rows // splits)
    return max(block_m, -(-per_split // block_m) * block_m)


def _triton_fwd(x2, weight, bias, r2, row_scale, row_counts, in_widths, out_widths, segments, rows_per_sample,
                gelu, save_pre):
    """x2: (rows, K_max); row_counts: host ints; in_widths / out_widths: int32 (G,) tensors on x2's device, never
    read on the host (the kernels clamp them to K_max / the segment width)."""
    rows, k_max = x2.shape
    n_max = weight.shape[0]
    seg_width = n_max // segments
    y = x2.new_empty((rows, n_max))
    pre = x2.new_empty((rows, n_max)) if save_pre else x2.new_empty((0,))
    if rows == 0:
        return y, pre
    device = str(x2.device)
    interp = _ext.interpreter_tiles()
    if interp:
        block_m, block_n, block_k = _INTERP_BLOCKS["fwd"]
    else:
        block_m, block_n = _gpu_blocks(x2.dtype, rows // max(1, sum(1 for r in row_counts if r)))
    blocks = _row_blocks(tuple(row_counts), block_m, device)
    col_tiles = triton.cdiv(seg_width, block_n)
    args = (x2, weight, bias if bias is not None else x2, r2 if r2 is not None else x2,
            row_scale if row_scale is not None else x2, y, pre if save_pre else y, blocks,
            _row_starts_of(row_counts, device), in_widths, out_widths, k_max, n_max, seg_width, col_tiles,
            rows_per_sample)
    consts = dict(HAS_BIAS=bias is not None, GELU=gelu, HAS_RESIDUAL=r2 is not None,
                  HAS_ROW_SCALE=row_scale is not None, SAVE_PRE=save_pre, PRECISION=_precision(x2.dtype),
                  BLOCK_M=block_m, BLOCK_N=block_n)
    grid = (blocks.shape[0], segments * col_tiles)
    if interp:
        _ragged_linear_fwd_kernel[grid](*args, **consts, BLOCK_K=block_k, num_warps=4)
    else:
        _launch_tuned("fwd", grid, args, consts)
    return y, pre


def _triton_bwd(dy2, x2, weight, pre2, row_scale, row_counts, in_widths, out_widths, segments, rows_per_sample,
                gelu, has_bias, has_residual):
    rows, k_max = x2.shape
    n_max = weight.shape[0]
    seg_width = n_max // segments
    device = str(x2.device)
    interp = _ext.interpreter_tiles()
    precision = _precision(x2.dtype)
    starts = _row_starts_of(row_counts, device)
    dx = torch.empty_like(x2)
    dr = torch.empty_like(dy2) if has_residual else dy2.new_empty((0,))

    # (1) Prologue: dresidual and dpre. Without a residual or GELU, dpre is dy itself (masked when read).
    write_dp = gelu or row_scale is not None
    dp = dy2
    if rows and (has_residual or write_dp):
        dp_buf = torch.empty_like(dy2) if write_dp else dr
        block_r, block_c = _INTERP_BLOCKS["prologue"] if interp else (32, 128)
        grid = (triton.cdiv(rows, block_r), triton.cdiv(n_max, block_c))
        _ragged_linear_bwd_prologue_kernel[grid](
            dy2, pre2 if gelu else dy2, row_scale if row_scale is not None else dy2, dr if has_residual else dp_buf,
            dp_buf, starts, out_widths, len(row_counts), rows, n_max, seg_width, rows_per_sample, GELU=gelu,
            HAS_ROW_SCALE=row_scale is not None, WRITE_DR=has_residual, WRITE_DP=write_dp, BLOCK_R=block_r,
            BLOCK_C=block_c, num_warps=4)
        dp = dp_buf

    # (2) dx: grouped GEMM over (row blocks, input column tiles); tiles beyond k_g (or with n_g = 0) store zeros.
    if rows:
        if interp:
            block_m, block_k, block_n = _INTERP_BLOCKS["dx"]
        else:
            block_m, block_k = _gpu_blocks(x2.dtype, rows // max(1, sum(1 for r in row_counts if r)))
        blocks = _row_blocks(tuple(row_counts), block_m, device)
        grid = (blocks.shape[0], triton.cdiv(k_max, block_k))
        args = (dp, weight, dx, blocks, starts, in_widths, out_widths, k_max, n_max, seg_width, segments)
        consts = dict(PRECISION=precision, BLOCK_M=block_m, BLOCK_K=block_k)
        if interp:
            _ragged_linear_dx_kernel[grid](*args, **consts, BLOCK_N=block_n, num_warps=4)
        else:
            _launch_tuned("dx", grid, args, consts)

    # (3) dW, db: grouped GEMM over W's tiles, each summing the groups that cover it, per row split.
    block_n, block_k, block_m = _INTERP_BLOCKS["dw"] if interp else (64, 64, 64)
    n_tiles = segments * triton.cdiv(seg_width, block_n)
    k_tiles = triton.cdiv(k_max, block_k)
    per_split = _split_rows(rows, n_tiles * k_tiles, block_m)
    splits = max(1, triton.cdiv(rows, per_split))
    part_dtype = weight.dtype if splits == 1 else torch.float32
    dw_part = weight.new_empty((splits, n_max, k_max), dtype=part_dtype)
    db_part = weight.new_empty((splits, n_max), dtype=part_dtype) if has_bias else dw_part
    args = (dp, x2, dw_part, db_part, starts, in_widths, out_widths, len(row_counts), k_max, n_max, seg_width,
            per_split)
    consts = dict(HAS_BIAS=has_bias, PRECISION=precision, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=block_m)
    grid = (n_tiles, k_tiles, splits)
    if interp:
        _ragged_linear_dw_kernel[grid](*args, **consts, num_warps=4)
    else:
        _launch_tuned("dw", grid, args, consts)
    # Fixed-order sum of the split partials (a plain reduction, no atomics): deterministic.
    dw = dw_part[0] if splits == 1 else dw_part.sum(0).to(weight.dtype)
    if has_bias:
        db = db_part[0] if splits == 1 else db_part.sum(0).to(weight.dtype)
    else:
        db = weight.new_empty((0,))
    return dx, dw, db, dr


def _aot_signatures(dt: str):
    fwd = {"X": f"*{dt}", "W": f"*{dt}", "BIAS": f"*{dt}", "RES": f"*{dt}", "SCALE": "*fp32", "Y": f"*{dt}",
           "PRE": f"*{dt}", "ROW_BLOCKS": "*i32", "ROW_STARTS": "*i32", "IN_W": "*i32", "OUT_W": "*i32",
           "K_max": "i32", "N_max": "i32", "seg_width": "i32", "col_tiles": "i32", "rows_per_sample": "i32",
           "HAS_BIAS": "constexpr", "GELU": "constexpr", "HAS_RESIDUAL": "constexpr", "HAS_ROW_SCALE": "constexpr",
           "SAVE_PRE": "constexpr", "PRECISION": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
           "BLOCK_K": "constexpr"}
    prologue = {"DY": f"*{dt}", "PRE": f"*{dt}", "SCALE": "*fp32", "DR": f"*{dt}", "DP": f"*{dt}",
                "ROW_STARTS": "*i32", "OUT_W": "*i32", "num_groups": "i32", "num_rows": "i32", "N_max": "i32",
                "seg_width": "i32", "rows_per_sample": "i32", "GELU": "constexpr", "HAS_ROW_SCALE": "constexpr",
                "WRITE_DR": "constexpr", "WRITE_DP": "constexpr", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
    dx = {"DP": f"*{dt}", "W": f"*{dt}", "DX": f"*{dt}", "ROW_BLOCKS": "*i32", "ROW_STARTS": "*i32",
          "IN_W": "*i32", "OUT_W": "*i32", "K_max": "i32", "N_max": "i32", "seg_width": "i32", "num_segments": "i32",
          "PRECISION": "constexpr", "BLOCK_M": "constexpr", "BLOCK_K": "constexpr", "BLOCK_N": "constexpr"}
    dw = {"DP": f"*{dt}", "X": f"*{dt}", "DW": "*fp32", "DB": "*fp32", "ROW_STARTS": "*i32", "IN_W": "*i32",
          "OUT_W": "*i32", "num_groups": "i32", "K_max": "i32", "N_max": "i32", "seg_width": "i32",
          "rows_per_split": "i32", "HAS_BIAS": "constexpr", "PRECISION": "constexpr", "BLOCK_N": "constexpr",
          "BLOCK_K": "constexpr", "BLOCK_M": "constexpr"}
    return fwd, prologue, dx, dw


# Epilogue combinations the ViT-ResNAS / LeViT blocks use: (HAS_BIAS, GELU, HAS_RESIDUAL, HAS_ROW_SCALE, SAVE_PRE)
_AOT_EPILOGUES = (
    (True, False, False, False, False),   # qkv, plain linear
    (False, False, False, False, False),  # bias-free linear
    (True, True, False, False, True),     # fc1 + GELU, training (saves the pre-activation)
    (True, True, False, False, False),    # fc1 + GELU, inference
    (True, False, True, True, False),     # proj / fc2 + drop-path residual
    (True, False, True, False, False),    # proj / fc2 + residual
)
for _dt, _torch_dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
    _fwd_sig, _pro_sig, _dx_sig, _dw_sig = _aot_signatures(_dt)
    _bm = 64 if _dt == "fp32" else 128
    _prec = "tf32"
    for _bias, _gelu_on, _res, _scale, _save in _AOT_EPILOGUES:
        register_aot(_ragged_linear_fwd_kernel, _fwd_sig,
                     {"HAS_BIAS": _bias, "GELU": _gelu_on, "HAS_RESIDUAL": _res, "HAS_ROW_SCALE": _scale,
                      "SAVE_PRE": _save, "PRECISION": _prec, "BLOCK_M": _bm, "BLOCK_N": 64, "BLOCK_K": 32},
                     num_warps=4 if _bm == 64 else 8)
    for _gelu_on, _scale, _dr in ((True, False, False), (True, True, True), (False, True, True), (False, False, True)):
        register_aot(_ragged_linear_bwd_prologue_kernel, _pro_sig,
                     {"GELU": _gelu_on, "HAS_ROW_SCALE": _scale, "WRITE_DR": _dr, "WRITE_DP": _gelu_on or _scale,
                      "BLOCK_R": 32, "BLOCK_C": 128})
    register_aot(_ragged_linear_dx_kernel, _dx_sig,
                 {"PRECISION": _prec, "BLOCK_M": _bm, "BLOCK_K": 64, "BLOCK_N": 32}, num_warps=4 if _bm == 64 else 8)
    for _bias in (True, False):
        register_aot(_ragged_linear_dw_kernel, _dw_sig,
                     {"HAS_BIAS": _bias, "PRECISION": _prec, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_M": 64})
    if _dt != "fp32":  # one row split: dW / db are written directly in the weight's dtype
        register_aot(_ragged_linear_dw_kernel, {**_dw_sig, "DW": f"*{_dt}", "DB": f"*{_dt}"},
                     {"HAS_BIAS": True, "PRECISION": _prec, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_M": 64})
register_aot(_ragged_linear_fwd_kernel, _aot_signatures("fp32")[0],
             {"HAS_BIAS": True, "GELU": False, "HAS_RESIDUAL": False, "HAS_ROW_SCALE": False, "SAVE_PRE": False,
              "PRECISION": "ieee", "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32})  # fp32 at "highest" precision
# Every autotune candidate (block, warps, stages) at the largest tiles of each dtype family, so the resource check
# (`resnas aot --resources`) sees each configuration a GPU may pick: fp32 at 64 x 64, half types at 128 x 64.
for _dt, _bm in (("fp32", 64), ("bf16", 128)) if HAS_TRITON else ():  # triton.Config needs the real triton
    _fwd_sig, _, _dx_sig, _dw_sig = _aot_signatures(_dt)
    for _kind in ("fwd", "dx", "dw"):
        for _config in _autotune_spec(_kind)[1]:
            if _kind == "fwd":
                _kernel, _sig = _ragged_linear_fwd_kernel, _fwd_sig
                _consts = {"HAS_BIAS": True, "GELU": True, "HAS_RESIDUAL": False, "HAS_ROW_SCALE": False,
                           "SAVE_PRE": True, "PRECISION": "tf32", "BLOCK_M": _bm, "BLOCK_N": 64}
            elif _kind == "dx":
                _kernel, _sig = _ragged_linear_dx_kernel, _dx_sig
                _consts = {"PRECISION": "tf32", "BLOCK_M": _bm, "BLOCK_K": 64}
            else:
                _kernel, _sig = _ragged_linear_dw_kernel, _dw_sig
                _consts = {"HAS_BIAS": True, "PRECISION": "tf32", "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_M": 64}
            register_aot(_kernel, _sig, {**_consts, **_config.kwargs}, num_warps=_config.num_warps,
                         num_stages=_config.num_stages)


# ---------------------------------------------------------------------------------------------------------------------
# Reference backend of the op (explicit per-group formulas, plain PyTorch, widths as tensors)
# ---------------------------------------------------------------------------------------------------------------------
def _gelu_grad_torch(h: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(h * _SQRT1_2)) + h * torch.exp(-0.5 * h * h) * _INV_SQRT_2PI


def _spans(row_counts):
    start = 0
    for rows in row_counts:
        yield start, start + rows
        start += rows


def _group_masks(in_widths, out_widths, g: int, k_max: int, segments: int, seg_width: int):
    """(K_max,) / (N_max,) bool masks of group g's active input columns and output columns (every segment), from the
    widths tensors on the device (no host read), each width clamped to its bound."""
    device = in_widths.device
    k_mask = torch.arange(k_max, device=device) < in_widths[g].clamp(0, k_max)
    n_mask = torch.arange(segments * seg_width, device=device) % seg_width < out_widths[g].clamp(0, seg_width)
    return k_mask, n_mask


def _reference_fwd(x2, weight, bias, r2, row_scale, row_counts, in_widths, out_widths, segments, rows_per_sample,
                   gelu, save_pre):
    """Per group: F.linear of its rows through W masked to its (n_g, k_g) slice, in x's dtype. `torch.where`, not a
    product with the mask, so that whatever lies beyond the widths (even NaN) is never used."""
    rows, k_max = x2.shape
    n_max = weight.shape[0]
    seg_width = n_max // segments
    y = x2.new_zeros((rows, n_max))
    pre = x2.new_zeros((rows, n_max)) if save_pre else x2.new_empty((0,))
    for g, (start, end) in enumerate(_spans(row_counts)):
        if start == end:
            continue
        k_mask, n_mask = _group_masks(in_widths, out_widths, g, k_max, segments, seg_width)
        xg = torch.where(k_mask, x2[start:end], 0)
        wg = torch.where(n_mask[:, None] & k_mask[None, :], weight, 0)
        h = F.linear(xg, wg, None if bias is None else torch.where(n_mask, bias, 0))
        if save_pre:
            pre[start:end] = h
        a = F.gelu(h) if gelu else h
        if r2 is not None:
            if row_scale is not None:
                sample = torch.arange(start, end, device=x2.device) // rows_per_sample
                a = row_scale.to(a.dtype)[sample][:, None] * a
            a = torch.where(n_mask, r2[start:end], 0) + a
        y[start:end] = torch.where(n_mask, a, 0)
    return y, pre


def _reference_bwd(dy2, x2, weight, pre2, row_scale, row_counts, in_widths, out_widths, segments, rows_per_sample,
                   gelu, has_bias, has_residual):
    acc = compute_dtype(x2.dtype)
    rows, k_max = x2.shape
    n_max = weight.shape[0]
    seg_width = n_max // segments
    dx = torch.zeros((rows, k_max), dtype=acc, device=x2.device)
    dw = torch.zeros((n_max, k_max), dtype=acc, device=x2.device)
    db = torch.zeros((n_max,), dtype=acc, device=x2.device)
    dr = torch.zeros((rows, n_max), dtype=dy2.dtype, device=x2.device) if has_residual else dy2.new_empty((0,))
    wa = weight.to(acc)
    for g, (start, end) in enumerate(_spans(row_counts)):
        if start == end:
            continue
        k_mask, n_mask = _group_masks(in_widths, out_widths, g, k_max, segments, seg_width)
        d = torch.where(n_mask, dy2[start:end].to(acc), 0)
        if has_residual:
            dr[start:end] = torch.where(n_mask, dy2[start:end], 0)
        if row_scale is not None:
            sample = torch.arange(start, end, device=x2.device) // rows_per_sample
            d = d * row_scale.to(acc)[sample][:, None]
        if gelu:
            d = d * _gelu_grad_torch(torch.where(n_mask, pre2[start:end].to(acc), 0))
        xg = torch.where(k_mask, x2[start:end].to(acc), 0)
        wg = torch.where(n_mask[:, None] & k_mask[None, :], wa, 0)
        dx[start:end] = torch.where(k_mask, d @ wg, 0)
        dw += d.t() @ xg
        db += d.sum(0)
    db = db.to(weight.dtype) if has_bias else weight.new_empty((0,))
    return dx.to(x2.dtype), dw.to(weight.dtype), db, dr


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
