"""Triton kernels of the ragged linear and their launchers (the `triton` backend); semantics and tiling in the
package docstring. The launchers take 2-D rows, host row counts and int32 widths tensors on the device."""
import functools
from typing import Tuple

import torch

from ... import _ext
from ..._triton import tl, triton
from ...ragged import row_starts


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
    db_acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # per-column partial sums of db, reduced once at the end
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
                db_acc += dp_t.to(tl.float32)
    j_in = js < seg_width
    base = split.to(tl.int64) * N_max
    tl.store(DW + (base + w_rows)[:, None] * K_max + ks[None, :], acc.to(DW.dtype.element_ty),
             mask=j_in[:, None] & (ks < K_max)[None, :])
    if HAS_BIAS:
        tl.store(DB + base + w_rows, tl.sum(db_acc, axis=1).to(DB.dtype.element_ty), mask=j_in & (pid_k == 0))



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


# Elementwise backward prologue: 8 warps for its 32 x 128 tiles, 16 elements per thread (at 4 warps, the GELU
# derivative of 32 elements spilled).
_PROLOGUE_WARPS = 8

# dW tiles (BLOCK_N x BLOCK_K of W) and their row chunk BLOCK_M, fixed (never autotuned: the summation order stays
# put). A 64-row chunk held 2 x 64 x 64 fp32 operands next to the accumulator and spilled at 4 warps.
_DW_BLOCKS = (64, 64, 32)

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


# Autotune candidates per kernel and dot precision: (constexprs, num_warps, num_stages). Each one holds its tile in
# registers without spilling on sm_80 and sm_90 at every tile size the launchers pick (`resnas aot --resources`
# compiles them all, aot.py). That rules out 4 warps: a 128 x 64 tile leaves 64 fp32 accumulators per thread next to
# the operand fragments and the per-element pointers and masks of the ragged loads (the loads cannot assume aligned
# rows), and even 64 x 64 tiles spilled at 4 warps with a 64-deep chunk, or with fp32 operands. "ieee" (fp32 FMA
# dots, torch's default "highest" fp32 matmul precision) holds its operands in a blocked layout, not in tensor-core
# fragments, and needs shallower reduction chunks: 64-deep forward chunks and 32- or 64-deep dx chunks spilled.
_CANDIDATES = {
    "tf32": {  # tensor-core dots: tf32 for fp32, and every half type
        "fwd": [({"BLOCK_K": 32}, 8, 3), ({"BLOCK_K": 32}, 8, 4), ({"BLOCK_K": 64}, 8, 3), ({"BLOCK_K": 64}, 8, 4)],
        "dx": [({"BLOCK_N": 32}, 8, 3), ({"BLOCK_N": 32}, 8, 4), ({"BLOCK_N": 64}, 8, 3)],
        # launch parameters only: the row blocking (the dW summation order) stays fixed
        "dw": [({}, 8, 2), ({}, 8, 4)],
    },
    "ieee": {
        "fwd": [({"BLOCK_K": 32}, 8, 3), ({"BLOCK_K": 32}, 8, 4), ({"BLOCK_K": 16}, 8, 3)],
        "dx": [({"BLOCK_N": 16}, 8, 3), ({"BLOCK_N": 16}, 8, 4)],
        "dw": [({}, 8, 2), ({}, 8, 4)],
    },
}
_AUTOTUNE_KEYS = {
    "fwd": ["K_max", "N_max", "seg_width", "BLOCK_M", "BLOCK_N", "PRECISION"],
    "dx": ["K_max", "N_max", "seg_width", "BLOCK_M", "BLOCK_K", "PRECISION"],
    "dw": ["K_max", "N_max", "seg_width", "BLOCK_N", "BLOCK_K", "BLOCK_M", "PRECISION"],
}
_KERNELS = {"fwd": _ragged_linear_fwd_kernel, "dx": _ragged_linear_dx_kernel, "dw": _ragged_linear_dw_kernel}


def _autotune_spec(kind: str, precision: str):
    """(kernel, autotune candidates as triton.Config, autotune key) of an autotuned kernel at a dot precision."""
    configs = [triton.Config(dict(kwargs), num_warps=warps, num_stages=stages)
               for kwargs, warps, stages in _CANDIDATES[precision][kind]]
    return _KERNELS[kind], configs, _AUTOTUNE_KEYS[kind]


@functools.lru_cache(maxsize=None)
def _tuned(kind: str, precision: str):
    """The GPU-autotuned variant of a kernel at a dot precision, created on first use: decorating at import would
    query the CUDA driver on machines that have none (and autotuning is meaningless under the interpreter)."""
    kernel, configs, key = _autotune_spec(kind, precision)
    return triton.autotune(configs, key=key)(kernel)


def _launch_tuned(kind: str, grid, args, consts) -> None:
    """Production launch of an autotuned kernel (its candidates follow consts["PRECISION"]). Under the interpreter
    (only with `_ext.production_tiles()`) there is no GPU to time candidates on: the pinned candidate runs instead, so
    tests can execute each one."""
    precision = consts["PRECISION"]
    if _ext.triton_interpreting():
        kernel, configs, _ = _autotune_spec(kind, precision)
        config = _ext.pinned_autotune_config(configs)
        kernel[grid](*args, **consts, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        _tuned(kind, precision)[grid](*args, **consts)


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
            BLOCK_C=block_c, num_warps=_PROLOGUE_WARPS)
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
    block_n, block_k, block_m = _INTERP_BLOCKS["dw"] if interp else _DW_BLOCKS
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
