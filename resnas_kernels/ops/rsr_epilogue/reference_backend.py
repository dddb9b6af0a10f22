"""The explicit PyTorch backend (tensor masks only: device widths never reach the host)."""
import torch
import torch.nn.functional as F

from ...ragged import Ragged
from ...reference.layer_norm import compute_dtype


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
