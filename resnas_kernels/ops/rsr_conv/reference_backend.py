"""The explicit PyTorch backend: the im2col reference and one GEMM on masked columns."""
import torch

from ...ragged import Ragged
from ...reference.layer_norm import compute_dtype
from ..rsr_im2col.reference_backend import _reference_bwd as _im2col_reference_bwd
from ..rsr_im2col.reference_backend import _reference_fwd as _im2col_reference_fwd


def _out_mask(out_groups: Ragged, co_max: int, device) -> torch.Tensor:
    """(B, 1, Co_max) bool: output channel c is active for the sample's group (c < co; clamps co to Co_max)."""
    return out_groups.mask(co_max, device=device)[:, None, :]


# The reference runs the whole batch as one GEMM on masked columns (zero beyond ci*k*k per sample) and masks the
# output by co: tensor masks only, so device widths never reach the host.
def _reference_fwd(u, weight, in_groups: Ragged, out_groups: Ragged, geo):
    acc = compute_dtype(u.dtype)
    cols = _im2col_reference_fwd(u, in_groups, geo).to(acc)
    out = cols @ weight.to(acc).t()
    zero = torch.zeros((), dtype=acc, device=u.device)
    return torch.where(_out_mask(out_groups, weight.shape[0], u.device), out, zero).to(u.dtype)


def _reference_bwd(dout, u, weight, in_groups: Ragged, out_groups: Ragged, geo):
    acc = compute_dtype(u.dtype)
    cols = _im2col_reference_fwd(u, in_groups, geo).to(acc)
    w = weight.to(acc)
    zero = torch.zeros((), dtype=acc, device=u.device)
    dy = torch.where(_out_mask(out_groups, weight.shape[0], u.device), dout.to(acc), zero)
    # dy is zero beyond co and cols beyond ci*k*k: group g only reaches dW[:co, :ci*k*k].
    dw = dy.reshape(-1, dy.shape[-1]).t() @ cols.reshape(-1, cols.shape[-1])
    # im2col's adjoint masks du by ci; a group with co = 0 gets dy = 0, hence du = 0.
    du = _im2col_reference_bwd(dy @ w, in_groups, geo)
    return du.to(u.dtype), dw
