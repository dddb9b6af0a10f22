"""Residual spatial reduction (RSR): the ragged block between ViT-ResNAS stages, fused on the token layout.

Spec: `resnas_kernels.reference.residual_spatial_reduction` (the oracle; vit_resnas.md section 2, 4.5, 9.2(g)).

The fused path is four registered custom ops chained by autograd, with no (B, C, H, W) layout anywhere:

    u    = ragged_layer_norm(x)                                   LN over each group's first ci channels, all tokens
    cols = rsr_im2col(u)                  (B, Ho*Wo, Ci_max*k*k)  token-layout im2col, channel-major / tap-minor
    conv = ragged_linear(cols, conv_weight.view(Co_max, -1))     the conv as ONE ragged GEMM: group g uses the
                                                                  top-left block [:co, :ci*k*k] = W[:co, :ci] flattened
           (on CPU, with the C++ extension: conv = rsr_conv(u, ...), the same two steps as a blocked implicit GEMM that
           never materialises `cols`: at these shapes a fresh 40-150 MB buffer per call costs more than it saves;
           for fp32 and large groups, oneDNN's direct conv on the channels-last token layout instead, see ops/rsr_conv/)
    cls  = ragged_linear(u[:, :1], cls_weight)                    the cls token's GEMV (has_cls only)
    out  = rsr_epilogue(conv, x, pos_embed, conv_bias, cls, cls_bias)
                                                                  one pass: + bias + pos_embed + zero-padded
                                                                  AvgPool(x) (+ cls_bias + x_cls), zeros beyond co

Backends (`resnas_kernels.set_backend`): "reference" runs the oracle (stock functional ops per group); "cpu" and
"triton" run the fused chain, every piece on that backend (LN, conv or im2col + GEMM, epilogue); "auto" runs the
fused chain with each piece on its own preferred backend (on CUDA: Triton LN / im2col / GEMM and the CUDA C++
epilogue; on CPU: the C++ kernels, each falling back to its reference when the extension lacks it). There is no
"cuda"-only RSR: ragged_linear has no CUDA C++ kernel by design; the CUDA C++ epilogue and im2col are reachable through
"auto" and as ops of their own (`rsr_epilogue`, `rsr_im2col`).

Widths are data: in_groups may carry host ints or an int32 (G,) tensor on x's device, out_widths likewise; every piece
gets them as tensors (`Ragged.widths_tensor`), so a new architecture is a new tensor value (torch.compile does not
recompile, nothing reads them on the host for CUDA tensors: shapes and grids come from Ci_max, Co_max and the sizes).
Values are checked where that is free (host ints, CPU tensors; CUDA under `set_validate_metadata(True)`) and clamped by
every backend to [0, Ci_max] / [0, Co_max] in any case. The reference backend with device widths runs the masked
full-width formulation with masks built on the device (`_reference_masked`); with host widths the per-group oracle.
On the C++ backends the conv and the epilogue are one C++-registered op each (`torch.ops.resnas.rsr_conv`,
`rsr_epilogue`: autograd and checks in C++, csrc/rsr.cpp), one dispatcher hop per piece.

Caveats:
- x must be contiguous and zero beyond each group's input width (the ragged contract); the output is exactly zero
  beyond c_out,g. A group with c_in,g = c_out,g = 0 gets all-zero rows and costs no GEMM work.
- fp64: computed in fp64 on every backend; on the Triton backend every piece runs its reference for fp64 (the
  kernels compute in fp32), as every op does.
- Precision: LN statistics, the epilogue's sums and the gradients of pos_embed and the biases are fp32. On CPU the
  conv GEMM also runs in fp32 for fp16 / bf16 x (rounded once); on the im2col + ragged_linear route (CUDA, Triton) the
  GEMMs run in x's dtype with fp32 accumulation, parameters given in fp32 being cast to x's dtype first (as autocast
  does for F.conv2d / F.linear). The reference computes everything in fp32 and rounds once.
- On the im2col route the column tensor is k*k/stride^2 = 2.25x the size of x (3x3, stride 2).
- Determinism: pos_embed / bias gradients are fixed-order batch sums (bitwise reproducible on every backend, also
  across CPU thread counts); conv_weight / cls_weight gradients are reproducible run to run (fixed group / block
  order on CPU, ragged_linear's tile-owner dW on GPU), but CPU BLAS does not promise bit-equality across thread counts.
- Under torch.compile the choices made here in Python (reference vs fused chain, blocked conv vs im2col + GEMM) are
  taken once at trace time; the custom ops still pick their own backends when they run. Changing the backend setting
  after compiling needs a fresh torch.compile.
- Double backward is not supported.

Layout: one folder per op, each with its roles in separate files (as `ragged_layer_norm/`): `rsr_im2col/`,
`rsr_conv/`, `rsr_epilogue/` and this composite (`__init__.py` the public function and the fused chain;
`reference_backend.py` its reference backend).
"""
from typing import Optional, Tuple

import torch

from ...backend import BackendUnavailableError, OpInfo, register_op, resolve_backend
from ...ragged import Ragged, as_ragged
from ...reference.rsr import rsr_output_grid
from .._checks import check_float_tensor, check_same_device, check_tensor
from ..ragged_layer_norm import ragged_layer_norm
from ..ragged_linear import ragged_linear
from ..rsr_conv import OP as CONV_OP
from ..rsr_conv import rsr_conv
from ..rsr_epilogue import check_shortcut, rsr_epilogue
from ..rsr_im2col import rsr_im2col
from .reference_backend import _reference_masked, _reference_rsr

# A composition: ragged_layer_norm -> rsr_conv (CPU) | rsr_im2col + ragged_linear -> rsr_epilogue, plus the cls
# ragged_linear.
OP = register_op(OpInfo(
    name="residual_spatial_reduction",
    backends=("triton", "cpu"),
    auto_cuda=("triton",),
    ext_ops=("ext_rsr_conv_fwd", "ext_rsr_conv_bwd", "ext_rsr_epilogue_fwd", "ext_rsr_epilogue_bwd"),
))

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_param(t, name: str, shape: Tuple[int, ...], x: torch.Tensor) -> None:
    check_tensor(t, name)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{name} must have x's dtype ({x.dtype}) or float32, got {t.dtype}")
    check_same_device(x, t, "x", name)


def _as_gemm_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight in the GEMM's dtype, contiguous (ragged_linear reads it in place; a cast is differentiable)."""
    return w.to(dtype).contiguous()


# Backend decisions taken in Python, outside the custom ops. Under torch.compile they are evaluated once at trace
# time and treated as constants (dynamo cannot trace the extension loader behind them, and guarding on them is not
# possible): a set_backend(...) after compiling needs a fresh torch.compile.
@torch.compiler.assume_constant_result
def _rsr_backend(device: torch.device) -> str:
    return resolve_backend(OP.name, device)


@torch.compiler.assume_constant_result
def _conv_backend(device: torch.device) -> Optional[str]:
    """The backend rsr_conv would run on now, or None when it cannot run the current setting (e.g. "triton")."""
    try:
        return resolve_backend(CONV_OP.name, device)
    except BackendUnavailableError:
        return None


def _fused(x, in_groups: Ragged, out_groups: Ragged, ln_weight, ln_bias, conv_weight, conv_bias, pos_embed,
           cls_weight, cls_bias, grid, has_cls, eps, kernel_size, stride, padding):
    co_max = conv_weight.shape[0]
    kk = kernel_size * kernel_size
    u = ragged_layer_norm(x, ln_weight, ln_bias, in_groups, eps)
    # (Co_max, Ci_max, k, k) -> (Co_max, Ci_max*k*k): group g's W[:co, :ci] is the top-left block [:co, :ci*k*k].
    if _conv_backend(x.device) == "cpu":
        # CPU: the blocked implicit GEMM (same math as below, without materialising the column tensor).
        conv = rsr_conv(u, conv_weight.contiguous().view(co_max, -1), in_groups, out_groups.widths, grid, has_cls,
                        kernel_size, stride, padding)
    else:
        cols = rsr_im2col(u, in_groups, grid, has_cls, kernel_size, stride, padding)
        w2d = _as_gemm_weight(conv_weight, x.dtype).view(co_max, -1)
        # group g reads the first ci*k*k columns (a widths tensor is scaled on its device: no host value)
        col_widths = in_groups.widths * kk if in_groups.on_device else [ci * kk for ci in in_groups.widths]
        conv = ragged_linear(cols, w2d, None, in_groups.with_widths(col_widths), out_groups.widths)
    cls = None
    if has_cls:
        cls = ragged_linear(u[:, :1].contiguous(), _as_gemm_weight(cls_weight, x.dtype), None, in_groups,
                            out_groups.widths)
    return rsr_epilogue(conv, x, pos_embed, conv_bias, cls, cls_bias if has_cls else None, in_groups,
                        out_groups.widths, grid, stride)


def residual_spatial_reduction(x: torch.Tensor, in_groups: Optional[Ragged], out_widths,
                               ln_weight: torch.Tensor, ln_bias: torch.Tensor, conv_weight: torch.Tensor,
                               conv_bias: torch.Tensor, pos_embed: torch.Tensor,
                               cls_weight: Optional[torch.Tensor] = None, cls_bias: Optional[torch.Tensor] = None, *,
                               grid: Tuple[int, int], has_cls: bool = True, eps: float = 1e-6, kernel_size: int = 3,
                               stride: int = 2, padding: int = 1) -> torch.Tensor:
    """Ragged RSR from c_in,g to c_out,g >= c_in,g channels per group; see the reference for the exact spec.

    Args:
        x: (B, has_cls + H*W, Ci_max) contiguous, zero beyond each group's input width.
        in_groups: Ragged(sizes, c_in widths) over dim 0 (None: one group at full width); the widths may be host
            ints or an int32 (G,) tensor on x's device (device metadata: nothing is read on the host for CUDA).
        out_widths: c_out,g per group, c_in,g <= c_out,g <= Co_max: a sequence of ints, an int32 (G,) tensor on
            x's device, or a Ragged with the same sizes. Width values are checked where that needs no device sync
            (host ints, CPU tensors); every backend clamps them to [0, Ci_max] / [0, Co_max] in any case.
        ln_weight, ln_bias: (Ci_max,); conv_weight: (Co_max, Ci_max, k, k); conv_bias: (Co_max,);
        pos_embed: (1, Ho*Wo, Co_max); cls_weight: (Co_max, Ci_max) and cls_bias: (Co_max,) when has_cls.
        grid: (H, W) of the input patch tokens; Ho, Wo = ceil(H / stride), ceil(W / stride).
    Returns:
        (B, has_cls + Ho*Wo, Co_max), zero beyond c_out,g.
    """
    check_float_tensor(x, "x", _FLOAT_DTYPES, min_dim=3)
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, tokens, C), got {tuple(x.shape)}")
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(v, int) and v > 0 for v in grid)):
        raise ValueError(f"grid must be a pair of positive ints (H, W), got {grid!r}")
    for name, v, low in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    ci_max = x.shape[-1]
    in_groups = as_ragged(in_groups, x.shape[0], ci_max)
    if isinstance(out_widths, Ragged):
        if out_widths.sizes != in_groups.sizes:
            raise ValueError(f"out_widths must split the batch like in_groups: {out_widths.sizes} vs "
                             f"{in_groups.sizes}")
        out_widths = out_widths.widths
    out_groups = in_groups.with_widths(out_widths)
    check_tensor(conv_weight, "conv_weight")
    if conv_weight.dim() != 4 or conv_weight.shape[1] != ci_max or conv_weight.shape[2:] != (kernel_size, kernel_size):
        raise ValueError(f"conv_weight must have shape (Co_max, {ci_max}, {kernel_size}, {kernel_size}), got "
                         f"{tuple(conv_weight.shape)}")
    co_max = conv_weight.shape[0]
    if co_max < ci_max:
        raise ValueError(f"conv_weight has {co_max} output channels, fewer than x's {ci_max}: the shortcut needs "
                         f"Co_max >= Ci_max")
    out_grid = rsr_output_grid(tuple(grid), kernel_size, stride, padding)
    n_tokens = int(bool(has_cls)) + grid[0] * grid[1]
    if x.shape[1] != n_tokens:
        raise ValueError(f"x has {x.shape[1]} tokens but grid={tuple(grid)} with has_cls={bool(has_cls)} needs "
                         f"{n_tokens}")
    _check_param(conv_weight, "conv_weight", tuple(conv_weight.shape), x)
    _check_param(ln_weight, "ln_weight", (ci_max,), x)
    _check_param(ln_bias, "ln_bias", (ci_max,), x)
    _check_param(conv_bias, "conv_bias", (co_max,), x)
    _check_param(pos_embed, "pos_embed", (1, out_grid[0] * out_grid[1], co_max), x)
    if has_cls:
        if cls_weight is None or cls_bias is None:
            raise ValueError("cls_weight and cls_bias are required when has_cls=True")
        _check_param(cls_weight, "cls_weight", (co_max, ci_max), x)
        _check_param(cls_bias, "cls_bias", (co_max,), x)
    in_groups.check(x.shape[0], ci_max, arg="x", what="in_groups.widths", device=x.device)
    check_shortcut(in_groups, out_groups, in_name="in_groups.widths")
    out_groups.check(x.shape[0], co_max, arg="conv_weight (out channels)", what="out_widths", device=x.device)
    kwargs = dict(grid=tuple(grid), has_cls=bool(has_cls), eps=float(eps), kernel_size=kernel_size, stride=stride,
                  padding=padding)
    if _rsr_backend(x.device) == "reference":
        if in_groups.on_device or out_groups.on_device:
            return _reference_masked(x, in_groups, out_groups, ln_weight, ln_bias, conv_weight, conv_bias, pos_embed,
                                     cls_weight, cls_bias, **kwargs)
        return _reference_rsr(x, in_groups, out_groups.widths, ln_weight, ln_bias, conv_weight, conv_bias, pos_embed,
                              cls_weight, cls_bias, **kwargs)
    return _fused(x, in_groups, out_groups, ln_weight, ln_bias, conv_weight, conv_bias, pos_embed, cls_weight,
                  cls_bias, **kwargs)
