"""Plain, readable PyTorch reference of every op: the test oracle, the fallback path and the FLOP-counting path.

Each function's docstring is the op's exact spec. `masked_*` functions are the original ViT-ResNAS code's full-width
masked formulation of the same op (the parity oracle for the supernet and a benchmark peer).
"""
from .layer_norm import masked_layer_norm, ragged_layer_norm
from .rsr import masked_residual_spatial_reduction, residual_spatial_reduction, rsr_output_grid
from .linear import masked_linear, ragged_linear
from .attention import levit_bias_index, masked_attention, ragged_attention

__all__ = ["ragged_layer_norm", "masked_layer_norm", "residual_spatial_reduction", "masked_residual_spatial_reduction",
           "rsr_output_grid"]
__all__ += ["ragged_linear", "masked_linear"]
__all__ += ["ragged_attention", "masked_attention", "levit_bias_index"]
