"""Registration of the op: its backend entry, the bridge to the C++ kernels in `csrc/` (with their fake kernels), the
auto pick of the CUDA forward, the argument checks, and the Python custom ops `resnas::ragged_attention_fwd / _bwd`
(fake implementations, autograd) that the reference, Triton and cuda backends run."""
import functools
from typing import List, Optional, Tuple

import torch

from ... import _ext, config
from ...backend import BackendUnavailableError, OpInfo, get_backend, register_op, resolve_backend, why_unavailable
from ...ragged import Ragged
from ...reference.attention import levit_query_resolution
from ...reference.layer_norm import compute_dtype
from .._checks import check_groups, check_same_device, check_tensor
from .auto_pick import AutoPicker, bucket, versions
from .reference_backend import _reference_bwd, _reference_fwd
from .triton_kernels import _bias_chunk, _triton_bwd, _triton_fwd

OP = register_op(OpInfo(
    name="ragged_attention",
    backends=("triton", "cpu", "cuda"),
    # Triton has fwd + bwd; the CUDA C++ op is a forward only. Under auto, the forward is then picked per shape by
    # measurement between the two (FWD_PICKER below); this order is the fallback when Triton is missing.
    auto_cuda=("triton", "cuda"),
    ext_ops=("ext_ragged_attention_fwd", "ext_ragged_attention_bwd"),
))

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


# ---------------------------------------------------------------------------------------------------------------------
# C++ backends (csrc/cpu/ragged_attention.cpp; csrc/cuda/ragged_attention_fwd.cu is a forward only)
# ---------------------------------------------------------------------------------------------------------------------
_CUDA_MAX_GROUPS = 256  # kMaxGroups of csrc/cuda/ragged_attention_fwd.cu: group starts travel in the kernel parameters


def _cuda_fwd_supported(q, k, v, num_groups: int) -> bool:
    """Shapes the CUDA C++ warp-per-row forward takes (csrc/cuda/ragged_attention_fwd.cu: kMaxKeysPerLane,
    kMaxOutPerLane, kMaxSmemBytes, kMaxGroups); the others run the Triton forward."""
    n_k, d_qk, d_v = k.shape[1], q.shape[3], v.shape[3]
    smem = 4 * (n_k * (d_qk + 1) + n_k * d_v + 8 * (d_qk + n_k))
    return n_k <= 256 and d_qk <= 128 and d_v <= 128 and smem <= 96 * 1024 and num_groups <= _CUDA_MAX_GROUPS


def _ext_fwd(q, k, v, table, index, dense, sizes: List[int], widths: torch.Tensor, scale: float, grid: List[int]):
    if q.is_cuda and not _cuda_fwd_supported(q, k, v, len(sizes)):
        return _triton_fwd(q, k, v, table, index, dense, sizes, widths, scale, grid)
    return torch.ops.resnas.ext_ragged_attention_fwd(q, k, v, table, index, dense, sizes, widths, scale, grid)


def _ext_bwd(dout, q, k, v, out, lse, table, index, dense, sizes: List[int], widths: torch.Tensor, scale: float,
             grid: List[int], need_table: bool, need_dense: bool):
    chunk = _bias_chunk(q.shape[0], dense is not None and dense.dim() == 4)
    return torch.ops.resnas.ext_ragged_attention_bwd(dout, q, k, v, out, lse, table, index, dense, sizes, widths,
                                                     scale, grid, need_table, need_dense, chunk)


def _fwd_outputs(q, v):
    """Empty (out, lse) of a forward: the fake implementations' outputs."""
    batch, n_q, h_max, _ = q.shape
    return (q.new_empty((batch, n_q, h_max * v.shape[3])),
            q.new_empty((batch, h_max, n_q), dtype=compute_dtype(q.dtype)))


def _bwd_outputs(q, k, v, bias_table, dense_bias, need_table_grad: bool, need_dense_grad: bool):
    """Empty (dq, dk, dv, dtable, ddense) of a backward: the fake implementations' outputs."""
    dtable = (bias_table.new_empty(bias_table.shape) if (bias_table is not None and need_table_grad)
              else q.new_empty((0,)))
    ddense = (dense_bias.new_empty(dense_bias.shape) if (dense_bias is not None and need_dense_grad)
              else q.new_empty((0,)))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dtable, ddense


def _check_bwd_tensors(q, v, dout, out, lse) -> None:
    batch, n_q, h_max, _ = q.shape
    for name, t, shape, dtype in (("dout", dout, (batch, n_q, h_max * v.shape[3]), q.dtype),
                                  ("out", out, (batch, n_q, h_max * v.shape[3]), q.dtype),
                                  ("lse", lse, (batch, h_max, n_q), compute_dtype(q.dtype))):
        check_tensor(t, name)
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"{name} must have shape {shape} and dtype {dtype}, got {tuple(t.shape)} {t.dtype}")


def _ext_fwd_fake(q, k, v, bias_table, bias_index, dense_bias, sizes, widths, scale, grid):
    # The C++ kernel's checks, at trace time (torch.compile runs this instead of the kernel); values are not read.
    _check_args(q, k, v, Ragged(tuple(sizes), widths), scale, bias_table, bias_index, tuple(grid) if grid else None,
                dense_bias)
    return _fwd_outputs(q, v)


def _ext_bwd_fake(dout, q, k, v, out, lse, bias_table, bias_index, dense_bias, sizes, widths, scale, grid,
                  need_table_grad, need_dense_grad, chunk):
    _check_args(q, k, v, Ragged(tuple(sizes), widths), scale, bias_table, bias_index, tuple(grid) if grid else None,
                dense_bias)
    _check_bwd_tensors(q, v, dout, out, lse)
    return _bwd_outputs(q, k, v, bias_table, dense_bias, need_table_grad, need_dense_grad)


_ext_fakes_registered = False


@torch.compiler.assume_constant_result
def _register_ext_fakes() -> bool:
    """Registers the fake kernels of the C++ ops `resnas::ext_ragged_attention_fwd/_bwd` once, on the first call that
    takes the C++ path (the ops exist only once the extension is loaded, which happens lazily). torch.compile runs it
    at trace time instead of tracing it (`assume_constant_result`), before the op it is needed for is traced."""
    global _ext_fakes_registered
    if not _ext_fakes_registered:
        torch.library.register_fake("resnas::ext_ragged_attention_fwd", _ext_fwd_fake)
        torch.library.register_fake("resnas::ext_ragged_attention_bwd", _ext_bwd_fake)
        _ext_fakes_registered = True
    return True


_FWD = {"reference": _reference_fwd, "triton": _triton_fwd, "cpu": _ext_fwd, "cuda": _ext_fwd}

# Auto dispatch of the CUDA forward (backend auto, CUDA tensors, a shape both kernels take): the Triton forward and the
# CUDA C++ one are timed once per key on the real inputs (CUDA events) and the faster is kept; Triton stays unless the
# CUDA C++ kernel is > 5% faster (see `auto_pick`). `config.set_attention_fwd` / RESNAS_ATTENTION_FWD=triton|cuda|auto
# overrides the measurement; `config.set_autotune_cache` / RESNAS_AUTOTUNE_CACHE=path.json keeps decisions across
# processes. The backward always runs Triton on CUDA.
FWD_PICKER = AutoPicker("ragged_attention_fwd", ("triton", "cuda"), override=config.attention_fwd)


@functools.lru_cache(maxsize=None)
def _device_name(index: Optional[int]) -> str:
    return torch.cuda.get_device_name(index)


def _fwd_key(q, k, v, table, index, dense, num_groups: int, grid: List[int]):
    """What the winner depends on: sequence lengths, head dims, heads, batch bucket, dtype, bias kind, whether the
    CUDA kernel can take the group count, the GPU and the library versions. Static shapes only: the head counts are
    device metadata (never read here) and only change the work per sample."""
    bias = "grid" if grid else ("index" if index is not None else ("dense%d" % dense.dim() if dense is not None
                                                                   else "none"))
    return (q.shape[1], k.shape[1], q.shape[2], q.shape[3], v.shape[3], bucket(q.shape[0]), str(q.dtype), bias,
            num_groups <= _CUDA_MAX_GROUPS, _device_name(q.device.index), *versions())


def _auto_cuda_fwd(q, k, v, table, index, dense, sizes: List[int], widths: torch.Tensor, scale: float,
                   grid: List[int]):
    args = (q, k, v, table, index, dense, sizes, widths, scale, grid)
    runners = {"triton": lambda: _triton_fwd(*args)}
    if why_unavailable(OP, "cuda", q.device) is None and _cuda_fwd_supported(q, k, v, len(sizes)):
        runners["cuda"] = lambda: _ext_fwd(*args)
    decision = FWD_PICKER.pick(_fwd_key(q, k, v, table, index, dense, len(sizes), grid), runners)
    return runners[decision.winner]()


# The CUDA C++ op is a forward only: on the cuda backend the backward runs the Triton kernels.
_BWD = {"reference": _reference_bwd, "triton": _triton_bwd, "cpu": _ext_bwd, "cuda": _triton_bwd}


# ---------------------------------------------------------------------------------------------------------------------
# torch.library custom ops of the Python backends (reference, triton, and cuda, whose backward is Triton): opaque to
# torch.compile, with fake implementations and autograd. The cpu backend's public path is the C++ op
# `resnas::ragged_attention` instead (one dispatcher hop); these ops also run it, for direct callers.
# ---------------------------------------------------------------------------------------------------------------------
def _backend_for(q: torch.Tensor) -> str:
    # get_backend() is read here, in code torch.compile traces, so a compiled graph is guarded on the requested
    # backend; the resolution itself (extension loading, availability) runs as a trace-time constant.
    return _resolve_backend(get_backend(), q.device, q.dtype)


@torch.compiler.assume_constant_result
def _resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    return _resolve_backend_cached(requested, device, dtype)


@functools.lru_cache(maxsize=64)
def _resolve_backend_cached(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs this call (`requested` is `get_backend()`, which `resolve_backend` applies). Cached: what
    can run where is fixed once the extension and Triton have been looked for (both are loaded once per process)."""
    backend = resolve_backend(OP.name, device)
    if backend == "triton" and dtype == torch.bfloat16 and _ext.triton_interpreting():
        raise BackendUnavailableError(
            "ragged_attention: bf16 on the Triton backend under TRITON_INTERPRET=1 is refused: Triton's interpreter "
            "computes bf16 tl.dot wrongly. Use fp16 / fp32 there, or another backend (reference, cpu)")
    # The GPU kernels take fp32 / bf16 / fp16; fp64 (gradient checking) runs the reference there.
    return "reference" if (dtype == torch.float64 and backend in ("triton", "cuda")) else backend


def _check_index_values(index: Optional[torch.Tensor], table: Optional[torch.Tensor]) -> None:
    """Values of bias_index must lie in [0, T). Runs inside the op body, so it also runs under torch.compile."""
    if index is None or table is None or index.numel() == 0:
        return
    lo, hi = int(index.min()), int(index.max())  # one device sync on CUDA
    if lo < 0 or hi >= table.shape[1]:
        raise ValueError(f"bias_index values must lie in [0, T) = [0, {table.shape[1]}) (T = bias_table.shape[1]), "
                         f"got values in [{lo}, {hi}]")


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


@torch.library.custom_op("resnas::ragged_attention_fwd", mutates_args=())
def ragged_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: Optional[torch.Tensor],
                         bias_index: Optional[torch.Tensor], dense_bias: Optional[torch.Tensor], sizes: List[int],
                         widths: torch.Tensor, scale: float, grid: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (B, Nq, H_max * d_v), lse (B, H_max, Nq) fp32 / fp64). `widths` is the int32 (G,) heads tensor on
    q's device; `grid` is [R, s] or [] (see `ragged_attention`); with a grid, bias_index is None."""
    _check_args(q, k, v, Ragged(tuple(sizes), widths), scale, bias_table, bias_index, tuple(grid) if grid else None,
                dense_bias)
    _check_index_values(bias_index, bias_table)
    if bias_index is not None:
        bias_index = bias_index.to(torch.int32).contiguous()  # the kernels read int32 (checked to fit above)
    table, dense = _contiguous(bias_table), _contiguous(dense_bias)
    backend = _backend_for(q)
    if q.is_cuda and backend in ("triton", "cuda") and get_backend() == "auto":
        return _auto_cuda_fwd(q, k, v, table, bias_index, dense, sizes, widths, scale, grid)
    return _FWD[backend](q, k, v, table, bias_index, dense, sizes, widths, scale, grid)


@ragged_attention_fwd.register_fake
def _(q, k, v, bias_table, bias_index, dense_bias, sizes, widths, scale, grid):
    return _fwd_outputs(q, v)


@torch.library.custom_op("resnas::ragged_attention_bwd", mutates_args=())
def ragged_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor, bias_table: Optional[torch.Tensor], bias_index: Optional[torch.Tensor],
                         dense_bias: Optional[torch.Tensor], sizes: List[int], widths: torch.Tensor, scale: float,
                         grid: List[int], need_table_grad: bool, need_dense_grad: bool
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv, dbias_table, ddense_bias): dq/dk/dv contiguous with q/k/v's shapes, zeros on inactive
    heads; dbias_table (H_max, T) in the table's dtype when a table is given and need_table_grad, else an empty (0,)
    tensor; ddense_bias like dense_bias when need_dense_grad, else empty."""
    _check_args(q, k, v, Ragged(tuple(sizes), widths), scale, bias_table, bias_index, tuple(grid) if grid else None,
                dense_bias)
    _check_bwd_tensors(q, v, dout, out, lse)
    if not (lse.is_contiguous() and out.is_contiguous()):
        raise ValueError("out and lse must be contiguous (as the forward returns them)")
    if bias_index is not None:
        bias_index = bias_index.to(torch.int32).contiguous()  # checked by the forward
    impl = _BWD[_backend_for(q)]
    return impl(dout.contiguous(), q, k, v, out, lse, _contiguous(bias_table), bias_index, _contiguous(dense_bias),
                sizes, widths, scale, grid, need_table_grad, need_dense_grad)


@ragged_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, bias_table, bias_index, dense_bias, sizes, widths, scale, grid, need_table_grad,
      need_dense_grad):
    return _bwd_outputs(q, k, v, bias_table, dense_bias, need_table_grad, need_dense_grad)


def _setup_context(ctx, inputs, output):
    q, k, v, bias_table, bias_index, dense_bias, sizes, widths, scale, grid = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias_table, bias_index, dense_bias, widths)
    ctx.args = (sizes, scale, grid)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, bias_table, bias_index, dense_bias, widths = ctx.saved_tensors
    sizes, scale, grid = ctx.args
    need_table = bias_table is not None and ctx.needs_input_grad[3]
    need_dense = dense_bias is not None and ctx.needs_input_grad[5]
    dq, dk, dv, dtable, ddense = ragged_attention_bwd(dout, q, k, v, out, lse, bias_table, bias_index, dense_bias,
                                                      sizes, widths, scale, grid, need_table, need_dense)
    return (dq, dk, dv, dtable if need_table else None, None, ddense if need_dense else None,
            None, None, None, None)


ragged_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------------
# Argument checks
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


def _check_args(q, k, v, heads: Ragged, scale, bias_table, bias_index, bias_grid, dense_bias,
                what: str = "widths") -> None:
    """The argument checks of `ragged_attention`, run again by the custom ops (direct calls, torch.compile) and by the
    fake kernels of the C++ ops; `csrc/ragged_attention.h` (check_args) words its checks the same way."""
    _check_qkv(q, k, v)
    if heads.on_device:
        check_same_device(q, heads.widths, "q", what)
    check_groups(heads, q.shape[0], q.shape[2], batch_of="q", width_of="q (dim 2, H_max)", what=what)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (abs(scale) < float("inf")):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    _check_bias(q, k, bias_table, bias_index, bias_grid, dense_bias)
