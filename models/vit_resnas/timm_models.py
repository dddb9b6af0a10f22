"""timm registration: the searched ViT-ResNAS nets, the hand-designed ViT-Res-Tiny, and the two supernets.

Importing this module (done by `import resnas_kernels.models`) registers, under names of our own:

    vit_resnas_tiny / _small / _medium   the searched architectures (vit_resnas.md 7.1), 1.783 / 2.846 / 4.513 GMACs
    vit_res_tiny                         the hand-designed ViT-Res-Tiny (section 1), 1.794 GMACs
    vit_resnas_supernet_tiny / _small    the sr_tiny_mh / sr_small_mh supernets (section 4.2), 3.50 / 6.26 GMACs

Each is a `ViTResNAS` (the fused ragged path; for a searched net, the one-architecture case). Extra keyword arguments:
img_size (a multiple of 56), drop_path_rate (the paper trains with 0.2 Tiny, 0.3 Small / Medium), patch_output
(add the per-patch training head). No weights are published under a license we can redistribute (the original
weights are CC-BY-NC, on Dropbox); load a local original or own checkpoint with
`timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))`, which runs
`checkpoint.checkpoint_filter_fn` (original names are mapped, pos-embeds resized).

`timm.create_model(name, features_only=True[, out_indices=(...)])` gives one feature map per stage (NCHW, strides
14 / 28 / 56, `feature_info.channels()` = the stage widths) through `forward_intermediates`.
"""
from __future__ import annotations

from typing import Sequence, Tuple

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .checkpoint import checkpoint_filter_fn
from .space import SMALL_SPACE, TINY_SPACE, Arch, BlockArch, StageArch
from .supernet import ViTResNAS

__all__ = ["TINY_ARCH", "SMALL_ARCH", "MEDIUM_ARCH", "RES_TINY_ARCH", "MODEL_ARCHS"]


def _arch(*stages: Tuple[int, int, Sequence[Tuple[int, int]]]) -> Arch:
    """Stages as (embed, head_dim, [(heads, mlp hidden), ...])."""
    return Arch(tuple(StageArch(c, d, tuple(BlockArch(h, m) for h, m in blocks)) for c, d, blocks in stages))


# vit_resnas.md 7.1 (the --network-def strings of scripts/vit-sr-nas/searched_net/*.sh), removed blocks deleted.
TINY_ARCH = _arch(
    (176, 32, [(3, 704), (3, 576), (3, 640), (4, 576), (4, 704)]),
    (352, 48, [(10, 1408), (8, 1408), (8, 1280), (8, 1408), (10, 1280), (10, 1024)]),
    (704, 64, [(10, 2560), (10, 1792), (10, 2816), (8, 2816), (8, 2560)]),
)
SMALL_ARCH = _arch(
    (220, 32, [(5, 880), (5, 880), (7, 800), (5, 720), (5, 720), (5, 720)]),
    (440, 48, [(10, 1760), (10, 1440), (10, 1920), (10, 1600), (12, 1600), (12, 1440)]),
    (880, 64, [(16, 3200), (12, 3200), (16, 2880), (12, 2240), (14, 2560)]),
)
MEDIUM_ARCH = _arch(
    (240, 32, [(7, 960), (6, 960), (7, 800), (8, 960), (7, 880), (8, 880), (6, 800)]),
    (640, 48, [(10, 1120), (14, 1760), (14, 1920), (16, 1760), (14, 1440), (16, 1760), (16, 1920)]),
    (880, 64, [(16, 3200), (10, 3840), (16, 3840), (12, 3200), (16, 3520), (14, 3520)]),
)
# Hand-designed ViT-Res-Tiny (scripts/vit-sr-nas/reference_net/tiny.sh): head dim 64, MLP ratio 4, depth 4/4/4.
RES_TINY_ARCH = _arch(
    (192, 64, [(3, 768)] * 4),
    (384, 64, [(6, 1536)] * 4),
    (768, 64, [(12, 3072)] * 4),
)

# name -> (architecture, search space or None)
MODEL_ARCHS = {
    "vit_resnas_tiny": (TINY_ARCH, None),
    "vit_resnas_small": (SMALL_ARCH, None),
    "vit_resnas_medium": (MEDIUM_ARCH, None),
    "vit_res_tiny": (RES_TINY_ARCH, None),
    "vit_resnas_supernet_tiny": (TINY_SPACE.max_arch(), TINY_SPACE),
    "vit_resnas_supernet_small": (SMALL_SPACE.max_arch(), SMALL_SPACE),
}


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "stem.conv1.conv", "classifier": "head",
        "paper_ids": "arXiv:2109.00642", "paper_name": "Searching for Efficient Multi-Stage Vision Transformers",
        "origin_url": "https://github.com/yilunliao/vit-search", **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in MODEL_ARCHS})


def _create(variant: str, pretrained: bool = False, **kwargs) -> ViTResNAS:
    arch, space = MODEL_ARCHS[variant]
    kwargs.setdefault("arch", arch)
    if space is not None:
        kwargs.setdefault("space", space)
    # features_only=True: timm's FeatureGetterNet around forward_intermediates, one NCHW map per stage by default.
    return build_model_with_cfg(ViTResNAS, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2)), **kwargs)


@register_model
def vit_resnas_tiny(pretrained: bool = False, **kwargs) -> ViTResNAS:
    return _create("vit_resnas_tiny", pretrained, **kwargs)


@register_model
def vit_resnas_small(pretrained: bool = False, **kwargs) -> ViTResNAS:
    return _create("vit_resnas_small", pretrained, **kwargs)


@register_model
def vit_resnas_medium(pretrained: bool = False, **kwargs) -> ViTResNAS:
    return _create("vit_resnas_medium", pretrained, **kwargs)


@register_model
def vit_res_tiny(pretrained: bool = False, **kwargs) -> ViTResNAS:
    return _create("vit_res_tiny", pretrained, **kwargs)


@register_model
def vit_resnas_supernet_tiny(pretrained: bool = False, **kwargs) -> ViTResNAS:
    return _create("vit_resnas_supernet_tiny", pretrained, **kwargs)


@register_model
def vit_resnas_supernet_small(pretrained: bool = False, **kwargs) -> ViTResNAS:
    return _create("vit_resnas_supernet_small", pretrained, **kwargs)
