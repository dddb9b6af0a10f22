"""Public fused ops. Importing this package registers every op's torch.library custom ops and backends."""
from .ragged_layer_norm import ragged_layer_norm
from .residual_spatial_reduction import residual_spatial_reduction
from .ragged_linear import ragged_linear
from .ragged_attention import levit_bias_index, ragged_attention

from ..backend import OpInfo, registered_ops


def all_ops() -> "dict[str, OpInfo]":
    """Every op of the package with its backends (importing this package registered them)."""
    return registered_ops()


__all__ = ["ragged_layer_norm", "residual_spatial_reduction", "all_ops"]
__all__ += ["ragged_linear"]
__all__ += ["ragged_attention", "levit_bias_index"]
