"""LeViT's CPU fast path: folded Conv/Linear layers through oneDNN with pre-packed weights and Hardswish or the
residual add fused into the GEMM or conv (the ops Inductor itself emits), for eager CPU fp32 work without autograd;
the plain PyTorch ops everywhere else."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["PACK_WEIGHTS"]


def _onednn_ok() -> bool:
    return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


_ONEDNN = _onednn_ok()
PACK_WEIGHTS = True  # pre-pack folded weights for oneDNN in the inference cache (CPU fp32)


def _packable(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype == torch.float32 and not w.requires_grad


def _use_onednn(x: torch.Tensor, w: torch.Tensor, residual: Optional[torch.Tensor] = None) -> bool:
    """oneDNN's fused-epilogue linear/conv (the ops Inductor emits) only for eager CPU fp32 work that needs no
    autograd: they have no backward; under CPU autocast the plain ops pick the autocast dtype; and under
    torch.compile the plain ops let Inductor choose (its lowering of these ops wants frozen weights)."""
    if not (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32):
        return False
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    if residual is not None and not (residual.is_contiguous() and residual.dtype == torch.float32):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                             or (residual is not None and residual.requires_grad)))


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, hardswish: bool = False,
            residual: Optional[torch.Tensor] = None, packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[residual +] [hardswish](x @ w.T + b), one fused GEMM where possible (`packed`: w pre-packed for oneDNN)."""
    if _use_onednn(x, w, residual):
        wk = packed if packed is not None else w
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, wk, b, "add")
        return torch.ops.mkldnn._linear_pointwise(x, wk, b, "hardswish" if hardswish else "none", [], "")
    y = F.linear(x, w, b)
    if hardswish:
        y = F.hardswish(y)
    return y if residual is None else residual + y


def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, stride, padding, hardswish: bool,
          packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    if _use_onednn(x, w):
        return torch.ops.mkldnn._convolution_pointwise(x, packed if packed is not None else w, b, list(padding),
                                                       list(stride), [1, 1], 1, "hardswish" if hardswish else "none",
                                                       [], "")
    y = F.conv2d(x, w, b, stride, padding)
    return F.hardswish(y) if hardswish else y


def _needs_autograd(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _hardswish(x: torch.Tensor) -> torch.Tensor:
    # In place when nothing will differentiate through x (it is a fresh kernel output either way).
    return F.hardswish(x, inplace=not _needs_autograd(x))
