"""Reference ragged (variable-width) linear: the oracle for every ragged-linear kernel, written for reading, not speed.

A weight-sharing supernet stores one weight W of shape (N_max, K_max); sub-network g uses its top-left slice
W[:n_g, :k_g]. `ragged_linear` runs every group of a batch through its own slice (the AutoFormer-style sliced
sub-network, one `F.linear` per group), `masked_linear` is the original ViT-ResNAS full-width formulation (one
`F.linear` over the padded batch with the whole weight, then an output mask). Under the ragged contract (x is zero
beyond k_g) the two are equal.
"""
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..ragged import Ragged

__all__ = ["ragged_linear", "masked_linear", "out_width_tuple"]

ACTIVATIONS = (None, "gelu")


def out_width_tuple(in_groups: Ragged, out_widths: Union[Ragged, Sequence[int]]) -> tuple:
    """The per-group output widths n_g as a tuple of ints (`out_widths` may be a Ragged over the same groups)."""
    if isinstance(out_widths, Ragged):
        if out_widths.sizes != in_groups.sizes:
            raise ValueError(f"out_widths and in_groups must split the batch into the same groups: "
                             f"out_widths.sizes={out_widths.sizes} vs in_groups.sizes={in_groups.sizes}")
        return out_widths.widths
    return in_groups.with_widths(out_widths).widths  # validates: one int >= 0 per group


def _activate(y: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    if activation is None:
        return y
    if activation == "gelu":
        return F.gelu(y, approximate="none")
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _per_sample(row_scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(b,) per-sample scale broadcast over the middle dims and the channels of `like` (b, ..., n)."""
    return row_scale.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def ragged_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], in_groups: Ragged,
                  out_widths: Union[Ragged, Sequence[int]], *, segments: int = 1, activation: Optional[str] = None,
                  residual: Optional[torch.Tensor] = None, row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each group's rows through the top-left slice of one shared weight, zeros beyond the group's output width.

    Spec, for x of shape (B, ..., K_max), weight (N_max, K_max) viewed as S = `segments` stacked blocks of
    Nseg = N_max // S rows, and group g owning samples [o_g, o_g + b_g) with input width k_g = in_groups.widths[g]
    and output width n_g = out_widths[g] <= Nseg:
        for each segment s, with cols_s = [s*Nseg, s*Nseg + n_g):
            h = x[o_g:o_g+b_g, ..., :k_g] @ weight[cols_s, :k_g]^T + bias[cols_s]      (F.linear on the slices)
            a = gelu(h) (exact erf form) when activation == "gelu", else h
            y[o_g:o_g+b_g, ..., cols_s] = a                                              without a residual
            y[o_g:o_g+b_g, ..., cols_s] = residual[..., cols_s] + row_scale[sample] * a  with one
                                                                                (row_scale = 1 when None)
        y[..., s*Nseg + n_g : (s+1)*Nseg] = 0 for every segment: exactly zero beyond the width, also with a residual.
    S = 1 is the plain linear; S = 3 is the qkv projection, where q, k and v are each sliced to their first n_g rows
    (heads * head_dim) separately, and y.view(B, ..., 3, Nseg) holds q, k, v with zeros beyond n_g in each.
    k_g = 0 gives act(bias) (an empty product is zero); n_g = 0 gives all-zero rows (the group skips the op).
    Columns of x beyond k_g are never read. Math runs in x's dtype with PyTorch's own F.linear / F.gelu.
    """
    n_widths = out_width_tuple(in_groups, out_widths)
    n_max = weight.shape[0]
    seg_width = n_max // segments
    outs = []
    for (start, end), k, n in zip(zip(in_groups.offsets[:-1], in_groups.offsets[1:]), in_groups.widths, n_widths):
        xg = x[start:end, ..., :k]
        pieces = []
        for s in range(segments):
            lo = s * seg_width
            h = F.linear(xg, weight[lo:lo + n, :k], None if bias is None else bias[lo:lo + n])
            a = _activate(h, activation)
            if residual is not None:
                scaled = a if row_scale is None else _per_sample(row_scale[start:end], a) * a
                a = residual[start:end, ..., lo:lo + n] + scaled
            pieces.append(F.pad(a, (0, seg_width - n)))
        outs.append(torch.cat(pieces, dim=-1))
    return torch.cat(outs, dim=0)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], in_mask: torch.Tensor,
                  out_mask: torch.Tensor, *, activation: Optional[str] = None, residual: Optional[torch.Tensor] = None,
                  row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The original ViT-ResNAS formulation: full-width `F.linear` for every sample, then multiply by the output mask.

    in_mask: broadcastable to x (B, ..., K_max), true on each sample's first k channels (the original ChannelDrop
    mask, e.g. shape (B, 1, K_max)); out_mask: broadcastable to the output (B, ..., N_max), true on the active output
    columns (for a segmented weight, the first n_g columns of every segment).
        y = act(F.linear(x * in_mask, weight, bias)) * out_mask
        y = (residual + row_scale[sample] * y) * out_mask   with a residual
    Every sample pays the full N_max x K_max GEMM; the masks throw the padded columns' work away.
    """
    y = _activate(F.linear(x * in_mask.to(x.dtype), weight, bias), activation) * out_mask.to(x.dtype)
    if residual is not None:
        scaled = y if row_scale is None else _per_sample(row_scale, y) * y
        y = (residual + scaled) * out_mask.to(x.dtype)
    return y
