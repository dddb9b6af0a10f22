"""`resnas_kernels.cuda_graph.CapturedTrainStep`: one captured supernet step per (group sizes, image size), replayed
for new architectures, equals the eager step sequence.

CPU tier: the helper's logic without CUDA (keys, static buffers, warm-up that leaves no trace, LRU, clear errors),
through a subclass whose "capture" returns the step itself (CPU optimizers cannot be capturable, so its groups run
with capturable off). GPU tier: real capture and replay against eager steps.
"""
import copy
import random

import pytest
import torch
import torch.nn.functional as F

from resnas_kernels.cuda_graph import CapturedTrainStep
from resnas_kernels.models.vit_resnas import SearchSpace, StageSpace, ViTResNAS

IMG = 28
NUM_CLASSES = 5
SPACE = SearchSpace("cuda_graph", (
    StageSpace(embed=(16, 12, 8), head_dim=4, heads=(2, 1), mlp=(32, 16), depth=2, removable=(1,)),
    StageSpace(embed=(24, 16), head_dim=6, heads=(3, 2), mlp=(48, 24), depth=1, removable=()),
))


def _loss(logits, labels):
    return F.cross_entropy(logits, labels)


def _model(dtype=torch.float64, device="cpu") -> ViTResNAS:
    torch.manual_seed(0)
    return ViTResNAS(space=SPACE, img_size=IMG, num_classes=NUM_CLASSES, drop_path_rate=0.2).to(device, dtype).train()


def _steps(count, seed, dtype=torch.float64, device="cpu"):
    """(images, labels, archs, sizes) of `count` steps over two group-size keys."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        sizes = (2, 0, 1, 1) if i % 3 else (1, 3)
        archs = SPACE.sample_groups(len(sizes), rng)
        images = torch.randn(sum(sizes), 3, IMG, IMG, generator=gen, dtype=dtype).to(device)
        labels = torch.randint(0, NUM_CLASSES, (sum(sizes),), generator=gen).to(device)
        out.append((images, labels, archs, sizes))
    return out


def _eager_steps(model, opt, steps):
    losses = []
    for i, (images, labels, archs, sizes) in enumerate(steps):
        torch.manual_seed(100 + i)
        opt.zero_grad(set_to_none=True)
        loss = _loss(model(images, archs, sizes), labels)
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return losses


class _EagerCapture(CapturedTrainStep):
    """The CPU stand-in: 'capturing' warms up (and undoes it) like the real capture, then replays by running."""

    def _capture(self, run):
        self._warm_up(run)
        return run


def _cpu_adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, capturable=True)


def _cpu_step(model, cls=None, **kwargs):
    """A helper over a capturable AdamW whose groups then run with capturable off: CPU optimizers cannot be
    capturable (the stand-in runs eagerly anyway)."""
    step = (cls or _EagerCapture)(model, _cpu_adamw(model), _loss, **kwargs)
    for group in step.optimizer.param_groups:
        group["capturable"] = False
    return step


def _eager_adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def _rel_err(a, b):
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def test_replayed_steps_equal_eager_steps_cpu_logic():
    """Static buffers per key, architecture tensors written per step, the warm-up undone (parameters, BatchNorm
    statistics, fresh AdamW state, RNG): the step sequence equals the eager one, in fp64."""
    model = _model()
    reference = copy.deepcopy(model)
    steps = _steps(5, seed=1)
    captured = _cpu_step(model)
    losses = []
    for i, (images, labels, archs, sizes) in enumerate(steps):
        torch.manual_seed(100 + i)
        arch_tensor = model.encode_archs(archs) if i % 2 else None
        losses.append(captured(images, labels, None if i % 2 else archs, group_sizes=sizes,
                               arch_tensor=arch_tensor).detach().clone())
    assert captured.num_graphs == 2  # (2, 0, 1, 1) and (1, 3)
    ref_losses = _eager_steps(reference, _eager_adamw(reference), steps)
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        assert _rel_err(a, b) <= 1e-12, f"loss of step {i}"
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert _rel_err(p.detach(), q.detach()) <= 1e-12, name
    for (name, b), c in zip(model.named_buffers(), reference.buffers()):
        assert _rel_err(b.double(), c.double()) <= 1e-12, name


def test_graphs_are_keyed_by_group_sizes_and_image_shape_and_evicted_lru():
    model = _model()
    captured = _cpu_step(model, max_graphs=2, warmup_iters=1)
    (images, labels, archs, sizes), = _steps(1, seed=2)
    key = captured.key(images, labels, sizes)
    assert key == ((1, 3), (3, IMG, IMG), torch.float64, (), torch.int64)
    captured(images, labels, archs, group_sizes=sizes)
    captured(images, labels, SPACE.sample_groups(2, 3), group_sizes=sizes)  # new architectures: same graph
    assert captured.num_graphs == 1
    captured(images, labels, archs, group_sizes=(2, 2))
    captured(images[:3], labels[:3], archs[:1], group_sizes=(3,))
    assert captured.num_graphs == 2 and list(captured._graphs) == [((2, 2),) + key[1:], ((3,),) + key[1:]]
    captured.clear()
    assert captured.num_graphs == 0 and all(p.grad is None for p in model.parameters())


def test_bad_input_raises_clear_errors():
    model = _model()
    (images, labels, archs, sizes), = _steps(1, seed=4)
    with pytest.raises(TypeError, match="optimizer must be torch.optim.Adam or AdamW"):
        CapturedTrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), _loss)
    with pytest.raises(ValueError, match="optimizer must be built with capturable=True"):
        CapturedTrainStep(model, torch.optim.AdamW(model.parameters()), _loss)
    with pytest.raises(TypeError, match="model must be a ViTResNAS supernet"):
        CapturedTrainStep(torch.nn.Linear(2, 2), _cpu_adamw(torch.nn.Linear(2, 2)), _loss)
    before = [p.detach().clone() for p in model.parameters()]
    real = _cpu_step(model, CapturedTrainStep)
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        real(images, labels, archs, group_sizes=sizes)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # nothing ran
    captured = _cpu_step(model, warmup_iters=1)
    opt = captured.optimizer
    with pytest.raises(ValueError, match="give exactly one of archs and arch_tensor"):
        captured(images, labels, archs, group_sizes=sizes, arch_tensor=model.encode_archs(archs))
    with pytest.raises(ValueError, match=r"group_sizes \(1, 2\) must sum to the batch size of images \(4\)"):
        captured(images, labels, archs, group_sizes=(1, 2))
    with pytest.raises(ValueError, match="targets must have one entry per image"):
        captured(images, labels[:3], archs, group_sizes=sizes)
    captured(images, labels, archs, group_sizes=sizes)
    with pytest.raises(ValueError, match=r"arch_tensor must be an int32 tensor of shape \(\d+, 2\)"):
        captured(images, labels, group_sizes=sizes, arch_tensor=model.encode_archs(archs).long())
    opt.param_groups[0]["lr"] = 5e-3
    with pytest.raises(ValueError, match="param group 0's lr changed from 0.01 to 0.005 since this step was captured"):
        captured(images, labels, archs, group_sizes=sizes)


@pytest.mark.gpu
def test_cuda_graph_replays_equal_eager_steps():
    """Real capture: 6 steps over two keys (two graphs), new architectures every step, a tensor learning rate
    changed in place between steps; losses and parameters equal the eager steps (fp32, up to kernel rounding)."""
    model = _model(torch.float32, "cuda")
    reference = copy.deepcopy(model)
    steps = _steps(6, seed=5, dtype=torch.float32, device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)
    captured = CapturedTrainStep(model, opt, _loss)
    losses = []
    for i, (images, labels, archs, sizes) in enumerate(steps):
        opt.param_groups[0]["lr"].fill_(1e-3 / (1 + i))
        torch.manual_seed(100 + i)
        losses.append(captured(images, labels, archs, group_sizes=sizes).detach().clone())
    assert captured.num_graphs == 2
    ref_losses = []
    for i, step in enumerate(steps):
        ref_opt.param_groups[0]["lr"].fill_(1e-3 / (1 + i))
        ref_losses += _eager_steps_from(reference, ref_opt, step, 100 + i)
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        assert _rel_err(a, b) <= 1e-4, f"loss of step {i}"
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert _rel_err(p.detach(), q.detach()) <= 1e-4, name


def _eager_steps_from(model, opt, step, seed):
    images, labels, archs, sizes = step
    torch.manual_seed(seed)
    opt.zero_grad(set_to_none=True)
    loss = _loss(model(images, archs, sizes), labels)
    loss.backward()
    opt.step()
    return [loss.detach().clone()]
