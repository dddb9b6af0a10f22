"""Reference ragged multi-head attention with a LeViT-style bias table: the oracle for every attention kernel.

Written for reading, not speed. Autograd through `ragged_attention` is the oracle of the fused backward.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..ragged import Ragged, as_ragged
from .layer_norm import compute_dtype


def levit_query_resolution(resolution: int, stride: int) -> int:
    """Side of the query grid of LeViT's shrink attention: the points 0, s, 2s, ... < R, i.e. (R - 1) // s + 1."""
    return (resolution - 1) // stride + 1


def levit_bias_index(resolution: Union[int, Tuple[int, int]], stride: int = 1, device=None) -> torch.Tensor:
    """LeViT's `attention_bias_idxs`: (Nq, Nk) int64 with idx[q, j] = |y_q - y_j| * R + |x_q - x_j|.

    Keys are the R x R grid in row-major order (token j at (y, x) = (j // R, j % R)), Nk = R^2. Queries are the
    stride-s sub-grid: query q sits at (s * (q // R'), s * (q % R')) with R' = (R - 1) // s + 1, Nq = R'^2; stride 1 is
    the plain (Nq = Nk) attention. Values lie in [0, R^2), so the bias table has R^2 columns per head
    (`../shared/reference/levit.md` section 1; identical to timm's and the official repo's buffers).
    `resolution` (R_h, R_w) is a non-square grid (the LeViT model accepts one): idx = |dy| * R_w + |dx|.
    """
    pair = resolution if isinstance(resolution, tuple) and len(resolution) == 2 else (resolution, resolution)
    for r in pair:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"resolution must be an int >= 1 or a pair of them, got {resolution!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")
    (rh, rw), (qh, qw) = pair, (levit_query_resolution(r, stride) for r in pair)
    q = torch.arange(qh * qw, device=device)
    j = torch.arange(rh * rw, device=device)
    qy, qx = (q // qw) * stride, (q % qw) * stride
    ky, kx = j // rw, j % rw
    return (qy[:, None] - ky[None, :]).abs() * rw + (qx[:, None] - kx[None, :]).abs()


def gather_bias(bias_table: torch.Tensor, bias_index: torch.Tensor) -> torch.Tensor:
    """(H, T) table and (Nq, Nk) index -> (H, Nq, Nk) bias: bias[h, i, j] = table[h, index[i, j]]."""
    return bias_table[:, bias_index]


def _bias_for(q: torch.Tensor, k: torch.Tensor, bias_table, bias_index, bias_grid, dense_bias):
    """The additive (1|H|B, H, Nq, Nk)-broadcastable bias, or None. bias_grid is resolved to an index here."""
    if bias_table is not None:
        if bias_grid is not None:
            bias_index = levit_bias_index(int(bias_grid[0]), int(bias_grid[1]), device=q.device)
        return gather_bias(bias_table, bias_index)  # (H, Nq, Nk)
    return dense_bias


def ragged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: Optional[Ragged] = None, *,
                     scale: Optional[float] = None, bias_table: Optional[torch.Tensor] = None,
                     bias_index: Optional[torch.Tensor] = None, bias_grid: Optional[Tuple[int, int]] = None,
                     dense_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-head attention where group g of the batch runs only its first h_g heads.

    Spec. q: (B, Nq, H_max, d_qk), k: (B, Nk, H_max, d_qk), v: (B, Nk, H_max, d_v) (any strides). heads =
    Ragged(sizes, widths) over dim 0 with widths[g] = h_g active heads (None: every head of every sample). For a
    sample b of group g and a head h < h_g:
        scores[i, j] = (q[b, i, h] . k[b, j, h]) * scale + bias[h, i, j]       scale defaults to d_qk ** -0.5
        out[b, i, h * d_v:(h + 1) * d_v] = softmax_j(scores[i, :]) @ v[b, :, h]
    and out[b, :, h * d_v:] = 0 for h >= h_g. Output (B, Nq, H_max * d_v), head-major (ready for the output
    projection), in q's dtype. Scores and softmax run in fp32 (fp64 for fp64 inputs).

    Bias (at most one kind):
        bias_table (H_max, T) with bias_index (Nq, Nk) integer in [0, T): bias[h, i, j] = table[h, index[i, j]];
        bias_table with bias_grid = (R, s) instead: the index is `levit_bias_index(R, s)` (Nk = R^2, Nq = R'^2);
        dense_bias (1 | H_max, Nq, Nk) or (B, H_max, Nq, Nk), added as is.
    The bias is added after scaling and is not scaled (LeViT, SDPA attn_mask). Gradients flow to q, k, v and to
    bias_table / dense_bias; inactive heads get zero gradients.
    """
    batch, h_max, d_qk = q.shape[0], q.shape[2], q.shape[3]
    heads = as_ragged(heads, batch, h_max)
    scale = d_qk ** -0.5 if scale is None else scale
    acc = compute_dtype(q.dtype)
    bias = _bias_for(q, k, bias_table, bias_index, bias_grid, dense_bias)
    d_v, n_q = v.shape[3], q.shape[1]
    outs = []
    for (start, end), h in zip(zip(heads.offsets[:-1], heads.offsets[1:]), heads.widths):
        # Per group: (b_g, h_g, N, d) in the accumulation dtype, only the active heads.
        qg = q[start:end, :, :h].transpose(1, 2).to(acc)
        kg = k[start:end, :, :h].transpose(1, 2).to(acc)
        vg = v[start:end, :, :h].transpose(1, 2).to(acc)
        scores = (qg @ kg.transpose(-2, -1)) * scale
        if bias is not None:
            bg = bias[start:end] if bias.dim() == 4 else bias[None]  # (b_g | 1, H_max | 1, Nq, Nk)
            if bg.shape[1] != 1:
                bg = bg[:, :h]                                       # the group's heads only
            scores = scores + bg.to(acc)
        out = scores.softmax(dim=-1) @ vg                                   # (b_g, h_g, Nq, d_v)
        out = F.pad(out.transpose(1, 2), (0, 0, 0, h_max - h))              # (b_g, Nq, H_max, d_v)
        outs.append(out.reshape(end - start, n_q, h_max * d_v).to(q.dtype))
    return torch.cat(outs, dim=0)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_mask: torch.Tensor, *,
                     scale: Optional[float] = None, bias_table: Optional[torch.Tensor] = None,
                     bias_index: Optional[torch.Tensor] = None, bias_grid: Optional[Tuple[int, int]] = None,
                     dense_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The original full-heads approach: compute every head of every sample, then zero the inactive heads.

    head_mask: (B, H_max), true (or 1) on each sample's active heads (e.g. `Ragged.mask(H_max)`). Same math and output
    as `ragged_attention`, but the cost is that of all H_max heads for every sample (the supernet baseline).
    """
    batch, n_q, h_max, d_qk = q.shape
    d_v = v.shape[3]
    scale = d_qk ** -0.5 if scale is None else scale
    acc = compute_dtype(q.dtype)
    bias = _bias_for(q, k, bias_table, bias_index, bias_grid, dense_bias)
    scores = (q.transpose(1, 2).to(acc) @ k.permute(0, 2, 3, 1).to(acc)) * scale   # (B, H, Nq, Nk)
    if bias is not None:
        scores = scores + bias.to(acc)
    out = scores.softmax(dim=-1) @ v.transpose(1, 2).to(acc)                        # (B, H, Nq, d_v)
    out = out * head_mask.to(acc)[:, :, None, None]
    return out.transpose(1, 2).reshape(batch, n_q, h_max * d_v).to(q.dtype)
