"""Drop-in attention (resnas_kernels.layers.attention) against timm: a small ViT and a random-init levit_128s.

Rule (tests/_oracle.py): the oracle is the unpatched timm model in fp64; the patched fp32 model must be within 2x
(outputs) / 3x (gradients) of the error of the unpatched fp32 model against that oracle, plus a few ulps. So the fused
attention may round differently from timm's matmul-softmax-matmul, but not be less accurate, end to end.
"""
import copy

import pytest
import torch

import resnas_kernels as rk
from resnas_kernels import Ragged, _ext
from resnas_kernels.layers.attention import (FusedAttention, patch_timm_levit_attention, patch_timm_vit_attention,
                                             unpatch_timm_attention)

from _backends import model_backend
from _oracle import assert_close_to_oracle

timm = pytest.importorskip("timm")


def _backend():
    return model_backend()


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Random init of what timm initialises to 0 / 1 (LeViT: BN gamma = 0 on residual branches, zero bias tables), so
    the attention and its bias table actually shape the output and receive gradient."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "attention_biases" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.dim() == 1 and ("bn" in name or "norm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    return model


def _fwd_bwd(model, x):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out.double() * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["input"] = x.grad.detach().clone()
    return out.detach(), grads


def _parity(make_model, x, patch, train: bool, check_names=None):
    backend = _backend()
    base = _randomise(make_model())
    base.train(train)
    for head in ("head", "head_dist"):  # LeViT's classifier BatchNorm over a batch of 2 samples is degenerate in
        if train and hasattr(base, head):  # training mode (two values normalised to +-1): keep it in eval mode
            getattr(base, head).eval()
    oracle = copy.deepcopy(base).double()
    fused = copy.deepcopy(base)
    assert patch(fused) > 0
    o_out, o_grads = _fwd_bwd(oracle, x.double())
    s_out, s_grads = _fwd_bwd(base, x)
    with rk.use_backend(backend):
        f_out, f_grads = _fwd_bwd(fused, x)
    assert_close_to_oracle(f_out, o_out, s_out, "out")
    assert set(f_grads) == set(s_grads)
    for name in (check_names or f_grads):
        assert_close_to_oracle(f_grads[name], o_grads[name], s_grads[name], f"grad {name}", factor=3.0)
    return f_grads


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_patch_timm_vit(train):
    from timm.models.vision_transformer import VisionTransformer

    def make():
        torch.manual_seed(0)
        return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10,
                                 qkv_bias=True)

    x = torch.randn(3, 3, 32, 32)
    grads = _parity(make, x, patch_timm_vit_attention, train)
    assert grads["blocks.0.attn.qkv.weight"].abs().sum() > 0


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_patch_timm_levit_128s(train):
    """levit_128s (random init): 9 attention and 2 shrink-attention modules (N = 196 / 49 / 16, 196 -> 49, 49 -> 16),
    bias tables indexed by the grid in-kernel; gradients of every parameter, the bias tables included."""
    x = torch.randn(2, 3, 224, 224)
    names = None
    if train:
        model = timm.create_model("levit_128s", pretrained=False)
        names = ["input"] + [n for n, _ in model.named_parameters() if "attention_biases" in n or ".qkv." in n
                             or ".kv." in n or "stem.conv1" in n]
    grads = _parity(lambda: timm.create_model("levit_128s", pretrained=False), x, patch_timm_levit_attention, train,
                    check_names=names)
    if train:
        assert all(grads[n].abs().sum() > 0 for n in names if "attention_biases" in n)


def test_patch_counts_and_unpatch():
    model = timm.create_model("levit_128s", pretrained=False)
    assert patch_timm_levit_attention(model) == 11  # stages of depth 2 + 3 + 4 = 9, plus 2 shrink blocks
    assert patch_timm_levit_attention(model) == 11  # idempotent: the original forward is kept once
    assert unpatch_timm_attention(model) == 11
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert patch_timm_levit_attention(timm.create_model("levit_conv_128s", pretrained=False)) == 0  # conv mode


def test_vit_fallbacks_keep_timm_semantics():
    """attn_mask / attention dropout in training fall back to timm's own forward (documented)."""
    from timm.layers.attention import Attention

    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, attn_drop=0.5)
    patch_timm_vit_attention(attn)
    x = torch.randn(2, 5, 32)
    mask = torch.zeros(2, 1, 5, 5)
    attn.eval()
    with torch.no_grad():
        torch.testing.assert_close(attn(x, attn_mask=mask), attn._resnas_original_forward(x, attn_mask=mask))
        torch.testing.assert_close(attn(x), attn._resnas_original_forward(x), rtol=1e-5, atol=1e-6)


def test_fused_attention_module_matches_timm_and_runs_ragged():
    from timm.layers.attention import Attention

    torch.manual_seed(0)
    timm_attn = Attention(48, num_heads=3, qkv_bias=True).eval()
    fused = FusedAttention.from_timm(timm_attn)
    assert fused.qkv is timm_attn.qkv and fused.proj is timm_attn.proj
    x = torch.randn(4, 17, 48)
    with torch.no_grad(), rk.use_backend(_backend()):
        torch.testing.assert_close(fused(x), timm_attn(x), rtol=1e-5, atol=1e-6)
        # Ragged heads: group 1 runs 2 of 3 heads, i.e. the timm module with head 2's output columns zeroed.
        heads = Ragged((2, 2), (3, 2))
        y = fused(x, heads)
        b, n = x.shape[:2]
        qkv = timm_attn.qkv(x).reshape(b, n, 3, 3, 16).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        a = a.transpose(1, 2).reshape(b, n, 48) * heads.mask(3).repeat_interleave(16, dim=1)[:, None, :]
        torch.testing.assert_close(y, timm_attn.proj(a), rtol=1e-5, atol=1e-6)
    standalone = FusedAttention(64, num_heads=4)
    assert standalone(torch.randn(2, 9, 64)).shape == (2, 9, 64)
