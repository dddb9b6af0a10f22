"""Compile once: the architecture is data, so torch.compile serves every sampled architecture from one graph.

A supernet step receives the sampled architectures as ONE int32 tensor (`ViTResNAS.encode_archs`); the group sizes
are the only host facts of an architecture set. `torch.compile(fullgraph=True)` of the forward (whose backward
AOTAutograd compiles with it) must therefore compile once per group sizes and then run >= 20 different architecture
sets with zero recompiles, giving the eager outputs and gradients. Compiles are counted by a counting backend around
"aot_eager" (the same aten graph eager runs, so fp64 results agree to rounding, and compiling is fast on CPU).
LeViT (the fused model, one fixed architecture) and supernet inference compile once too.
"""
import random

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from resnas_kernels.models.vit_resnas import TINY_SPACE, SearchSpace, StageSpace, ViTResNAS

pytestmark = pytest.mark.usefixtures("one_thread")

FP64_REL = 1e-12
IMG = 28
NUM_CLASSES = 5
SIZES = (2, 0, 1, 1)  # an empty group and groups of one
# Tiny widths, two stages of one block (the graph, and so the compile time, grows with the blocks), but every
# structural feature of the real spaces: a residual spatial reduction, a removable and a fixed block, a head dim that
# is not a power of two.
SPACE = SearchSpace("compile_once", (
    StageSpace(embed=(16, 12, 8), head_dim=4, heads=(2, 1), mlp=(32, 16), depth=1, removable=(0,)),
    StageSpace(embed=(24, 16), head_dim=6, heads=(3, 2), mlp=(48, 24), depth=1, removable=()),
))


def _model(**kwargs) -> ViTResNAS:
    torch.manual_seed(0)
    model = ViTResNAS(space=SPACE, img_size=IMG, num_classes=NUM_CLASSES, **kwargs).double()
    with torch.no_grad():  # non-trivial affines and biases, so a wrong width cannot hide behind zeros
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1, 0.2)
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.Linear)) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    return model


def _arch_sets(count: int, seed: int):
    """`count` different architecture sets for SIZES; the first two hold the extremes (every removable block
    removed, the whole supernet)."""
    rng = random.Random(seed)
    sets = [[SPACE.min_arch(), SPACE.max_arch(), SPACE.max_arch(), SPACE.min_arch()],
            [SPACE.max_arch(), SPACE.min_arch(), SPACE.min_arch(), SPACE.max_arch()]]
    while len(sets) < count:
        archs = SPACE.sample_groups(len(SIZES), rng)
        if archs not in sets:
            sets.append(archs)
    return sets


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def _grads(model):
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


def test_compile_counter_sees_recompiles():
    """The counting used below is not vacuous: a value passed as a host constant recompiles, as a tensor it does
    not."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda x, n: x * n, backend=counter, fullgraph=True, dynamic=False)
    for n in (2, 3, 4):
        fn(torch.ones(3), n)
    assert counter.frame_count == 3
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda x, n: x * n, backend=counter, fullgraph=True, dynamic=False)
    for n in (2, 3, 4):
        assert fn(torch.ones(3), torch.tensor(n)).tolist() == [n] * 3
    assert counter.frame_count == 1


def test_supernet_train_step_compiles_once_for_20_architecture_sets():
    """Forward + backward in train mode (BatchNorm batch statistics, stochastic depth drawn from the same random
    stream): one compilation for 20 architecture sets, outputs and every parameter gradient equal to eager."""
    model = _model(drop_path_rate=0.2).train()
    x = torch.randn(sum(SIZES), 3, IMG, IMG, dtype=torch.float64)
    weights = torch.randn(sum(SIZES), NUM_CLASSES, dtype=torch.float64)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True, dynamic=False)
    def loss_fn(images, arch_tensor):
        return (model(images, group_sizes=SIZES, arch_tensor=arch_tensor) * weights).sum()

    for step, archs in enumerate(_arch_sets(20, seed=1)):
        arch_tensor = model.encode_archs(archs)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(step)
        loss = loss_fn(x, arch_tensor)
        loss.backward()
        compiled = (loss.detach(), _grads(model))
        model.zero_grad(set_to_none=True)
        torch.manual_seed(step)
        eager_loss = (model(x, archs, SIZES) * weights).sum()
        eager_loss.backward()
        assert _rel_err(compiled[0], eager_loss.detach()) <= FP64_REL, f"loss, architecture set {step}"
        for name, g in _grads(model).items():
            assert _rel_err(compiled[1][name], g) <= FP64_REL, f"grad of {name}, architecture set {step}"
        assert counter.frame_count == 1, f"recompiled at architecture set {step}"
    assert counter.frame_count == 1


def test_supernet_inference_compiles_once():
    """Eval-mode inference without autograd over several architecture sets: one compilation, eager results (the
    search's cached-stem path takes the same tensor: checked eagerly, to keep compile time down). And the plain
    fixed-architecture forward(x)."""
    model = _model().eval()
    x = torch.randn(sum(SIZES), 3, IMG, IMG, dtype=torch.float64)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    forward = torch.compile(lambda images, t: model(images, group_sizes=SIZES, arch_tensor=t), backend=counter,
                            fullgraph=True, dynamic=False)
    with torch.no_grad():
        tokens = model.stem_tokens(x)
        for archs in _arch_sets(6, seed=2):
            arch_tensor = model.encode_archs(archs)
            eager = model(x, archs, SIZES)
            assert _rel_err(forward(x, arch_tensor), eager) <= FP64_REL
            assert _rel_err(model.forward_from_stem(tokens, group_sizes=SIZES, arch_tensor=arch_tensor),
                            eager) <= FP64_REL
        # One fixed architecture (what timm's vit_resnas_* models run): forward(x) compiles once too.
        fixed = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
        for _ in range(3):
            images = torch.randn(2, 3, IMG, IMG, dtype=torch.float64)
            assert _rel_err(fixed(images), model(images)) <= FP64_REL
    assert counter.frame_count == 2  # one graph per compiled function, none per architecture or input


def test_levit_inference_compiles_once():
    """The fused LeViT (one fixed architecture): compiled inference runs new inputs without recompiling and matches
    eager (which uses oneDNN's fused ops where compiled code uses the plain ones: fp32 rounding differs)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("levit_128s_fused", img_size=64, num_classes=NUM_CLASSES).eval()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 3, 64, 64)
            eager = model(x)
            assert _rel_err(compiled(x), eager) <= 1e-4
    assert counter.frame_count == 1


def test_encode_archs_layout():
    """Row r of the tensor is one op's widths; removed blocks are 0 on every row of theirs, the constant rows hold
    the stem's im2col width and the classifier width."""
    model = _model()
    archs = [SPACE.min_arch(), SPACE.max_arch()]
    t = model.encode_archs(archs)
    layout = model.arch_layout
    assert t.dtype == torch.int32 and t.shape == (layout.num_rows, 2) and t.is_contiguous()
    assert t[layout.stem_in].tolist() == [24 * 7 * 7] * 2 and t[layout.head_out].tolist() == [NUM_CLASSES] * 2
    for s, st in enumerate(SPACE.stages):
        assert t[layout.embed[s]].tolist() == [st.embed[-1], st.embed[0]]
    removed = layout.blocks[0][0]  # the min arch removes stage 0's only (removable) block
    assert t[removed.keep].tolist() == [0, 1]
    for row in (removed.active, removed.heads, removed.attn, removed.hidden):
        assert t[row, 0] == 0 and t[row, 1] > 0
    kept = layout.blocks[1][0]
    assert t[kept.keep].tolist() == [1, 1]
    assert t[kept.attn].tolist() == [2 * 6, 3 * 6] and t[kept.hidden].tolist() == [24, 48]
    assert ((t >= 0) & (t <= torch.tensor(layout.bounds, dtype=torch.int32)[:, None])).all()


def test_arch_tensor_bad_input_raises_clear_errors():
    model = _model().eval()
    x = torch.randn(sum(SIZES), 3, IMG, IMG, dtype=torch.float64)
    archs = _arch_sets(2, seed=3)[0]
    t = model.encode_archs(archs)
    with pytest.raises(TypeError, match="arch_tensor must be an int32 tensor"):
        model(x, group_sizes=SIZES, arch_tensor=t.long())
    with pytest.raises(ValueError, match=rf"arch_tensor must have shape \({t.shape[0]}, 4\)"):
        model(x, group_sizes=SIZES, arch_tensor=t[:, :3])
    with pytest.raises(ValueError, match=r"group_sizes \(2, 0, 1, 2\) sum to 5, but x holds 4"):
        model(x, group_sizes=(2, 0, 1, 2), arch_tensor=t)
    with pytest.raises(ValueError, match="arch_tensor must be on the device of x"):
        model(x, group_sizes=SIZES, arch_tensor=t.to("meta"))
    with pytest.raises(ValueError, match="give either archs or arch_tensor"):
        model(x, archs, SIZES, arch_tensor=t)
    with pytest.raises(ValueError, match="arch_tensor needs mode='ragged'"):
        model(x, group_sizes=SIZES, arch_tensor=t, mode="masked")
    too_wide = t.clone()
    too_wide[model.arch_layout.embed[1], 2] = 25
    with pytest.raises(ValueError, match=rf"arch_tensor\[{model.arch_layout.embed[1]}, 2\]=25 must lie in \[0, 24\]"):
        model(x, group_sizes=SIZES, arch_tensor=too_wide)
    with pytest.raises(ValueError, match=r"archs\[1\] has 3 stages; the compile_once space has 2"):
        model.encode_archs([SPACE.max_arch(), TINY_SPACE.max_arch()])
