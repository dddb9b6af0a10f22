"""timm registration and model API of the ViT-ResNAS models; the fused models equal stock-PyTorch networks."""
import pytest
import timm
import torch

import resnas_kernels.models  # noqa: F401  (registers the models)
from resnas_kernels.models.vit_resnas import ViTResNAS, ViTResNASNet, count_macs
from resnas_kernels.models.vit_resnas.timm_models import MODEL_ARCHS

NAMES = sorted(MODEL_ARCHS)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machine: avoid OpenMP oversubscription
    yield
    torch.set_num_threads(threads)


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
