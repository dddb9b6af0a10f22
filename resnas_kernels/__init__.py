"""resnas-kernels: fused ragged kernels for multi-stage Vision Transformers and their weight-sharing supernets.

    import resnas_kernels as rk
    groups = rk.Ragged(sizes=(64, 64), widths=(176, 256))      # two sub-networks, each on its slice of the batch
    y = rk.ragged_layer_norm(x, weight, bias, groups)           # (B, N, C_max), zeros beyond each group's width

Backends are chosen per call (see `resnas_kernels.backend`): `rk.set_backend("reference")` or RESNAS_BACKEND=...
Every runtime switch (environment variable and setter) is in `resnas_kernels.config`.
"""
from . import config, reference
from .backend import BACKENDS, BackendUnavailableError, get_backend, resolve_backend, set_backend, use_backend
from .ops import levit_bias_index, ragged_attention, ragged_layer_norm, ragged_linear, residual_spatial_reduction
from .ragged import Ragged, set_validate_metadata

__version__ = "0.1.0"

# Register the models with timm (vit_resnas_*, vit_res_tiny, levit_*_fused) on import of the package, so that
# `import resnas_kernels; timm.create_model("vit_resnas_tiny")` works. Last, after every op above is bound (the models
# import them from this package); it costs the import of timm.
from . import models  # noqa: E402,F401

__all__ = ["Ragged", "set_validate_metadata", "ragged_layer_norm", "ragged_linear", "ragged_attention",
           "levit_bias_index", "residual_spatial_reduction", "reference", "config", "set_backend", "get_backend",
           "use_backend", "resolve_backend", "BACKENDS", "BackendUnavailableError", "__version__"]
