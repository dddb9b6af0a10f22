"""LeViT on the fused kernels (`resnas_kernels.models.levit`) against timm's `levit_*` with the same weights.

Tolerance rule (tests/_oracle.py): the oracle is timm's model evaluated in fp64 with the same weights and inputs;
ours in fp32 passes if its max error is at most 2x (outputs) / 3x (gradients, running statistics) the error of timm's
own fp32 model, plus 8 ulps at the oracle's magnitude. BN folding, the fused attention kernel and oneDNN's fused
epilogues round differently from timm's op sequence, but must not be materially less accurate.

Weights are random with non-trivial BatchNorm statistics and affines and non-zero bias tables (timm initialises some
BN gammas and every bias table to 0, which would let folding and bias bugs hide).

Train mode and gradients are compared in fp64 (ours in fp64, through the same kernels, vs timm in fp64), plus fp32
train outputs at batch 16: see `check_train_and_grads` for why fp32 train-mode results of this network cannot be
compared element-wise at small batch.

Cost control (the file must stay under 90 s on 2 idle cores): every variant at batch 1 (eval, train, gradients) and
16 (eval); train mode and gradients at batch 16 for LeViT-128S (see TRAIN_B16); each model pair is built once per
test.
"""
import copy
import itertools

import pytest
import timm
import torch

import resnas_kernels.models  # noqa: F401  (registers levit_*_fused with timm)
from resnas_kernels.bench.cases.levit import random_weights
from resnas_kernels.models import levit as L

from _oracle import assert_close_to_oracle

VARIANTS = ["levit_128s", "levit_128", "levit_192", "levit_256", "levit_384"]


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial BN statistics/affines, attention bias tables (the benchmark's draw) and head weights."""
    random_weights(model, seed)
    g = torch.Generator().manual_seed(seed + 1_000_003)
    for name, p in model.named_parameters():
        if name.startswith(("head.linear", "head_dist.linear")):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@torch.no_grad()
def ema_towards(models, other: dict) -> None:
    """An EMA update as timm's ModelEmaV3 does it: every float parameter and BN statistic lerped in place, halfway
    towards `other` (a state dict in the same naming)."""
    for m in models:
        for name, t in m.state_dict().items():
            if t.is_floating_point():
                t.lerp_(other[name].to(t.dtype), 0.5)


def make_pair(variant: str, seed: int, fused_attn=None, **kwargs):
    """(timm model, our model) with the same random weights; and timm's fp64 copy (the oracle)."""
    torch.manual_seed(seed)
    ref = randomize(timm.create_model(variant, **kwargs), seed)
    ours = timm.create_model(f"{variant}_fused", fused_attn=fused_attn, **kwargs)
    ours.load_state_dict(ref.state_dict())
    oracle = copy.deepcopy(ref).double()
    return ref, ours, oracle


def images(batch: int, seed: int, size=(224, 224)) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def set_mode(models, train: bool):
    for m in models:
        m.train(train)


def check_eval(ref, ours, oracle, x, name):
    set_mode((ref, ours, oracle), False)
    with torch.no_grad():
        assert_close_to_oracle(ours(x), oracle(x.double()), ref(x), name)


def _train_step(model, x, distilled_training):
    """Train-mode forward and backward with a fixed random cotangent ((out * w).sum() has no structure for errors to
    cancel in); returns the output and the gradients by parameter name."""
    model.train()
    model.set_distilled_training(distilled_training)
    model.zero_grad(set_to_none=True)
    out = model(x)
    out = torch.stack(out) if isinstance(out, tuple) else out
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out.dtype)
    (out * w).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


FP32_TRAIN_MIN_BATCH = 16  # see check_train_and_grads


def check_train_and_grads(ref, ours, oracle, x, name, distilled_training=False):
    """Train mode: outputs, every parameter gradient and the updated BN statistics, ours in fp64 against timm in fp64
    with torch.testing's fp64 tolerances (1e-7); fp32 outputs with the oracle rule from batch 16; fp32 gradients
    present and finite.

    Why not fp32 element-wise at every batch: with random non-trivial BN statistics this network's fp32 train-mode
    results are ill-conditioned, so per-element errors measure where rounding happened to land:
    - Gradients: Hardswish's derivative jumps at +-3, and rounding moves a few pre-activations across a jump. Swapping
      torch.softmax for an exact hand-written softmax (exp / sum) in timm's own math changed timm's fp32 max gradient
      error on some parameters by 2x-76x depending on the seed, and timm's own fp32 gradients are only 0.6%-5%
      accurate in relative L2 (batch 16). No fp32 gradient tolerance can separate right from wrong here.
    - Outputs at small batch: the heads' train-mode BN sees 2 samples per channel; the same hand-written softmax gave
      0.12x-1.15x timm's fp32 output error over five seeds at batch 2, but 0.93x-1.13x at batch 16.
    In fp64 nothing crosses a jump: ours matches timm's fp64 to ~3e-12 relative (measured), four orders of magnitude
    under the bound, while any real error (index, scale, missing term, wrong BN mode) is O(1).
    """
    ours64 = copy.deepcopy(ours).double()  # before any train-mode forward moves the BN statistics
    out_ours, g_ours = _train_step(ours, x, distilled_training)
    out_ora, g_ora = _train_step(oracle, x.double(), distilled_training)
    out_64, g_64 = _train_step(ours64, x.double(), distilled_training)
    assert list(g_ours) == list(g_ora), "parameter names/order differ from timm"
    assert torch.isfinite(out_ours).all(), f"{name}: non-finite fp32 train output"
    for n, g in g_ours.items():
        assert g is not None and torch.isfinite(g).all(), f"{name}: missing or non-finite fp32 gradient for {n}"
    if x.shape[0] >= FP32_TRAIN_MIN_BATCH:
        ref.train()
        ref.set_distilled_training(distilled_training)
        with torch.no_grad():  # timm's fp32 error sets the bound; its gradients are not needed
            out_ref = ref(x)
        out_ref = torch.stack(out_ref) if isinstance(out_ref, tuple) else out_ref
        assert_close_to_oracle(out_ours, out_ora, out_ref, f"{name} fp32 train output")
    torch.testing.assert_close(out_64, out_ora, rtol=1e-7, atol=1e-7, msg=lambda m: f"{name} fp64 output: {m}")
    scale = max(1.0, max(g.abs().max().item() for g in g_ora.values()))
    for n, g in g_64.items():
        torch.testing.assert_close(g, g_ora[n], rtol=1e-7, atol=1e-7 * scale,
                                   msg=lambda m: f"{name} fp64 grad {n}: {m}")
    ora_b = dict(oracle.named_buffers())
    for n, b in ours64.named_buffers():
        if "running_" in n or n.endswith("num_batches_tracked"):
            torch.testing.assert_close(b, ora_b[n], rtol=1e-7, atol=1e-7, msg=lambda m: f"{name} buffer {n}: {m}")


# ---------------------------------------------------------------------------------------------------------------------
# Registration, state dicts, checkpoints
# ---------------------------------------------------------------------------------------------------------------------
def test_registered_under_our_names_only():
    names = timm.list_models("levit_*_fused")
    assert sorted(names) == sorted(f"{v}_fused" for v in VARIANTS)
    for v in VARIANTS:
        # timm's own names still build timm's model: ours never overwrote them.
        assert type(timm.create_model(v)).__module__ == "timm.models.levit"
        cfg = timm.create_model(f"{v}_fused").pretrained_cfg
        assert cfg["hf_hub_id"] == f"timm/{v}.fb_dist_in1k"
        assert cfg["fixed_input_size"] and cfg["input_size"] == (3, 224, 224)
    assert isinstance(timm.create_model("levit_128s_fused"), L.LevitFused)


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_matches_timm(variant):
    ref = timm.create_model(variant)
    ours = timm.create_model(f"{variant}_fused")
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ours) == list(sd_ref)  # same names, same order
    for k in sd_ref:
        assert sd_ours[k].shape == sd_ref[k].shape, k
    ours.load_state_dict(sd_ref)  # strict, both directions
    ref.load_state_dict(sd_ours)
    # the non-persistent index buffer equals timm's
    for (n1, b1), (n2, b2) in zip(ref.named_buffers(), ours.named_buffers()):
        assert n1 == n2
        if n1.endswith("attention_bias_idxs"):
            assert torch.equal(b1, b2), n1
    assert ours.no_weight_decay() == ref.no_weight_decay()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def _official_index(resolution: int, stride: int, resolution_q: int) -> torch.Tensor:
    """The official repo's `attention_bias_idxs`: table slots in first-appearance order of (|dy|, |dx|) offsets."""
    offsets, idxs = {}, []
    for p1 in itertools.product(range(resolution_q), range(resolution_q)):
        for p2 in itertools.product(range(resolution), range(resolution)):
            off = (abs(p1[0] * stride - p2[0]), abs(p1[1] * stride - p2[1]))
            idxs.append(offsets.setdefault(off, len(offsets)))
    return torch.tensor(idxs).view(resolution_q ** 2, resolution ** 2)


def _official_state_dict(variant: str, timm_sd: dict) -> dict:
    """The state dict facebookresearch/LeViT's `LeViT_*` would hold for the same weights (persistent index buffers
    included), built from that repo's module layout (levit.md section 8): names written out independently of
    checkpoint_filter_fn, values taken from timm's state dict by position (both are in module-registration order)."""
    cfg = L.MODEL_CFGS[variant]
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]

    def lin_bn(prefix):
        return [f"{prefix}.c.weight"] + [f"{prefix}.bn.{s}" for s in bn]

    names = []
    for i in (0, 2, 4, 6):
        names += lin_bn(f"patch_embed.{i}")
    blocks, index_buffers, res = [], {}, 14
    for stage, depth in enumerate(cfg["depth"]):
        for _ in range(depth):
            n = len(blocks)
            blocks.append([f"blocks.{n}.m.attention_biases"] + lin_bn(f"blocks.{n}.m.qkv")
                          + lin_bn(f"blocks.{n}.m.proj.1"))
            index_buffers[f"blocks.{n}.m.attention_bias_idxs"] = _official_index(res, 1, res)
            n = len(blocks)
            blocks.append(lin_bn(f"blocks.{n}.m.0") + lin_bn(f"blocks.{n}.m.2"))
        if stage < 2:
            n = len(blocks)
            res_q = (res - 1) // 2 + 1
            blocks.append([f"blocks.{n}.attention_biases"] + lin_bn(f"blocks.{n}.kv") + lin_bn(f"blocks.{n}.q.1")
                          + lin_bn(f"blocks.{n}.proj.1"))
            index_buffers[f"blocks.{n}.attention_bias_idxs"] = _official_index(res, 2, res_q)
            n = len(blocks)
            blocks.append(lin_bn(f"blocks.{n}.m.0") + lin_bn(f"blocks.{n}.m.2"))
            res = res_q
    # The official flat order (a stage's blocks, then the shrink + MLP leading to the next stage) is timm's order
    # too, where the shrink opens the next stage.
    names += [k for b in blocks for k in b]
    for head in ("head", "head_dist"):
        names += [f"{head}.bn.{s}" for s in bn] + [f"{head}.l.weight", f"{head}.l.bias"]
    assert len(names) == len(timm_sd), (len(names), len(timm_sd))
    out = {}
    for name, (timm_key, value) in zip(names, timm_sd.items()):
        assert name.rsplit(".", 1)[-1] == timm_key.rsplit(".", 1)[-1], (name, timm_key)
        out[name] = value.clone()
    out.update(index_buffers)
    return out


@pytest.mark.parametrize("variant", ["levit_128s", "levit_256"])
def test_checkpoint_filter_original_repo_naming(variant, tmp_path):
    ref = randomize(timm.create_model(variant), seed=11)
    official = _official_state_dict(variant, ref.state_dict())
    path = tmp_path / "LeViT.pth"
    torch.save({"model": official, "epoch": 999}, path)  # the original checkpoints wrap the weights in 'model'
    loaded = torch.load(path, weights_only=True)
    fresh = timm.create_model(f"{variant}_fused")
    fresh.load_state_dict(L.checkpoint_filter_fn(loaded, fresh))  # strict
    for k, v in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # The official index buffers (first-appearance order) equal ours, so the tables copy 1:1.
    for name, buf in fresh.named_buffers():
        if name.endswith("attention_bias_idxs"):
            mod = fresh.get_submodule(name.rsplit(".", 1)[0])
            assert torch.equal(buf, _official_index(mod.resolution[0], mod.stride, mod.resolution_q[0])), name
    if variant == "levit_128s":  # equal state dicts imply equal outputs; one forward as a smoke check
        x = images(1, seed=12)
        with torch.no_grad():
            torch.testing.assert_close(fresh.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-4)


def test_checkpoint_filter_timm_and_create_model_file(tmp_path):
    """timm's own checkpoints load through timm's pretrained path (file overlay + our filter fn)."""
    ref = randomize(timm.create_model("levit_128s"), seed=3)
    sd = dict(ref.state_dict())
    sd["stages.0.blocks.0.attn.attention_bias_idxs"] = torch.zeros(196, 196, dtype=torch.long)  # old timm files
    path = tmp_path / "levit_128s.pth"
    torch.save(sd, path)
    ours = timm.create_model("levit_128s_fused", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


def test_checkpoint_filter_rejects_other_variant():
    ref = timm.create_model("levit_128")  # more blocks than 128S
    official = _official_state_dict("levit_128", ref.state_dict())
    with pytest.raises(KeyError, match="more blocks"):
        L.checkpoint_filter_fn(official, timm.create_model("levit_128s_fused"))


# ---------------------------------------------------------------------------------------------------------------------
# Parity with timm: every variant, eval / train / gradients
# ---------------------------------------------------------------------------------------------------------------------
# B=16 train mode and gradients are compared for LeViT-128S only: fp64 forward+backward at B=16 of ours and timm's
# costs about 5 s of CPU per 0.3 GMAC of model (measured: 128S ~5 s, 192 ~9 s, 384 ~25 s), so all five variants would
# take most of this file's 90 s budget on 2 cores. What B=16 adds over B=1 is variant-independent (BN batch
# statistics over many samples, the kernel's chunked bias-gradient reduction: 8 samples per chunk, so 2 chunks),
# while what differs between variants (D = 16 / 32, head counts, widths, V dims) is covered at B=1 in train mode and
# at B=1 and 16 in eval for every variant.
TRAIN_B16 = ("levit_128s",)


def check_train_batch1(ref, ours, oracle, x, name):
    """Train mode at B=1: the full model cannot run, in timm either (the heads' BatchNorm1d sees one value per
    channel: the same ValueError); the body can (its BN normalises over the 196/49/16 tokens), so compare the pooled
    train-mode features and every body gradient with the classifier removed."""
    saved = copy.deepcopy(ours.state_dict())
    set_mode((ref, ours), True)
    with pytest.raises(ValueError) as e_ref:
        ref(x)
    with pytest.raises(ValueError) as e_ours:
        ours(x)
    assert str(e_ours.value) == str(e_ref.value)
    ours.load_state_dict(saved)  # the body ran before the heads raised and moved the BN statistics
    for m in (ref, ours, oracle):
        m.reset_classifier(0)
    check_train_and_grads(ref, ours, oracle, x, name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_with_timm(variant):
    """Every variant against timm with the same weights: eval outputs at B=1 and 16; train outputs, gradients and
    updated BN statistics at B=1 and (TRAIN_B16) 16."""
    ref, ours, oracle = make_pair(variant, seed=21)
    weights = copy.deepcopy(ref.state_dict())
    x1, x16 = images(1, seed=22), images(16, seed=23)
    check_eval(ref, ours, oracle, x1, f"{variant} eval B=1")
    check_eval(ref, ours, oracle, x16, f"{variant} eval B=16")
    if variant in TRAIN_B16:
        check_train_and_grads(ref, ours, oracle, x16, f"{variant} B=16")
        for m in (ref, ours, oracle):  # the train step moved the BN statistics (differently in fp32 and fp64)
            m.load_state_dict(weights)
    check_train_batch1(ref, ours, oracle, x1, f"{variant} B=1")


def test_parity_distilled_training():
    """set_distilled_training(True): train mode returns the two heads' logits, as timm's."""
    ref, ours, oracle = make_pair("levit_128s", seed=41)
    check_train_and_grads(ref, ours, oracle, images(2, seed=44), "levit_128s distilled", distilled_training=True)


def _close_fp64(actual, oracle, name):
    """fp64 comparison used for gradients (see check_train_and_grads): torch.testing's fp64 tolerances, atol scaled
    to the oracle's magnitude."""
    scale = max(1.0, oracle.abs().max().item())
    torch.testing.assert_close(actual, oracle, rtol=1e-7, atol=1e-7 * scale, msg=lambda m: f"{name}: {m}")


def test_parity_eval_mode_gradients():
    """Eval mode with grad enabled (the official repo fine-tunes with model.train(False)): the fold is computed on
    the fly, so gradients reach the linear weights, the BN affines and the bias tables; BN statistics stay frozen."""
    ref, ours, oracle = make_pair("levit_128s", seed=51)
    ours64 = copy.deepcopy(ours).double()
    x = images(2, seed=52)
    set_mode((ref, ours, oracle, ours64), False)
    outs, grads = {}, {}
    for key, m, inp in (("ref", ref, x), ("ours", ours, x), ("oracle", oracle, x.double()),
                        ("ours64", ours64, x.double())):
        out = m(inp)
        out.pow(2).sum().backward()
        outs[key], grads[key] = out.detach(), {n: p.grad for n, p in m.named_parameters()}
    assert_close_to_oracle(outs["ours"], outs["oracle"], outs["ref"], "eval-mode output")
    for n, g in grads["ours64"].items():  # fp64: see check_train_and_grads
        assert grads["ours"][n] is not None and torch.isfinite(grads["ours"][n]).all(), n
        _close_fp64(g, grads["oracle"][n], f"eval-mode fp64 grad {n}")
    for n, b in ours.named_buffers():  # eval mode: statistics frozen
        if "running_" in n:
            assert torch.equal(b, ref.state_dict()[n]), n


def test_input_gradient_in_eval():
    """Gradient w.r.t. the input of a frozen eval model (e.g. saliency): the oneDNN fast path (no autograd) must step
    aside in fp32 (it would raise or return no gradient); fp64 checks the values. Batch 2: see
    test_input_gradient_batch1_finite_differences."""
    ref, ours, oracle = make_pair("levit_128s", seed=55)
    ours64 = copy.deepcopy(ours).double()
    set_mode((ref, ours, oracle, ours64), False)
    grads = {}
    for key, m, dtype in (("ours", ours, torch.float32), ("oracle", oracle, torch.float64),
                          ("ours64", ours64, torch.float64)):
        m.requires_grad_(False)
        x = images(2, seed=56).to(dtype).requires_grad_()
        out = m(x)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)).sum().backward()
        grads[key] = x.grad
    assert torch.isfinite(grads["ours"]).all() and grads["ours"].abs().max() > 0
    _close_fp64(grads["ours64"], grads["oracle"], "input gradient fp64")


def test_input_gradient_batch1_finite_differences():
    """At batch 1 timm cannot be the oracle for input gradients: PyTorch 2.14's CPU BatchNorm2d backward in eval mode
    returns a wrong input gradient when the batch is 1 and the incoming gradient is channels-last (here: the stem
    output is flattened and transposed into tokens), so timm's LeViT input gradient is wrong at batch 1 (in fp32 and
    fp64). Ours folds that BN away; check it against central finite differences in fp64 instead."""
    _, ours, _ = make_pair("levit_128s", seed=57)
    ours = ours.double().eval().requires_grad_(False)
    x = images(1, seed=58).double().requires_grad_()
    w = torch.randn(1, 1000, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (ours(x) * w).sum().backward()
    g = torch.Generator().manual_seed(59)
    eps = torch.finfo(torch.float64).eps
    with torch.no_grad():
        for _ in range(3):
            d = torch.randn(x.shape, generator=g, dtype=torch.float64)
            h = 1e-5
            lp, lm = (ours(x + h * d) * w).sum(), (ours(x - h * d) * w).sum()
            fd = (lp - lm) / (2 * h)
            ad = (x.grad * d).sum()
            # Central differences: rounding error ~ eps * |L| / h (L summed over thousands of terms: 100x that), plus
            # truncation O(h^2), well under 1e-5 relative here. timm's batch-1 gradient is off by O(1) relative.
            bound = 1e-5 * abs(fd) + 100 * eps * (abs(lp) + abs(lm)) / (2 * h)
            assert abs(fd - ad) <= bound, (fd.item(), ad.item(), bound.item())


# ---------------------------------------------------------------------------------------------------------------------
# Fused vs unfused attention
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["levit_128s"])
def test_fused_vs_unfused(variant, monkeypatch):
    """The same model through resnas_kernels.ragged_attention and through plain PyTorch attention (timm's math):
    eval outputs as accurate as the unfused path's (oracle rule, unfused as the reference) through both eager CPU
    inference attentions (the kernel and the chunked GEMMs), and train outputs and gradients (including the bias
    tables', reduced inside the kernel) against the oracle."""
    ref, fused, oracle = make_pair(variant, seed=61, fused_attn=True)
    unfused = copy.deepcopy(fused).set_fused_attn(False)
    monkeypatch.setattr(L.levit, "CPU_INFERENCE_GEMM_ATTENTION", True)
    check_eval(unfused, fused, oracle, images(2, seed=62), f"{variant} fused vs unfused, eval (GEMM attention)")
    monkeypatch.setattr(L.levit, "CPU_INFERENCE_GEMM_ATTENTION", False)
    check_eval(unfused, fused, oracle, images(2, seed=62), f"{variant} fused vs unfused, eval (kernel)")
    check_train_and_grads(unfused, fused, oracle, images(2, seed=63), f"{variant} fused vs unfused")
    for n, p in fused.named_parameters():
        if n.endswith("attention_biases"):
            assert p.grad.abs().max() > 0, f"{n}: the bias table got no gradient through the kernel"


def test_fused_path_calls_the_kernel(monkeypatch):
    """Guard against silently running the unfused path: count the kernel calls of one forward and check what they
    get: training passes the table with the in-kernel grid index, kernel inference the cached gathered bias."""
    _, ours, _ = make_pair("levit_128s", seed=63)
    calls = []
    real = L._attention_op()
    monkeypatch.setitem(L._ATTENTION_OP, "op", lambda *a, **k: calls.append(k) or real(*a, **k))
    x = images(2, seed=64)
    ours.train()
    ours(x)
    assert len(calls) == 2 + 3 + 4 + 2  # 9 block attentions + 2 shrink attentions
    assert [c["bias_grid"] for c in calls] == [(14, 1)] * 2 + [(14, 2)] + [(7, 1)] * 3 + [(7, 2)] + [(4, 1)] * 4
    assert all(c["bias_table"] is not None and "dense_bias" not in c for c in calls)
    calls.clear()
    ours.eval()
    with torch.no_grad():
        ours(x)
    assert len(calls) == 11  # eager CPU fp32 inference: the kernel (CPU_INFERENCE_GEMM_ATTENTION is False)
    for c, m in zip(calls, [m for m in ours.modules() if isinstance(m, (L.Attention, L.AttentionDownsample))]):
        if L.EVAL_DENSE_BIAS:
            assert torch.equal(c["dense_bias"], m.attention_biases[:, m.attention_bias_idxs])
        else:
            assert c["bias_grid"] == (m.resolution[0], m.stride)
    calls.clear()
    monkeypatch.setattr(L.levit, "CPU_INFERENCE_GEMM_ATTENTION", True)
    with torch.no_grad():
        ours(x)
    assert calls == []  # the chunked GEMM attention instead


def test_cpu_inference_gemm_attention_chunks(monkeypatch):
    """The chunked GEMM attention on strided q/k/v views against the plain formula in fp64, with chunks that do not
    divide the batch and a non-square query/key grid (the shrink attention's shape)."""
    from resnas_kernels.models.levit import onednn
    g = torch.Generator().manual_seed(65)
    B, Nq, Nk, H, D, Dv = 5, 9, 25, 3, 4, 8
    qkv = torch.randn(B, Nk, H, 2 * D + Dv, generator=g)
    q = torch.randn(B, Nq, H, 2 * D, generator=g)[..., :D]
    k, v = qkv[..., D:2 * D], qkv[..., 2 * D:]
    bias = torch.randn(H, Nq, Nk, generator=g)
    monkeypatch.setattr(onednn, "ATTENTION_CHUNK_BYTES", 2 * H * Nq * Nk * 4)  # chunks of 2, 2, 1 samples
    out = onednn.attention_cpu_inference(q, k, v, 0.5, bias)
    q64, k64, v64 = (t.double().transpose(1, 2) for t in (q, k, v))
    attn = (q64 @ k64.transpose(-1, -2) * 0.5 + bias.double()).softmax(-1)
    expected = (attn @ v64).transpose(1, 2).reshape(B, Nq, H * Dv)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# BN folding and the inference caches
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls_args", [("LinearNorm", (24, 40)), ("ConvNorm", (6, 10, 3, 2, 1))])
def test_bn_folding_layer(cls_args):
    """Each folded layer equals Linear/Conv followed by eval-mode BN, and the cached weights are the closed form."""
    cls, args = cls_args
    layer = randomize(getattr(L, cls)(*args), seed=71)
    x = torch.randn((5, 7, args[0]) if cls == "LinearNorm" else (2, args[0], 9, 11),
                    generator=torch.Generator().manual_seed(72))
    layer.eval()
    with torch.no_grad():
        y = layer(x)
        y64 = layer.bn.double()(layer.linear.double()(x.double()).flatten(0, 1)).view(5, 7, -1) \
            if cls == "LinearNorm" else layer.bn.double()(layer.linear.double()(x.double()))
        layer.float()
        y32 = (layer.bn(layer.linear(x).flatten(0, 1)).view(5, 7, -1) if cls == "LinearNorm"
               else layer.bn(layer.linear(x)))
    assert_close_to_oracle(y, y64, y32, f"folded {cls}")
    w, b = layer._inference_tensors()
    bn = layer.bn
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(w, layer.linear.weight * s.view(-1, *[1] * (w.dim() - 1)))
    torch.testing.assert_close(b, bn.bias - bn.running_mean * s)


def test_fuse_builds_and_train_clears_caches():
    _, ours, _ = make_pair("levit_128s", seed=81)
    layers = [m for m in ours.modules() if isinstance(m, (L.LinearNorm, L.ConvNorm, L.NormLinear))]
    assert all(m._cache is None for m in layers)
    assert ours.fuse() is ours and not ours.training
    assert all(m._cache is not None for m in layers)
    ours.train()
    assert all(m._cache is None for m in layers)
    assert all(m.bn.training for m in layers)
    ours.eval()
    assert all(m._cache is not None for m in layers)
    # caches never enter the state dict
    assert set(ours.state_dict()) == set(timm.create_model("levit_128s").state_dict())
    # deepcopy of an eval model with its caches (oneDNN's packed weights cannot be copied): the copy rebuilds its own
    x = images(1, seed=82)
    with torch.no_grad():
        out = ours(x)
        twin = copy.deepcopy(ours)
        assert all(m._cache is None for m in twin.modules() if isinstance(m, L.LinearNorm))
        assert torch.equal(twin(x), out)


def test_eval_runs_no_batchnorm_and_no_separate_activation():
    """fuse() / eval() folds every BatchNorm (stem convs, every linear, both heads) into the preceding conv/linear:
    no BatchNorm or Hardswish module runs in an inference forward (the activations are fused into the kernels' calls),
    while train mode runs every BatchNorm, as timm."""
    model = randomize(timm.create_model("levit_128s_fused"), seed=85)
    calls = []
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    acts = [m for m in model.modules() if isinstance(m, torch.nn.Hardswish)]
    assert len(bns) == 4 + 2 * 9 + 3 * 2 + 2 * 11 + 2 and acts  # stem, attn qkv/proj, shrink kv/q/proj, MLPs, heads
    for m in bns + acts:
        m.register_forward_hook(lambda mod, *_: calls.append(mod))
    x = images(2, seed=86)
    with torch.no_grad():
        model.fuse()(x)
    assert calls == []
    model.train()
    with torch.no_grad():
        model(x)
    assert {id(m) for m in calls if m in bns} == {id(m) for m in bns}


def _drop_timm_bias_cache(*timm_models):
    # timm caches the gathered bias per device in eval mode and only drops it in train()/eval()/.to(): after an
    # in-place change of the tables it would keep using the old bias. Reset the references (never ours).
    for m in timm_models:
        m.eval()


def test_cache_follows_in_place_updates_and_load_state_dict():
    """A cache built in eval mode must not go stale: EMA-style in-place updates, load_state_dict, train/eval cycles."""
    ref, ours, oracle = make_pair("levit_128s", seed=91)
    x = images(2, seed=92)
    check_eval(ref, ours, oracle, x, "before")
    # 1. An EMA update (timm's ModelEmaV3 keeps its model in eval mode and lerps every parameter and BN statistic in
    #    place), towards other random weights.
    other = randomize(timm.create_model("levit_128s"), seed=93).state_dict()
    ema_towards((ref, ours, oracle), other)
    _drop_timm_bias_cache(ref, oracle)
    check_eval(ref, ours, oracle, x, "after in-place update")
    # 2. load_state_dict of other weights while in eval mode.
    other = randomize(timm.create_model("levit_128s"), seed=94)
    for m in (ref, ours, oracle):
        m.load_state_dict(other.state_dict())
    _drop_timm_bias_cache(ref, oracle)
    check_eval(ref, ours, oracle, x, "after load_state_dict")
    # 3. a training step (BN statistics move), then back to eval.
    set_mode((ref, ours, oracle), True)
    ref(x), ours(x), oracle(x.double())
    check_eval(ref, ours, oracle, x, "after a train-mode forward")


def test_dtype_and_device_moves_rebuild_caches():
    ref, ours, oracle = make_pair("levit_128s", seed=95)
    x = images(1, seed=96)
    ours.eval()
    with torch.no_grad():
        ours(x)
        ours.double()  # the caches must be rebuilt in fp64, not reused in fp32
        out = ours(x.double())
    assert out.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(out, oracle.eval()(x.double()), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input, other resolutions
# ---------------------------------------------------------------------------------------------------------------------
def test_wrong_resolution_raises():
    model = timm.create_model("levit_128s_fused").eval()
    for bad in ((1, 3, 192, 192), (1, 3, 224, 256), (1, 4, 224, 224), (3, 224, 224)):
        with pytest.raises(ValueError, match=r"x must be a \(B, 3, 224, 224\) image batch.*14x14 token grid"):
            model(torch.zeros(bad))
    attn = model.stages[0].blocks[0].attn
    with pytest.raises(ValueError, match="49 tokens.*14x14 token grid"):
        attn(torch.zeros(1, 49, 128))
    shrink = model.stages[1].downsample.attn_downsample
    with pytest.raises(ValueError, match="49 tokens.*14x14 token grid"):
        shrink(torch.zeros(1, 49, 128))


@pytest.mark.parametrize("img_size", [192, (224, 160)])
def test_other_resolutions_match_timm(img_size):
    """Models built for another (also non-square) size run and equal timm's at that size."""
    ref, ours, oracle = make_pair("levit_128s", seed=101, img_size=img_size)
    size = img_size if isinstance(img_size, tuple) else (img_size, img_size)
    x = images(2, seed=102, size=size)
    check_eval(ref, ours, oracle, x, f"img_size={img_size} eval")
    check_train_and_grads(ref, ours, oracle, x, f"img_size={img_size}")
    with pytest.raises(ValueError, match="image batch"):
        ours(images(1, seed=103))


def test_unsupported_arguments_raise():
    with pytest.raises(ValueError, match="use_conv"):
        timm.create_model("levit_128s_fused", use_conv=True)
    with pytest.raises(ValueError, match="act_layer"):
        timm.create_model("levit_128s_fused", act_layer="silu")


# ---------------------------------------------------------------------------------------------------------------------
# timm model API
# ---------------------------------------------------------------------------------------------------------------------
def test_timm_api():
    ref, ours, _ = make_pair("levit_128s", seed=111)
    x = images(2, seed=112)
    set_mode((ref, ours), False)
    with torch.no_grad():
        f_ref, f_ours = ref.forward_features(x), ours.forward_features(x)
        assert f_ours.shape == f_ref.shape == (2, 16, 384)
        torch.testing.assert_close(f_ours, f_ref, rtol=1e-4, atol=1e-4)
        assert ours.forward_head(f_ours, pre_logits=True).shape == (2, 384)
        _, inter = ours.forward_intermediates(x)
        _, inter_ref = ref.forward_intermediates(x)
        assert [t.shape for t in inter] == [t.shape for t in inter_ref] == [(2, 128, 14, 14), (2, 256, 7, 7),
                                                                              (2, 384, 4, 4)]
        for a, b in zip(inter, inter_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert ours.get_classifier()[0] is ours.head and ours.get_classifier()[1] is ours.head_dist
    assert ours.group_matcher() == ref.group_matcher()
    ours.reset_classifier(0)
    with torch.no_grad():
        assert ours(x).shape == (2, 384)
    ours.reset_classifier(10)
    ours.eval()
    with torch.no_grad():
        assert ours(x).shape == (2, 10)
    ours.train()
    ours.set_distilled_training(True)
    out = ours(x)
    assert isinstance(out, tuple) and len(out) == 2


def test_features_only_and_grad_checkpointing():
    feats = timm.create_model("levit_128s_fused", features_only=True)
    feats.eval()
    with torch.no_grad():
        outs = feats(images(1, seed=121))
    assert [o.shape[1] for o in outs] == feats.feature_info.channels() == [128, 256, 384]
    ref, ours, oracle = make_pair("levit_128s", seed=122)
    for m in (ref, ours, oracle):  # all three: the recomputed forward moves the BN statistics a second time
        m.set_grad_checkpointing(True)
    check_train_and_grads(ref, ours, oracle, images(2, seed=123), "grad checkpointing")


def test_flops_match_flop_counter():
    """levit_flops (2 x MACs of convs, linears and attention matmuls, one averaged head) against PyTorch's
    FlopCounterMode on timm's model, which runs both heads."""
    from torch.utils.flop_counter import FlopCounterMode

    for variant in ("levit_128s", "levit_256"):
        ref = timm.create_model(variant).eval()
        ours = timm.create_model(f"{variant}_fused")
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            ref(torch.zeros(2, 3, 224, 224))
        one_head = 2 * 2 * ours.num_features * ours.num_classes
        assert L.levit_flops(ours, batch=2) == counter.get_total_flops() - one_head
    # The official counter (levit.md section 3) counts 305.1M multiply-adds for 128S including softmax
    # (H * Nq * Nk per attention) and both heads' linears.
    ours = timm.create_model("levit_128s_fused")
    softmax = sum(m.num_heads * m.num_queries * m.num_keys for m in ours.modules()
                  if isinstance(m, (L.Attention, L.AttentionDownsample)))
    official = L.levit_flops(ours) // 2 + softmax + ours.num_features * ours.num_classes
    assert abs(official - 305.1e6) < 0.1e6, official


# ---------------------------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torch_compile_inference():
    ref, ours, oracle = make_pair("levit_128s", seed=131)
    x = images(2, seed=132)
    ours.fuse()
    compiled = torch.compile(ours, fullgraph=True)
    with torch.inference_mode():
        out = compiled(x)
        assert_close_to_oracle(out, oracle.eval()(x.double()), ref.eval()(x), "compiled eval")
    # New weights in place (an EMA update), then fuse() as documented: the compiled model must use them.
    other = randomize(timm.create_model("levit_128s"), seed=133).state_dict()
    ema_towards((ref, ours, oracle), other)
    ours.fuse()
    _drop_timm_bias_cache(ref, oracle)
    with torch.inference_mode():
        out = compiled(x)
        assert_close_to_oracle(out, oracle(x.double()), ref(x), "compiled eval after an update and fuse()")


@pytest.mark.slow
def test_torch_compile_training_step():
    """A compiled training step (fp64, see check_train_and_grads) equals timm's."""
    _, ours, oracle = make_pair("levit_128s", seed=141)
    ours = ours.double()
    compiled = torch.compile(ours)
    x = images(2, seed=142).double()
    ours.train()
    out = compiled(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)).sum().backward()
    grads = {n: p.grad for n, p in ours.named_parameters()}
    out_ora, g_ora = _train_step(oracle, x, False)
    torch.testing.assert_close(out, out_ora, rtol=1e-7, atol=1e-7)
    for n, g in grads.items():
        _close_fp64(g, g_ora[n], f"compiled grad {n}")


# ---------------------------------------------------------------------------------------------------------------------
# The drop-in patching helper (resnas_kernels.layers.attention, owned by the attention op)
# ---------------------------------------------------------------------------------------------------------------------
def _patch_helper():
    try:
        from resnas_kernels.layers.attention import patch_timm_levit_attention
    except ImportError as exc:
        pytest.skip(f"resnas_kernels.layers.attention is not available: {exc}")
    return patch_timm_levit_attention


def test_patch_timm_levit_in_place():
    patch = _patch_helper()
    ref, _, oracle = make_pair("levit_128s", seed=151)
    patched = copy.deepcopy(ref)
    before = {k: v.clone() for k, v in patched.state_dict().items()}
    patch(patched)
    assert patched.state_dict().keys() == before.keys()
    for k, v in patched.state_dict().items():
        assert torch.equal(v, before[k]), f"patching changed weight {k}"
    x = images(2, seed=152)
    check_eval(ref, patched, oracle, x, "patched timm eval")
    check_train_and_grads(ref, patched, oracle, x, "patched timm")
