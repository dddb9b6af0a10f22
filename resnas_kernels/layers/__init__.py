"""Drop-in nn.Modules built on the fused ops."""
from .rsr import ResidualSpatialReduction  # noqa: F401
from .attention import FusedAttention, patch_timm_levit_attention, patch_timm_vit_attention, unpatch_timm_attention  # noqa: F401
