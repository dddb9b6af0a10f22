"""LeViT: the model (attention layers, blocks, stages, `LevitFused`) and its timm entrypoints; the package docstring
describes the architecture and the modes. The Conv/Linear + BatchNorm layers are in folding.py, the oneDNN CPU
path in onednn.py, the checkpoint remap in checkpoint.py, the FLOP counter in flops.py."""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, checkpoint_seq

from resnas_kernels.reference.attention import levit_bias_index

from .checkpoint import checkpoint_filter_fn
from .folding import ConvNorm, LinearNorm, NormLinear, _AveragedHeads, _FoldedCache
from .onednn import _hardswish, _needs_autograd, attention_cpu_inference, cpu_fast_path

__all__ = ["LevitFused", "Attention", "AttentionDownsample", "MODEL_CFGS", "EVAL_DENSE_BIAS", "levit_bias_index",
           "levit_128s_fused", "levit_128_fused", "levit_192_fused", "levit_256_fused",
           "levit_384_fused"]

# Same architecture table as timm's `model_cfgs` and the official `specification` (levit.md section 3).
MODEL_CFGS: Dict[str, dict] = {
    "levit_128s": dict(embed_dim=(128, 256, 384), key_dim=16, num_heads=(4, 6, 8), depth=(2, 3, 4)),
    "levit_128": dict(embed_dim=(128, 256, 384), key_dim=16, num_heads=(4, 8, 12), depth=(4, 4, 4)),
    "levit_192": dict(embed_dim=(192, 288, 384), key_dim=32, num_heads=(3, 5, 6), depth=(4, 4, 4)),
    "levit_256": dict(embed_dim=(256, 384, 512), key_dim=32, num_heads=(4, 6, 8), depth=(4, 4, 4)),
    "levit_384": dict(embed_dim=(384, 512, 768), key_dim=32, num_heads=(6, 9, 12), depth=(4, 4, 4)),
}


# ---------------------------------------------------------------------------------------------------------------------
# Kernels used by the layers
# ---------------------------------------------------------------------------------------------------------------------
def _attention_op():
    """`resnas_kernels.ragged_attention`, looked up through `_ATTENTION_OP` (tests swap it there)."""
    op = _ATTENTION_OP.get("op")
    if op is None:
        # From the op's module, not the package root: the root imports the models (timm registration).
        from resnas_kernels.ops.ragged_attention import ragged_attention

        op = _ATTENTION_OP["op"] = ragged_attention
    return op


_ATTENTION_OP: Dict[str, object] = {}

# Inference attention bias: True passes the cached gathered (H, Nq, Nk) bias to the kernel (dense_bias); False lets
# the kernel gather from the table itself (bias_grid). Both are exact; the dense read was measured faster on CPU.
EVAL_DENSE_BIAS = True
# True: eager CPU fp32 inference runs the attention as chunked batched GEMMs (onednn.attention_cpu_inference) instead
# of the fused kernel. The GEMMs were faster at LeViT's small head dims until the C++ kernel's register blocking; since
# then the kernel is 2-9 % faster on the whole LeViT-128S (batch 1 and 16, 1 and 2 threads; BENCHMARKS.md).
CPU_INFERENCE_GEMM_ATTENTION = False


# ---------------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------------
def _unfused_attention(q, k, v, scale: float, bias: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch attention with the same operand layout as the fused op: q (B, Nq, H, D), k (B, Nk, H, D),
    v (B, Nk, H, Dv), bias (H, Nq, Nk) -> (B, Nq, H*Dv). The 'unfused' path tests compare the kernel against."""
    B, Nq, H, _ = q.shape
    attn = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * scale + bias
    attn = attn.softmax(dim=-1)
    return (attn @ v.transpose(1, 2)).transpose(1, 2).reshape(B, Nq, H * v.shape[-1])


class _BiasedAttentionBase(_FoldedCache):
    """What the two attention layers share: the bias table, its index, and the call into the attention kernel.

    Training (or any call that needs the table's gradient) passes the table to the kernel with `bias_grid=(R, s)`:
    the kernel computes |dy|*R + |dx| from the query/key positions and reduces the table's gradient itself
    (non-square grids pass the (Nq, Nk) index instead). Inference passes the gathered (H, Nq, Nk) bias, cached per
    layer like the folded weights (`EVAL_DENSE_BIAS`; rebuilt when the table changes, dropped by train()).
    """

    fused_attn: bool  # set by LevitFused.set_fused_attn; True -> resnas_kernels.ragged_attention

    def _init_bias(self, num_heads: int, resolution: Tuple[int, int], stride: int, device, dtype):
        self.resolution = resolution
        self.stride = stride
        self.resolution_q = tuple((r - 1) // stride + 1 for r in resolution)
        self.num_keys = resolution[0] * resolution[1]
        self.num_queries = self.resolution_q[0] * self.resolution_q[1]
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, self.num_keys, device=device, dtype=dtype))
        self.register_buffer("attention_bias_idxs", levit_bias_index(resolution, stride, device=device),
                             persistent=False)
        self.fused_attn = True

    def _cache_sources(self):
        return (self.attention_biases,)

    def _compute_cache(self):
        return (self.attention_biases[:, self.attention_bias_idxs],)

    def init_non_persistent_buffers(self) -> None:
        """timm's hook for models built on the meta device: recompute the index buffer."""
        self.attention_bias_idxs = levit_bias_index(self.resolution, self.stride, self.attention_bias_idxs.device)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        op = _attention_op() if self.fused_attn else None
        table = self.attention_biases
        if (op is not None and CPU_INFERENCE_GEMM_ATTENTION and not self.training
                and cpu_fast_path(q, k, v, table)):
            (bias,) = self._inference_tensors()
            return attention_cpu_inference(q, k, v, self.scale, bias)
        if self.training or _needs_autograd(table):
            # The table's gradient is reduced inside the kernel; the index is computed there on square grids.
            if op is not None:
                if self.resolution[0] == self.resolution[1]:
                    return op(q, k, v, scale=self.scale, bias_table=table, bias_grid=(self.resolution[0], self.stride))
                return op(q, k, v, scale=self.scale, bias_table=table, bias_index=self.attention_bias_idxs)
            bias = table[:, self.attention_bias_idxs]  # gathered per call while training, as timm does
        elif op is not None and not EVAL_DENSE_BIAS and self.resolution[0] == self.resolution[1]:
            return op(q, k, v, scale=self.scale, bias_table=table, bias_grid=(self.resolution[0], self.stride))
        else:
            (bias,) = self._inference_tensors()  # the gathered (H, Nq, Nk) bias, cached
        if op is not None:
            return op(q, k, v, scale=self.scale, dense_bias=bias)
        return _unfused_attention(q, k, v, self.scale, bias)

    def _check_tokens(self, n: int, expected: int) -> None:
        if n != expected:
            raise ValueError(f"{type(self).__name__}: x has {n} tokens but this layer's attention-bias table is tied "
                             f"to the {self.resolution[0]}x{self.resolution[1]} token grid ({expected} tokens)")


class Attention(_BiasedAttentionBase):
    """In-stage attention: qkv = LinearNorm(C -> H*(2D + Dv)) with per-head interleaved [q | k | v] channels,
    Hardswish, LinearNorm(H*Dv -> C) (gamma initialised to 0: it ends a residual branch)."""

    def __init__(self, dim: int, key_dim: int, num_heads: int = 8, attn_ratio: float = 4.0,
                 resolution: Union[int, Tuple[int, int]] = 14, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.key_attn_dim = key_dim * num_heads
        self.val_attn_dim = self.val_dim * num_heads
        self.qkv = LinearNorm(dim, self.val_attn_dim + 2 * self.key_attn_dim, **dd)
        self.proj = nn.Sequential(OrderedDict([
            ("act", nn.Hardswish()),  # applied by forward (in place at inference); kept for timm's module layout
            ("ln", LinearNorm(self.val_attn_dim, dim, bn_weight_init=0, **dd)),
        ]))
        self._init_bias(num_heads, to_2tuple(resolution), 1, device, dtype)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[residual +] proj(hardswish(attention(x))), x (B, N, C)."""
        B, N, _ = x.shape
        self._check_tokens(N, self.num_keys)
        qkv = self.qkv(x).view(B, N, self.num_heads, 2 * self.key_dim + self.val_dim)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)  # strided views, no copies
        o = self._attend(q, k, v)
        return self.proj.ln(_hardswish(o), residual=residual)


class Subsample(nn.Module):
    """Tokens of the stride-s grid: (B, R*R, C) -> (B, R'*R', C)."""

    def __init__(self, stride: int, resolution: Tuple[int, int]):
        super().__init__()
        self.stride = stride
        self.resolution = resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, C = x.shape
        return x.view(B, self.resolution[0], self.resolution[1], C)[:, ::self.stride, ::self.stride].reshape(B, -1, C)


class AttentionDownsample(_BiasedAttentionBase):
    """Shrink attention between stages: keys/values on all R x R tokens (kv = LinearNorm(C_in -> H*(D + 4D)), per-head
    [k | v]), queries from the stride-2 tokens (q = LinearNorm(C_in -> H*D)), output LinearNorm(H*4D -> C_out), no
    residual. timm's `AttentionDownsample` names (`kv`, `q.ln`, `proj.ln`)."""

    def __init__(self, in_dim: int, out_dim: int, key_dim: int, num_heads: int = 8, attn_ratio: float = 2.0,
                 stride: int = 2, resolution: Union[int, Tuple[int, int]] = 14, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        resolution = to_2tuple(resolution)
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.key_attn_dim = key_dim * num_heads
        self.val_attn_dim = self.val_dim * num_heads
        self.kv = LinearNorm(in_dim, self.val_attn_dim + self.key_attn_dim, **dd)
        self.q = nn.Sequential(OrderedDict([
            ("down", Subsample(stride, resolution)),
            ("ln", LinearNorm(in_dim, self.key_attn_dim, **dd)),
        ]))
        self.proj = nn.Sequential(OrderedDict([
            ("act", nn.Hardswish()),
            ("ln", LinearNorm(self.val_attn_dim, out_dim, **dd)),
        ]))
        self._init_bias(num_heads, resolution, stride, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        self._check_tokens(N, self.num_keys)
        k, v = self.kv(x).view(B, N, self.num_heads, self.key_dim + self.val_dim).split(
            [self.key_dim, self.val_dim], dim=3)
        q = self.q.ln(self.q.down(x)).view(B, self.num_queries, self.num_heads, self.key_dim)
        o = self._attend(q, k, v)
        return self.proj.ln(_hardswish(o))


# ---------------------------------------------------------------------------------------------------------------------
# Blocks and stages
# ---------------------------------------------------------------------------------------------------------------------
class LevitMlp(nn.Module):
    """LinearNorm(C -> rC), Hardswish, LinearNorm(rC -> C, gamma init 0)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.ln1 = LinearNorm(in_features, hidden_features, **dd)
        self.act = nn.Hardswish()  # fused into ln1 by forward; kept for timm's module layout
        self.drop = nn.Dropout(drop)
        self.ln2 = LinearNorm(hidden_features, in_features, bn_weight_init=0, **dd)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.ln2(self.drop(self.ln1(x, hardswish=True)), residual=residual)


def _residual(branch, x: torch.Tensor, drop_path: nn.Module) -> torch.Tensor:
    """x + drop_path(branch(x)); the add goes into the branch's last GEMM when drop-path is inactive."""
    if isinstance(drop_path, DropPath) and drop_path.training and drop_path.drop_prob > 0:
        return x + drop_path(branch(x))
    return branch(x, residual=x)


class LevitDownsample(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, key_dim: int, num_heads: int, attn_ratio: float = 4.0,
                 mlp_ratio: float = 2.0, resolution: Tuple[int, int] = (14, 14), drop_path: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.attn_downsample = AttentionDownsample(in_dim, out_dim, key_dim, num_heads, attn_ratio, stride=2,
                                                   resolution=resolution, **dd)
        self.mlp = LevitMlp(out_dim, int(out_dim * mlp_ratio), **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn_downsample(x)
        return _residual(self.mlp, x, self.drop_path)


class LevitBlock(nn.Module):
    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float = 2.0, mlp_ratio: float = 2.0,
                 resolution: Tuple[int, int] = (14, 14), drop_path: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.attn = Attention(dim, key_dim, num_heads, attn_ratio, resolution, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = LevitMlp(dim, int(dim * mlp_ratio), **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _residual(self.attn, x, self.drop_path1)
        return _residual(self.mlp, x, self.drop_path2)


class LevitStage(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, key_dim: int, depth: int, num_heads: int, attn_ratio: float,
                 mlp_ratio: float, resolution: Tuple[int, int], downsample: bool, drop_path: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if downsample:
            # Shrink attention: C_in / D heads, V dim 4D, MLP ratio 2 (levit.md section 2; timm and the official code).
            self.downsample = LevitDownsample(in_dim, out_dim, key_dim, num_heads=in_dim // key_dim, attn_ratio=4.0,
                                              mlp_ratio=2.0, resolution=resolution, drop_path=drop_path, **dd)
            resolution = tuple((r - 1) // 2 + 1 for r in resolution)
        else:
            if in_dim != out_dim:
                raise ValueError(f"a stage without downsampling keeps its width: in_dim={in_dim} != out_dim={out_dim}")
            self.downsample = nn.Identity()
        self.resolution = resolution
        self.blocks = nn.Sequential(*[
            LevitBlock(out_dim, key_dim, num_heads, attn_ratio, mlp_ratio, resolution, drop_path, **dd)
            for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class Stem16(nn.Module):
    """4 x [Conv3x3 stride 2 + BN], Hardswish after the first three: 224 -> 14. timm's `Stem16` names."""

    def __init__(self, in_chs: int, out_chs: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.stride = 16
        self.conv1 = ConvNorm(in_chs, out_chs // 8, 3, stride=2, padding=1, **dd)
        self.act1 = nn.Hardswish()  # the activations are fused into the convs by forward; kept for the layout
        self.conv2 = ConvNorm(out_chs // 8, out_chs // 4, 3, stride=2, padding=1, **dd)
        self.act2 = nn.Hardswish()
        self.conv3 = ConvNorm(out_chs // 4, out_chs // 2, 3, stride=2, padding=1, **dd)
        self.act3 = nn.Hardswish()
        self.conv4 = ConvNorm(out_chs // 2, out_chs, 3, stride=2, padding=1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x, hardswish=True)
        x = self.conv2(x, hardswish=True)
        x = self.conv3(x, hardswish=True)
        return self.conv4(x)


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------
class LevitFused(nn.Module):
    """LeViT with timm's `Levit`/`LevitDistilled` parameter names, API and outputs (see the module docstring).

    Args: as timm's `Levit` for the linear (non-conv) mode with the s16 stem, subsample downsampling and Hardswish
    (the five published variants), plus:
        distilled: add the distillation head `head_dist` (timm's `LevitDistilled`; True for the published weights).
        fused_attn: run the attention through `resnas_kernels.ragged_attention` (default True; eager CPU fp32
            inference uses batched GEMMs instead when CPU_INFERENCE_GEMM_ATTENTION is set); False runs plain PyTorch attention (the timm math), e.g. to
            compare against the kernel.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: Tuple[int, ...] = (192,), key_dim: int = 64, depth: Tuple[int, ...] = (12,),
                 num_heads: Union[int, Tuple[int, ...]] = (3,), attn_ratio: Union[float, Tuple[float, ...]] = 2.0,
                 mlp_ratio: Union[float, Tuple[float, ...]] = 2.0, global_pool: str = "avg", drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, distilled: bool = True, fused_attn: Optional[bool] = None,
                 device=None, dtype=None, **kwargs):
        super().__init__()
        unsupported = {k: v for k, v in kwargs.items()
                       if not (k == "act_layer" and v in ("hard_swish", "hardswish", nn.Hardswish))
                       and not (k == "stem_type" and v == "s16") and not (k == "down_op" and v == "subsample")
                       and not (k == "use_conv" and not v)}
        if unsupported:
            raise ValueError(f"LevitFused implements timm's linear-mode LeViT with the s16 stem, subsample "
                             f"downsampling and Hardswish; unsupported arguments: {unsupported}")
        if global_pool not in ("", "avg"):
            raise ValueError(f"global_pool must be 'avg' or '' (LeViT pools by averaging tokens), got {global_pool!r}")
        dd = dict(device=device, dtype=dtype)
        num_stages = len(embed_dim)
        if len(depth) != num_stages:
            raise ValueError(f"depth must have one entry per stage ({num_stages}), got {depth}")
        as_tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * num_stages  # noqa: E731
        num_heads, attn_ratio, mlp_ratio = as_tuple(num_heads), as_tuple(attn_ratio), as_tuple(mlp_ratio)

        self.img_size = to_2tuple(img_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dim[-1]
        self.embed_dim = tuple(embed_dim)
        self.drop_rate = drop_rate
        self.distilled = distilled
        self.distilled_training = False
        self.grad_checkpointing = False
        self.use_conv = False
        self.feature_info = []

        self.stem = Stem16(in_chans, embed_dim[0], **dd)
        stride = self.stem.stride
        resolution = tuple(i // stride for i in self.img_size)
        if min(resolution) < 1:
            raise ValueError(f"img_size {self.img_size} is smaller than the stem's stride {stride}")
        self.patch_grid = resolution
        stages = []
        in_dim = embed_dim[0]
        for i in range(num_stages):
            stages.append(LevitStage(in_dim, embed_dim[i], key_dim, depth[i], num_heads[i], attn_ratio[i],
                                     mlp_ratio[i], resolution, downsample=i > 0, drop_path=drop_path_rate, **dd))
            if i > 0:
                stride *= 2
                resolution = tuple((r - 1) // 2 + 1 for r in resolution)
            self.feature_info.append(dict(num_chs=embed_dim[i], reduction=stride, module=f"stages.{i}"))
            in_dim = embed_dim[i]
        self.stages = nn.Sequential(*stages)
        self.final_grid = resolution

        self.head = self._make_head(num_classes, dd)
        self.head_dist = self._make_head(num_classes, dd) if distilled else None
        # Not a registered submodule (it owns no parameters and must not appear in the module tree).
        object.__setattr__(self, "_avg_heads", _AveragedHeads(self))
        self.set_fused_attn(fused_attn)

    def _make_head(self, num_classes: int, dd: dict) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        return NormLinear(self.num_features, num_classes, drop=self.drop_rate, **dd)

    # -- fused attention switch, inference caches ---------------------------------------------------------------
    def set_fused_attn(self, enable: Optional[bool] = True) -> "LevitFused":
        """True or None: attention through resnas_kernels.ragged_attention (eager CPU fp32 inference: batched GEMMs
        instead when CPU_INFERENCE_GEMM_ATTENTION is set); False: plain PyTorch attention (timm's math), e.g. to compare against."""
        use = enable is None or bool(enable)
        for m in self.modules():
            if isinstance(m, _BiasedAttentionBase):
                m.fused_attn = use
        self.fused_attn = use
        return self

    def _cached_layers(self):
        layers = [m for m in self.modules() if isinstance(m, _FoldedCache)]
        return layers + ([self._avg_heads] if self.distilled and self.num_classes > 0 else [])

    def fuse(self) -> "LevitFused":
        """Switch to inference and build every cache now (folded BN weights, gathered biases, averaged heads), e.g.
        before `torch.compile`. `eval()` does the same; `train()` drops the caches."""
        self.eval()
        return self

    def clear_caches(self) -> "LevitFused":
        """Drop every inference cache (folded weights, gathered biases, averaged heads); the next eval-mode forward
        rebuilds them. Needed after in-place writes through `.data` (e.g. an EMA written as `p.data.lerp_(...)`),
        which the caches cannot detect."""
        for m in self._cached_layers():
            m.clear_cache()
        return self

    def train(self, mode: bool = True) -> "LevitFused":
        super().train(mode)
        for m in self._cached_layers():
            if mode:
                m.clear_cache()
            else:
                m.build_cache()
        return self

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)  # the layers clear their caches as they are converted
        self._avg_heads.clear_cache()
        if not self.training:
            self.train(False)  # rebuild the caches on the new device / dtype
        return out

    # -- timm API -------------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        return {k for k in self.state_dict().keys() if "attention_biases" in k}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True):
        self.distilled_training = enable

    @torch.jit.ignore
    def get_classifier(self):
        return (self.head, self.head_dist) if self.distilled else self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        if global_pool is not None:
            if global_pool not in ("", "avg"):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.stem.conv1.linear.weight
        dd = dict(device=ref.device, dtype=ref.dtype)
        self.head = self._make_head(num_classes, dd)
        self.head.train(self.training)
        if self.distilled:
            self.head_dist = self._make_head(num_classes, dd)
            self.head_dist.train(self.training)
        self._avg_heads.clear_cache()

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans or tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"x must be a (B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}) image batch, got "
                f"{tuple(x.shape)}: LeViT's attention-bias tables are tied to the {self.patch_grid[0]}x"
                f"{self.patch_grid[1]} token grid of {self.img_size[0]}x{self.img_size[1]} inputs (build the model "
                f"with img_size=... for another size; the pretrained bias tables do not transfer)")

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.stem(x)                                  # (B, C, 14, 14)
        return x.flatten(2).transpose(1, 2).contiguous()  # (B, 196, C) tokens, row-major grid order

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        if pre_logits or self.num_classes == 0:
            return x
        if not self.distilled:
            return self.head(x)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return self.head(x), self.head_dist(x)
        if self.head.bn.training or self.head_dist.bn.training or (self.drop_rate > 0 and self.training):
            return (self.head(x) + self.head_dist(x)) / 2
        return self._avg_heads(x)  # eval: both heads folded and averaged into one linear

    def forward(self, x: torch.Tensor):
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's contract: the outputs of the selected stages as NCHW maps, and the final features."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self._embed(x)
        B = x.shape[0]
        H, W = self.patch_grid
        stages = self.stages if (torch.jit.is_scripting() or not stop_early) else self.stages[:max_index + 1]
        intermediates = []
        for idx, stage in enumerate(stages):
            x = checkpoint(stage, x) if self.grad_checkpointing and not torch.jit.is_scripting() else stage(x)
            if idx > 0:
                H, W = (H - 1) // 2 + 1, (W - 1) // 2 + 1
            if idx in take_indices:
                intermediates.append(x.reshape(B, H, W, -1).permute(0, 3, 1, 2))
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices


# ---------------------------------------------------------------------------------------------------------------------
# timm registration
# ---------------------------------------------------------------------------------------------------------------------
def _create(variant: str, pretrained: bool = False, distilled: bool = True, **kwargs) -> LevitFused:
    out_indices = kwargs.pop("out_indices", (0, 1, 2))
    if kwargs.get("features_only", False):
        kwargs.setdefault("feature_cls", "getter")
    arch = variant[: -len("_fused")]
    return build_model_with_cfg(
        LevitFused, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **dict(MODEL_CFGS[arch], distilled=distilled, **kwargs))


def _cfg(timm_weights: str = "", **kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "stem.conv1.linear",
        "classifier": ("head.linear", "head_dist.linear"), "license": "apache-2.0", "paper_ids": "arXiv:2104.01136",
        # The authors' weights as re-hosted by timm: same names and shapes, loaded unchanged.
        **({"hf_hub_id": f"timm/{timm_weights}"} if timm_weights else {}),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    f"{arch}_fused.fb_dist_in1k": _cfg(f"{arch}.fb_dist_in1k") for arch in MODEL_CFGS
})


@register_model
def levit_128s_fused(pretrained: bool = False, **kwargs) -> LevitFused:
    return _create("levit_128s_fused", pretrained, **kwargs)


@register_model
def levit_128_fused(pretrained: bool = False, **kwargs) -> LevitFused:
    return _create("levit_128_fused", pretrained, **kwargs)


@register_model
def levit_192_fused(pretrained: bool = False, **kwargs) -> LevitFused:
    return _create("levit_192_fused", pretrained, **kwargs)


@register_model
def levit_256_fused(pretrained: bool = False, **kwargs) -> LevitFused:
    return _create("levit_256_fused", pretrained, **kwargs)


@register_model
def levit_384_fused(pretrained: bool = False, **kwargs) -> LevitFused:
    return _create("levit_384_fused", pretrained, **kwargs)
