"""ViT-ResNAS (Liao, Karaman, Sze, arXiv 2109.00642) on the ragged kernels: search spaces, MAC counter, the one-pass
supernet, standalone sub-networks, timm models and original-checkpoint loading. Spec: vit_resnas.md.

    from resnas_kernels.models.vit_resnas import ViTResNAS, TINY_SPACE
    supernet = ViTResNAS(space=TINY_SPACE)
    archs = TINY_SPACE.sample_groups(4, rng=0)
    logits = supernet(images, archs, group_sizes=(8, 8, 8, 8))     # four sub-networks, one pass
    net = supernet.extract(archs[0])                                 # a standalone stock-PyTorch sub-network

`import resnas_kernels` registers the timm models (timm_models.py): timm.create_model("vit_resnas_tiny"), also with
features_only=True (one NCHW map per stage via forward_intermediates).
"""
from . import checkpoint, timm_models  # noqa: F401  (importing timm_models registers the models with timm)
from .macs import count_macs, mac_breakdown
from .space import (SMALL_SPACE, SPACES, TINY_SPACE, Arch, BlockArch, SearchSpace, StageArch, StageSpace,
                    enabled_choices, get_space)
from .subnet import ViTResNASNet
from .supernet import ViTResNAS
from .timm_models import MEDIUM_ARCH, RES_TINY_ARCH, SMALL_ARCH, TINY_ARCH

__all__ = ["Arch", "BlockArch", "StageArch", "SearchSpace", "StageSpace", "TINY_SPACE", "SMALL_SPACE", "SPACES",
           "get_space", "enabled_choices", "count_macs", "mac_breakdown", "ViTResNASNet", "ViTResNAS", "TINY_ARCH",
           "SMALL_ARCH", "MEDIUM_ARCH", "RES_TINY_ARCH"]
