"""timm registration and model API of the ViT-ResNAS models; the fused models equal stock-PyTorch networks."""
import random

import pytest
import timm
import torch

import resnas_kernels.models  # noqa: F401  (registers the models)
from resnas_kernels.models.vit_resnas import TINY_SPACE, ViTResNAS, ViTResNASNet, count_macs
from resnas_kernels.models.vit_resnas.timm_models import MODEL_ARCHS

NAMES = sorted(MODEL_ARCHS)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_registered():
    assert set(NAMES) <= set(timm.list_models("vit_res*"))
    assert {"vit_resnas_tiny", "vit_resnas_small", "vit_resnas_medium", "vit_res_tiny"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_create_model_cfg_and_api(name):
    with torch.device("meta"):  # construction and API without allocating 40-160 M parameters
        model = timm.create_model(name)
    arch, space = MODEL_ARCHS[name]
    assert isinstance(model, ViTResNAS) and model.arch == arch and model.space is space
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg and cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000
    params = dict(model.named_parameters())
    assert cfg["first_conv"] + ".weight" in params and cfg["classifier"] + ".weight" in params
    assert model.num_classes == 1000 and model.num_features == model.head_hidden_size == arch.stages[-1].embed
    assert model.no_weight_decay() == {"cls_token"} and "pos_embed" not in model.no_weight_decay()
    assert model.get_classifier() is model.head
    assert count_macs(model.arch) > 1e9


def test_forward_api_on_a_small_input():
    torch.manual_seed(0)
    model = timm.create_model("vit_resnas_tiny", img_size=56, num_classes=5).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        assert logits.shape == (2, 5) and feats.shape == (2, 2, 704)  # cls + one 1x1-grid patch token at 56
        assert torch.equal(model.forward_head(feats, pre_logits=True), feats[:, 0])
        torch.testing.assert_close(model.forward_head(feats), logits, rtol=1e-5, atol=1e-6)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), feats[:, 0], rtol=1e-5, atol=1e-6)
        model.reset_classifier(0, "")
        torch.testing.assert_close(model(x), feats, rtol=1e-5, atol=1e-6)
        model.reset_classifier(3, "token")
        assert model(x).shape == (2, 3)


@pytest.mark.parametrize("name", ["vit_resnas_tiny", "vit_res_tiny"])
def test_fused_model_equals_stock_network(name):
    """The registered (ragged-kernel) model and a stock-PyTorch network of the same architecture share state-dict
    names and compute the same function."""
    torch.manual_seed(1)
    fused = timm.create_model(name, img_size=112, num_classes=10).eval().double()
    stock = ViTResNASNet(fused.arch, img_size=112, num_classes=10).eval().double()
    stock.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(2, 3, 112, 112, dtype=torch.float64)
    with torch.no_grad():
        expected = stock(x)
        assert (fused(x) - expected).abs().max() <= 1e-12 * max(1.0, expected.abs().max().item())


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(2)
    model = timm.create_model("vit_res_tiny", img_size=56, num_classes=4, drop_path_rate=0.1).double().train()
    x = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # same drop-path draws; checkpointing replays the RNG state on recompute
        model(x).square().sum().backward()
        grads.append(model.stages[0].blocks[0].attn.qkv.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    assert (grads[0] - grads[1]).abs().max() <= 1e-12 * grads[0].abs().max()


def test_patch_output_training_head():
    model = timm.create_model("vit_res_tiny", img_size=112, num_classes=6, patch_output=True).train()
    cls, patches = model(torch.randn(2, 3, 112, 112))
    assert cls.shape == (2, 6) and patches.shape == (2, 4, 6)  # 2x2 stage-3 grid at 112
    assert model.eval()(torch.randn(1, 3, 112, 112)).shape == (1, 6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="img_size must be a positive multiple of 56"):
        timm.create_model("vit_res_tiny", img_size=64)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, 56, 56\)"):
        timm.create_model("vit_res_tiny", img_size=56)(torch.randn(1, 3, 112, 112))
    with pytest.raises(ValueError, match="drop_rate must be 0"):
        timm.create_model("vit_res_tiny", drop_rate=0.1)


def test_import_of_the_package_registers_the_models():
    """`import resnas_kernels` alone (no explicit `import resnas_kernels.models`) registers every name with timm."""
    import subprocess
    import sys
    code = ("import resnas_kernels, timm; names = set(timm.list_models()); "
            "missing = [n for n in %r + ['levit_128s_fused'] if n not in names]; "
            "assert not missing, missing; print('ok')") % (NAMES,)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_features_only_and_forward_intermediates():
    """timm feature extraction: one NCHW map per stage (strides 14 / 28 / 56), through forward_intermediates; the
    fused model's intermediates equal the stock network's."""
    torch.manual_seed(4)
    x = torch.randn(2, 3, 112, 112, dtype=torch.float64)
    feats = timm.create_model("vit_res_tiny", img_size=112, features_only=True).double().eval()
    assert feats.feature_info.channels() == [192, 384, 768] and feats.feature_info.reduction() == [14, 28, 56]
    with torch.no_grad():
        maps = feats(x)
    assert [tuple(m.shape) for m in maps] == [(2, 192, 8, 8), (2, 384, 4, 4), (2, 768, 2, 2)]
    # out_indices prunes the later stages (and the head / final norm) away.
    last_needed = timm.create_model("vit_res_tiny", img_size=112, features_only=True, out_indices=(1,))
    assert len(last_needed.model.stages) == 2 and last_needed.feature_info.channels() == [384]

    fused = timm.create_model("vit_res_tiny", img_size=112, num_classes=7).double().eval()
    stock = ViTResNASNet(fused.arch, img_size=112, num_classes=7).double().eval()
    stock.load_state_dict(fused.state_dict(), strict=True)
    missing, unexpected = feats.model.load_state_dict(fused.state_dict(), strict=False)  # its norm / head are pruned
    assert not missing and set(unexpected) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    with torch.no_grad():
        final, inter = fused.forward_intermediates(x, norm=True, output_fmt="NLC", return_prefix_tokens=True)
        final_s, inter_s = stock.forward_intermediates(x, norm=True, output_fmt="NLC", return_prefix_tokens=True)
        assert (final - fused.forward_features(x)).abs().max() <= 1e-12
        assert (final - final_s).abs().max() <= 1e-12 * max(1.0, final_s.abs().max().item())
        for (p, c), (ps, cs) in zip(inter, inter_s):
            assert (p - ps).abs().max() <= 1e-12 * max(1.0, ps.abs().max().item())
            assert (c - cs).abs().max() <= 1e-12 * max(1.0, cs.abs().max().item())
        assert torch.equal(inter[-1][0], final[:, 1:]) and torch.equal(inter[-1][1], final[:, :1])
        # NCHW maps are the NLC tokens laid out on the stage grid; indices / stop_early pick stages.
        maps_f = fused.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        assert torch.equal(maps_f[0], inter[0][0].reshape(2, 8, 8, 192).permute(0, 3, 1, 2))
        for m, ref in zip(feats(x), fused.forward_intermediates(x, intermediates_only=True)):
            assert torch.equal(m, ref)
        early, inter_early = fused.forward_intermediates(x, indices=1, stop_early=False)
        assert len(inter_early) == 1 and inter_early[0].shape == (2, 768, 2, 2)
        stage0 = fused.forward_intermediates(x, indices=(0,), stop_early=True, intermediates_only=True)
        assert torch.equal(stage0[0], maps_f[0])
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC'"):
        fused.forward_intermediates(x, output_fmt="NHWC")


def test_supernet_intermediates_follow_the_groups():
    """The supernet's forward_intermediates takes archs / group_sizes like its forward: each group's stage maps
    have its own width (zeros beyond), equal to that sub-network's own intermediates."""
    torch.manual_seed(5)
    space = TINY_SPACE
    model = ViTResNAS(space=space, img_size=56, num_classes=3).double().eval()
    archs = space.sample_groups(2, random.Random(5))
    x = torch.randn(3, 3, 56, 56, dtype=torch.float64)
    with torch.no_grad():
        maps = model.forward_intermediates(x, archs=archs, group_sizes=(1, 2), intermediates_only=True)
        for g, (arch, rows) in enumerate(zip(archs, (slice(0, 1), slice(1, 3)))):
            ref = model.extract(arch).forward_intermediates(x[rows], intermediates_only=True)
            for s, (m, r) in enumerate(zip(maps, ref)):
                c = arch.stages[s].embed
                assert (m[rows, :c] - r).abs().max() <= 1e-12 * max(1.0, r.abs().max().item())
                assert not m[rows, c:].any()


def test_grad_checkpointing_really_drops_block_activations():
    """With checkpointing, the blocks' activations are not kept for the backward (they are recomputed): the bytes
    saved by autograd outside the checkpointed regions drop by far more than half (ragged and masked paths)."""
    model = timm.create_model("vit_res_tiny", img_size=56, num_classes=4).train()
    x = torch.randn(2, 3, 56, 56)

    def saved_bytes(mode):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x, mode=mode)
        out.sum().backward()
        return total[0]
    for mode in ("ragged", "masked"):
        model.set_grad_checkpointing(False)
        plain = saved_bytes(mode)
        model.set_grad_checkpointing(True)
        assert model.grad_checkpointing
        checkpointed = saved_bytes(mode)
        assert checkpointed < 0.5 * plain, (mode, checkpointed, plain)
    model.set_grad_checkpointing(False)
