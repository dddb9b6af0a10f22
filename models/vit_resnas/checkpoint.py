"""Checkpoints: atomic save, `weights_only=True` load, and loading the original repository's weights.

The original code (yilunliao/vit-search, `FlexibleDistillVisionTransformerSR`) keeps one flat `blocks` list holding the
transformer blocks, the RSR blocks and parameter-less `BypassBlock`s (exists = 0), so its names are e.g.

    patch_embed.conv1.conv.weight   -> stem.conv1.conv.weight     (conv{1,2,3}.{conv,bn}.* likewise)
    patch_embed.conv_proj.*         -> stem.proj.*
    tokens                          -> cls_token
    pos_embed                       -> pos_embed
    blocks.{i}.norm.*               -> stages.{s}.reduce.norm.*        (i is an RSR block: it has patch_reduce)
    blocks.{i}.patch_reduce.*       -> stages.{s}.reduce.conv.*
    blocks.{i}.token_transform.*    -> stages.{s}.reduce.cls_proj.*
    blocks.{i}.pos_embed            -> stages.{s}.reduce.pos_embed
    blocks.{i}.{norm1,attn,norm2,mlp}.* -> stages.{s}.blocks.{k}.*     (k counts the blocks of stage s that exist)
    norm.*, cls_head.*, patch_head.* -> norm.*, head.*, patch_head.*

The stage of a block is the number of RSR blocks before it. Bypass blocks own no parameters, so they are invisible in
the state dict and simply not counted (our models hold only existing blocks, as the original README says to retrain).
Distillation-token checkpoints (`dst_head`, two tokens) are not ViT-ResNAS final models and are refused.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from typing import Any, Dict, Mapping

import torch
import torch.nn.functional as F

from resnas_kernels._atomic import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "convert_original_state_dict", "is_original_state_dict",
           "checkpoint_filter_fn", "convert_original_checkpoint", "resize_pos_embeds"]

_STEM = {"patch_embed.conv_proj.": "stem.proj."}
_TOP = {"tokens": "cls_token", "pos_embed": "pos_embed"}
_TOP_PREFIX = {"norm.": "norm.", "cls_head.": "head.", "patch_head.": "patch_head."}
_RSR = {"norm.": "norm.", "patch_reduce.": "conv.", "token_transform.": "cls_proj.", "pos_embed": "pos_embed"}
_BLOCK_PARTS = ("norm1.", "attn.", "norm2.", "mlp.")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------
def save_checkpoint(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`: a crash never leaves a
    truncated checkpoint behind. Keep `obj` to tensors, containers and plain Python values so that
    `load_checkpoint` (weights_only) can read it."""
    atomic_write(path, lambda f: torch.save(obj, f), suffix=".pt")

def load_checkpoint(path: str, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True. The original repository's DeiT-style checkpoints also store the training
    `args` (an argparse.Namespace of plain values), which is allow-listed for this load only."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location=map_location, weights_only=True)


# ---------------------------------------------------------------------------------------------------------------------
# Original names -> ours
# ---------------------------------------------------------------------------------------------------------------------
def _unwrap(checkpoint: Mapping[str, Any], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint ({'model': ..., 'model_ema': ..., 'optimizer': ...}), with a
    DistributedDataParallel 'module.' prefix removed."""
    sd = checkpoint
    for key in (("model_ema", "model") if use_ema else ("model", "state_dict")):
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def is_original_state_dict(state_dict: Mapping[str, Any]) -> bool:
    return "tokens" in state_dict or any(k.startswith("patch_embed.") for k in state_dict)


def convert_original_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename an original-repository state dict to our names (see the module docstring). Raises a ValueError naming
    the first key it cannot place."""
    sd = _unwrap(state_dict)
    if "dst_head.weight" in sd or ("tokens" in sd and sd["tokens"].shape[1] != 1):
        raise ValueError("this is a distillation-token checkpoint (dst_head / two tokens); ViT-ResNAS models have one "
                         "cls token and no distillation head")
    block_ids = sorted({int(m.group(1)) for k in sd for m in [_BLOCK_KEY.match(k)] if m})
    rsr_ids = [i for i in block_ids if f"blocks.{i}.patch_reduce.weight" in sd]
    out: Dict[str, torch.Tensor] = {}
    # Per flat index: (stage, position among the stage's existing blocks).
    place: Dict[int, tuple] = {}
    stage, k = 0, 0
    for i in block_ids:
        if i in rsr_ids:
            stage, k = stage + 1, 0
            place[i] = (stage, None)
        else:
            place[i] = (stage, k)
            k += 1
    for key, value in sd.items():
        new = None
        m = _BLOCK_KEY.match(key)
        if m:
            s, k = place[int(m.group(1))]
            rest = m.group(2)
            if k is None:
                new = next((f"stages.{s}.reduce.{ours}{rest[len(orig):]}" for orig, ours in _RSR.items()
                            if rest.startswith(orig)), None)
            elif rest.startswith(_BLOCK_PARTS):
                new = f"stages.{s}.blocks.{k}.{rest}"
        elif key.startswith("patch_embed.conv_proj."):
            new = "stem.proj." + key[len("patch_embed.conv_proj."):]
        elif key.startswith("patch_embed.conv"):
            new = "stem." + key[len("patch_embed."):]
        elif key in _TOP:
            new = _TOP[key]
        else:
            new = next((ours + key[len(orig):] for orig, ours in _TOP_PREFIX.items() if key.startswith(orig)), None)
        if new is None:
            raise ValueError(f"cannot map the original state-dict key {key!r} to a ViT-ResNAS parameter (plain "
                             f"patch-embedding and distillation models are not supported)")
        out[new] = value
    return out


def resize_pos_embeds(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Bicubic interpolation of every positional embedding to the model's token grid (the original's high-resolution
    fine-tuning rule: the stage-1 cls entry is kept as is; RSR pos-embeds have no cls entry)."""
    own = model.state_dict()
    for key, value in list(state_dict.items()):
        if not key.endswith("pos_embed") or key not in own or value.shape == own[key].shape:
            continue
        n_cls = 0 if ".reduce." in key else 1
        old, new = value.shape[1] - n_cls, own[key].shape[1] - n_cls
        old_side, new_side = math.isqrt(old), math.isqrt(new)
        if old_side ** 2 != old or new_side ** 2 != new:
            raise ValueError(f"{key}: cannot resize a non-square token grid ({old} -> {new} tokens)")
        grid = value[:, n_cls:].reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(new_side, new_side), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, new, -1).to(value.dtype)
        state_dict[key] = torch.cat([value[:, :n_cls], grid], dim=1)
    return state_dict


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """timm `pretrained_filter_fn`: accept our own or the original repository's state dicts (or training checkpoints
    wrapping them), rename, drop a patch head the model does not have, resize positional embeddings."""
    sd = _unwrap(state_dict)
    if is_original_state_dict(sd):
        sd = convert_original_state_dict(sd)
    if getattr(model, "patch_head", None) is None:
        sd = {k: v for k, v in sd.items() if not k.startswith("patch_head.")}
    return resize_pos_embeds(sd, model)


def convert_original_checkpoint(src: str, dst: str, use_ema: bool = True) -> None:
    """Convert an original-repository checkpoint file (EMA weights when present and use_ema) into a plain state dict
    with our names, written atomically; `dst` then loads with timm's weights_only loader."""
    checkpoint = load_checkpoint(src)
    save_checkpoint(convert_original_state_dict(_unwrap(checkpoint, use_ema=use_ema)), dst)
