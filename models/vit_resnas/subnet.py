"""A standalone ViT-ResNAS network from stock PyTorch modules (vit_resnas.md sections 1-3): no ragged machinery.

This is what `ViTResNAS.extract(arch)` returns, the "stock PyTorch" peer of the benchmarks, and the reference path
for FLOP counting. It also defines the module tree (and so the state-dict names) that the fused model in
`supernet.py` inherits, so the two load each other's weights:

    stem.conv{1,2,3}.{conv,bn}   3x3/s2 conv + BN + ReLU, then a residual pair of 3x3 conv + BN + ReLU
    stem.proj                    7x7/s7 projection to C1 (with bias)
    cls_token, pos_embed         (1, 1, C1), (1, 1 + H/14 * W/14, C1)
    stages.{s}.reduce            residual spatial reduction into stage s >= 1: norm, conv, cls_proj, pos_embed
    stages.{s}.blocks.{i}        pre-LN blocks: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2
    norm, head, patch_head       final LayerNorm, classifier on the cls token, optional per-patch classifier
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, trunc_normal_, use_fused_attn
from timm.models._features import feature_take_indices  # (not re-exported by timm.models in 1.0.x)
from torch import nn

from .macs import token_grids
from .space import PATCH_SIZE, STEM_MID_WIDTH, Arch

__all__ = ["ViTResNASNet", "ConvStem", "Block", "Attention", "Mlp", "ResidualSpatialReduction", "LN_EPS",
           "init_weights", "block_drop_path_rates"]

LN_EPS = 1e-6


class ConvBnAct(nn.Module):
    def __init__(self, in_chans: int, out_chans: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class ConvStem(nn.Module):
    """The type-4 conv stem: 3x3/s2 (in -> 24), then r + [3x3 -> 3x3](r), then 7x7/s7 to C1 (effective patch 14)."""

    def __init__(self, embed_dim: int, in_chans: int = 3, mid_chans: int = STEM_MID_WIDTH):
        super().__init__()
        self.conv1 = ConvBnAct(in_chans, mid_chans, stride=2)
        self.conv2 = ConvBnAct(mid_chans, mid_chans)
        self.conv3 = ConvBnAct(mid_chans, mid_chans)
        half = PATCH_SIZE // 2
        self.proj = nn.Conv2d(mid_chans, embed_dim, half, half)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the projection: architecture-independent, shared by every sub-network.

        Runs channels-last (returns a channels-last tensor): with 24 channels, oneDNN's NCHW convolutions are 1.5-2x
        slower forward and backward on CPU, and cuDNN prefers NHWC too. The numbers are the same convolution's."""
        x = self.conv1(x.contiguous(memory_format=torch.channels_last))
        return x + self.conv3(self.conv2(x))

    def patches(self, trunk: torch.Tensor) -> torch.Tensor:
        """The projection's im2col: `trunk` (B, C, H, W) -> (B, H/k * W/k, k*k*C), columns in (kh, kw, c) order.

        That order reads a channels-last trunk in memory order, and the gradient comes back channels-last too (an
        NCHW-ordered one would put the trunk's backward on oneDNN's slow mixed-layout path)."""
        b, c, hh, ww = trunk.shape
        k = self.proj.kernel_size[0]
        return (trunk.permute(0, 2, 3, 1).reshape(b, hh // k, k, ww // k, k, c).permute(0, 1, 3, 2, 4, 5)
                .reshape(b, (hh // k) * (ww // k), k * k * c))

    @staticmethod
    def proj_matrix(weight: torch.Tensor) -> torch.Tensor:
        """A projection weight (out, C, k, k) as the (out, k*k*C) matrix that multiplies `patches` (a copy)."""
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(x)).flatten(2).transpose(1, 2)  # (B, H/14 * W/14, C1)


class Attention(nn.Module):
    """qkv with bias laid out [q | k | v], each heads * head_dim wide and head-major; scale head_dim^-0.5."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, dim)
        self.fused_attn = use_fused_attn()  # timm's switch; FLOP counting turns it off (CPU SDPA has no formula)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = ((q * self.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """x = x + DropPath(Attn(LN1(x))); x = x + DropPath(MLP(LN2(x)))."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_hidden: int, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_hidden)
        self.drop_path_rate = drop_path
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ResidualSpatialReduction(nn.Module):
    """y_patch = Conv3x3s2(LN(x)_patch) + P + pad0(AvgPool2(x_patch)); y_cls = Linear(LN(x)_cls) + pad0(x_cls)."""

    def __init__(self, in_dim: int, out_dim: int, out_tokens: int):
        super().__init__()
        if out_dim < in_dim:
            raise ValueError(f"a residual spatial reduction needs out_dim >= in_dim, got {in_dim} -> {out_dim}")
        self.norm = nn.LayerNorm(in_dim, eps=LN_EPS)
        self.conv = nn.Conv2d(in_dim, out_dim, 3, 2, 1)
        self.cls_proj = nn.Linear(in_dim, out_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, out_tokens, out_dim))
        self.pool = nn.AvgPool2d(2, 2)
        self.pad = out_dim - in_dim

    def forward(self, x: torch.Tensor, grid: int) -> torch.Tensor:
        b, _, c = x.shape
        u = self.norm(x)
        patches = self.conv(u[:, 1:].transpose(1, 2).reshape(b, c, grid, grid)).flatten(2).transpose(1, 2)
        shortcut = self.pool(x[:, 1:].transpose(1, 2).reshape(b, c, grid, grid)).flatten(2).transpose(1, 2)
        patches = patches + self.pos_embed + F.pad(shortcut, (0, self.pad))
        cls = self.cls_proj(u[:, :1]) + F.pad(x[:, :1], (0, self.pad))
        return torch.cat([cls, patches], dim=1)


class Stage(nn.Module):
    def __init__(self, reduce: Optional[ResidualSpatialReduction], blocks: List[Block]):
        super().__init__()
        self.reduce = reduce
        self.blocks = nn.ModuleList(blocks)


def block_drop_path_rates(arch: Arch, drop_path_rate: float) -> List[List[float]]:
    """Per stage, per block slot: the rate rises linearly from 0 to drop_path_rate over all slots of the def (as the
    original, where a supernet's removable slots count too); removed slots get a rate as well, unused."""
    total = sum(arch.num_slots)
    rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # plain Python: works on meta too
    out, i = [], 0
    for n in arch.num_slots:
        out.append(rates[i:i + n])
        i += n
    return out


def init_weights(module: nn.Module) -> None:
    """trunc_normal(0.02) for linears and embeddings, zero biases, LayerNorm (1, 0); convs keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, ResidualSpatialReduction):
            trunc_normal_(m.pos_embed, std=0.02)


class ViTResNASNet(nn.Module):
    """A ViT-ResNAS network of one architecture, from stock modules. Removed block slots of `arch` are dropped.

    Args:
        arch: the architecture (`Arch`); use `arch.pruned()` semantics: None slots are simply absent.
        img_size: input side, a multiple of 56 (three stages: patch 14, two reductions by 2).
        num_classes: classifier outputs (0: no classifier, forward returns pooled features).
        drop_path_rate: stochastic depth, linear over the blocks; or pass `drop_path_rates` per stage and block.
        patch_output: add the per-patch head used in training with patch-token mixup (vit_resnas.md 3.4).
    """

    def __init__(self, arch: Arch, img_size: Union[int, Tuple[int, int]] = 224, num_classes: int = 1000,
                 in_chans: int = 3, drop_path_rate: float = 0.0,
                 drop_path_rates: Optional[Sequence[Sequence[float]]] = None, patch_output: bool = False,
                 global_pool: str = "token", drop_rate: float = 0.0):
        super().__init__()
        if not isinstance(arch, Arch):
            raise TypeError(f"arch must be an Arch, got {type(arch).__name__}")
        if drop_rate:
            raise ValueError(f"ViT-ResNAS has no dropout (vit_resnas.md 3.1); drop_rate must be 0, got {drop_rate}")
        if global_pool not in ("token", ""):
            raise ValueError(f"global_pool must be 'token' (the cls token) or '' (unpooled), got {global_pool!r}")
        if isinstance(img_size, (tuple, list)):  # timm passes (H, W)
            if len(img_size) != 2 or img_size[0] != img_size[1]:
                raise ValueError(f"img_size must be an int or a square (H, W) pair, got {img_size!r}")
            img_size = img_size[0]
        self.arch = arch
        self.img_size = img_size
        self.grids = token_grids(img_size, arch.num_stages)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = arch.stages[-1].embed
        self.global_pool = global_pool
        self.patch_output = patch_output
        self.grad_checkpointing = False
        if drop_path_rates is None:
            drop_path_rates = block_drop_path_rates(arch, drop_path_rate)

        c1 = arch.stages[0].embed
        self.stem = ConvStem(c1, in_chans)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c1))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grids[0] ** 2, c1))
        stages = []
        for s, st in enumerate(arch.stages):
            reduce = (ResidualSpatialReduction(arch.stages[s - 1].embed, st.embed, self.grids[s] ** 2)
                      if s > 0 else None)
            blocks = [Block(st.embed, b.heads, st.head_dim, b.mlp, rate)
                      for b, rate in zip(st.blocks, drop_path_rates[s]) if b is not None]
            stages.append(Stage(reduce, blocks))
        self.stages = nn.ModuleList(stages)
        # timm feature extraction (features_only=True wraps the model in FeatureGetterNet -> forward_intermediates):
        # one feature map per stage, at strides 14 / 28 / 56.
        self.feature_info = [dict(num_chs=st.embed, reduction=PATCH_SIZE * 2 ** s, module=f"stages.{s}")
                             for s, st in enumerate(arch.stages)]
        self.norm = nn.LayerNorm(self.num_features, eps=LN_EPS)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.patch_head = nn.Linear(self.num_features, num_classes) if patch_output and num_classes > 0 else None
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        init_weights(self)

    # -- timm API ------------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        return {"cls_token"}  # the original excludes only the class token (pos-embeds ARE decayed, vit_resnas.md 3.3)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^cls_token|^pos_embed|^stem",
                    blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.blocks\.(\d+)", None),
                                                              (r"^stages\.(\d+)\.reduce", (0,)),
                                                              (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        if global_pool not in (None, "token", ""):
            raise ValueError(f"global_pool must be 'token' (the cls token) or '' (unpooled), got {global_pool!r}")
        if global_pool is not None:
            self.global_pool = global_pool
        self.num_classes = num_classes
        device, dtype = self.cls_token.device, self.cls_token.dtype  # (the norm may have been pruned to Identity)
        self.head = (nn.Linear(self.num_features, num_classes, device=device, dtype=dtype) if num_classes > 0
                     else nn.Identity())
        if self.patch_head is not None:
            self.patch_head = (nn.Linear(self.num_features, num_classes, device=device, dtype=dtype)
                               if num_classes > 0 else None)

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be an image batch (B, C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        expected = (self.stem.conv1.conv.in_channels, self.img_size, self.img_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (B, {expected[0]}, {self.img_size}, {self.img_size}) for this model "
                             f"(img_size={self.img_size}; build it with another multiple of 56 for other sizes), got "
                             f"{tuple(x.shape)}")

    # -- forward ---------------------------------------------------------------------------------------------------
    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A block, under activation checkpointing when enabled (its activations are recomputed in the backward;
        the RNG state is replayed, so drop-path draws are the same)."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return block(x)

    def _stage_outputs(self, x: torch.Tensor, num_stages: int) -> Tuple[List[torch.Tensor], Callable]:
        """The tokens (B, 1 + HW_s, C_s) after each of the first `num_stages` stages, and the final norm as a
        function of the last stage's tokens. Overridden by the ragged supernet."""
        self.check_input(x)
        x = self.stem(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        outs = []
        for s, stage in enumerate(self.stages[:num_stages]):
            if stage.reduce is not None:
                x = stage.reduce(x, self.grids[s - 1])
            for block in stage.blocks:
                x = self._run_block(block, x)
            outs.append(x)
        return outs, self.norm

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> stage-3 tokens (B, 1 + HW, C), before the final norm."""
        return self._stage_outputs(x, len(self.stages))[0][-1]

    def forward_intermediates(self, x: torch.Tensor, indices: Union[int, Sequence[int], None] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False, **kwargs):
        """timm's intermediate-feature API, one feature per stage (stage outputs, strides 14 / 28 / 56).

        Args:
            indices: stages to return: None all, an int the last n, a sequence the given (negative from the end).
            return_prefix_tokens: also return each stage's cls token: a list of (features, cls (B, 1, C_s)) pairs.
            norm: apply the final LayerNorm to the last stage's output (the only one of its width).
            stop_early: do not run the stages after the last one requested.
            output_fmt: "NCHW" (B, C_s, H_s, W_s) patch maps, or "NLC" (B, H_s * W_s, C_s) patch tokens.
            intermediates_only: return only the list; else (final features, list), the final features being
                `forward_features(x)` (normalised tokens, cls first) when every stage ran, else the last stage's.
            kwargs: the supernet takes archs= and group_sizes= here (as in its forward).
        """
        output_fmt = getattr(output_fmt, "value", output_fmt)  # FeatureGetterNet passes timm's Format enum
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stages), indices)
        outs, final_norm = self._stage_outputs(x, max_index + 1 if stop_early else len(self.stages), **kwargs)
        last = len(self.stages) - 1
        intermediates = []
        for s in take:
            y = final_norm(outs[s]) if norm and s == last else outs[s]
            cls, patches = y[:, :1], y[:, 1:]
            if output_fmt == "NCHW":
                g = self.grids[s]
                patches = patches.reshape(y.shape[0], g, g, -1).permute(0, 3, 1, 2).contiguous()
            intermediates.append((patches, cls) if return_prefix_tokens else patches)
        if intermediates_only:
            return intermediates
        final = final_norm(outs[-1]) if len(outs) == len(self.stages) else outs[-1]
        return final, intermediates

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last of `indices` (and the final norm / the head if asked), as timm's feature
        extraction does before wrapping the model. Returns the absolute stage indices."""
        take, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:  # the head and norm are sized for the last stage: they go too
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, "")
            self.patch_head = None
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens (B, 1 + (H/56)(W/56), C_last): the cls token first."""
        return self.norm(self.forward_tokens(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor):
        tokens = self.forward_tokens(x)
        if self.training and self.patch_head is not None:
            # Patch-token mixup training: the final LN on all tokens, a per-token head on the patches.
            feats = self.norm(tokens)
            return self.forward_head(feats), self.patch_head(feats[:, 1:])
        if self.global_pool != "token":
            return self.forward_head(self.norm(tokens))
        # Inference: the LN on the cls token only (LN is per token, so this equals norm-then-select).
        return self.forward_head(self.norm(tokens[:, :1]))
