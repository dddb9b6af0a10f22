"""FLOPs of a LeViT inference forward (the official counter's convention, times 2)."""
from __future__ import annotations

from .folding import LinearNorm
from .levit import Attention, AttentionDownsample, LevitDownsample, LevitFused, LevitMlp

__all__ = ["levit_flops"]


def levit_flops(model: LevitFused, batch: int = 1) -> int:
    """FLOPs (2 x multiply-adds) of one inference forward: convolutions, linears, and the two attention matmuls.
    Softmax, activations, BN (folded) and adds are not counted (the official counter's convention, plus 2x)."""
    macs = 0
    h, w = model.img_size
    for conv in (model.stem.conv1, model.stem.conv2, model.stem.conv3, model.stem.conv4):
        c = conv.linear
        h, w = (h + 2 * c.padding[0] - c.kernel_size[0]) // c.stride[0] + 1, \
               (w + 2 * c.padding[1] - c.kernel_size[1]) // c.stride[1] + 1
        macs += c.in_channels * c.out_channels * c.kernel_size[0] * c.kernel_size[1] * h * w
    for m in model.modules():
        if isinstance(m, LinearNorm):
            continue
        if isinstance(m, Attention):
            n = m.num_keys
            macs += n * m.qkv.linear.in_features * m.qkv.linear.out_features
            macs += m.num_heads * n * n * (m.key_dim + m.val_dim)
            macs += n * m.proj.ln.linear.in_features * m.proj.ln.linear.out_features
        elif isinstance(m, AttentionDownsample):
            nk, nq = m.num_keys, m.num_queries
            macs += nk * m.kv.linear.in_features * m.kv.linear.out_features
            macs += nq * m.q.ln.linear.in_features * m.q.ln.linear.out_features
            macs += m.num_heads * nq * nk * (m.key_dim + m.val_dim)
            macs += nq * m.proj.ln.linear.in_features * m.proj.ln.linear.out_features
        elif isinstance(m, LevitMlp):
            n = _tokens_of(model, m)
            macs += 2 * n * m.ln1.linear.in_features * m.ln1.linear.out_features
    if model.num_classes > 0:
        macs += model.num_features * model.num_classes  # the two heads are averaged into one linear at inference
    return 2 * macs * batch


def _tokens_of(model: LevitFused, mlp: LevitMlp) -> int:
    for stage in model.stages:
        mlps = [b.mlp for b in stage.blocks]
        if isinstance(stage.downsample, LevitDownsample):
            mlps.append(stage.downsample.mlp)
        if any(m is mlp for m in mlps):
            return stage.resolution[0] * stage.resolution[1]
    raise ValueError("MLP not found in the model")
