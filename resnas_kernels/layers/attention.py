"""Drop-in attention built on `resnas_kernels.ragged_attention`: a ViT-style module, and patches for timm models.

    from resnas_kernels.layers.attention import FusedAttention, patch_timm_vit_attention, patch_timm_levit_attention

    attn = FusedAttention(dim=384, num_heads=6)                  # qkv Linear + fused attention + proj Linear
    y = attn(x)                                                  # (B, N, dim)
    y = attn(x, heads=Ragged((64, 64), (6, 4)))                  # supernet: group 1 runs only its first 4 heads
    y = attn(x, heads=Ragged((64, 64), arch_heads))              # ... or the head counts as an int32 device tensor

    n = patch_timm_vit_attention(vit_model)      # every timm.layers.Attention now calls the fused op, same weights
    n = patch_timm_levit_attention(levit_model)  # every timm LeViT Attention / AttentionDownsample (linear mode)

What the patches do: they replace the module's `forward` (an instance attribute, so `module.__class__` and the
state dict are unchanged; `unpatch_timm_attention(model)` undoes it). timm ViT attention reads q, k, v as views of its
(B, N, 3, H, d) qkv output; LeViT attention reads them as views of its per-head interleaved (B, N, H, 2D + d_v) output
and passes `attention_biases` as the bias table with the grid computed in-kernel, so LeViT's gathered
(H, N, N) bias is never materialised (timm caches one per device in eval mode; the fused op needs no cache).

Caveats:
- Attention dropout is not fused: a timm ViT module with attn_drop.p > 0 in training mode, or called with an
  attn_mask / is_causal, runs its original forward. (ViT-ResNAS and LeViT train with attention dropout 0.)
- LeViT's conv mode (`levit_conv_*`, NCHW) is not patched (the function returns how many modules it patched).
- The bias table is indexed by the LeViT grid only for square resolutions; others pass timm's index buffer instead.
"""
import types
from typing import Optional

import torch
from torch import nn

from ..ops.ragged_attention import ragged_attention
from ..ragged import Ragged

__all__ = ["FusedAttention", "patch_timm_vit_attention", "patch_timm_levit_attention", "unpatch_timm_attention"]


class FusedAttention(nn.Module):
    """Multi-head self-attention with a fused (ragged-head) core: qkv = Linear(dim, 3 H d); attention; proj.

    Weight layout is timm's `Attention` (qkv output viewed as (B, N, 3, H, d)), so `FusedAttention.from_timm(m)` and
    `load_state_dict` of a timm attention's `qkv` / `proj` work as is. `heads` (a Ragged over the batch) lets group g
    run only its first h_g heads; the output columns of the other heads are zero before `proj`. Its widths may be an
    int32 tensor on x's device (a supernet's sampled architecture): new values then need no recompilation.
    """

    def __init__(self, dim: int, num_heads: int = 8, head_dim: Optional[int] = None, qkv_bias: bool = False,
                 proj_bias: bool = True, dim_out: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}) when head_dim is None")
            head_dim = dim // num_heads
        self.num_heads, self.head_dim = num_heads, head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(num_heads * head_dim, dim_out or dim, bias=proj_bias, **dd)

    @classmethod
    def from_timm(cls, attn: nn.Module) -> "FusedAttention":
        """A FusedAttention sharing the weights (the same Parameter objects) of a timm `Attention`."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads, new.head_dim, new.scale = attn.num_heads, attn.head_dim, attn.scale
        new.qkv, new.proj = attn.qkv, attn.proj
        return new

    def forward(self, x: torch.Tensor, heads: Optional[Ragged] = None,
                dense_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)
        out = ragged_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], heads, scale=self.scale,
                               dense_bias=dense_bias)
        return self.proj(out)


# ---------------------------------------------------------------------------------------------------------------------
# timm patches
# ---------------------------------------------------------------------------------------------------------------------
_ORIGINAL = "_resnas_original_forward"


def _vit_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
    """timm.layers.Attention.forward with the fused core (same math; see the module docstring for the fallbacks)."""
    if attn_mask is not None or is_causal or (self.training and self.attn_drop.p > 0):
        return getattr(self, _ORIGINAL)(x, attn_mask=attn_mask, is_causal=is_causal)
    b, n, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k = self.q_norm(q), self.k_norm(k)  # per-head norms over d: layout-independent
    out = ragged_attention(q, k, v, scale=self.scale)
    out = self.norm(out)
    if gate is not None:
        out = out * gate
    return self.proj_drop(self.proj(out))


def _levit_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm.models.levit.Attention.forward (linear mode) with the fused core and in-kernel bias indexing."""
    b, n, _ = x.shape
    q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
    out = ragged_attention(q, k, v, scale=self.scale, bias_table=self.attention_biases, **_levit_bias(self, 1))
    return self.proj(out)


def _levit_downsample_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm.models.levit.AttentionDownsample.forward (linear mode): queries on the stride-s sub-grid."""
    b, n, _ = x.shape
    k, v = self.kv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
    q = self.q(x).view(b, -1, self.num_heads, self.key_dim)
    out = ragged_attention(q, k, v, scale=self.scale, bias_table=self.attention_biases,
                           **_levit_bias(self, self.stride))
    return self.proj(out)


def _levit_bias(module, stride: int) -> dict:
    r0, r1 = module.resolution
    if r0 == r1:
        return dict(bias_grid=(int(r0), int(stride)))
    return dict(bias_index=module.attention_bias_idxs)


def _patch(module: nn.Module, forward) -> None:
    if _ORIGINAL not in module.__dict__:
        setattr(module, _ORIGINAL, module.forward)
    module.forward = types.MethodType(forward, module)


def patch_timm_vit_attention(model: nn.Module) -> int:
    """Make every timm `Attention` (timm.layers.attention.Attention: ViT, DeiT, ...) in `model` use the fused
    attention, keeping its weights. Returns the number of modules patched."""
    from timm.layers.attention import Attention

    count = 0
    for module in model.modules():
        if isinstance(module, Attention):
            _patch(module, _vit_forward)
            count += 1
    return count


def patch_timm_levit_attention(model: nn.Module) -> int:
    """Make every timm LeViT `Attention` and `AttentionDownsample` (linear mode) in `model` use the fused attention
    with the bias table indexed in-kernel, keeping its weights. Returns the number of modules patched."""
    from timm.models.levit import Attention, AttentionDownsample

    count = 0
    for module in model.modules():
        if isinstance(module, (Attention, AttentionDownsample)) and not module.use_conv:
            _patch(module, _levit_attention_forward if isinstance(module, Attention) else _levit_downsample_forward)
            count += 1
    return count


def unpatch_timm_attention(model: nn.Module) -> int:
    """Undo `patch_timm_*`: the patched modules get their original forward back. Returns how many."""
    count = 0
    for module in model.modules():
        if _ORIGINAL in module.__dict__:
            del module.__dict__["forward"]
            del module.__dict__[_ORIGINAL]
            count += 1
    return count
