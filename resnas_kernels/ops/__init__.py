"""Public fused ops. Importing this package registers every op's torch.library custom ops and backends."""
from .ragged_layer_norm import ragged_layer_norm
from .residual_spatial_reduction import residual_spatial_reduction

__all__ = ["ragged_layer_norm", "residual_spatial_reduction"]
