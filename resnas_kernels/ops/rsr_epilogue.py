"""RSR epilogue: conv output + bias + pos_embed + zero-padded AvgPool of the raw tokens, and the cls row, in one pass.

Per sample of group g (ci = c_in,g <= co = c_out,g), with n = 1 when there is a cls token (else 0), t = oh*Wo + ow:

    out[b, n + t, c] = conv[b, t, c] + conv_bias[c] + pos_embed[0, t, c] + (c < ci ? avgpool(x)[b, t, c] : 0)   c < co
    out[b, 0, c]     = cls[b, 0, c]  + cls_bias[c]                        + (c < ci ? x[b, 0, c] : 0)            c < co
    out[b, :, c]     = 0                                                                                     c >= co

avgpool: stride x stride windows of x's patch tokens (the un-normalised input); the grid's edge may cut the last
window (odd grids, 7 -> 4): it averages only the tokens inside the grid, as AvgPool2d(ceil_mode=True) does. `conv` and
`cls` are the bias-free outputs of the ragged GEMMs (`ragged_linear`). The biases are added here rather than in the
GEMMs because their gradients then come for free from the column sums that pos_embed's gradient needs anyway.

Backends: reference (plain PyTorch) | triton | cpu (csrc/cpu/rsr_epilogue.cpp) | cuda (csrc/cuda/rsr_epilogue.cu).

Dispatch: on the C++ backends the public function calls one C++-registered op, `torch.ops.resnas.rsr_epilogue`
(csrc/rsr.cpp: autograd and argument checks in C++ over the device kernels `ext_rsr_epilogue_fwd / _bwd`), one dispatcher
hop per call; the reference and Triton backends run the Python custom ops `resnas::rsr_epilogue_fwd / _bwd`.

Caveats:
- conv, x and cls must be contiguous and share a dtype; pos_embed / biases may be x's dtype or fp32. Sums are in fp32
  (fp64 for fp64); the output is x's dtype.
- fp64 on the Triton backend runs the reference, as for every op (the kernels' shortcut gradient is fp32).
- Widths are data: int32 (G,) tensors on x's device (ragged.py). Their values (bounds, the shortcut rule) are checked
  on the host only where that needs no device sync (CPU tensors; CUDA under `set_validate_metadata(True)`); every
  backend clamps ci to [0, Ci] and co to [0, Co] (masks by the static bounds), so no metadata value can address
  memory outside the tensors.
- The custom ops check their arguments themselves (`_check_args`), on every backend.
- Backward: dconv / dcls are dout's rows masked to co (a copy: a custom op may not return a view of its input); dx is
  the pooling adjoint (a gather: each input token lies in exactly one window) plus the cls shortcut, masked to ci.
  d(pos_embed), d(conv_bias), d(cls_bias) are batch sums taken per output token with the samples in a fixed order and
  no atomics: bitwise reproducible run to run and across thread counts.
- Double backward is not supported.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .._triton import tl, triton
from ..aot import register_aot
from .. import _ext
from ..backend import OpInfo, register_op, resolve_backend, resolve_backend_for
from ..ragged import Ragged, _is_fake as is_fake, row_starts, validate_metadata
from ..reference.layer_norm import compute_dtype
from ..reference.rsr import check_shortcut_widths
from ._checks import check_float_tensor, check_groups, check_same_device, check_tensor
from .rsr_im2col import _sample_width, check_widths_device

OP = register_op(OpInfo(
    name="rsr_epilogue",
    backends=("triton", "cpu", "cuda"),
    auto_cuda=("cuda", "triton"),
    ext_ops=("ext_rsr_epilogue_fwd", "ext_rsr_epilogue_bwd"),
))


def pool_out_grid(grid: Sequence[int], stride: int) -> Tuple[int, int]:
    """(ceil(H / stride), ceil(W / stride)): the pooled shortcut's grid."""
    return -(-grid[0] // stride), -(-grid[1] // stride)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------------
@triton.jit
def _rsr_epilogue_fwd_kernel(CONV, X, POS, BIAS, CLS, CLS_BIAS, OUT, SAMPLE_STARTS, IN_WIDTHS, OUT_WIDTHS, num_groups,
                             Ci, Co, H, W, Wo, L, HAS_CLS: tl.constexpr, STRIDE: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (output row, block of channels). POS/BIAS/CLS_BIAS are in the accumulation dtype."""
    row = tl.program_id(0)
    n_cls = 1 if HAS_CLS else 0
    n_out = n_cls + L
    n_in = n_cls + H * W
    b = row // n_out
    r = row % n_out
    ci = _sample_width(SAMPLE_STARTS, IN_WIDTHS, num_groups, b, Ci)  # clamped to the static bounds: no width can
    co = _sample_width(SAMPLE_STARTS, OUT_WIDTHS, num_groups, b, Co)  # address another token's channels
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = c < ci
    out_c = c < co
    x_base = X + b.to(tl.int64) * n_in * Ci
    if HAS_CLS and r == 0:
        val = tl.load(CLS + b.to(tl.int64) * Co + c, mask=out_c, other=0.0).to(POS.dtype.element_ty)
        val += tl.load(CLS_BIAS + c, mask=out_c, other=0.0)
        val += tl.load(x_base + c, mask=in_c, other=0.0).to(POS.dtype.element_ty)
    else:
        t = r - n_cls
        oh = t // Wo
        ow = t % Wo
        h0 = oh * STRIDE
        w0 = ow * STRIDE
        pooled = tl.zeros((BLOCK_C,), dtype=POS.dtype.element_ty)
        for dh in tl.static_range(STRIDE):
            for dw in tl.static_range(STRIDE):
                inside = (h0 + dh < H) & (w0 + dw < W)
                tok = tl.where(inside, n_cls + (h0 + dh) * W + w0 + dw, 0)
                pooled += tl.load(x_base + tok * Ci + c, mask=in_c & inside, other=0.0).to(POS.dtype.element_ty)
        count = (tl.minimum(h0 + STRIDE, H) - h0) * (tl.minimum(w0 + STRIDE, W) - w0)
        val = tl.load(CONV + (b.to(tl.int64) * L + t) * Co + c, mask=out_c, other=0.0).to(POS.dtype.element_ty)
        val += tl.load(BIAS + c, mask=out_c, other=0.0)
        val += tl.load(POS + t * Co + c, mask=out_c, other=0.0)
        val += pooled / count
    val = tl.where(out_c, val, 0.0)
    tl.store(OUT + row.to(tl.int64) * Co + c, val.to(OUT.dtype.element_ty), mask=c < Co)


@triton.jit
def _rsr_epilogue_bwd_kernel(DOUT, DCONV, DX, DCLS, SAMPLE_STARTS, IN_WIDTHS, OUT_WIDTHS, num_groups, Ci, Co, H, W, Wo,
                             L, HAS_CLS: tl.constexpr, STRIDE: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (output row, block of channels): masked copy of the row, and dx of its pooling window's tokens (or of
    the cls token). Windows are disjoint, so every dx row is written by exactly one program."""
    row = tl.program_id(0)
    n_cls = 1 if HAS_CLS else 0
    n_out = n_cls + L
    n_in = n_cls + H * W
    b = row // n_out
    r = row % n_out
    ci = _sample_width(SAMPLE_STARTS, IN_WIDTHS, num_groups, b, Ci)
    co = _sample_width(SAMPLE_STARTS, OUT_WIDTHS, num_groups, b, Co)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.load(DOUT + row.to(tl.int64) * Co + c, mask=c < co, other=0.0)
    dx_base = DX + b.to(tl.int64) * n_in * Ci
    dx_mask = c < Ci
    dx_val = tl.where(c < ci, d, 0.0)
    if HAS_CLS and r == 0:
        tl.store(DCLS + b.to(tl.int64) * Co + c, d, mask=c < Co)
        tl.store(dx_base + c, dx_val, mask=dx_mask)
    else:
        t = r - n_cls
        tl.store(DCONV + (b.to(tl.int64) * L + t) * Co + c, d, mask=c < Co)
        oh = t // Wo
        ow = t % Wo
        h0 = oh * STRIDE
        w0 = ow * STRIDE
        count = (tl.minimum(h0 + STRIDE, H) - h0) * (tl.minimum(w0 + STRIDE, W) - w0)
        dx_val = (dx_val.to(tl.float32) / count).to(DX.dtype.element_ty)
        for dh in tl.static_range(STRIDE):
            for dw in tl.static_range(STRIDE):
                inside = (h0 + dh < H) & (w0 + dw < W)
                tok = tl.where(inside, n_cls + (h0 + dh) * W + w0 + dw, 0)
                tl.store(dx_base + tok * Ci + c, dx_val, mask=dx_mask & inside)


@triton.jit
def _rsr_epilogue_colsum_kernel(DOUT, SUMS, SAMPLE_STARTS, OUT_WIDTHS, num_groups, n_out, Co, BLOCK_C: tl.constexpr):
    """Program (output token r, block of channels): SUMS[r, c] = sum over samples b (increasing) of DOUT[b, r, c] for
    c < co_b. A fixed order and no atomics: deterministic parameter gradients."""
    r = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_C,), dtype=SUMS.dtype.element_ty)
    for g in range(num_groups):
        start = tl.load(SAMPLE_STARTS + g)
        end = tl.load(SAMPLE_STARTS + g + 1)
        co = tl.minimum(tl.maximum(tl.load(OUT_WIDTHS + g), 0), Co)  # device metadata, clamped
        for b in range(start, end):
            acc += tl.load(DOUT + (tl.cast(b, tl.int64) * n_out + r) * Co + c, mask=c < co, other=0.0).to(acc.dtype)
    tl.store(SUMS + r * Co + c, acc, mask=c < Co)


_BLOCK_C = 128


def _geometry(grid, stride, has_cls):
    return tuple(grid), stride, int(has_cls), pool_out_grid(grid, stride)


def _triton_fwd(conv, x, pos, bias, cls, cls_bias, in_groups: Ragged, out_groups: Ragged, geo):
    (H, W), s, n_cls, (Ho, Wo) = geo
    B, L, Co = conv.shape
    Ci = x.shape[2]
    out = x.new_empty((B, n_cls + L, Co))
    if out.numel() == 0:
        return out
    acc = compute_dtype(x.dtype)
    pos, bias = pos.to(acc).contiguous(), bias.to(acc).contiguous()
    cls_bias = cls_bias.to(acc).contiguous() if n_cls else bias
    grid = (B * (n_cls + L), triton.cdiv(Co, _BLOCK_C))
    _rsr_epilogue_fwd_kernel[grid](conv, x, pos, bias, cls if n_cls else conv, cls_bias, out,
                                   row_starts(in_groups.sizes, 1, x.device), in_groups.widths_tensor(x.device),
                                   out_groups.widths_tensor(x.device), in_groups.num_groups, Ci, Co, H, W, Wo, L,
                                   HAS_CLS=bool(n_cls), STRIDE=s, BLOCK_C=_BLOCK_C, num_warps=4)
    return out


def _triton_bwd(dout, in_groups: Ragged, out_groups: Ragged, geo, in_channels: int):
    (H, W), s, n_cls, (Ho, Wo) = geo
    B, n_out, Co = dout.shape
    L, Ci = n_out - n_cls, in_channels
    acc = compute_dtype(dout.dtype)
    dconv = dout.new_empty((B, L, Co))
    dx = dout.new_empty((B, n_cls + H * W, Ci))
    dcls = dout.new_empty((B, 1, Co)) if n_cls else dout.new_empty((0,))
    sums = dout.new_empty((n_out, Co), dtype=acc)
    starts = row_starts(in_groups.sizes, 1, dout.device)
    out_widths = out_groups.widths_tensor(dout.device)
    if B * n_out:
        _rsr_epilogue_bwd_kernel[(B * n_out, triton.cdiv(Co, _BLOCK_C))](
            dout, dconv, dx, dcls if n_cls else dconv, starts, in_groups.widths_tensor(dout.device), out_widths,
            in_groups.num_groups, Ci, Co, H, W, Wo, L, HAS_CLS=bool(n_cls), STRIDE=s, BLOCK_C=_BLOCK_C, num_warps=4)
    _rsr_epilogue_colsum_kernel[(n_out, triton.cdiv(Co, _BLOCK_C))](dout, sums, starts, out_widths,
                                                                     out_groups.num_groups, n_out, Co,
                                                                     BLOCK_C=_BLOCK_C, num_warps=4)
    dpos = sums[n_cls:].unsqueeze(0).clone()  # clone: a fresh tensor (no storage offset)
    dbias = sums[n_cls:].sum(0)   # a fixed-shape reduction: deterministic on CPU and CUDA
    dcls_bias = sums[0].clone() if n_cls else sums.new_empty((0,))
    return dconv, dx, dpos, dbias, dcls, dcls_bias


for _dt, _pdt in (("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32")):
    _ints = {n: "i32" for n in ("num_groups", "Ci", "Co", "H", "W", "Wo", "L")}
    _fwd_sig = {"CONV": f"*{_dt}", "X": f"*{_dt}", "POS": f"*{_pdt}", "BIAS": f"*{_pdt}", "CLS": f"*{_dt}",
                "CLS_BIAS": f"*{_pdt}", "OUT": f"*{_dt}", "SAMPLE_STARTS": "*i32", "IN_WIDTHS": "*i32",
                "OUT_WIDTHS": "*i32", **_ints, "HAS_CLS": "constexpr", "STRIDE": "constexpr", "BLOCK_C": "constexpr"}
    _bwd_sig = {"DOUT": f"*{_dt}", "DCONV": f"*{_dt}", "DX": f"*{_dt}", "DCLS": f"*{_dt}", "SAMPLE_STARTS": "*i32",
                "IN_WIDTHS": "*i32", "OUT_WIDTHS": "*i32", **_ints, "HAS_CLS": "constexpr", "STRIDE": "constexpr",
                "BLOCK_C": "constexpr"}
    for _has_cls in (True, False):
        _consts = {"HAS_CLS": _has_cls, "STRIDE": 2, "BLOCK_C": _BLOCK_C}
        register_aot(_rsr_epilogue_fwd_kernel, _fwd_sig, _consts, num_warps=4)
        register_aot(_rsr_epilogue_bwd_kernel, _bwd_sig, _consts, num_warps=4)
    register_aot(_rsr_epilogue_colsum_kernel,
                 {"DOUT": f"*{_dt}", "SUMS": f"*{_pdt}", "SAMPLE_STARTS": "*i32", "OUT_WIDTHS": "*i32",
                  "num_groups": "i32", "n_out": "i32", "Co": "i32", "BLOCK_C": "constexpr"},
                 {"BLOCK_C": _BLOCK_C}, num_warps=4)


# ---------------------------------------------------------------------------------------------------------------------
# Reference backend (plain PyTorch)
# ---------------------------------------------------------------------------------------------------------------------
def _col_mask(groups: Ragged, width: int, device) -> torch.Tensor:
    """(B, 1, width) bool: column c is active for the sample's group."""
    return groups.mask(width, device=device)[:, None, :]


def _reference_fwd(conv, x, pos, bias, cls, cls_bias, in_groups: Ragged, out_groups: Ragged, geo):
    (H, W), s, n_cls, (Ho, Wo) = geo
    B, L, Co = conv.shape
    Ci = x.shape[2]
    acc = compute_dtype(x.dtype)
    img = x[:, n_cls:].to(acc).transpose(1, 2).reshape(B, Ci, H, W)
    pooled = F.avg_pool2d(img, s, s, ceil_mode=True).flatten(2).transpose(1, 2)        # (B, L, Ci)
    zero = torch.zeros((), dtype=acc, device=x.device)
    pooled = torch.where(_col_mask(in_groups, Ci, x.device), pooled, zero)  # select: NaN beyond ci must not leak
    patches = conv.to(acc) + bias.to(acc) + pos.to(acc) + F.pad(pooled, (0, Co - Ci))
    rows = [patches]
    if n_cls:
        shortcut = torch.where(_col_mask(in_groups, Ci, x.device), x[:, :1].to(acc), zero)
        rows.insert(0, cls.to(acc) + cls_bias.to(acc) + F.pad(shortcut, (0, Co - Ci)))
    out = torch.cat(rows, dim=1)
    return torch.where(_col_mask(out_groups, Co, x.device), out, zero).to(x.dtype)


def _reference_bwd(dout, in_groups: Ragged, out_groups: Ragged, geo, in_channels: int):
    (H, W), s, n_cls, (Ho, Wo) = geo
    B, n_out, Co = dout.shape
    Ci = in_channels
    acc = compute_dtype(dout.dtype)
    zero = torch.zeros((), dtype=dout.dtype, device=dout.device)
    d = torch.where(_col_mask(out_groups, Co, dout.device), dout, zero)
    dconv = d[:, n_cls:].contiguous()
    # The pooling adjoint: each token gets its window's gradient / the window's token count.
    ones = torch.ones(1, 1, H, W, dtype=acc, device=dout.device)
    counts = F.avg_pool2d(ones, s, s, ceil_mode=True, divisor_override=1).flatten(2).transpose(1, 2)  # (1, L, 1)
    per_token = (dconv[..., :Ci].to(acc) / counts).transpose(1, 2).reshape(B, Ci, Ho, Wo)
    up = per_token.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)[:, :, :H, :W]
    dx_patches = up.flatten(2).transpose(1, 2)
    rows = [dx_patches]
    if n_cls:
        rows.insert(0, d[:, :1, :Ci].to(acc))
    dx = torch.where(_col_mask(in_groups, Ci, dout.device), torch.cat(rows, dim=1), zero.to(acc)).to(dout.dtype)
    sums = d.to(acc).sum(0)                                                                # (n_out, Co)
    dpos = sums[n_cls:].unsqueeze(0).clone()  # clone: a fresh tensor (no storage offset)
    dbias = sums[n_cls:].sum(0)
    dcls = d[:, :1].contiguous() if n_cls else dout.new_empty((0,))
    dcls_bias = sums[0].clone() if n_cls else sums.new_empty((0,))
    return dconv, dx.contiguous(), dpos, dbias, dcls, dcls_bias


# ---------------------------------------------------------------------------------------------------------------------
# C++ backends
# ---------------------------------------------------------------------------------------------------------------------
def _ext_fwd(conv, x, pos, bias, cls, cls_bias, in_groups: Ragged, out_groups: Ragged, geo):
    grid, s, _, _ = geo
    return torch.ops.resnas.ext_rsr_epilogue_fwd(conv, x, pos, bias, cls, cls_bias, list(in_groups.sizes),
                                                 in_groups.widths_tensor(x.device), out_groups.widths_tensor(x.device),
                                                 list(grid), s)


def _ext_bwd(dout, in_groups: Ragged, out_groups: Ragged, geo, in_channels: int):
    grid, s, n_cls, _ = geo
    return torch.ops.resnas.ext_rsr_epilogue_bwd(dout, list(in_groups.sizes), in_groups.widths_tensor(dout.device),
                                                 out_groups.widths_tensor(dout.device), list(grid), s, bool(n_cls),
                                                 in_channels)


_FWD = {"reference": _reference_fwd, "triton": _triton_fwd, "cpu": _ext_fwd, "cuda": _ext_fwd}
_BWD = {"reference": _reference_bwd, "triton": _triton_bwd, "cpu": _ext_bwd, "cuda": _ext_bwd}


# ---------------------------------------------------------------------------------------------------------------------
# torch.library custom ops
# ---------------------------------------------------------------------------------------------------------------------
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_geometry(grid, stride) -> None:
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(v, int) and v > 0 for v in grid)):
        raise ValueError(f"grid must be a pair of positive ints (H, W), got {grid!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")


def check_shortcut(in_groups: Ragged, out_groups: Ragged, in_name: str = "in_widths") -> None:
    """The shortcut rule (c_in,g <= c_out,g; c_out,g = 0 where c_in,g = 0) on host widths, or on widths tensors whose
    values can be read without a device sync (CPU, or the debug switch). The kernels need no such guarantee to stay
    in bounds."""
    widths = []
    for groups in (in_groups, out_groups):
        if not groups.on_device:
            widths.append(groups.widths)
            continue
        t = groups.widths
        if torch.compiler.is_compiling() or (t.device.type != "cpu" and not validate_metadata()) or is_fake(t):
            return
        widths.append(t.tolist())
    check_shortcut_widths(widths[0], widths[1], in_name=in_name)


def _check_args(conv, x, pos_embed, conv_bias, cls, cls_bias, in_groups: Ragged, out_groups: Ragged, grid,
                stride) -> None:
    """Shapes, dtypes and metadata of `rsr_epilogue_fwd` (its public caller checks the parameters it is given)."""
    check_float_tensor(x, "x", _FLOAT_DTYPES, min_dim=3)
    check_float_tensor(conv, "conv", (x.dtype,), min_dim=3)
    _check_geometry(grid, stride)
    n_cls = int(cls is not None)
    ho, wo = pool_out_grid(grid, stride)
    if x.dim() != 3 or x.shape[1] != n_cls + grid[0] * grid[1]:
        raise ValueError(f"x must have shape (B, {n_cls} + H*W, Ci) = (B, {n_cls + grid[0] * grid[1]}, Ci) for "
                         f"grid={tuple(grid)}, got {tuple(x.shape)}")
    batch, ci_max = x.shape[0], x.shape[2]
    if conv.dim() != 3 or conv.shape[:2] != (batch, ho * wo) or conv.shape[2] < ci_max:
        raise ValueError(f"conv must have shape (B, Ho*Wo, Co >= Ci) = ({batch}, {ho * wo}, >= {ci_max}), got "
                         f"{tuple(conv.shape)}")
    co_max = conv.shape[2]
    for name, t, shape in (("pos_embed", pos_embed, (1, ho * wo, co_max)), ("conv_bias", conv_bias, (co_max,)),
                           ("cls", cls, (batch, 1, co_max)), ("cls_bias", cls_bias, (co_max,))):
        if t is None:
            continue
        check_tensor(t, name)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        check_same_device(x, t, "x", name)
    if (cls is None) != (cls_bias is None):
        raise ValueError("cls and cls_bias must be given together")
    if cls is not None:
        check_float_tensor(cls, "cls", (x.dtype,))
    check_groups(in_groups, batch, ci_max, batch_of="x", width_of="x", what="in_widths")
    check_groups(out_groups, batch, co_max, batch_of="x", width_of="conv (dim 2, Co)", what="out_widths")
    check_widths_device(in_groups, x, "in_widths", "x")
    check_widths_device(out_groups, x, "out_widths", "x")
    check_shortcut(in_groups, out_groups)


@torch.library.custom_op("resnas::rsr_epilogue_fwd", mutates_args=())
def rsr_epilogue_fwd(conv: torch.Tensor, x: torch.Tensor, pos_embed: torch.Tensor, conv_bias: torch.Tensor,
                     cls: Optional[torch.Tensor], cls_bias: Optional[torch.Tensor], sizes: List[int],
                     in_widths: torch.Tensor, out_widths: torch.Tensor, grid: List[int], stride: int) -> torch.Tensor:
    """out (B, n + Ho*Wo, Co); see the module docstring. n = 1 when cls is given; widths: int32 (G,) on x's device."""
    in_groups = Ragged(tuple(sizes), in_widths)
    out_groups = Ragged(tuple(sizes), out_widths)
    _check_args(conv, x, pos_embed, conv_bias, cls, cls_bias, in_groups, out_groups, grid, stride)
    impl = _FWD[resolve_backend_for(OP.name, x)]
    return impl(conv, x, pos_embed, conv_bias, cls, cls_bias, in_groups, out_groups,
                _geometry(grid, stride, cls is not None))


@rsr_epilogue_fwd.register_fake
def _fake_fwd(conv, x, pos_embed, conv_bias, cls, cls_bias, sizes, in_widths, out_widths, grid, stride):
    return x.new_empty((x.shape[0], int(cls is not None) + conv.shape[1], conv.shape[2]))


@torch.library.custom_op("resnas::rsr_epilogue_bwd", mutates_args=())
def rsr_epilogue_bwd(dout: torch.Tensor, sizes: List[int], in_widths: torch.Tensor, out_widths: torch.Tensor,
                     grid: List[int], stride: int, has_cls: bool, in_channels: int
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dconv, dx, dpos, dconv_bias, dcls, dcls_bias); parameter gradients in fp32 (fp64 for fp64), dcls and
    dcls_bias empty without cls."""
    in_groups = Ragged(tuple(sizes), in_widths)
    out_groups = Ragged(tuple(sizes), out_widths)
    check_float_tensor(dout, "dout", _FLOAT_DTYPES, min_dim=3)
    _check_geometry(grid, stride)
    ho, wo = pool_out_grid(grid, stride)
    n_out = int(bool(has_cls)) + ho * wo
    if dout.dim() != 3 or dout.shape[1] != n_out or dout.shape[2] < in_channels:
        raise ValueError(f"dout must have shape (B, has_cls + Ho*Wo, Co >= in_channels) = (B, {n_out}, >= "
                         f"{in_channels}), got {tuple(dout.shape)}")
    check_groups(in_groups, dout.shape[0], in_channels, batch_of="dout", width_of="in_channels", what="in_widths")
    check_groups(out_groups, dout.shape[0], dout.shape[2], batch_of="dout", width_of="dout (dim 2, Co)",
                 what="out_widths")
    check_widths_device(in_groups, dout, "in_widths", "dout")
    check_widths_device(out_groups, dout, "out_widths", "dout")
    impl = _BWD[resolve_backend_for(OP.name, dout)]
    return impl(dout, in_groups, out_groups, _geometry(grid, stride, has_cls), in_channels)


@rsr_epilogue_bwd.register_fake
def _fake_bwd(dout, sizes, in_widths, out_widths, grid, stride, has_cls, in_channels):
    b, n_out, co = dout.shape
    n_cls = int(has_cls)
    acc = compute_dtype(dout.dtype)
    return (dout.new_empty((b, n_out - n_cls, co)), dout.new_empty((b, n_cls + grid[0] * grid[1], in_channels)),
            dout.new_empty((1, n_out - n_cls, co), dtype=acc), dout.new_empty((co,), dtype=acc),
            dout.new_empty((b, 1, co)) if has_cls else dout.new_empty((0,)),
            dout.new_empty((co,), dtype=acc) if has_cls else dout.new_empty((0,), dtype=acc))


def _setup_context(ctx, inputs, output):
    conv, x, pos_embed, conv_bias, cls, cls_bias, sizes, in_widths, out_widths, grid, stride = inputs
    ctx.args = (sizes, in_widths, out_widths, grid, stride, cls is not None, x.shape[2])
    ctx.dtypes = (pos_embed.dtype, conv_bias.dtype, cls_bias.dtype if cls_bias is not None else None)


def _backward(ctx, dout):
    dconv, dx, dpos, dbias, dcls, dcls_bias = rsr_epilogue_bwd(dout.contiguous(), *ctx.args)
    pos_dtype, bias_dtype, cls_bias_dtype = ctx.dtypes
    has_cls = ctx.args[5]
    return (dconv, dx, dpos.to(pos_dtype), dbias.to(bias_dtype), dcls if has_cls else None,
            dcls_bias.to(cls_bias_dtype) if has_cls else None, None, None, None, None, None)


rsr_epilogue_fwd.register_autograd(_backward, setup_context=_setup_context)

# The C++ backends: one C++-registered op, resnas::rsr_epilogue (csrc/rsr.cpp: autograd and checks in C++), over the
# device kernels ext_rsr_epilogue_fwd / _bwd. Their fake kernels live here so torch.compile traces through the C++
# autograd.
_ext.register_cxx_fakes({"resnas::rsr_epilogue": _fake_fwd, "resnas::ext_rsr_epilogue_fwd": _fake_fwd,
                         "resnas::ext_rsr_epilogue_bwd": _fake_bwd})


# Taken once at trace time under torch.compile (as every backend decision: see residual_spatial_reduction.py).
@torch.compiler.assume_constant_result
def _cxx_backend(device: torch.device) -> bool:
    return resolve_backend(OP.name, device) in ("cpu", "cuda")


def rsr_epilogue(conv: torch.Tensor, x: torch.Tensor, pos_embed: torch.Tensor, conv_bias: torch.Tensor,
                 cls: Optional[torch.Tensor], cls_bias: Optional[torch.Tensor], in_groups: Ragged,
                 out_widths, grid: Tuple[int, int], stride: int = 2) -> torch.Tensor:
    """The fused epilogue; see the module docstring. Called by `residual_spatial_reduction`, whose public checks
    cover the parameters; the C++ backends re-check shapes and dtypes and raise with the argument's name."""
    if isinstance(out_widths, Ragged):
        out_widths = out_widths.widths
    args = (list(in_groups.sizes), in_groups.widths_tensor(x.device),
            in_groups.with_widths(out_widths).widths_tensor(x.device), list(grid), stride)
    if _cxx_backend(x.device):
        return torch.ops.resnas.rsr_epilogue(conv, x, pos_embed, conv_bias, cls, cls_bias, *args)
    return rsr_epilogue_fwd(conv, x, pos_embed, conv_bias, cls, cls_bias, *args)
