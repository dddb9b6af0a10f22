"""Fused ragged multi-head attention with per-group head counts and a learnable LeViT bias table (issue 5).

Spec: `resnas_kernels.reference.ragged_attention` (the oracle). This file holds the whole op: the Triton kernels and
launchers, the bridge to the C++ kernels (`csrc/cpu/ragged_attention.cpp`, `csrc/cuda/ragged_attention_fwd.cu`), the
`torch.library` custom ops `resnas::ragged_attention_fwd/bwd` with fake implementations and autograd, and the public
`ragged_attention` function.

Backends: reference | triton | cpu (C++, fwd + bwd) | cuda (CUDA C++ forward; its backward runs the Triton kernels).

Caveats:
- q, k, v need a unit stride on the head dim only: views of a segmented (B, N, 3, H, d) qkv tensor or of LeViT's
  per-head interleaved (B, N, H, 2D + d_v) tensor are read in place, without copies.
- The forward also returns the per-row log-sum-exp (B, H_max, Nq), fp32 (fp64 for fp64 inputs), 0 on inactive heads;
  the backward recomputes the probabilities from it (no (Nq, Nk) tensor is saved).
- Softmax, scores and every accumulation are fp32 (fp64 for fp64 inputs) whatever the input dtype.
- The bias-table gradient is deterministic: every (sample chunk, head) task accumulates its samples' score gradients
  into its own partial buffer, sequentially, and the partials are summed in a fixed order (chunk size depends on the
  shape only). No float atomics, no (B, H, Nq, Nk) tensor (except the gradient of a per-sample dense bias, which is
  that tensor). The Triton backward keeps a (chunks, H, Nq, Nk) fp32 partial of the score gradient (chunks = B / 8 or
  fewer) and maps it to the table with a fixed-order segmented sum.
- bias_index values are checked against [0, T) in eager calls (one device sync on CUDA: prefer bias_grid there, which
  computes the index in-kernel). The kernels also mask out-of-range table reads, so a bad index can never read out of
  bounds.
- Double backward is not supported.
"""
from typing import List, Optional, Tuple

import torch

from .. import _ext
from .._triton import tl, triton
from ..aot import register_aot
from ..backend import OpInfo, register_op, resolve_backend
from ..ragged import Ragged, as_ragged
from ..reference.attention import levit_bias_index, levit_query_resolution
from ..reference.layer_norm import compute_dtype
from ._checks import check_same_device, check_tensor

OP = register_op(OpInfo(
    name="ragged_attention",
    backends=("triton", "cpu", "cuda"),
    # No GPU was available when this op was written: the order is a guess (Triton has fwd + bwd; the CUDA C++ op is a
    # forward only). Re-rank with `resnas bench --case ragged_attention` on a GPU.
    auto_cuda=("triton", "cuda"),
    ext_ops=("ext_ragged_attention_fwd", "ext_ragged_attention_bwd"),
))

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


# ---------------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------------
def _bias_chunk(batch: int, per_sample_dense: bool) -> int:
    """Samples per backward task whose score gradients are summed into one partial bias-gradient buffer.

    A function of the batch size only (never of the device or thread count), so the summation order and hence the
    bits of the bias gradient depend only on the input shape. A per-sample dense bias needs its own gradient per
    sample (chunk 1). Otherwise 8 samples per chunk keeps the partial buffer at 1/8 of a (B, H, Nq, Nk) tensor and
    still leaves B / 8 * H tasks to run in parallel.
    """
    return 1 if per_sample_dense else max(1, min(8, batch))


def _grid_index(grid: List[int], device) -> torch.Tensor:
    return levit_bias_index(int(grid[0]), int(grid[1]), device=device)


# ---------------------------------------------------------------------------------------------------------------------
# Reference backend of the op (explicit log-sum-exp and backward formula, plain PyTorch)
# ---------------------------------------------------------------------------------------------------------------------
def _group_bias(table, index, dense, grid, start: int, end: int, h: int, acc, device):
    """Bias of group rows [start, end) and heads [0, h), broadcastable to (b_g, h, Nq, Nk), or None."""
    if table is not None:
        idx = _grid_index(grid, device) if grid else index.long()
        return table[:h][:, idx].to(acc)[None]
    if dense is not None:
        bg = dense[start:end] if dense.dim() == 4 else dense[None]
        return (bg[:, :h] if bg.shape[1] != 1 else bg).to(acc)
    return None


def _reference_fwd(q, k, v, table, index, dense, groups: Ragged, scale: float, grid: List[int]):
    batch, n_q, h_max, _ = q.shape
    d_v = v.shape[3]
    acc = compute_dtype(q.dtype)
    out = q.new_zeros((batch, n_q, h_max, d_v))
    lse = q.new_zeros((batch, h_max, n_q), dtype=acc)
    for (start, end), h in zip(zip(groups.offsets[:-1], groups.offsets[1:]), groups.widths):
        if h == 0 or end == start:
            continue
        qg, kg, vg = (t[start:end, :, :h].transpose(1, 2).to(acc) for t in (q, k, v))
        s = (qg @ kg.transpose(-2, -1)) * scale
        bias = _group_bias(table, index, dense, grid, start, end, h, acc, q.device)
        if bias is not None:
            s = s + bias
        row_lse = torch.logsumexp(s, dim=-1)                                # (b_g, h, Nq)
        o = torch.exp(s - row_lse[..., None]) @ vg                          # (b_g, h, Nq, d_v)
        out[start:end, :, :h] = o.transpose(1, 2).to(q.dtype)
        lse[start:end, :h] = row_lse
    return out.view(batch, n_q, h_max * d_v), lse


def _reference_bwd(dout, q, k, v, out, lse, table, index, dense, groups: Ragged, scale: float, grid: List[int],
                   need_table: bool, need_dense: bool):
    batch, n_q, h_max, d_qk = q.shape
    n_k, d_v = k.shape[1], v.shape[3]
    acc = compute_dtype(q.dtype)
    dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    ds_sum = q.new_zeros((h_max, n_q, n_k), dtype=acc)                     # sum over samples (table / shared dense)
    ddense = torch.zeros_like(dense, dtype=acc) if (need_dense and dense is not None) else None
    do4 = dout.reshape(batch, n_q, h_max, d_v)
    o4 = out.reshape(batch, n_q, h_max, d_v)
    for (start, end), h in zip(zip(groups.offsets[:-1], groups.offsets[1:]), groups.widths):
        if h == 0 or end == start:
            continue
        qg, kg, vg, dog, og = (t[start:end, :, :h].transpose(1, 2).to(acc) for t in (q, k, v, do4, o4))
        s = (qg @ kg.transpose(-2, -1)) * scale
        bias = _group_bias(table, index, dense, grid, start, end, h, acc, q.device)
        if bias is not None:
            s = s + bias
        p = torch.exp(s - lse[start:end, :h, :, None].to(acc))              # (b_g, h, Nq, Nk)
        delta = (dog * og).sum(-1, keepdim=True)                            # D_i = dO_i . O_i
        ds = p * (dog @ vg.transpose(-2, -1) - delta)                       # dS = P * (dP - D)
        dq[start:end, :, :h] = (ds @ kg * scale).transpose(1, 2).to(q.dtype)
        dk[start:end, :, :h] = (ds.transpose(-2, -1) @ qg * scale).transpose(1, 2).to(k.dtype)
        dv[start:end, :, :h] = (p.transpose(-2, -1) @ dog).transpose(1, 2).to(v.dtype)
        ds_sum[:h] += ds.sum(0)
        if ddense is not None and dense.dim() == 4:
            ddense[start:end, :h] = ds
    dtable = q.new_empty((0,))
    if need_table and table is not None:
        idx = (_grid_index(grid, q.device) if grid else index.long()).reshape(-1)
        # index_add_ is sequential on CPU; on CUDA it uses atomics (the reference backend is not a kernel).
        dtable = torch.zeros((h_max, table.shape[1]), dtype=acc, device=q.device)
        dtable = dtable.index_add_(1, idx, ds_sum.reshape(h_max, -1)).to(table.dtype)
    if ddense is None:
        ddense = q.new_empty((0,))
    else:
        if dense.dim() == 3:
            ddense = ds_sum if dense.shape[0] == h_max else ds_sum.sum(0, keepdim=True)
        ddense = ddense.to(dense.dtype)
    return dq, dk, dv, dtable, ddense


# ---------------------------------------------------------------------------------------------------------------------
# C++ backends (csrc/cpu/ragged_attention.cpp; csrc/cuda/ragged_attention_fwd.cu is a forward only)
# ---------------------------------------------------------------------------------------------------------------------
def _ext_fwd(q, k, v, table, index, dense, groups: Ragged, scale: float, grid: List[int]):
    return torch.ops.resnas.ext_ragged_attention_fwd(q, k, v, table, index, dense, list(groups.sizes),
                                                     list(groups.widths), scale, list(grid))


def _ext_bwd(dout, q, k, v, out, lse, table, index, dense, groups: Ragged, scale: float, grid: List[int],
             need_table: bool, need_dense: bool):
    chunk = _bias_chunk(q.shape[0], dense is not None and dense.dim() == 4)
    return torch.ops.resnas.ext_ragged_attention_bwd(dout, q, k, v, out, lse, table, index, dense,
                                                     list(groups.sizes), list(groups.widths), scale, list(grid),
                                                     need_table, need_dense, chunk)


_FWD = {"reference": _reference_fwd, "cpu": _ext_fwd, "cuda": _ext_fwd}
_BWD = {"reference": _reference_bwd, "cpu": _ext_bwd}


# ---------------------------------------------------------------------------------------------------------------------
# torch.library custom ops (opaque to torch.compile, with fake implementations and autograd)
# ---------------------------------------------------------------------------------------------------------------------
def _check_index_values(index: Optional[torch.Tensor], table: Optional[torch.Tensor]) -> None:
    """Values of bias_index must lie in [0, T). Runs inside the op body, so it also runs under torch.compile."""
    if index is None or table is None or index.numel() == 0:
        return
    lo, hi = int(index.min()), int(index.max())  # one device sync on CUDA
    if lo < 0 or hi >= table.shape[1]:
        raise ValueError(f"bias_index values must lie in [0, T) = [0, {table.shape[1]}) (T = bias_table.shape[1]), "
                         f"got values in [{lo}, {hi}]")


@torch.library.custom_op("resnas::ragged_attention_fwd", mutates_args=())
def ragged_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: Optional[torch.Tensor],
                         bias_index: Optional[torch.Tensor], dense_bias: Optional[torch.Tensor], sizes: List[int],
                         widths: List[int], scale: float, grid: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (B, Nq, H_max * d_v), lse (B, H_max, Nq) fp32 / fp64). `grid` is [R, s] or [] (see
    `ragged_attention`); with a grid, bias_index is None."""
    _check_index_values(bias_index, bias_table)
    if bias_index is not None:
        bias_index = bias_index.to(torch.int32).contiguous()  # the kernels read int32 (checked to fit above)
    groups = Ragged(tuple(sizes), tuple(widths))
    impl = _FWD[resolve_backend(OP.name, q.device)]
    return impl(q, k, v, bias_table, bias_index, dense_bias, groups, scale, grid)


@ragged_attention_fwd.register_fake
def _(q, k, v, bias_table, bias_index, dense_bias, sizes, widths, scale, grid):
    batch, n_q, h_max, _ = q.shape
    out = q.new_empty((batch, n_q, h_max * v.shape[3]))
    return out, q.new_empty((batch, h_max, n_q), dtype=compute_dtype(q.dtype))


@torch.library.custom_op("resnas::ragged_attention_bwd", mutates_args=())
def ragged_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor, bias_table: Optional[torch.Tensor], bias_index: Optional[torch.Tensor],
                         dense_bias: Optional[torch.Tensor], sizes: List[int], widths: List[int], scale: float,
                         grid: List[int], need_table_grad: bool, need_dense_grad: bool
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv, dbias_table, ddense_bias): dq/dk/dv contiguous with q/k/v's shapes, zeros on inactive
    heads; dbias_table (H_max, T) in the table's dtype when a table is given and need_table_grad, else an empty (0,)
    tensor; ddense_bias like dense_bias when need_dense_grad, else empty."""
    if bias_index is not None:
        bias_index = bias_index.to(torch.int32).contiguous()  # checked by the forward
    groups = Ragged(tuple(sizes), tuple(widths))
    impl = _BWD[resolve_backend(OP.name, q.device)]
    return impl(dout.contiguous(), q, k, v, out, lse, bias_table, bias_index, dense_bias, groups, scale, grid,
                need_table_grad, need_dense_grad)


@ragged_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, bias_table, bias_index, dense_bias, sizes, widths, scale, grid, need_table_grad,
      need_dense_grad):
    dtable = (bias_table.new_empty(bias_table.shape) if (bias_table is not None and need_table_grad)
              else q.new_empty((0,)))
    ddense = (dense_bias.new_empty(dense_bias.shape) if (dense_bias is not None and need_dense_grad)
              else q.new_empty((0,)))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dtable, ddense


def _setup_context(ctx, inputs, output):
    q, k, v, bias_table, bias_index, dense_bias, sizes, widths, scale, grid = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias_table, bias_index, dense_bias)
    ctx.args = (sizes, widths, scale, grid)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, bias_table, bias_index, dense_bias = ctx.saved_tensors
    sizes, widths, scale, grid = ctx.args
    need_table = bias_table is not None and ctx.needs_input_grad[3]
    need_dense = dense_bias is not None and ctx.needs_input_grad[5]
    dq, dk, dv, dtable, ddense = ragged_attention_bwd(dout, q, k, v, out, lse, bias_table, bias_index, dense_bias,
                                                      sizes, widths, scale, grid, need_table, need_dense)
    return (dq, dk, dv, dtable if need_table else None, None, ddense if need_dense else None,
            None, None, None, None)


ragged_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------------------
def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, N, H_max, d), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must have dtype in {[str(d) for d in _FLOAT_DTYPES]}, got {t.dtype}")
        if t.shape[3] > 1 and t.stride(3) != 1:
            raise ValueError(f"{name} must have unit stride on its last (head) dim, got strides {t.stride()}; "
                             f"other strides may be arbitrary (views of a qkv tensor are fine)")
    for name, t in (("k", k), ("v", v)):
        check_same_device(q, t, "q", name)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype ({q.dtype}), got {t.dtype}")
    names = "q (B, Nq, H_max, d_qk), k (B, Nk, H_max, d_qk), v (B, Nk, H_max, d_v)"
    shapes = f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k and v must have the same batch size (dim 0): expected {names}, {shapes}")
    if not (q.shape[2] == k.shape[2] == v.shape[2]):
        raise ValueError(f"q, k and v must have the same number of heads H_max (dim 2): expected {names}, {shapes}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head dim d_qk (dim 3): expected {names}, {shapes}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of keys Nk (dim 1): expected {names}, {shapes}")
    if min(q.shape[1], k.shape[1], q.shape[3], v.shape[3]) < 1:
        raise ValueError(f"Nq, Nk, d_qk and d_v must be >= 1, {shapes}")


def _check_bias(q, k, bias_table, bias_index, bias_grid, dense_bias):
    batch, n_q, h_max, _ = q.shape
    n_k = k.shape[1]
    if bias_table is not None and dense_bias is not None:
        raise ValueError("give at most one bias: bias_table (with bias_index or bias_grid) or dense_bias, not both")
    if bias_table is None:
        if bias_index is not None or bias_grid is not None:
            raise ValueError("bias_index / bias_grid index a bias_table, but bias_table is None")
    else:
        check_tensor(bias_table, "bias_table")
        if bias_table.dim() != 2 or bias_table.shape[0] != h_max or bias_table.shape[1] < 1:
            raise ValueError(f"bias_table must have shape (H_max, T) = ({h_max}, T >= 1) (H_max = q.shape[2]), got "
                             f"{tuple(bias_table.shape)}")
        if bias_table.dtype not in (q.dtype, torch.float32):
            raise TypeError(f"bias_table must have q's dtype ({q.dtype}) or float32, got {bias_table.dtype}")
        check_same_device(q, bias_table, "q", "bias_table")
        if (bias_index is None) == (bias_grid is None):
            raise ValueError("with bias_table, give exactly one of bias_index (Nq, Nk) or bias_grid (R, stride), "
                             f"got {'both' if bias_index is not None else 'neither'}")
        if bias_index is not None:
            check_tensor(bias_index, "bias_index")
            if tuple(bias_index.shape) != (n_q, n_k):
                raise ValueError(f"bias_index must have shape (Nq, Nk) = ({n_q}, {n_k}), got {tuple(bias_index.shape)}")
            if bias_index.dtype not in _INDEX_DTYPES:
                raise TypeError(f"bias_index must be an integer tensor (int64 or int32), got {bias_index.dtype}")
            check_same_device(q, bias_index, "q", "bias_index")
        else:
            ok = (isinstance(bias_grid, (tuple, list)) and len(bias_grid) == 2
                  and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in bias_grid))
            if not ok:
                raise ValueError(f"bias_grid must be a pair of ints (R, stride) >= 1, got {bias_grid!r}")
            r, s = bias_grid
            rq = levit_query_resolution(r, s)
            if n_k != r * r or n_q != rq * rq:
                raise ValueError(f"bias_grid=({r}, {s}) means Nk = R^2 = {r * r} keys and Nq = ((R-1)//s+1)^2 = "
                                 f"{rq * rq} queries, got Nq={n_q}, Nk={n_k}")
            if bias_table.shape[1] < r * r:
                raise ValueError(f"bias_grid=({r}, {s}) indexes offsets up to R^2 - 1 = {r * r - 1}, so bias_table "
                                 f"needs T >= {r * r} columns, got T={bias_table.shape[1]}")
    if dense_bias is not None:
        check_tensor(dense_bias, "dense_bias")
        ok3 = dense_bias.dim() == 3 and dense_bias.shape[0] in (1, h_max) and tuple(dense_bias.shape[1:]) == (n_q, n_k)
        ok4 = dense_bias.dim() == 4 and tuple(dense_bias.shape) == (batch, h_max, n_q, n_k)
        if not (ok3 or ok4):
            raise ValueError(f"dense_bias must have shape (1 or H_max, Nq, Nk) = (1|{h_max}, {n_q}, {n_k}) or "
                             f"(B, H_max, Nq, Nk) = ({batch}, {h_max}, {n_q}, {n_k}), got {tuple(dense_bias.shape)}")
        if dense_bias.dtype not in (q.dtype, torch.float32):
            raise TypeError(f"dense_bias must have q's dtype ({q.dtype}) or float32, got {dense_bias.dtype}")
        check_same_device(q, dense_bias, "q", "dense_bias")


def ragged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: Optional[Ragged] = None, *,
                     scale: Optional[float] = None, bias_table: Optional[torch.Tensor] = None,
                     bias_index: Optional[torch.Tensor] = None, bias_grid: Optional[Tuple[int, int]] = None,
                     dense_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fused attention where group g of the batch runs its first h_g heads; see `reference.ragged_attention`.

    Args:
        q: (B, Nq, H_max, d_qk); k: (B, Nk, H_max, d_qk); v: (B, Nk, H_max, d_v). Same dtype and device; unit stride
            on the last dim, any other strides (e.g. `qkv.view(B, N, 3, H, d)[:, :, 0]`).
        heads: Ragged(sizes, widths) over dim 0, widths[g] = active heads h_g (None: all H_max heads everywhere).
        scale: multiplies q.k; default d_qk ** -0.5.
        bias_table: (H_max, T) learnable table (q's dtype or fp32), used with exactly one of
        bias_index: (Nq, Nk) integer tensor with values in [0, T), or
        bias_grid: (R, stride), the LeViT geometry: the index |dy| * R + |dx| is computed in-kernel (no index read).
        dense_bias: (1 | H_max, Nq, Nk) or (B, H_max, Nq, Nk) additive bias (q's dtype or fp32), instead of a table.
    Returns:
        (B, Nq, H_max * d_v) in q's dtype, head-major, zeros for heads >= h_g. Differentiable w.r.t. q, k, v,
        bias_table (deterministic) and dense_bias.
    """
    _check_qkv(q, k, v)
    batch, _, h_max, d_qk = q.shape
    heads = as_ragged(heads, batch, h_max)
    heads.check(batch, h_max, arg="q (dim 2, H_max)", what="heads.widths")
    if scale is None:
        scale = d_qk ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (abs(scale) < float("inf")):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    _check_bias(q, k, bias_table, bias_index, bias_grid, dense_bias)
    grid: List[int] = list(bias_grid) if bias_grid is not None else []
    if bias_table is not None:
        bias_table = bias_table.contiguous()
    if dense_bias is not None:
        dense_bias = dense_bias.contiguous()
    out, _ = ragged_attention_fwd(q, k, v, bias_table, bias_index, dense_bias, list(heads.sizes), list(heads.widths),
                                  float(scale), grid)
    return out
