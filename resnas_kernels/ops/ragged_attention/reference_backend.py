"""The `reference` backend of the op: explicit log-sum-exp and backward formula in plain PyTorch over the whole padded
batch."""
from typing import List

import torch

from ...ragged import sample_group_index
from ...reference.attention import levit_bias_index
from ...reference.layer_norm import compute_dtype


def _grid_index(grid: List[int], device) -> torch.Tensor:
    return levit_bias_index(int(grid[0]), int(grid[1]), device=device)


# ---------------------------------------------------------------------------------------------------------------------
# Reference backend of the op (explicit log-sum-exp and backward formula, plain PyTorch over the whole padded batch).
# The heads metadata becomes a (B, H_max) mask by tensor ops (no host read); inactive heads' inputs are replaced by
# zeros before use and their outputs by exact zeros after, so nothing of them leaks (NaN or inf included).
# ---------------------------------------------------------------------------------------------------------------------
def _active_mask(sizes: List[int], widths: torch.Tensor, h_max: int, device) -> torch.Tensor:
    """(B, H_max) bool, True where head h of sample b is active (any widths value acts as clamped to [0, H_max])."""
    sample_heads = widths[sample_group_index(sizes, device)]
    return torch.arange(h_max, device=device)[None, :] < sample_heads[:, None]


def _heads_major(t: torch.Tensor, active: torch.Tensor, acc) -> torch.Tensor:
    """(B, H, N, d) in `acc` of a (B, N, H, d) tensor, zeros on inactive heads."""
    return torch.where(active[:, None, :, None], t, 0).transpose(1, 2).to(acc)


def _full_bias(table, index, dense, grid: List[int], acc, device):
    """The bias, broadcastable to (B, H_max, Nq, Nk), in `acc`; None without one."""
    if table is not None:
        idx = _grid_index(grid, device) if grid else index.long()
        return table[:, idx].to(acc)[None]
    if dense is not None:
        return (dense if dense.dim() == 4 else dense[None]).to(acc)
    return None


def _reference_fwd(q, k, v, table, index, dense, sizes: List[int], widths: torch.Tensor, scale: float,
                   grid: List[int]):
    batch, n_q, h_max, _ = q.shape
    d_v = v.shape[3]
    acc = compute_dtype(q.dtype)
    active = _active_mask(sizes, widths, h_max, q.device)
    qa, ka, va = (_heads_major(t, active, acc) for t in (q, k, v))
    s = (qa @ ka.transpose(-2, -1)) * scale                                 # (B, H, Nq, Nk)
    bias = _full_bias(table, index, dense, grid, acc, q.device)
    if bias is not None:
        s = s + bias
    row_lse = torch.logsumexp(s, dim=-1)                                    # (B, H, Nq)
    o = torch.exp(s - row_lse[..., None]) @ va                              # (B, H, Nq, d_v)
    o = torch.where(active[:, :, None, None], o, 0)
    lse = torch.where(active[:, :, None], row_lse, 0)
    return o.transpose(1, 2).to(q.dtype).reshape(batch, n_q, h_max * d_v), lse


def _reference_bwd(dout, q, k, v, out, lse, table, index, dense, sizes: List[int], widths: torch.Tensor,
                   scale: float, grid: List[int], need_table: bool, need_dense: bool):
    batch, n_q, h_max, _ = q.shape
    d_v = v.shape[3]
    acc = compute_dtype(q.dtype)
    active = _active_mask(sizes, widths, h_max, q.device)
    qa, ka, va = (_heads_major(t, active, acc) for t in (q, k, v))
    dog, og = (_heads_major(t.reshape(batch, n_q, h_max, d_v), active, acc) for t in (dout, out))
    s = (qa @ ka.transpose(-2, -1)) * scale
    bias = _full_bias(table, index, dense, grid, acc, q.device)
    if bias is not None:
        s = s + bias
    p = torch.where(active[:, :, None, None], torch.exp(s - lse[..., None].to(acc)), 0)  # (B, H, Nq, Nk)
    delta = (dog * og).sum(-1, keepdim=True)                                # D_i = dO_i . O_i
    ds = p * (dog @ va.transpose(-2, -1) - delta)                           # dS = P * (dP - D); 0 where inactive
    dq, dk, dv = ((g.transpose(1, 2).to(t.dtype).contiguous())
                  for g, t in ((ds @ ka * scale, q), (ds.transpose(-2, -1) @ qa * scale, k),
                               (p.transpose(-2, -1) @ dog, v)))
    ds_sum = ds.sum(0)                                                      # (H, Nq, Nk): table / shared dense
    dtable = q.new_empty((0,))
    if need_table and table is not None:
        idx = (_grid_index(grid, q.device) if grid else index.long()).reshape(-1)
        # index_add_ is sequential on CPU; on CUDA it uses atomics (the reference backend is not a kernel).
        dtable = torch.zeros((h_max, table.shape[1]), dtype=acc, device=q.device)
        dtable = dtable.index_add_(1, idx, ds_sum.reshape(h_max, -1)).to(table.dtype)
    ddense = q.new_empty((0,))
    if need_dense and dense is not None:
        if dense.dim() == 4:
            ddense = ds
        else:
            ddense = ds_sum if dense.shape[0] == h_max else ds_sum.sum(0, keepdim=True)
        ddense = ddense.to(dense.dtype)
    return dq, dk, dv, dtable, ddense
