"""Drop-in nn.Modules built on the fused ops."""
import warnings

from .rsr import FusedResidualSpatialReduction  # noqa: F401
from .attention import FusedAttention, patch_timm_levit_attention, patch_timm_vit_attention, unpatch_timm_attention  # noqa: F401


def __getattr__(name):
    # The layer's old name collided with the stock module of extracted sub-networks
    # (models.vit_resnas.subnet.ResidualSpatialReduction); kept importable for existing code.
    if name == "ResidualSpatialReduction":
        warnings.warn("resnas_kernels.layers.ResidualSpatialReduction is now FusedResidualSpatialReduction",
                      DeprecationWarning, stacklevel=2)
        return FusedResidualSpatialReduction
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
