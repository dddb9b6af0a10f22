"""Analytic MAC counter over an `Arch`, with the original estimator's conventions (vit_resnas.md sections 6-7).

Conventions of `network_utils/compute_flop_mac.py` (`ComputationEstimator(distill=False, patch_size=14)`, MAC mode),
which define the searched models' budgets (ViT-Res-Tiny = 1.7944 G, the Tiny search constraint):
- counted: the stem convs (3x3/s2 3->24, two 3x3 24->24, the 7x7/s7 projection), per block qkv (C * 3hd * N),
  Q K^T and A V (N^2 * h d each), proj (hd * C * N), fc1 and fc2 (C * hidden * N each); per RSR the 3x3/s2 conv
  (counted over all output positions, padding included) and the cls linear; the classifier head on the cls token.
- N includes the cls token (257 / 65 / 17 at 224).
- ignored: biases, LayerNorm, softmax, GELU, pooling, residual and positional-embedding adds, BatchNorm, the train-only
  patch head.
- resolution: the original hard-codes the stem's 112x112 mid resolution (so only 224 is right there); here the stem
  runs at img_size / 2, which equals the original at 224 and is what the network computes at other sizes.

`torch.utils.flop_counter.FlopCounterMode` on the stock sub-network (`subnet.py`) counts 2 FLOPs per MAC on exactly
these ops (convolution, linear/addmm, attention matmuls) and nothing else, so FLOPs == 2 * MACs with the patch head
off; tests/test_vit_resnas_macs.py checks that.
"""
from __future__ import annotations

from typing import Dict

from .space import PATCH_SIZE, STEM_MID_WIDTH, Arch

__all__ = ["count_macs", "mac_breakdown", "token_grids"]


def token_grids(img_size: int, num_stages: int) -> list:
    """Patch-token grid side per stage: img / 14, halved by each RSR (16 / 8 / 4 at 224)."""
    reduction = PATCH_SIZE * 2 ** (num_stages - 1)
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0 or img_size % reduction:
        raise ValueError(f"img_size must be a positive multiple of {reduction} (patch 14 and {num_stages - 1} "
                         f"spatial reductions by 2), got {img_size!r}")
    return [img_size // PATCH_SIZE // 2 ** s for s in range(num_stages)]


def mac_breakdown(arch: Arch, img_size: int = 224, num_classes: int = 1000,
                  stem_mid: int = STEM_MID_WIDTH) -> Dict[str, int]:
    """MACs by part: 'stem', 'linear.s{i}' (qkv + proj + MLP), 'attn.s{i}' (QK^T + AV), 'rsr', 'head'."""
    grids = token_grids(img_size, arch.num_stages)
    mid = img_size // 2  # the stem's first conv has stride 2
    out: Dict[str, int] = {}
    out["stem"] = (3 * stem_mid * 9 * mid * mid            # 3x3/s2, 3 -> mid
                   + 2 * stem_mid * stem_mid * 9 * mid * mid  # the residual pair of 3x3 convs
                   + arch.stages[0].embed * stem_mid * 7 * 7 * grids[0] ** 2)  # 7x7/s7 projection
    out["rsr"] = 0
    for s, st in enumerate(arch.stages):
        n = 1 + grids[s] ** 2
        c = st.embed
        if s > 0:
            c_in = arch.stages[s - 1].embed
            out["rsr"] += grids[s] ** 2 * c * 9 * c_in + c_in * c  # 3x3/s2 conv + cls linear
        linear = attn = 0
        for b in st.blocks:
            if b is None:
                continue
            hd = b.heads * st.head_dim
            linear += n * c * 3 * hd + n * hd * c + 2 * n * c * b.mlp
            attn += 2 * n * n * hd
        out[f"linear.s{s + 1}"] = linear
        out[f"attn.s{s + 1}"] = attn
    out["head"] = arch.stages[-1].embed * num_classes
    return out


def count_macs(arch: Arch, img_size: int = 224, num_classes: int = 1000, stem_mid: int = STEM_MID_WIDTH) -> int:
    """Total MACs of `arch` (removed blocks cost nothing) under the original estimator's conventions."""
    return sum(mac_breakdown(arch, img_size, num_classes, stem_mid).values())
