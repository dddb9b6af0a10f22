"""Checkpoints: the original repository's state-dict names mapped to ours, atomic save, weights_only load."""
import argparse
import os

import pytest
import timm
import torch

import resnas_kernels.models  # noqa: F401  (registers the models)
from resnas_kernels.models.vit_resnas import Arch, ViTResNAS, ViTResNASNet
from resnas_kernels.models.vit_resnas.checkpoint import (checkpoint_filter_fn, convert_original_checkpoint,
                                                         convert_original_state_dict, load_checkpoint,
                                                         save_checkpoint)

# A scaled-down original `network_def` with a BypassBlock (exists = 0) in stage 1 and one at the end of stage 3.
NETWORK_DEF = (
    (4, 16),
    (1, (16, 2, 8), (16, 48), 1), (1, (16, 2, 8), (16, 32), 0), (1, (16, 1, 8), (16, 40), 1),
    (3, 16, 24),
    (1, (24, 3, 8), (24, 64), 1), (1, (24, 2, 8), (24, 72), 1),
    (3, 24, 32),
    (1, (32, 2, 16), (32, 96), 1), (1, (32, 2, 16), (32, 96), 0),
    (2, 32, 7),
)
IMG = 56


def original_state_dict(network_def, img_size=IMG, patch_output=True, mid=24):
    """A state dict named and shaped as the original FlexibleDistillVisionTransformerSR (nets/vit_sr_supernet.py,
    nets/supernet_blocks.py, nets/patch_conv.py) builds it for `network_def`, filled with distinct random values.
    Written from the original module structure, independently of our mapping code."""
    g = torch.Generator().manual_seed(0)
    sd = {}

    def add(name, *shape):
        sd[name] = torch.randn(*shape, generator=g, dtype=torch.float64)

    for i, cin in ((1, 3), (2, mid), (3, mid)):
        add(f"patch_embed.conv{i}.conv.weight", mid, cin, 3, 3)
        for p in ("weight", "bias", "running_mean"):
            add(f"patch_embed.conv{i}.bn.{p}", mid)
        sd[f"patch_embed.conv{i}.bn.running_var"] = torch.rand(mid, generator=g, dtype=torch.float64) + 0.5
        sd[f"patch_embed.conv{i}.bn.num_batches_tracked"] = torch.tensor(5)
    c = network_def[0][1]
    grid = img_size // 14
    add("patch_embed.conv_proj.weight", c, mid, 7, 7)
    add("patch_embed.conv_proj.bias", c)
    add("tokens", 1, 1, c)
    add("pos_embed", 1, 1 + grid * grid, c)
    for i, entry in enumerate(network_def[1:-1]):  # one flat `blocks` list: blocks, RSRs and bypass blocks
        if entry[0] == 1 and entry[3]:
            (_, (c, h, d), (_, m), _) = entry
            for n in ("norm1", "norm2"):
                add(f"blocks.{i}.{n}.weight", c)
                add(f"blocks.{i}.{n}.bias", c)
            add(f"blocks.{i}.attn.qkv.weight", 3 * h * d, c)
            add(f"blocks.{i}.attn.qkv.bias", 3 * h * d)
            add(f"blocks.{i}.attn.proj.weight", c, h * d)
            add(f"blocks.{i}.attn.proj.bias", c)
            add(f"blocks.{i}.mlp.fc1.weight", m, c)
            add(f"blocks.{i}.mlp.fc1.bias", m)
            add(f"blocks.{i}.mlp.fc2.weight", c, m)
            add(f"blocks.{i}.mlp.fc2.bias", c)
        elif entry[0] == 3:
            _, ci, co = entry
            grid //= 2
            add(f"blocks.{i}.norm.weight", ci)
            add(f"blocks.{i}.norm.bias", ci)
            add(f"blocks.{i}.patch_reduce.weight", co, ci, 3, 3)
            add(f"blocks.{i}.patch_reduce.bias", co)
            add(f"blocks.{i}.token_transform.weight", co, ci)
            add(f"blocks.{i}.token_transform.bias", co)
            add(f"blocks.{i}.pos_embed", 1, grid * grid, co)
            c = co
    classes = network_def[-1][2]
    add("norm.weight", c)
    add("norm.bias", c)
    heads = ("cls_head", "patch_head") if patch_output else ("cls_head",)
    for head in heads:
        add(f"{head}.weight", classes, c)
        add(f"{head}.bias", classes)
    return sd


def _model(**kwargs):
    arch = Arch.from_network_def(NETWORK_DEF).pruned()
    return ViTResNAS(arch, img_size=IMG, num_classes=7, **kwargs).double()


def test_original_names_map_onto_our_model():
    original = original_state_dict(NETWORK_DEF)
    ours = convert_original_state_dict({"model": {"module." + k: v for k, v in original.items()}, "epoch": 3})
    model = _model(patch_output=True)
    model.load_state_dict(ours, strict=True)  # every parameter and buffer found, nothing left over
    sd = model.state_dict()
    # Spot checks across the flat index: bypass blocks (indices 1 and 8) own nothing and are skipped.
    pairs = {
        "patch_embed.conv2.bn.running_var": "stem.conv2.bn.running_var",
        "patch_embed.conv_proj.weight": "stem.proj.weight",
        "tokens": "cls_token",
        "blocks.0.attn.qkv.weight": "stages.0.blocks.0.attn.qkv.weight",
        "blocks.2.mlp.fc2.bias": "stages.0.blocks.1.mlp.fc2.bias",
        "blocks.3.patch_reduce.weight": "stages.1.reduce.conv.weight",
        "blocks.3.token_transform.bias": "stages.1.reduce.cls_proj.bias",
        "blocks.3.norm.weight": "stages.1.reduce.norm.weight",
        "blocks.5.norm2.weight": "stages.1.blocks.1.norm2.weight",
        "blocks.6.pos_embed": "stages.2.reduce.pos_embed",
        "blocks.7.attn.proj.weight": "stages.2.blocks.0.attn.proj.weight",
        "cls_head.weight": "head.weight",
        "patch_head.bias": "patch_head.bias",
    }
    for orig, mine in pairs.items():
        assert torch.equal(sd[mine], original[orig]), f"{orig} -> {mine}"
    # The converted weights run: the fused model and a stock network agree on them.
    stock = ViTResNASNet(model.arch, img_size=IMG, num_classes=7, patch_output=True).double().eval()
    stock.load_state_dict(ours)
    x = torch.randn(2, 3, IMG, IMG, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), stock(x), rtol=1e-10, atol=1e-10)


def test_filter_fn_and_timm_pretrained_file(tmp_path):
    original = original_state_dict(NETWORK_DEF, patch_output=True)
    path = str(tmp_path / "orig.pth")
    # The original trainer saves DeiT-style checkpoints with its argparse namespace (weights_only must cope).
    save_checkpoint({"model": original, "model_ema": original, "args": argparse.Namespace(lr=1e-3, epochs=300)}, path)
    converted = str(tmp_path / "converted.pth")
    convert_original_checkpoint(path, converted)
    model = _model()  # no patch head: the filter drops it
    filtered = checkpoint_filter_fn(load_checkpoint(path), model)
    model.load_state_dict(filtered, strict=True)
    assert torch.equal(model.stages[2].blocks[0].attn.qkv.weight, original["blocks.7.attn.qkv.weight"])
    # timm's own loader (weights_only) on the converted file, into a registered model at another input size:
    # pos-embeds are resized bicubically.
    arch = Arch.from_network_def(NETWORK_DEF).pruned()
    timm_model = timm.create_model("vit_res_tiny", arch=arch, num_classes=7, img_size=112, pretrained=True,
                                   pretrained_cfg_overlay=dict(file=converted))
    assert timm_model.pos_embed.shape == (1, 1 + 8 * 8, 16)
    assert torch.equal(timm_model.stages[1].reduce.conv.weight, original["blocks.3.patch_reduce.weight"].float())
    assert torch.equal(timm_model.pos_embed[:, :1], original["pos_embed"][:, :1].float())  # cls entry kept


def test_unmappable_checkpoints_are_refused():
    original = original_state_dict(NETWORK_DEF)
    with pytest.raises(ValueError, match="distillation-token checkpoint"):
        convert_original_state_dict({**original, "dst_head.weight": torch.zeros(7, 32)})
    with pytest.raises(ValueError, match="cannot map the original state-dict key 'blocks.0.extra.weight'"):
        convert_original_state_dict({**original, "blocks.0.extra.weight": torch.zeros(1)})


def test_atomic_save_and_weights_only_load(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    model = ViTResNASNet(Arch.from_network_def(NETWORK_DEF).pruned(), img_size=IMG, num_classes=7)
    save_checkpoint({"model": model.state_dict(), "arch": model.arch.to_json(), "epoch": 1}, path)
    loaded = load_checkpoint(path)
    assert Arch.from_json(loaded["arch"]) == model.arch and loaded["epoch"] == 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded["model"].items())
    # A failing save leaves the previous file intact and no temporary file behind.
    with pytest.raises(Exception):
        save_checkpoint({"bad": lambda: 0}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    # weights_only: arbitrary pickled objects are refused on load.
    torch.save({"obj": object()}, str(tmp_path / "evil.pt"))
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint(str(tmp_path / "evil.pt"))
