"""ViT-ResNAS supernet: ragged forward == masked forward == loop over sliced sub-networks == each extracted
sub-network, for outputs and for the gradients of the shared weights.

Two kinds of checks:
- fp64 structure: the four paths compute the same function. In fp64 the only differences are summation orders, so
  they agree to ~1e-15 relative; the bound (FP64_REL = 1e-12 relative to the output scale, ~4500 fp64 ulps) is far
  below what any slicing or masking mistake produces (O(1e-2) and up with these random weights).
- fp32 accuracy: the project's oracle rule (tests/_oracle.py): the error of the fp32 ragged / masked paths against an
  fp64 oracle must be at most 2x (outputs) / 3x (gradients) the error of the stock-PyTorch loop path in fp32.
Search spaces are scaled down (widths 16-64, input 56: 17 / 5 / 2 tokens) to keep CPU time small; one test runs the
full Tiny space at input 56.
"""
import random

import pytest
import torch

import resnas_kernels as rk
from resnas_kernels import Ragged
from resnas_kernels.models.vit_resnas import (TINY_SPACE, Arch, SearchSpace, StageSpace, ViTResNAS, count_macs,
                                              mac_breakdown)
from resnas_kernels.models.vit_resnas.supernet import _plan

from _oracle import assert_close_to_oracle, max_err

FP64_REL = 1e-12
IMG = 56
NUM_CLASSES = 10
# Head dims 8 / 12 / 16 mirror the real 32 / 48 / 64 (one of them not a power of two).
MINI = SearchSpace("mini", (
    StageSpace(embed=(32, 24, 16), head_dim=8, heads=(4, 3, 2), mlp=(64, 48, 32), depth=3, removable=(1,)),
    StageSpace(embed=(48, 40, 32), head_dim=12, heads=(4, 3, 2), mlp=(96, 64), depth=3, removable=(1, 2)),
    StageSpace(embed=(64, 56, 48), head_dim=16, heads=(4, 2), mlp=(128, 96), depth=2, removable=(1,)),
))
# Group sizes with an empty group and a group of one.
GROUPINGS = [(3,), (2, 1), (1, 0, 2), (2, 0, 1, 2)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(dtype=torch.float64, seed=0, **kwargs) -> ViTResNAS:
    torch.manual_seed(seed)
    model = ViTResNAS(space=MINI, img_size=IMG, num_classes=NUM_CLASSES, **kwargs).to(dtype)
    with torch.no_grad():  # non-trivial BN statistics, LN affines and biases, so slicing mistakes cannot hide
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1, 0.2)
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.Linear, torch.nn.Conv2d)) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    return model


def _archs(sizes, seed):
    rng = random.Random(seed)
    archs = MINI.sample_groups(len(sizes), rng)
    if len(sizes) >= 3:  # always cover the extremes: every removable block removed, and the whole supernet
        archs[-1], archs[0] = MINI.min_arch(), MINI.max_arch()
    return archs


def _run(model, mode, x, archs, sizes, weights):
    """Output and the gradients of every parameter for loss = sum(out * weights)."""
    model.zero_grad(set_to_none=True)
    out = model(x, archs, sizes, mode=mode)
    (out * weights).sum().backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    return out.detach(), grads


def _rel_err(a, b):
    scale = max(1.0, b.abs().max().item())
    return (a - b).abs().max().item() / scale


@pytest.mark.parametrize("sizes", GROUPINGS, ids=lambda s: "x".join(map(str, s)))
def test_fp64_ragged_masked_loop_extract_agree(sizes):
    seed = 10 * sum(sizes) + len(sizes)
    model = _model(seed=seed).eval()
    archs = _archs(sizes, seed)
    x = torch.randn(sum(sizes), 3, IMG, IMG, dtype=torch.float64)
    weights = torch.randn(sum(sizes), NUM_CLASSES, dtype=torch.float64)
    results = {mode: _run(model, mode, x, archs, sizes, weights) for mode in ("ragged", "masked", "loop")}
    ref_out, ref_grads = results["loop"]
    for mode in ("ragged", "masked"):
        out, grads = results[mode]
        assert _rel_err(out, ref_out) <= FP64_REL, f"{mode} output"
        for name, g in grads.items():
            assert _rel_err(g, ref_grads[name]) <= FP64_REL, f"{mode} grad of {name}"
    # Every shared weight that some group uses gets a gradient (the loss is not trivially zero anywhere).
    assert ref_grads["stages.2.blocks.0.mlp.fc2.weight"].abs().sum() > 0
    # Each extracted (copied, stock) sub-network reproduces its group's rows.
    start = 0
    for arch, size in zip(archs, sizes):
        if size:
            net = model.extract(arch)
            assert _rel_err(net(x[start:start + size]).detach(), ref_out[start:start + size]) <= FP64_REL
        start += size


def test_fp32_accuracy_matches_stock_pytorch():
    sizes = (2, 1, 0, 2)
    model64 = _model(seed=7).eval()
    model32 = _model(torch.float32, seed=7).eval()
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    archs = _archs(sizes, 7)
    x = torch.randn(sum(sizes), 3, IMG, IMG, dtype=torch.float64)
    weights = torch.randn(sum(sizes), NUM_CLASSES, dtype=torch.float64)
    oracle_out, oracle_grads = _run(model64, "loop", x, archs, sizes, weights)
    ref_out, ref_grads = _run(model32, "loop", x.float(), archs, sizes, weights.float())
    for mode in ("ragged", "masked"):
        out, grads = _run(model32, mode, x.float(), archs, sizes, weights.float())
        assert_close_to_oracle(out, oracle_out.float(), ref_out, f"{mode} logits")
        for name, g in grads.items():
            assert_close_to_oracle(g, oracle_grads[name].float(), ref_grads[name], f"{mode} grad {name}", factor=3.0)


def test_training_drop_path_and_patch_head_ragged_equals_masked():
    """Train mode: stochastic depth (same random draws in both modes), whole-batch BatchNorm statistics, and the
    patch-token head (final LN on every token)."""
    sizes = (2, 1, 2)
    model = _model(seed=3, drop_path_rate=0.5, patch_output=True).train()
    archs = _archs(sizes, 3)
    x = torch.randn(sum(sizes), 3, IMG, IMG, dtype=torch.float64)
    outs = {}
    for mode in ("ragged", "masked"):
        torch.manual_seed(123)
        cls, patches = model(x, archs, sizes, mode=mode)
        assert cls.shape == (5, NUM_CLASSES) and patches.shape == (5, (IMG // 56) ** 2, NUM_CLASSES)
        (cls.sum() + patches.square().sum()).backward()
        outs[mode] = (cls.detach(), patches.detach(), model.stages[1].blocks[0].attn.qkv.weight.grad.clone())
        model.zero_grad(set_to_none=True)
    for a, b in zip(outs["ragged"], outs["masked"]):
        assert _rel_err(a, b) <= FP64_REL
    # Stochastic depth was active: another draw gives another output.
    torch.manual_seed(124)
    assert _rel_err(model(x, archs, sizes)[0].detach(), outs["ragged"][0]) > 1e-6


def test_ragged_work_equals_the_sub_networks_macs(monkeypatch):
    """Every ragged linear does exactly the GEMM work of the sampled sub-networks: summed over all calls,
    rows * k_g * n_g * segments equals sum_g b_g * (the analytic linear MACs of arch_g). Removed blocks cost 0."""
    sizes = (2, 1, 0, 3)
    archs = [MINI.min_arch(), MINI.max_arch()] + MINI.sample_groups(2, random.Random(5))
    model = _model(torch.float32, seed=5).eval()
    done = {"linear": 0, "attn_heads": 0}
    real_linear, real_attention = rk.ragged_linear, rk.ragged_attention

    def values(widths):  # the supernet passes device metadata (tensors); read them here, outside the op
        widths = widths.widths if isinstance(widths, Ragged) else widths
        return widths.tolist() if isinstance(widths, torch.Tensor) else list(widths)

    def linear_spy(x, weight, bias, in_groups, out_widths, *, segments=1, **kw):
        rows = x.numel() // (x.shape[0] * x.shape[-1])
        done["linear"] += sum(b * rows * k * n * segments
                              for b, k, n in zip(in_groups.sizes, values(in_groups), values(out_widths)))
        return real_linear(x, weight, bias, in_groups, out_widths, segments=segments, **kw)

    def attention_spy(q, k, v, heads, **kw):
        done["attn_heads"] += sum(b * h for b, h in zip(heads.sizes, values(heads)))
        return real_attention(q, k, v, heads, **kw)

    # The supernet calls the ops through the resnas_kernels.ops namespace.
    monkeypatch.setattr(rk.ops, "ragged_linear", linear_spy)
    monkeypatch.setattr(rk.ops, "ragged_attention", attention_spy)
    with torch.no_grad():
        model(torch.randn(sum(sizes), 3, IMG, IMG), archs, sizes)
    expected = 0
    for arch, b in zip(archs, sizes):
        parts = mac_breakdown(arch, IMG, NUM_CLASSES)
        stem_proj = arch.stages[0].embed * 24 * 49 * (IMG // 14) ** 2
        expected += b * (sum(v for k, v in parts.items() if k.startswith("linear.")) + stem_proj + parts["head"])
    assert done["linear"] == expected
    assert done["attn_heads"] == sum(b * sum(blk.heads for st in a.stages for blk in st.blocks if blk is not None)
                                     for a, b in zip(archs, sizes))


def test_activations_are_zero_beyond_each_groups_width():
    """The ragged contract inside the model: after the stem (cls + pos-embed added) and after every block, each
    group's columns beyond its embedding width are exactly zero (one-stage nets expose the stage-1 activations)."""
    space = SearchSpace("one_stage", MINI.stages[:1])
    torch.manual_seed(4)
    model = ViTResNAS(space=space, img_size=28, num_classes=NUM_CLASSES).double().eval()
    with torch.no_grad():
        for p in (model.pos_embed, model.cls_token):
            p.normal_()
    sizes = (2, 1, 2)
    archs = space.sample_groups(3, random.Random(4))
    feats = model.forward_features(torch.randn(5, 3, 28, 28, dtype=torch.float64), archs, sizes)
    widths = Ragged(sizes, tuple(a.stages[0].embed for a in archs)).mask(feats.shape[-1], dtype=torch.bool)
    assert (feats[~widths[:, None, :].expand_as(feats)] == 0).all()
    assert (feats[widths[:, None, :].expand_as(feats)] != 0).all()
    # The stem alone (a stage without blocks): cls token and pos-embed must be masked to each group's width.
    stem_only = SearchSpace("stem_only", (StageSpace(embed=(32, 24, 16), head_dim=8, heads=(1,), mlp=(1,), depth=0,
                                                     removable=()),))
    model = ViTResNAS(space=stem_only, img_size=28, num_classes=NUM_CLASSES).double().eval()
    with torch.no_grad():
        for p in (model.pos_embed, model.cls_token):
            p.normal_()
    archs = stem_only.sample_groups(3, random.Random(5))
    widths = Ragged(sizes, tuple(a.stages[0].embed for a in archs)).mask(32, dtype=torch.bool)[:, None, :]
    tokens = model._ragged_tokens(torch.randn(5, 3, 28, 28, dtype=torch.float64), _plan(tuple(archs), sizes))
    assert (tokens[~widths.expand_as(tokens)] == 0).all() and (tokens[widths.expand_as(tokens)] != 0).all()


def test_cached_stem_forward_equals_the_full_forward():
    """Search evaluation caches the stem at full width once per image (vit_resnas.md 9.2 (h)); every candidate's stem
    output is a prefix of it."""
    sizes = (2, 0, 1, 2)
    model = _model(seed=6).eval()
    archs = _archs(sizes, 6)
    x = torch.randn(sum(sizes), 3, IMG, IMG, dtype=torch.float64)
    with torch.no_grad():
        tokens = model.stem_tokens(x)
        assert tokens.shape == (5, (IMG // 14) ** 2, MINI.stages[0].embed[0])
        assert _rel_err(model.forward_from_stem(tokens, archs, sizes), model(x, archs, sizes)) <= FP64_REL
    with pytest.raises(ValueError, match=r"tokens must be stem_tokens\(x\) of shape \(B, 16, 32\)"):
        model.forward_from_stem(tokens[:, :, :16], archs, sizes)


def test_removed_block_has_zero_widths_in_the_plan():
    arch_removed, arch_kept = MINI.min_arch(), MINI.max_arch()
    plan = _plan((arch_removed, arch_kept), (2, 3))
    removed = plan.stages[0].blocks[1]  # slot 1 of stage 0 is removable
    assert removed.keep == (False, True)
    for widths in (removed.active, removed.heads, removed.attn, removed.hidden):
        assert widths.widths[0] == 0 and widths.widths[1] > 0
    assert removed.out == (arch_removed.stages[0].embed, arch_kept.stages[0].embed)  # the residual is carried


@pytest.mark.slow
def test_full_tiny_space_forward_at_56():
    """The real sr_tiny_mh supernet (85 M parameters) on a 56x56 input: ragged == masked == extracted, fp32, with
    the fp64 extracted sub-networks as the oracle and the fp32 extracted ones as the same-dtype reference."""
    torch.manual_seed(11)
    model = ViTResNAS(space=TINY_SPACE, img_size=IMG, num_classes=NUM_CLASSES).eval()
    sizes = (1, 2, 1)
    archs = TINY_SPACE.sample_groups(3, random.Random(11))
    archs[0] = TINY_SPACE.min_arch()
    assert count_macs(archs[0]) < count_macs(archs[1])
    x = torch.randn(sum(sizes), 3, IMG, IMG)
    with torch.no_grad():
        ragged = model(x, archs, sizes)
        masked = model(x, archs, sizes, mode="masked")
        start = 0
        for arch, size in zip(archs, sizes):
            net = model.extract(arch)
            rows = slice(start, start + size)
            ref = net(x[rows])
            oracle = net.double()(x[rows].double()).float()
            assert_close_to_oracle(ragged[rows], oracle, ref, "ragged (tiny space)")
            assert_close_to_oracle(masked[rows], oracle, ref, "masked (tiny space)")
            start += size


def test_bad_architectures_and_inputs_raise_clear_errors():
    model = _model(torch.float32)
    x = torch.randn(3, 3, IMG, IMG)
    good = MINI.max_arch()
    with pytest.raises(ValueError, match=r"archs\[1\] stage 0: embed 20 is not a choice"):
        bad = Arch.from_dict({**good.to_dict(), "embed": [20, 48, 64]})
        model(x, [good, bad], (2, 1))
    with pytest.raises(ValueError, match=r"group_sizes \(2, 2\) sum to 4, but x holds 3"):
        model(x, [good, good], (2, 2))
    with pytest.raises(ValueError, match="group_sizes has 1 entries but archs has 2"):
        model(x, [good, good], (3,))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, 56, 56\)"):
        model(torch.randn(1, 3, 112, 112))
    with pytest.raises(ValueError, match="img_size must be a positive multiple of 56"):
        ViTResNAS(space=MINI, img_size=100)
    with pytest.raises(ValueError, match="mode must be one of"):
        model(x, good, mode="fast")
    blocks = good.to_dict()["blocks"]
    blocks[0][0] = None  # slot 0 is not removable
    with pytest.raises(ValueError, match="block 0 is removed but is not removable"):
        model(x, Arch.from_dict({**good.to_dict(), "blocks": blocks}))
    with pytest.raises(ValueError, match="cannot hold every architecture"):
        ViTResNAS(arch=MINI.min_arch().pruned(), space=MINI, img_size=IMG)


BF16_ROUNDING_SAMPLES = 3


def _bf16_nudged(t: torch.Tensor, seed: int) -> torch.Tensor:
    """t (fp64) with every element scaled by 1 + k 2^-8, k uniform in -2..2: moved by up to about two bf16 ulps."""
    k = torch.randint(-2, 3, t.shape, generator=torch.Generator().manual_seed(seed)).to(t.dtype)
    return t * (1 + k * 2.0 ** -8)


def _bf16_network_errors(model64, archs, sizes, x, weights, samples):
    """The bf16 network's (loop mode) error against the fp64 oracle, per output and parameter gradient: the largest over
    the given problem and `samples` copies with every weight and the input nudged by up to two bf16 ulps (each copy
    against its own fp64 oracle). The copies have the same conditioning and independent rounding; the reason is that
    of tests/_rsr_helpers.py's rounding samples: one sample of a rounding error is a noisy estimate of its size."""
    state = model64.state_dict()
    errs = {}
    for sample in range(samples + 1):
        if sample == 0:
            sd, xs = state, x
        else:
            sd = {k: _bf16_nudged(v, 1000 * sample + i) if v.is_floating_point() else v
                  for i, (k, v) in enumerate(state.items())}
            xs = _bf16_nudged(x, 999 * sample)
        oracle = _model(seed=7).eval()
        oracle.load_state_dict(sd)
        bf16 = _model(torch.bfloat16, seed=7).eval()
        bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in sd.items()})
        o_out, o_grads = _run(oracle, "loop", xs, archs, sizes, weights)
        b_out, b_grads = _run(bf16, "loop", xs.to(torch.bfloat16), archs, sizes, weights.to(torch.bfloat16))
        errs["out"] = max(errs.get("out", 0.0), max_err(b_out, o_out))
        for name, g in b_grads.items():
            errs[name] = max(errs.get(name, 0.0), max_err(g.float(), o_grads[name].float()))
    return errs


def test_bf16_autocast_forward_and_backward():
    """fp32 model under torch.autocast("cpu", bfloat16), forward + backward in every mode.

    Under autocast the stem's convs return bf16 and the ragged path keeps its activations (the residual stream
    included) in bf16, casting the fp32 master weights of its GEMMs per forward; LayerNorm statistics and every
    accumulation are fp32 inside the ops, and the parameters' gradients come back fp32. So its accuracy is that of
    the network run in bf16: the oracle rule (tests/_oracle.py) with the fp64 network as the oracle and the stock
    network converted to bf16 (loop mode) as the same-dtype reference, whose error is taken over BF16_ROUNDING_SAMPLES
    nudged copies too (`_bf16_network_errors`): with one sample, the bf16 network's error on one BatchNorm weight
    gradient of the stem moved 3x between nudged copies (2.2e-5 to 6.2e-5, torch 2.14), and torch 2.11's kernels drew
    a low one (2.6e-5) on its inputs, under which the ragged path's 1.1e-4 failed. The masked and loop paths use stock ops, which
    autocast itself casts (fp32 residual stream): their reference is the loop under autocast."""
    sizes = (2, 1, 0, 2)
    model64 = _model(seed=7).eval()
    model32 = _model(torch.float32, seed=7).eval()
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    model16 = _model(torch.bfloat16, seed=7).eval()
    model16.load_state_dict({k: v.to(torch.bfloat16) for k, v in model64.state_dict().items()})
    archs = _archs(sizes, 7)
    # Drawn from their own generator: building the bf16 model consumes the global one differently across torch
    # releases (2.11 and 2.14 drew different inputs here).
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(sum(sizes), 3, IMG, IMG, dtype=torch.float64, generator=gen)
    weights = torch.randn(sum(sizes), NUM_CLASSES, dtype=torch.float64, generator=gen)
    oracle_out, oracle_grads = _run(model64, "loop", x, archs, sizes, weights)
    bf16_out, bf16_grads = _run(model16, "loop", x.to(torch.bfloat16), archs, sizes, weights.to(torch.bfloat16))
    bf16_errs = _bf16_network_errors(model64, archs, sizes, x, weights, BF16_ROUNDING_SAMPLES)
    results = {}
    for mode in ("loop", "ragged", "masked"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[mode] = _run(model32, mode, x.float(), archs, sizes, weights.float())
        out, grads = results[mode]
        assert out.dtype == torch.bfloat16, mode
        assert all(g.dtype == torch.float32 for g in grads.values()), mode
    refs = {"ragged": (bf16_out, bf16_grads), "masked": results["loop"]}
    for mode, (ref_out, ref_grads) in refs.items():
        out, grads = results[mode]
        sampled = mode == "ragged"
        assert_close_to_oracle(out, oracle_out.to(out.dtype), ref_out, f"{mode} bf16 logits",
                               same_dtype_err=bf16_errs["out"] if sampled else None)
        for name, g in grads.items():
            assert_close_to_oracle(g, oracle_grads[name].float(), ref_grads[name].float(),
                                   f"{mode} bf16 grad {name}", factor=3.0,
                                   same_dtype_err=bf16_errs[name] if sampled else None)


def test_extracted_subnetwork_gradients_equal_the_supernet_slices():
    """The gradient side of `extract`: for each group g (sizes with an empty group and a group of one), the loss
    restricted to g's rows through the whole multi-group ragged batch gives the supernet gradients whose
    `sliced_state_dict(arch_g)` slices equal the extracted network's own gradients (fp64, eval-mode BN, so rows are
    independent); outside those slices the supernet gradient is exactly zero for the weights g does not use."""
    sizes = (1, 0, 3, 2)
    model = _model(seed=9).eval()
    archs = _archs(sizes, 9)
    x = torch.randn(sum(sizes), 3, IMG, IMG, dtype=torch.float64)
    weights = torch.randn(sum(sizes), NUM_CLASSES, dtype=torch.float64)
    start = 0
    for arch, size in zip(archs, sizes):
        rows = slice(start, start + size)
        start += size
        if not size:
            continue
        only_g = torch.zeros_like(weights)
        only_g[rows] = weights[rows]
        _, grads = _run(model, "ragged", x, archs, sizes, only_g)
        net = model.extract(arch)
        (net(x[rows]) * weights[rows]).sum().backward()
        shadow = _model(seed=9).eval()   # same structure, its tensors replaced by the supernet's gradients
        shadow.load_state_dict({**dict(shadow.named_buffers()), **grads}, strict=True)
        sliced = shadow.sliced_state_dict(arch)
        for name, p in net.named_parameters():
            assert _rel_err(p.grad, sliced[name]) <= FP64_REL, name
        used = sum(t.abs().sum() for n, t in sliced.items() if n in dict(net.named_parameters()))
        assert abs(sum(g.abs().sum() for g in grads.values()) - used) <= FP64_REL * used  # nothing outside
