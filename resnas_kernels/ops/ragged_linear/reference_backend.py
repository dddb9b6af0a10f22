"""The `reference` backend of the op: explicit per-group formulas in plain PyTorch on 2-D rows, with the widths as
tensors (masks built on the device, no host read)."""
import torch
import torch.nn.functional as F

from ...reference.layer_norm import compute_dtype

_SQRT1_2 = 0.7071067811865476       # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)


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
