"""The timm model contract, checked once for every model name this package registers (as timm's tests/test_models.py
does for timm's own): creation, forward shape, forward_features / forward_head, reset_classifier, pretrained_cfg,
features_only, and TorchScript (documented as unsupported: use torch.compile or torch.export).

Most checks build the models on the meta device (no weights to initialise: the larger models hold 40-155 M
parameters); shapes then flow through the ops' fake kernels and the reference. One model of each family also runs
forward on real values. Family-specific behaviour (parity with timm or the original code, checkpoints) is tested in
the family's own test file.
"""
import math
import warnings

import pytest
import timm
import torch

import resnas_kernels  # noqa: F401  (registers the models)

pytestmark = pytest.mark.usefixtures("one_thread")


def _our_model_names():
    return sorted(n for n in timm.list_models()
                  if timm.models.model_entrypoint(n).__module__.startswith("resnas_kernels."))


NAMES = _our_model_names()
BATCH = 2


def _meta_model(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs).eval()


def _meta_input(model):
    return torch.empty(BATCH, *model.pretrained_cfg["input_size"], device="meta")


def test_both_families_are_registered():
    # NAMES is derived from timm's registry; this keeps the tests below from silently running on nothing.
    assert any(n.startswith("levit_") for n in NAMES) and any(n.startswith("vit_res") for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_create_forward_and_classifier(name):
    model = _meta_model(name)
    cfg = model.pretrained_cfg
    for key in ("input_size", "num_classes", "mean", "std", "interpolation", "crop_pct", "first_conv", "classifier"):
        assert key in cfg, f"pretrained_cfg lacks {key!r}"
    assert model.default_cfg is cfg and model.num_classes == cfg["num_classes"]
    params = dict(model.named_parameters())
    assert cfg["first_conv"] + ".weight" in params
    classifiers = cfg["classifier"] if isinstance(cfg["classifier"], (tuple, list)) else (cfg["classifier"],)
    for head in classifiers:
        assert params[head + ".weight"].shape[0] == cfg["num_classes"]
    x = _meta_input(model)
    with torch.no_grad():
        features = model.forward_features(x)
        assert model.forward_head(features).shape == (BATCH, cfg["num_classes"])
        assert model.forward_head(features, pre_logits=True).shape == (BATCH, model.num_features)
        model.reset_classifier(7)
        assert model.forward_head(features).shape == (BATCH, 7)
        model.reset_classifier(0)
        assert model.forward_head(features).shape == (BATCH, model.num_features)
    # Documented: the models call custom ops with Python-side dispatch, which TorchScript cannot compile (use
    # torch.compile or torch.export).
    with warnings.catch_warnings(), pytest.raises(Exception):
        warnings.simplefilter("ignore")  # torch.jit.script itself is deprecated (a Future- or DeprecationWarning)
        torch.jit.script(model)


@pytest.mark.parametrize("name", NAMES)
def test_features_only(name):
    model = _meta_model(name, features_only=True)
    size = timm.models.get_pretrained_cfg_value(name, "input_size")
    with torch.no_grad():
        outs = model(torch.empty(BATCH, *size, device="meta"))
    info = model.feature_info
    assert len(outs) == len(info.channels()) >= 1
    for out, channels, reduction in zip(outs, info.channels(), info.reduction()):
        assert out.shape == (BATCH, channels, math.ceil(size[1] / reduction), math.ceil(size[2] / reduction))


# Any member of a family runs the same code; the first name of each keeps the real-valued runs to two models.
FIRST_OF_EACH_FAMILY = sorted({name.split("_")[0]: name for name in reversed(NAMES)}.values())


@pytest.mark.parametrize("name", FIRST_OF_EACH_FAMILY)
def test_forward_on_real_values(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5).eval()
    x = torch.randn(BATCH, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        out = model(x)
    assert out.shape == (BATCH, 5) and torch.isfinite(out).all()
