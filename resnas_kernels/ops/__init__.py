"""Public fused ops. Importing this package registers every op's torch.library custom ops and backends."""
from .ragged_layer_norm import ragged_layer_norm

__all__ = ["ragged_layer_norm"]
