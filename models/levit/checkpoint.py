"""Weights for LeViT: timm `levit_*` state dicts load unchanged; the original facebookresearch/LeViT checkpoints are
renamed onto this model's (timm's) names."""
from __future__ import annotations

import re
from typing import Dict, List

import torch
import torch.nn as nn

__all__ = ["checkpoint_filter_fn"]

# facebookresearch/LeViT (levit.py) layout: `patch_embed` = Sequential(Conv2d_BN, act, Conv2d_BN, act, ...) with
# Conv2d_BN/Linear_BN = Sequential(c, bn); one flat `blocks` Sequential: per stage [Residual(Attention),
# Residual(MLP)] x depth, then AttentionSubsample + Residual(MLP) before the next stage; Residual wraps its module
# as `.m`; MLP = Sequential(Linear_BN, act, Linear_BN); attention output `proj` = Sequential(act, Linear_BN);
# heads BN_Linear = Sequential(bn, l).
_ORIGINAL_SUBKEYS = (
    # (pattern in an original block, replacement in ours); applied to the key after the block prefix
    (r"^m\.qkv\.c\.", "qkv.linear."), (r"^m\.qkv\.bn\.", "qkv.bn."),
    (r"^m\.proj\.1\.c\.", "proj.ln.linear."), (r"^m\.proj\.1\.bn\.", "proj.ln.bn."),
    (r"^m\.attention_biases$", "attention_biases"),
    (r"^m\.0\.c\.", "ln1.linear."), (r"^m\.0\.bn\.", "ln1.bn."), (r"^m\.2\.c\.", "ln2.linear."),
    (r"^m\.2\.bn\.", "ln2.bn."),
    (r"^kv\.c\.", "kv.linear."), (r"^kv\.bn\.", "kv.bn."),
    (r"^q\.1\.c\.", "q.ln.linear."), (r"^q\.1\.bn\.", "q.ln.bn."),
    (r"^proj\.1\.c\.", "proj.ln.linear."), (r"^proj\.1\.bn\.", "proj.ln.bn."),
    (r"^attention_biases$", "attention_biases"),
)


def _original_block_targets(model: nn.Module) -> List[str]:
    """Our module prefix for each index of the original flat `blocks` Sequential."""
    targets = []
    for s, stage in enumerate(model.stages):
        if not isinstance(stage.downsample, nn.Identity):
            targets += [f"stages.{s}.downsample.attn_downsample", f"stages.{s}.downsample.mlp"]
        for b in range(len(stage.blocks)):
            targets += [f"stages.{s}.blocks.{b}.attn", f"stages.{s}.blocks.{b}.mlp"]
    return targets


def _remap_original(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    targets = _original_block_targets(model)
    stem = {"0": "conv1", "2": "conv2", "4": "conv3", "6": "conv4"}
    out = {}
    for key, value in state_dict.items():
        if key.endswith("attention_bias_idxs"):
            continue  # the index is recomputed (identical to ours, levit.md section 1)
        m = re.match(r"^patch_embed\.(\d+)\.(c|bn)\.(.+)$", key)
        if m:
            out[f"stem.{stem[m.group(1)]}.{'linear' if m.group(2) == 'c' else 'bn'}.{m.group(3)}"] = value
            continue
        m = re.match(r"^(head|head_dist)\.(bn|l)\.(.+)$", key)
        if m:
            out[f"{m.group(1)}.{'linear' if m.group(2) == 'l' else 'bn'}.{m.group(3)}"] = value
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)$", key)
        if not m:
            raise KeyError(f"unexpected key {key!r} in a facebookresearch/LeViT checkpoint")
        index, rest = int(m.group(1)), m.group(2)
        if index >= len(targets):
            raise KeyError(f"{key!r}: the checkpoint has more blocks than this model ({len(targets)}); "
                           f"is it another LeViT variant?")
        for pattern, repl in _ORIGINAL_SUBKEYS:
            new, n = re.subn(pattern, repl, rest)
            if n:
                out[f"{targets[index]}.{new}"] = value
                break
        else:
            raise KeyError(f"unexpected key {key!r} in a facebookresearch/LeViT checkpoint")
    return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map a timm `levit_*` or an original facebookresearch/LeViT state dict onto this model's names.

    Unwraps {'model': ...} (the original checkpoints), drops the `attention_bias_idxs` buffers (recomputed), renames
    the original layout (detected by its `patch_embed.` / `blocks.` keys). timm state dicts load unchanged.
    """
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    if any(k.startswith(("patch_embed.", "blocks.")) for k in state_dict):
        return _remap_original(state_dict, model)
    return {k: v for k, v in state_dict.items() if "attention_bias_idxs" not in k}
