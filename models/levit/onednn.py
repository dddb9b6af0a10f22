"""LeViT's CPU inference fast path (eager CPU fp32 work without autograd): the folded linears as MKL GEMMs with
in-place epilogues, the image-facing conv through oneDNN with Hardswish fused, and (when
levit.CPU_INFERENCE_GEMM_ATTENTION is set; off by default) the attention as batched GEMMs over L2-sized chunks of
the batch; the plain PyTorch ops everywhere else."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["PACK_WEIGHTS"]


def _onednn_ok() -> bool:
    return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


_ONEDNN = _onednn_ok()
PACK_WEIGHTS = True  # pre-pack the folded weights of oneDNN convs in the inference cache (CPU fp32)

# oneDNN's direct conv only where aten's conv is slow: few input channels (the 3-channel image), where aten falls back
# to im2col + GEMM at batch > 1 (5x slower than oneDNN at batch 16). On wider inputs aten's own conv is as fast or
# faster (up to 4x on the 32 -> 64 stem conv at batch 1).
ONEDNN_CONV_MAX_IN_CHANNELS = 4


def _packable(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype == torch.float32 and not w.requires_grad


def _needs_autograd(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def cpu_fast_path(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Eager CPU fp32 work that needs no autograd: under CPU autocast the plain ops pick the autocast dtype, and
    under torch.compile the plain ops let Inductor choose."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and all(t.dtype == torch.float32 for t in others)):
        return False
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    return not _needs_autograd(x, *others)


def use_onednn_conv(in_channels: int) -> bool:
    return _ONEDNN and in_channels <= ONEDNN_CONV_MAX_IN_CHANNELS


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, hardswish: bool = False,
            residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[residual +] [hardswish](x @ w.T + b): one GEMM (the bias enters as its beta=1 input), then the epilogue in
    place on the fresh output when nothing differentiates through it. MKL's GEMM beat oneDNN's fused-epilogue linear
    (pre-packed weights) at every LeViT shape, batch 1 and 16; the in-place epilogue is one pass over a small
    output."""
    y = F.linear(x, w, b)
    inplace = not _needs_autograd(y) and (residual is None or not _needs_autograd(residual))
    if hardswish:
        y = F.hardswish(y, inplace=inplace)
    if residual is None:
        return y
    return y.add_(residual) if inplace else residual + y


def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, stride, padding, hardswish: bool,
          packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    fast = cpu_fast_path(x, w)
    if fast and use_onednn_conv(x.shape[1]):
        return torch.ops.mkldnn._convolution_pointwise(x, packed if packed is not None else w, b, list(padding),
                                                       list(stride), [1, 1], 1, "hardswish" if hardswish else "none",
                                                       [], "")
    y = F.conv2d(x, w, b, stride, padding)
    return _hardswish(y) if hardswish else y


def _hardswish(x: torch.Tensor) -> torch.Tensor:
    # In place when nothing will differentiate through x (it is a fresh kernel output either way).
    return F.hardswish(x, inplace=not _needs_autograd(x))


# Score bytes of one attention chunk: the (chunk*H, Nq, Nk) scores are written by one GEMM, softmaxed in place and
# read by the next GEMM, so they should stay in L2.
ATTENTION_CHUNK_BYTES = 1 << 20


def attention_cpu_inference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                            bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v as two batched MKL GEMMs per chunk of samples, q (B, Nq, H, D), k (B, Nk, H, D),
    v (B, Nk, H, Dv) (strided views of the projections), bias (H, Nq, Nk) -> (B, Nq, H*Dv). At LeViT's head sizes
    (D = 16 or 32, Nk <= 196) the GEMMs beat the fused kernel's per-(sample, head) loop; chunking keeps the scores
    in cache, which the fused kernel otherwise wins on at batch 16."""
    B, Nq, H, D = q.shape
    Nk, Dv = k.shape[1], v.shape[-1]
    out = q.new_empty(B, Nq, H, Dv)
    per_chunk = max(1, ATTENTION_CHUNK_BYTES // (H * Nq * Nk * q.element_size()))
    for s in range(0, B, per_chunk):
        e = min(B, s + per_chunk)
        n = e - s
        qs = q[s:e].transpose(1, 2).reshape(n * H, Nq, D)
        ks = k[s:e].permute(0, 2, 3, 1).reshape(n * H, D, Nk)
        vs = v[s:e].transpose(1, 2).reshape(n * H, Nk, Dv)
        bs = bias if n == 1 else bias.expand(n, H, Nq, Nk).reshape(n * H, Nq, Nk)
        scores = torch.baddbmm(bs, qs, ks, alpha=scale)
        torch.softmax(scores, -1, out=scores)
        out[s:e].copy_(torch.bmm(scores, vs).view(n, H, Nq, Dv).transpose(1, 2))
    return out.view(B, Nq, H * Dv)
