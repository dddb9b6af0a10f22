"""The `reference` backend of the op: explicit statistics and backward formula in plain PyTorch, on 2-D rows, with
masks built on the device from the widths tensor (no host value, no sync)."""
import torch

from ...ragged import Ragged
from ...reference.layer_norm import compute_dtype


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
    shift = diff.sum(1, keepdim=True) / count  # the rounding error of mean (corrected two-pass, package docstring)
    var = ((diff * diff).sum(1, keepdim=True) / count - shift * shift).clamp_min(0)
    rstd = torch.where(active.any(1, keepdim=True), torch.rsqrt(var + eps), torch.zeros_like(var))
    y = torch.where(active, (diff - shift) * rstd * weight.to(acc) + bias.to(acc), zero)
    z_out = z.to(x2.dtype) if r2 is not None else x2.new_empty((0,))
    return y.to(x2.dtype), z_out, mean.squeeze(1), rstd.squeeze(1)


def _reference_bwd(dy2, dz2, z2, weight, mean, rstd, groups: Ragged, rows_per_sample: int):
    acc = compute_dtype(z2.dtype)
    active = torch.arange(z2.shape[1], device=z2.device)[None, :] < _row_widths(groups, rows_per_sample, z2.device)[:, None]
    count = active.sum(1, keepdim=True).clamp_min(1).to(acc)
    zero = torch.zeros((), dtype=acc, device=z2.device)
    xhat = torch.where(active, (z2.to(acc) - mean.to(acc)[:, None]) * rstd.to(acc)[:, None], zero)
    xhat = torch.where(active, xhat - xhat.sum(1, keepdim=True) / count, zero)  # re-centred, as the forward
    dy = torch.where(active, dy2.to(acc), zero)
    wdy = dy * weight.to(acc)
    c1 = (xhat * wdy).sum(1, keepdim=True) / count
    c2 = wdy.sum(1, keepdim=True) / count
    dx = torch.where(active, (wdy - (xhat * c1 + c2)) * rstd.to(acc)[:, None], zero)
    if dz2 is not None:
        dx = dx + torch.where(active, dz2.to(acc), zero)
    return dx.to(z2.dtype), (dy * xhat).sum(0).to(weight.dtype), dy.sum(0).to(weight.dtype)
