"""Drop-in nn.Modules built on the fused ops."""
from .rsr import ResidualSpatialReduction  # noqa: F401
