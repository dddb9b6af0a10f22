"""BatchNorm folding with a self-invalidating inference cache: the Conv/Linear + BatchNorm pairs of LeViT, which run
as one conv / linear with folded weights in inference (see the package docstring for when the cache is rebuilt)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from . import onednn
from .onednn import _conv, _linear, _needs_autograd, _packable, use_onednn_conv

__all__ = ["ConvNorm", "LinearNorm", "NormLinear"]


class _FoldedCache(nn.Module):
    """Base of the layers whose inference form is a cached function of their parameters (folded BN, gathered bias).

    Subclasses implement `_cache_sources()` (the tensors the cache is computed from) and `_compute_cache()` (a
    differentiable function of them returning a tuple of tensors). `_inference_tensors()` returns the cached tuple,
    rebuilding it when any source changed in place (version counters) or was replaced (`.to()`, `.data = ...`), or
    computes it on the fly when autograd needs to flow into the sources.
    """

    def __init__(self):
        super().__init__()
        self._cache: Optional[Tuple[torch.Tensor, ...]] = None
        self._cache_key: Optional[tuple] = None
        self._packed: Optional[torch.Tensor] = None  # the folded weight pre-packed for oneDNN (CPU fp32), or None

    # -- to implement --------------------------------------------------------------------------------------------
    def _cache_sources(self) -> Tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _compute_cache(self) -> Tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _pack(self, cache: Tuple[torch.Tensor, ...]) -> Optional[torch.Tensor]:
        """Optionally, the cached weight in oneDNN's blocked layout (what Inductor's weight prepacking does): saves
        the per-call reorder of the weight inside the oneDNN conv."""
        return None

    # -- cache logic ---------------------------------------------------------------------------------------------
    def _packed_weight(self) -> Optional[torch.Tensor]:
        # Never touched while tracing: oneDNN's opaque tensors cannot be fakeified, and compiled code uses plain ops.
        return None if torch.compiler.is_compiling() else self._packed

    def _source_key(self) -> tuple:
        # (object id, storage, in-place version) of every source: any change to a source changes the key, except a
        # write through `.data`, which has its own version counter (see the module docstring: `clear_caches()`).
        return tuple((id(t), t.data_ptr(), t._version) for t in self._cache_sources())

    def clear_cache(self) -> None:
        self._cache = None
        self._cache_key = None
        self._packed = None

    @torch.no_grad()
    def build_cache(self) -> None:
        self._cache = tuple(t.detach().contiguous() for t in self._compute_cache())
        self._packed = self._pack(self._cache) if onednn.PACK_WEIGHTS and onednn._ONEDNN else None
        self._cache_key = self._source_key()

    def __getstate__(self):
        # Caches are derived data (and oneDNN's packed tensors cannot be copied): deepcopy / pickle leave them out,
        # the copy rebuilds them on first use.
        state = self.__dict__.copy()
        state.update(_cache=None, _cache_key=None, _packed=None)
        return state

    def _inference_tensors(self) -> Tuple[torch.Tensor, ...]:
        if torch.is_grad_enabled() and _needs_autograd(*self._cache_sources()):
            return self._compute_cache()  # differentiable fold (eval-mode fine-tuning)
        if torch.compiler.is_compiling():
            # Traced graphs read the cache as built by eval()/fuse(); without one, the fold is traced into the graph.
            return self._cache if self._cache is not None else self._compute_cache()
        if self._cache is None or self._cache_key != self._source_key():
            self.build_cache()
        return self._cache

    def _apply(self, fn, recurse=True):
        self.clear_cache()  # converted/moved sources: rebuilt on the next inference call (or by LevitFused._apply)
        return super()._apply(fn, recurse)


def _bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = x * scale + shift, computed in fp32 (at least) for accuracy."""
    dtype = torch.promote_types(bn.running_var.dtype, torch.float32)
    scale = bn.weight.to(dtype) * torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    shift = bn.bias.to(dtype) - bn.running_mean.to(dtype) * scale
    return scale, shift


def _conv_or_linear_bn_sources(layer: nn.Module) -> Tuple[torch.Tensor, ...]:
    # Read through the module dicts, not nn.Module.__getattr__: this runs for every layer on every inference call
    # (the cache's version check), where the attribute lookups cost more than the small GEMMs' epilogues.
    weight = layer._modules["linear"]._parameters["weight"]
    bn = layer._modules["bn"]
    bn_params, bn_buffers = bn._parameters, bn._buffers
    return weight, bn_params["weight"], bn_params["bias"], bn_buffers["running_mean"], bn_buffers["running_var"]


class ConvNorm(_FoldedCache):
    """Conv2d (no bias) + BatchNorm2d; timm's `ConvNorm` names (`linear`, `bn`). Inference: one conv, folded BN."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, padding: int = 0,
                 bn_weight_init: float = 1.0, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.linear = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, bias=False, **dd)
        self.bn = nn.BatchNorm2d(out_chs, **dd)
        nn.init.constant_(self.bn.weight, bn_weight_init)

    def _cache_sources(self):
        return _conv_or_linear_bn_sources(self)

    def _compute_cache(self):
        scale, shift = _bn_scale_shift(self.bn)
        w = self.linear.weight
        return (w * scale.to(w.dtype)[:, None, None, None]).to(w.dtype), shift.to(w.dtype)

    def _pack(self, cache):
        c = self.linear
        if not (_packable(cache[0]) and use_onednn_conv(c.in_channels)):
            return None
        return torch.ops.mkldnn._reorder_convolution_weight(cache[0], list(c.padding), list(c.stride),
                                                             list(c.dilation), c.groups)

    def forward(self, x: torch.Tensor, hardswish: bool = False) -> torch.Tensor:
        if self.bn.training:
            y = self.bn(self.linear(x))
            return F.hardswish(y) if hardswish else y
        w, b = self._inference_tensors()
        return _conv(x, w, b, self.linear.stride, self.linear.padding, hardswish, self._packed_weight())


class LinearNorm(_FoldedCache):
    """Linear (no bias) + BatchNorm1d over the flattened tokens; timm's `LinearNorm` names. Inference: one linear."""

    def __init__(self, in_features: int, out_features: int, bn_weight_init: float = 1.0, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.linear = nn.Linear(in_features, out_features, bias=False, **dd)
        self.bn = nn.BatchNorm1d(out_features, **dd)
        nn.init.constant_(self.bn.weight, bn_weight_init)

    def _cache_sources(self):
        return _conv_or_linear_bn_sources(self)

    def _compute_cache(self):
        scale, shift = _bn_scale_shift(self.bn)
        w = self.linear.weight
        return (w * scale.to(w.dtype)[:, None]).to(w.dtype), shift.to(w.dtype)

    def forward(self, x: torch.Tensor, hardswish: bool = False, residual: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """[residual +] [hardswish](BN(x @ W.T))."""
        if self.bn.training:
            y = self.linear(x)
            y = self.bn(y.flatten(0, -2)).view_as(y)
            if hardswish:
                y = F.hardswish(y)
            return y if residual is None else residual + y
        w, b = self._inference_tensors()
        return _linear(x, w, b, hardswish, residual)


class NormLinear(_FoldedCache):
    """BatchNorm1d -> Dropout -> Linear (the classifier head); timm's `NormLinear` names."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, std: float = 0.02, drop: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.bn = nn.BatchNorm1d(in_features, **dd)
        self.drop = nn.Dropout(drop)
        self.linear = nn.Linear(in_features, out_features, bias=bias, **dd)
        trunc_normal_(self.linear.weight, std=std)
        if self.linear.bias is not None:
            nn.init.zeros_(self.linear.bias)

    def _cache_sources(self):
        bn, lin = self.bn, self.linear
        out = (lin.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        return out + ((lin.bias,) if lin.bias is not None else ())

    def _compute_cache(self):
        scale, shift = _bn_scale_shift(self.bn)
        w = self.linear.weight
        b = w.to(shift.dtype) @ shift
        if self.linear.bias is not None:
            b = b + self.linear.bias.to(b.dtype)
        return (w * scale.to(w.dtype)[None, :]).to(w.dtype), b.to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn.training or (self.drop.training and self.drop.p > 0):
            return self.linear(self.drop(self.bn(x)))
        w, b = self._inference_tensors()
        return F.linear(x, w, b)


class _AveragedHeads(_FoldedCache):
    """Inference form of the distilled pair: (head(x) + head_dist(x)) / 2 == one linear with averaged folded
    weights. Holds no parameters of its own (it reads the two heads, which it does not register as children)."""

    def __init__(self, owner: nn.Module):   # the LevitFused whose `head` and `head_dist` it averages
        super().__init__()
        self._owner = [owner]  # a list, so the owner is not registered as a submodule (no cycle in the module tree)

    def _cache_sources(self):
        owner = self._owner[0]
        return owner.head._cache_sources() + owner.head_dist._cache_sources()

    def _compute_cache(self):
        owner = self._owner[0]
        w1, b1 = owner.head._compute_cache()
        w2, b2 = owner.head_dist._compute_cache()
        return (w1 + w2) * 0.5, (b1 + b2) * 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._inference_tensors()
        return F.linear(x, w, b)
