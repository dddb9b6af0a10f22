"""Triton kernels of the epilogue (forward, backward, the fixed-order column sums), with their launchers."""
from typing import Sequence, Tuple

from ..._triton import tl, triton
from ...ragged import Ragged, row_starts
from ...reference.layer_norm import compute_dtype
from ..rsr_im2col.triton_kernels import _sample_width


def pool_out_grid(grid: Sequence[int], stride: int) -> Tuple[int, int]:
    """(ceil(H / stride), ceil(W / stride)): the pooled shortcut's grid."""
    return -(-grid[0] // stride), -(-grid[1] // stride)


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
