"""The reference backend of the composite: the per-group oracle (host widths) and the masked full-width formulation
(device widths)."""
import torch

from ...ragged import Ragged
from ...reference.layer_norm import compute_dtype
from ...reference.rsr import masked_residual_spatial_reduction
from ...reference.rsr import residual_spatial_reduction as _reference_rsr  # noqa: F401


def _reference_masked(x, in_groups: Ragged, out_groups: Ragged, ln_weight, ln_bias, conv_weight, conv_bias,
                      pos_embed, cls_weight, cls_bias, **kwargs):
    """The reference for device widths: the original code's masked full-width RSR, with the masks built from the
    widths tensors on the device (no host values; a mask clamps a width to its bound). Computed in fp32 (fp64 for
    fp64) and rounded once, like the per-group oracle it equals up to rounding."""
    acc = compute_dtype(x.dtype)
    in_mask = in_groups.mask(x.shape[-1], device=x.device)[:, None, :]
    out_mask = out_groups.mask(conv_weight.shape[0], device=x.device)[:, None, :]
    xa = torch.where(in_mask, x.to(acc), torch.zeros((), dtype=acc, device=x.device))  # NaN padding must not leak
    params = [p.to(acc) if p is not None else None
              for p in (ln_weight, ln_bias, conv_weight, conv_bias, pos_embed, cls_weight, cls_bias)]
    return masked_residual_spatial_reduction(xa, in_mask, out_mask, *params, **kwargs).to(x.dtype)
