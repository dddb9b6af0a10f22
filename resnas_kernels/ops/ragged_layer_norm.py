"""Ragged LayerNorm, optionally fused with a residual add: y = LN_g(x [+ r]) over each group's first c_g channels.

Spec: `resnas_kernels.reference.ragged_layer_norm` (the oracle). This file holds the whole op: Triton kernels and
launchers, the bridge to the C++ CPU / CUDA kernels in `csrc/`, the `torch.library` custom ops with their fake
implementations and autograd, and the public function.

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
  be x's dtype or fp32. fp64 on the Triton backend runs the reference (the kernels compute in fp32), as for every op.
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
from typing import List, Optional, Tuple

import torch

from .. import _ext
from .._triton import tl, triton
from ..aot import register_aot
from ..backend import OpInfo, get_backend, register_op, resolve_backend, resolve_backend_for
from ..ragged import Ragged, row_starts, validate_metadata
from ..reference.layer_norm import compute_dtype
from ._checks import check_float_tensor, check_groups, check_same_device, check_tensor, check_vector

OP = register_op(OpInfo(
    name="ragged_layer_norm",
    backends=("triton", "cpu", "cuda"),
    auto_cuda=("triton", "cuda"),  # provisional order: no GPU benchmark has been run yet to decide it
    ext_ops=("ext_ragged_layer_norm_fwd", "ext_ragged_layer_norm_bwd"),
))

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------------
@triton.jit
def _group_width(TABLE, num_groups, row):
    """Active width of `row`: TABLE is int32 (G, 3) [row_start, row_end, width]; rows outside every group get 0.
    Not used here any more: the RSR kernels (rsr_epilogue.py, rsr_im2col.py) import it; it goes once they read
    device widths themselves."""
    width = row * 0
    for g in range(num_groups):
        start = tl.load(TABLE + 3 * g)
        end = tl.load(TABLE + 3 * g + 1)
        w = tl.load(TABLE + 3 * g + 2)
        width = tl.where((row >= start) & (row < end), w, width)
    return width


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
    var = tl.sum(diff * diff, axis=0) / count
    rstd = tl.where(width > 0, 1.0 / tl.sqrt(var + eps), 0.0)
    w = tl.load(W + cols, mask=active, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=active, other=0.0).to(tl.float32)
    y = tl.where(active, diff * rstd * w + b, 0.0)
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
        c1 = tl.sum(xhat * wdy, axis=0) / count
        c2 = tl.sum(wdy, axis=0) / count
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


def _aot_signature(dtype: str, weight_dtype: str):
    fwd = {"X": f"*{dtype}", "R": f"*{dtype}", "Y": f"*{dtype}", "Z": f"*{dtype}", "W": f"*{weight_dtype}",
           "B": f"*{weight_dtype}", "MEAN": "*fp32", "RSTD": "*fp32", "ROW_STARTS": "*i32", "WIDTHS": "*i32",
           "num_groups": "i32",
           "C_max": "i32", "eps": "fp32", "HAS_RESIDUAL": "constexpr", "BLOCK_C": "constexpr"}
    bwd = {"DY": f"*{dtype}", "DZ": f"*{dtype}", "Z": f"*{dtype}", "W": f"*{weight_dtype}", "MEAN": "*fp32",
           "RSTD": "*fp32", "DX": f"*{dtype}", "DW_PART": "*fp32", "DB_PART": "*fp32", "ROW_STARTS": "*i32", "WIDTHS": "*i32",
           "num_groups": "i32", "num_rows": "i32", "C_max": "i32", "HAS_DZ": "constexpr",
           "ROWS_PER_PROGRAM": "constexpr", "BLOCK_C": "constexpr"}
    return fwd, bwd


for _dt, _wdt in (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp32")):
    _fwd_sig, _bwd_sig = _aot_signature(_dt, _wdt)
    for _block in (256, 1024, 2048):
        register_aot(_ragged_layer_norm_fwd_kernel, _fwd_sig, {"HAS_RESIDUAL": True, "BLOCK_C": _block},
                     num_warps=_num_warps(_block))
        register_aot(_ragged_layer_norm_fwd_kernel, _fwd_sig, {"HAS_RESIDUAL": False, "BLOCK_C": _block},
                     num_warps=_num_warps(_block))
        register_aot(_ragged_layer_norm_bwd_kernel, _bwd_sig,
                     {"HAS_DZ": True, "ROWS_PER_PROGRAM": 16, "BLOCK_C": _block}, num_warps=_num_warps(_block))
        register_aot(_ragged_layer_norm_bwd_kernel, _bwd_sig,
                     {"HAS_DZ": False, "ROWS_PER_PROGRAM": 64, "BLOCK_C": _block}, num_warps=_num_warps(_block))


# ---------------------------------------------------------------------------------------------------------------------
# Reference backend of the op (explicit statistics and backward formula, plain PyTorch)
# ---------------------------------------------------------------------------------------------------------------------
def _row_widths(groups: Ragged, rows_per_sample: int, device) -> torch.Tensor:
    """(rows,) width of every row, from the widths tensor on the device (no host value, no sync). The masks built from
    it (columns < width) clamp by construction: a negative width selects nothing, one above C_max everything."""
    return groups.sample_width_tensor(device).repeat_interleave(rows_per_sample)


def _reference_fwd(x2, r2, weight, bias, groups: Ragged, rows_per_sample: int, eps: float):
    acc = compute_dtype(x2.dtype)
    active = torch.arange(x2.shape[1], device=x2.device)[None, :] < _row_widths(groups, rows_per_sample, x2.device)[:, None]
    # With a residual, z = x + r is rounded to x's dtype before normalising (as the spec and unfused PyTorch do).
    # Masked by selection, never by multiplying: NaN or inf beyond a row's width must not leak into it (NaN * 0 = NaN).
    zero = torch.zeros((), dtype=acc, device=x2.device)
    z = (x2.to(acc) + r2.to(acc)).to(x2.dtype).to(acc) if r2 is not None else x2.to(acc)
    z = torch.where(active, z, zero)
    count = active.sum(1, keepdim=True).clamp_min(1).to(acc)
    mean = z.sum(1, keepdim=True) / count
    diff = torch.where(active, z - mean, zero)
    var = (diff * diff).sum(1, keepdim=True) / count
    rstd = torch.where(active.any(1, keepdim=True), torch.rsqrt(var + eps), torch.zeros_like(var))
    y = torch.where(active, diff * rstd * weight.to(acc) + bias.to(acc), zero)
    z_out = z.to(x2.dtype) if r2 is not None else x2.new_empty((0,))
    return y.to(x2.dtype), z_out, mean.squeeze(1), rstd.squeeze(1)


def _reference_bwd(dy2, dz2, z2, weight, mean, rstd, groups: Ragged, rows_per_sample: int):
    acc = compute_dtype(z2.dtype)
    active = torch.arange(z2.shape[1], device=z2.device)[None, :] < _row_widths(groups, rows_per_sample, z2.device)[:, None]
    count = active.sum(1, keepdim=True).clamp_min(1).to(acc)
    zero = torch.zeros((), dtype=acc, device=z2.device)
    xhat = torch.where(active, (z2.to(acc) - mean.to(acc)[:, None]) * rstd.to(acc)[:, None], zero)
    dy = torch.where(active, dy2.to(acc), zero)
    wdy = dy * weight.to(acc)
    c1 = (xhat * wdy).sum(1, keepdim=True) / count
    c2 = wdy.sum(1, keepdim=True) / count
    dx = torch.where(active, (wdy - (xhat * c1 + c2)) * rstd.to(acc)[:, None], zero)
    if dz2 is not None:
        dx = dx + torch.where(active, dz2.to(acc), zero)
    return dx.to(z2.dtype), (dy * xhat).sum(0).to(weight.dtype), dy.sum(0).to(weight.dtype)


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
    autograd. Both need the extension's ops defined: `_resolve_backend` calls this when it first picks a C++ backend
    (the extension loads lazily, when such a backend is first resolved)."""
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
        _bind_cxx_op()
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
        y, z = _cxx_op(x, weight, bias, groups.sizes, widths, float(eps), residual)
        return y if residual is None else (y, z)
    check_float_tensor(x, "x", _FLOAT_DTYPES, min_dim=2)
    _check_args(x, residual, weight, bias, groups, what="groups.widths")
    if not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    y, z, _, _ = ragged_layer_norm_fwd(x, residual, weight, bias, list(groups.sizes), groups.widths_tensor(x.device),
                                       float(eps))
    return y if residual is None else (y, z)
