"""The explicit PyTorch backend: F.unfold / F.fold, then the ragged mask (tensor masks only: device widths never
reach the host)."""
import torch
import torch.nn.functional as F

from ...ragged import Ragged


def _sample_widths(groups: Ragged, device) -> torch.Tensor:
    """(B,) width of every sample, from the widths tensor (no host values; a mask by it clamps to the bound)."""
    return groups.sample_width_tensor(device)


def _reference_fwd(u, groups: Ragged, geo):
    (H, W), k, s, p, n_cls, (Ho, Wo) = geo
    B, _, C = u.shape
    img = u[:, n_cls:].transpose(1, 2).reshape(B, C, H, W)
    cols = F.unfold(img, k, padding=p, stride=s).transpose(1, 2)            # (B, L, C*k*k), channel-major
    active = (torch.arange(C * k * k, device=u.device) // (k * k))[None, :] < _sample_widths(groups, u.device)[:, None]
    return torch.where(active[:, None, :], cols, torch.zeros((), dtype=u.dtype, device=u.device)).contiguous()


def _reference_bwd(dcols, groups: Ragged, geo):
    (H, W), k, s, p, n_cls, (Ho, Wo) = geo
    B, L, CKK = dcols.shape
    C = CKK // (k * k)
    img = F.fold(dcols.transpose(1, 2), (H, W), k, padding=p, stride=s)     # sums every column reading a token
    du = img.flatten(2).transpose(1, 2)
    active = torch.arange(C, device=dcols.device)[None, :] < _sample_widths(groups, dcols.device)[:, None]
    du = torch.where(active[:, None, :], du, torch.zeros((), dtype=du.dtype, device=du.device))
    return torch.cat([du.new_zeros(B, n_cls, C), du], dim=1).contiguous()
