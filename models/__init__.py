"""Models built on the fused ragged ops (installed as `resnas_kernels.models`): the ViT-ResNAS supernet and its
sub-networks, and LeViT. Importing registers them with timm under names of our own."""
from . import levit  # noqa: E402,F401  (registers levit_*_fused with timm)
from . import vit_resnas  # noqa: E402,F401  (registers vit_resnas_* / vit_res_tiny with timm)
