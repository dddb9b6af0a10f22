"""Triton kernels of the ragged LayerNorm and their launchers (the `triton` backend); semantics in the package
docstring. The launchers take 2-D rows and a `Ragged`, whose widths reach the kernels as an int32 device tensor."""
import torch

from ... import _ext
from ..._triton import tl, triton
from ...ragged import Ragged, row_starts
from ...reference.layer_norm import compute_dtype


@triton.jit
def _row_width(ROW_STARTS, WIDTHS, num_groups, row, C_max):
    """Active width of `row`: group g owns rows [ROW_STARTS[g], ROW_STARTS[g + 1]) (static, cached) and WIDTHS[g]
    columns (device metadata, clamped to [0, C_max]: never trusted); rows outside every group get 0."""
    width = row * 0
    for g in range(num_groups):
        start = tl.load(ROW_STARTS + g)
        end = tl.load(ROW_STARTS + g + 1)
        w = tl.load(WIDTHS + g)
        width = tl.where((row >= start) & (row < end), w, width)
    return tl.minimum(tl.maximum(width, 0), C_max)


@triton.jit
def _ragged_layer_norm_fwd_kernel(X, R, Y, Z, W, B, MEAN, RSTD, ROW_STARTS, WIDTHS, num_groups, C_max, eps,
                                  HAS_RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    width = _row_width(ROW_STARTS, WIDTHS, num_groups, row, C_max)
    cols = tl.arange(0, BLOCK_C)
    inside = cols < C_max
    active = cols < width  # width <= C_max (clamped): a row never reads into the next one
    offs = row.to(tl.int64) * C_max + cols  # int64: B * N * C can pass 2^31
    x = tl.load(X + offs, mask=active, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # z is normalised as stored (rounded to its dtype), like unfused PyTorch: the backward only sees stored z.
        x = (x + tl.load(R + offs, mask=active, other=0.0).to(tl.float32)).to(Z.dtype.element_ty)
        tl.store(Z + offs, x, mask=inside)  # masked loads made it 0 beyond the width
        x = x.to(tl.float32)
    count = tl.maximum(width, 1).to(tl.float32)
    mean = tl.sum(x, axis=0) / count
    diff = tl.where(active, x - mean, 0.0)
    # Corrected two-pass statistics: `shift` is the rounding error of `mean`, so that diff - shift is centred
    shift = tl.sum(diff, axis=0) / count
    var = tl.maximum(tl.sum(diff * diff, axis=0) / count - shift * shift, 0.0)
    rstd = tl.where(width > 0, 1.0 / tl.sqrt(var + eps), 0.0)
    w = tl.load(W + cols, mask=active, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=active, other=0.0).to(tl.float32)
    y = tl.where(active, (diff - shift) * rstd * w + b, 0.0)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=inside)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _ragged_layer_norm_bwd_kernel(DY, DZ, Z, W, MEAN, RSTD, DX, DW_PART, DB_PART, ROW_STARTS, WIDTHS, num_groups,
                                  num_rows, C_max, HAS_DZ: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
                                  BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    inside = cols < C_max
    w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(ROWS_PER_PROGRAM):
        row = pid * ROWS_PER_PROGRAM + i
        width = _row_width(ROW_STARTS, WIDTHS, num_groups, row, C_max)  # 0 for row >= num_rows: nothing is read
        active = cols < width
        offs = row.to(tl.int64) * C_max + cols
        z = tl.load(Z + offs, mask=active, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=active, other=0.0).to(tl.float32)
        in_range = row < num_rows
        mean = tl.load(MEAN + row, mask=in_range, other=0.0)
        rstd = tl.load(RSTD + row, mask=in_range, other=0.0)
        count = tl.maximum(width, 1).to(tl.float32)
        xhat = tl.where(active, (z - mean) * rstd, 0.0)
        wdy = w * dy
        # Centre xhat on its computed mean (the rounding error of the saved mean times rstd), as the forward does.
        shift = tl.sum(xhat, axis=0) / count
        c2 = tl.sum(wdy, axis=0) / count
        c1 = tl.sum(xhat * wdy, axis=0) / count - shift * c2
        xhat = tl.where(active, xhat - shift, 0.0)
        dx = tl.where(active, (wdy - (xhat * c1 + c2)) * rstd, 0.0)
        if HAS_DZ:
            dx += tl.load(DZ + offs, mask=active, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=inside & in_range)
        dw_acc += dy * xhat
        db_acc += dy
    tl.store(DW_PART + pid * C_max + cols, dw_acc, mask=inside)
    tl.store(DB_PART + pid * C_max + cols, db_acc, mask=inside)


def _block_c(c_max: int) -> int:
    return max(16, triton.next_power_of_2(c_max))


def _num_warps(block_c: int) -> int:
    return 1 if block_c <= 256 else (4 if block_c <= 2048 else 8)


def _rows_per_program(num_rows: int) -> int:
    # Fixed by the row count alone (never by the device) so the dweight summation order is reproducible.
    return 4 if _ext.interpreter_tiles() else (16 if num_rows <= _MANY_ROWS else 64)


_MANY_ROWS = 8192  # module constant so interpreter tests can reach 64 rows per program with few rows


def _triton_fwd(x2, r2, weight, bias, groups: Ragged, rows_per_sample: int, eps: float):
    rows, c_max = x2.shape
    y = torch.empty_like(x2)
    z = torch.empty_like(x2) if r2 is not None else x2.new_empty((0,))
    mean = x2.new_empty((rows,), dtype=compute_dtype(x2.dtype))
    rstd = x2.new_empty((rows,), dtype=compute_dtype(x2.dtype))
    if rows == 0:
        return y, z, mean, rstd
    block_c = _block_c(c_max)
    _ragged_layer_norm_fwd_kernel[(rows,)](
        x2, r2 if r2 is not None else x2, y, z if r2 is not None else y, weight, bias, mean, rstd,
        row_starts(groups.sizes, rows_per_sample, x2.device), groups.widths_tensor(x2.device), groups.num_groups,
        c_max, eps, HAS_RESIDUAL=r2 is not None, BLOCK_C=block_c, num_warps=_num_warps(block_c))
    return y, z, mean, rstd


def _triton_bwd(dy2, dz2, z2, weight, mean, rstd, groups: Ragged, rows_per_sample: int):
    rows, c_max = z2.shape
    dx = torch.empty_like(z2)
    per_program = _rows_per_program(rows)
    programs = triton.cdiv(rows, per_program) if rows else 0
    dw_part = z2.new_empty((programs, c_max), dtype=torch.float32)
    db_part = z2.new_empty((programs, c_max), dtype=torch.float32)
    if programs:
        block_c = _block_c(c_max)
        _ragged_layer_norm_bwd_kernel[(programs,)](
            dy2, dz2 if dz2 is not None else dy2, z2, weight, mean, rstd, dx, dw_part, db_part,
            row_starts(groups.sizes, rows_per_sample, z2.device), groups.widths_tensor(z2.device), groups.num_groups,
            rows, c_max, HAS_DZ=dz2 is not None, ROWS_PER_PROGRAM=per_program, BLOCK_C=block_c,
            num_warps=_num_warps(block_c))
    return dx, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)
