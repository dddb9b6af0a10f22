"""Token-layout im2col of the RSR conv: the patch tokens of u (B, n_cls + H*W, C) -> columns (B, Ho*Wo, C*k*k).

    cols[b, oh*Wo + ow, c*k*k + kh*k + kw] = u[b, n_cls + ih*W + iw, c],  ih = oh*s - p + kh, iw = ow*s - p + kw
                                             (0 when (ih, iw) is outside the grid: the conv's zero padding)

Column order is channel-major / tap-minor (F.unfold's order). With it, conv_weight.view(Co_max, Ci_max*k*k) holds
group g's sliced conv weight W[:co, :ci] as the top-left block [:co, :ci*k*k], so the conv of every group is one
ragged GEMM (`ragged_linear` with input widths ci*k*k) on the columns, straight from the token layout: no NCHW copy.

Part of the fused residual spatial reduction (`residual_spatial_reduction.py`) on CUDA / Triton: one op of its own so
autograd chains LN -> im2col -> ragged GEMM -> epilogue through separately registered custom ops. On CPU the fused RSR
uses `rsr_conv` instead (the same im2col + GEMM in blocks, never materialising the columns); this op's C++ CPU kernel
serves direct calls and shares its gather code with that conv.

Backends: reference (F.unfold / F.fold) | triton | cpu (csrc/cpu/rsr_im2col.cpp) | cuda (csrc/cuda/rsr_im2col.cu).

Dispatch: on the C++ backends the public function calls one C++-registered op, `torch.ops.resnas.rsr_im2col`
(csrc/rsr.cpp: autograd and argument checks in C++ over the device kernels `ext_rsr_im2col_fwd / _bwd`), one dispatcher
hop per call; the reference and Triton backends run the Python custom ops `resnas::rsr_im2col_fwd / _bwd`.

Caveats:
- u must be contiguous and obey the ragged contract (zero beyond each group's width ci); the columns are exactly zero
  for c >= ci and for padding taps. The cls row (has_cls) is not read.
- Backward (col2im) is a gather: every input token sums, in a fixed tap order, the columns that read it, so it is
  deterministic; du is zero on the cls row and beyond ci. The reference backward uses F.fold.
- The column tensor is k*k / stride^2 (~2.25x for 3x3 / 2) the size of u: memory is traded for one plain GEMM.
- fp64 on the Triton backend runs the reference, as for every op (the col2im kernel accumulates in fp32).
- Widths are data: the custom ops take them as an int32 (G,) tensor on u's device (`Ragged.widths_tensor`); grids
  and shapes come from the static sizes and C only. Values are checked on the host when that needs no device sync
  (CPU tensors; CUDA under `set_validate_metadata(True)`); every backend clamps a width to [0, C] (the reference by
  masks, Triton and C++ by masking channels with C too), so no metadata value can address memory outside the tensors.
- The custom ops check their arguments themselves (`_check_args`), on every backend.
- Double backward is not supported.
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from .._triton import tl, triton
from ..aot import register_aot
from .. import _ext
from ..backend import OpInfo, register_op, resolve_backend, resolve_backend_for
from ..ragged import Ragged, as_ragged, row_starts
from ._checks import check_float_tensor, check_groups

OP = register_op(OpInfo(
    name="rsr_im2col",
    backends=("triton", "cpu", "cuda"),
    auto_cuda=("triton", "cuda"),
    ext_ops=("ext_rsr_im2col_fwd", "ext_rsr_im2col_bwd"),
))

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def conv_out_grid(grid: Sequence[int], kernel_size: int, stride: int, padding: int) -> Tuple[int, int]:
    """(Ho, Wo) of a conv with this geometry; raises ValueError when the kernel does not fit the padded grid."""
    out = []
    for side in grid:
        if side + 2 * padding < kernel_size:
            raise ValueError(f"kernel_size={kernel_size} exceeds the padded grid side {side} + 2 * {padding}")
        out.append((side + 2 * padding - kernel_size) // stride + 1)
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------------
@triton.jit
def _sample_width(SAMPLE_STARTS, WIDTHS, num_groups, b, bound):
    """Width of sample b: group g owns samples [SAMPLE_STARTS[g], SAMPLE_STARTS[g + 1]) (static, cached) and WIDTHS[g]
    channels (device metadata, never trusted: clamped to [0, bound]). Samples outside every group get 0."""
    width = b * 0
    for g in range(num_groups):
        start = tl.load(SAMPLE_STARTS + g)
        end = tl.load(SAMPLE_STARTS + g + 1)
        width = tl.where((b >= start) & (b < end), tl.load(WIDTHS + g), width)
    return tl.minimum(tl.maximum(width, 0), bound)


@triton.jit
def _rsr_im2col_fwd_kernel(U, COLS, SAMPLE_STARTS, WIDTHS, num_groups, C, H, W, Wo, L, n_cls, stride, padding,
                           KSIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Program (output token row, block of columns): gathers BLOCK columns of one row of COLS."""
    row = tl.program_id(0)            # b * L + o
    b = row // L
    o = row % L
    oh = o // Wo
    ow = o % Wo
    ci = _sample_width(SAMPLE_STARTS, WIDTHS, num_groups, b, C)
    row_len = C * KSIZE * KSIZE
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    c = j // (KSIZE * KSIZE)
    tap = j % (KSIZE * KSIZE)
    ih = oh * stride - padding + tap // KSIZE
    iw = ow * stride - padding + tap % KSIZE
    valid = (c < ci) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)  # ci <= C: clamped
    n_in = n_cls + H * W
    src = (b.to(tl.int64) * n_in + n_cls + ih * W + iw) * C + c
    v = tl.load(U + tl.where(valid, src, 0), mask=valid, other=0.0)  # clamped address: no out-of-range pointer
    tl.store(COLS + row.to(tl.int64) * row_len + j, v, mask=j < row_len)


@triton.jit
def _rsr_im2col_bwd_kernel(DCOLS, DU, SAMPLE_STARTS, WIDTHS, num_groups, C, H, W, Ho, Wo, L, n_cls, stride, padding,
                           KSIZE: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (input token row, block of channels): sums the columns that read this token, taps in fixed order."""
    row = tl.program_id(0)            # b * (n_cls + H*W) + token
    n_in = n_cls + H * W
    b = row // n_in
    token = row % n_in
    ci = _sample_width(SAMPLE_STARTS, WIDTHS, num_groups, b, C)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.maximum(token - n_cls, 0)
    ih = p // W
    iw = p % W
    is_patch = token >= n_cls
    row_len = C * KSIZE * KSIZE
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for kh in tl.static_range(KSIZE):
        ph = ih + padding - kh                 # oh * stride for the output row that reads ih through tap row kh
        ok_h = (ph >= 0) & (ph % stride == 0) & (ph // stride < Ho)
        for kw in tl.static_range(KSIZE):
            pw = iw + padding - kw
            ok = is_patch & ok_h & (pw >= 0) & (pw % stride == 0) & (pw // stride < Wo)
            o = tl.where(ok, (ph // stride) * Wo + pw // stride, 0)
            offs = (b.to(tl.int64) * L + o) * row_len + c * (KSIZE * KSIZE) + kh * KSIZE + kw
            m = ok & (c < ci)
            acc += tl.load(DCOLS + tl.where(m, offs, 0), mask=m, other=0.0).to(tl.float32)
    tl.store(DU + row.to(tl.int64) * C + c, acc.to(DU.dtype.element_ty), mask=c < C)


_FWD_BLOCK = 1024
_BWD_BLOCK_C = 128


def _triton_fwd(u, groups: Ragged, geo):
    (H, W), k, s, p, n_cls, (Ho, Wo) = geo
    B, _, C = u.shape
    L = Ho * Wo
    cols = u.new_empty((B, L, C * k * k))
    if cols.numel() == 0:
        return cols
    grid = (B * L, triton.cdiv(C * k * k, _FWD_BLOCK))  # static bounds: no width is read on the host
    _rsr_im2col_fwd_kernel[grid](u, cols, row_starts(groups.sizes, 1, u.device), groups.widths_tensor(u.device),
                                 groups.num_groups, C, H, W, Wo, L, n_cls, s, p, KSIZE=k, BLOCK=_FWD_BLOCK,
                                 num_warps=4)
    return cols


def _triton_bwd(dcols, groups: Ragged, geo):
    (H, W), k, s, p, n_cls, (Ho, Wo) = geo
    B, L, CKK = dcols.shape
    C = CKK // (k * k)
    du = dcols.new_empty((B, n_cls + H * W, C))
    if du.numel() == 0:
        return du
    grid = (B * (n_cls + H * W), triton.cdiv(C, _BWD_BLOCK_C))
    _rsr_im2col_bwd_kernel[grid](dcols, du, row_starts(groups.sizes, 1, dcols.device),
                                 groups.widths_tensor(dcols.device), groups.num_groups, C, H, W, Ho, Wo, L, n_cls, s, p,
                                 KSIZE=k, BLOCK_C=_BWD_BLOCK_C, num_warps=4)
    return du


for _dt in ("fp32", "bf16", "fp16"):
    _ints = ("num_groups", "C", "H", "W", "Wo", "L", "n_cls", "stride", "padding")
    _fwd_sig = {"U": f"*{_dt}", "COLS": f"*{_dt}", "SAMPLE_STARTS": "*i32", "WIDTHS": "*i32",
                **{n: "i32" for n in _ints}, "KSIZE": "constexpr", "BLOCK": "constexpr"}
    register_aot(_rsr_im2col_fwd_kernel, _fwd_sig, {"KSIZE": 3, "BLOCK": _FWD_BLOCK}, num_warps=4)
    _ints = ("num_groups", "C", "H", "W", "Ho", "Wo", "L", "n_cls", "stride", "padding")
    _bwd_sig = {"DCOLS": f"*{_dt}", "DU": f"*{_dt}", "SAMPLE_STARTS": "*i32", "WIDTHS": "*i32",
                **{n: "i32" for n in _ints},
                "KSIZE": "constexpr", "BLOCK_C": "constexpr"}
    register_aot(_rsr_im2col_bwd_kernel, _bwd_sig, {"KSIZE": 3, "BLOCK_C": _BWD_BLOCK_C}, num_warps=4)


# ---------------------------------------------------------------------------------------------------------------------
# Reference backend (plain PyTorch: F.unfold / F.fold, then the ragged mask)
# ---------------------------------------------------------------------------------------------------------------------
def _sample_widths(groups: Ragged, device) -> torch.Tensor:
    """(B,) width of every sample, from the widths tensor (no host values; a mask by it clamps to the bound)."""
    return groups.sample_width_tensor(device)


def _reference_fwd(u, groups: Ragged, geo):
    (H, W), k, s, p, n_cls, (Ho, Wo) = geo
    B, _, C = u.shape
    img = u[:, n_cls:].transpose(1, 2).reshape(B, C, H, W)
    cols = F.unfold(img, k, padding=p, stride=s).transpose(1, 2)            # (B, L, C*k*k), channel-major
    active = (torch.arange(C * k * k, device=u.device) // (k * k))[None, :] < _sample_widths(groups, u.device)[:, None]
    return torch.where(active[:, None, :], cols, torch.zeros((), dtype=u.dtype, device=u.device)).contiguous()


def _reference_bwd(dcols, groups: Ragged, geo):
    (H, W), k, s, p, n_cls, (Ho, Wo) = geo
    B, L, CKK = dcols.shape
    C = CKK // (k * k)
    img = F.fold(dcols.transpose(1, 2), (H, W), k, padding=p, stride=s)     # sums every column reading a token
    du = img.flatten(2).transpose(1, 2)
    active = torch.arange(C, device=dcols.device)[None, :] < _sample_widths(groups, dcols.device)[:, None]
    du = torch.where(active[:, None, :], du, torch.zeros((), dtype=du.dtype, device=du.device))
    return torch.cat([du.new_zeros(B, n_cls, C), du], dim=1).contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# C++ backends
# ---------------------------------------------------------------------------------------------------------------------
def _ext_fwd(u, groups: Ragged, geo):
    grid, k, s, p, n_cls, _ = geo
    return torch.ops.resnas.ext_rsr_im2col_fwd(u, list(groups.sizes), groups.widths_tensor(u.device), list(grid), k,
                                               s, p, bool(n_cls))


def _ext_bwd(dcols, groups: Ragged, geo):
    grid, k, s, p, n_cls, _ = geo
    return torch.ops.resnas.ext_rsr_im2col_bwd(dcols, list(groups.sizes), groups.widths_tensor(dcols.device),
                                               list(grid), k, s, p, bool(n_cls))


_FWD = {"reference": _reference_fwd, "triton": _triton_fwd, "cpu": _ext_fwd, "cuda": _ext_fwd}
_BWD = {"reference": _reference_bwd, "triton": _triton_bwd, "cpu": _ext_bwd, "cuda": _ext_bwd}


# ---------------------------------------------------------------------------------------------------------------------
# torch.library custom ops
# ---------------------------------------------------------------------------------------------------------------------
def _geometry(grid: List[int], kernel_size: int, stride: int, padding: int, has_cls: bool):
    return (tuple(grid), kernel_size, stride, padding, int(has_cls),
            conv_out_grid(grid, kernel_size, stride, padding))


def _check_geometry(grid, kernel_size, stride, padding) -> None:
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(v, int) and v > 0 for v in grid)):
        raise ValueError(f"grid must be a pair of positive ints (H, W), got {grid!r}")
    for name, v, low in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    conv_out_grid(grid, kernel_size, stride, padding)


def check_widths_device(groups: Ragged, t: torch.Tensor, what: str, t_name: str) -> None:
    """A widths tensor must live on the device of the activations it describes (the kernels read it there)."""
    if groups.on_device and groups.widths.device != t.device:
        raise ValueError(f"{what} must be on the same device as {t_name}: {t_name} is on {t.device}, {what} is on "
                         f"{groups.widths.device}")


def _check_args(u, groups: Ragged, grid, has_cls, kernel_size, stride, padding, what: str = "widths") -> None:
    """The argument checks of `rsr_im2col`, run again by the custom op (direct calls, torch.compile)."""
    check_float_tensor(u, "u", _FLOAT_DTYPES, min_dim=3)
    if u.dim() != 3:
        raise ValueError(f"u must have shape (B, tokens, C), got {tuple(u.shape)}")
    _check_geometry(grid, kernel_size, stride, padding)
    n = int(bool(has_cls)) + grid[0] * grid[1]
    if u.shape[1] != n:
        raise ValueError(f"u has {u.shape[1]} tokens but grid={tuple(grid)} with has_cls={bool(has_cls)} needs {n}")
    check_groups(groups, u.shape[0], u.shape[2], batch_of="u", width_of="u", what=what)
    check_widths_device(groups, u, what, "u")


def _check_bwd_args(dcols, groups: Ragged, grid, kernel_size, stride, padding) -> None:
    check_float_tensor(dcols, "dcols", _FLOAT_DTYPES, min_dim=3)
    _check_geometry(grid, kernel_size, stride, padding)
    ho, wo = conv_out_grid(grid, kernel_size, stride, padding)
    kk = kernel_size * kernel_size
    if dcols.dim() != 3 or dcols.shape[1] != ho * wo or dcols.shape[2] % kk:
        raise ValueError(f"dcols must have shape (B, Ho*Wo, C*k*k) = (B, {ho * wo}, C*{kk}), got {tuple(dcols.shape)}")
    check_groups(groups, dcols.shape[0], dcols.shape[2] // kk, batch_of="dcols", width_of="dcols (C = dim 2 / k*k)")
    check_widths_device(groups, dcols, "widths", "dcols")


@torch.library.custom_op("resnas::rsr_im2col_fwd", mutates_args=())
def rsr_im2col_fwd(u: torch.Tensor, sizes: List[int], widths: torch.Tensor, grid: List[int], kernel_size: int,
                   stride: int, padding: int, has_cls: bool) -> torch.Tensor:
    """cols (B, Ho*Wo, C*k*k) of u (B, has_cls + H*W, C); widths: int32 (G,) on u's device. See the module
    docstring."""
    groups = Ragged(tuple(sizes), widths)
    _check_args(u, groups, grid, has_cls, kernel_size, stride, padding)
    impl = _FWD[resolve_backend_for(OP.name, u)]
    return impl(u, groups, _geometry(grid, kernel_size, stride, padding, has_cls))


@rsr_im2col_fwd.register_fake
def _fake_fwd(u, sizes, widths, grid, kernel_size, stride, padding, has_cls):
    ho, wo = conv_out_grid(grid, kernel_size, stride, padding)
    return u.new_empty((u.shape[0], ho * wo, u.shape[2] * kernel_size * kernel_size))


@torch.library.custom_op("resnas::rsr_im2col_bwd", mutates_args=())
def rsr_im2col_bwd(dcols: torch.Tensor, sizes: List[int], widths: torch.Tensor, grid: List[int], kernel_size: int,
                   stride: int, padding: int, has_cls: bool) -> torch.Tensor:
    """du (B, has_cls + H*W, C): the adjoint of rsr_im2col_fwd (zero cls row, zero beyond the widths)."""
    groups = Ragged(tuple(sizes), widths)
    _check_bwd_args(dcols, groups, grid, kernel_size, stride, padding)
    impl = _BWD[resolve_backend_for(OP.name, dcols)]
    return impl(dcols, groups, _geometry(grid, kernel_size, stride, padding, has_cls))


@rsr_im2col_bwd.register_fake
def _fake_bwd(dcols, sizes, widths, grid, kernel_size, stride, padding, has_cls):
    c = dcols.shape[2] // (kernel_size * kernel_size)
    return dcols.new_empty((dcols.shape[0], int(has_cls) + grid[0] * grid[1], c))


def _setup_context(ctx, inputs, output):
    _, sizes, widths, grid, kernel_size, stride, padding, has_cls = inputs
    ctx.args = (sizes, widths, grid, kernel_size, stride, padding, has_cls)


def _backward(ctx, dcols):
    return (rsr_im2col_bwd(dcols.contiguous(), *ctx.args),) + (None,) * 7


rsr_im2col_fwd.register_autograd(_backward, setup_context=_setup_context)

# The C++ backends: one C++-registered op, resnas::rsr_im2col (csrc/rsr.cpp: autograd and checks in C++), over the
# device kernels ext_rsr_im2col_fwd / _bwd. Their fake kernels live here so torch.compile traces through the C++
# autograd.
_ext.register_cxx_fakes({"resnas::rsr_im2col": _fake_fwd, "resnas::ext_rsr_im2col_fwd": _fake_fwd,
                         "resnas::ext_rsr_im2col_bwd": _fake_bwd})


# Taken once at trace time under torch.compile (as every backend decision: see residual_spatial_reduction.py).
@torch.compiler.assume_constant_result
def _cxx_backend(device: torch.device) -> bool:
    return resolve_backend(OP.name, device) in ("cpu", "cuda")


# ---------------------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------------------
def rsr_im2col(u: torch.Tensor, groups: Ragged, grid: Tuple[int, int], has_cls: bool = True, kernel_size: int = 3,
               stride: int = 2, padding: int = 1) -> torch.Tensor:
    """Columns (B, Ho*Wo, C*k*k) of the patch tokens of u for a k x k conv; see the module docstring.

    Args:
        u: (B, has_cls + H*W, C) contiguous, zero beyond each group's width.
        groups: Ragged(sizes, widths) over dim 0 of u (None: one group at full width).
        grid: (H, W) of the patch tokens.
    """
    check_float_tensor(u, "u", _FLOAT_DTYPES, min_dim=3)
    if u.dim() != 3:
        raise ValueError(f"u must have shape (B, tokens, C), got {tuple(u.shape)}")
    groups = as_ragged(groups, u.shape[0], u.shape[2])
    _check_args(u, groups, grid, has_cls, kernel_size, stride, padding, what="groups.widths")
    args = (list(groups.sizes), groups.widths_tensor(u.device), list(grid), kernel_size, stride, padding,
            bool(has_cls))
    if _cxx_backend(u.device):
        return torch.ops.resnas.rsr_im2col(u, *args)
    return rsr_im2col_fwd(u, *args)
