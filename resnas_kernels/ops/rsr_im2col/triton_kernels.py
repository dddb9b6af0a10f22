"""Triton kernels of the token-layout im2col and its adjoint, with their launchers."""
from ..._triton import tl, triton
from ...ragged import Ragged, row_starts


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
