"""Importance sorting ("rewiring") of heads and MLP units, with the AdamW state permuted along with the weights."""
import copy
import random

import pytest
import torch

from resnas_kernels.models.vit_resnas import SearchSpace, StageSpace, ViTResNAS

MINI = SearchSpace("mini", (
    StageSpace(embed=(32, 24), head_dim=8, heads=(4, 3, 2), mlp=(64, 48, 32), depth=2, removable=(1,)),
    StageSpace(embed=(48, 40), head_dim=12, heads=(4, 2), mlp=(96, 64), depth=2, removable=(1,)),
    StageSpace(embed=(64, 56), head_dim=16, heads=(4, 2), mlp=(128, 96), depth=2, removable=(1,)),
))
TOL = 1e-12  # fp64; a permutation only reorders sums


pytestmark = pytest.mark.usefixtures("one_thread")


def _trained(seed=0):
    """A supernet and its AdamW after a few multi-architecture steps (non-trivial moments)."""
    torch.manual_seed(seed)
    model = ViTResNAS(space=MINI, img_size=56, num_classes=5).double().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    rng = random.Random(seed)
    for _ in range(3):
        archs = MINI.sample_groups(2, rng)
        loss = model(torch.randn(4, 3, 56, 56, dtype=torch.float64), archs, (2, 2)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def _copy(model, opt):
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.05)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict would share the state tensors
    return twin, twin_opt


def _full_step(model, opt, x):
    loss = model(x).square().mean()  # the whole supernet: a permutation of units leaves it unchanged
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_sorting_orders_units_and_keeps_the_full_network():
    model, opt = _trained()
    twin, _ = _copy(model, opt)
    model.sort_by_importance(opt)
    x = torch.randn(3, 3, 56, 56, dtype=torch.float64)
    model.eval(), twin.eval()
    with torch.no_grad():
        assert (model(x) - twin(x)).abs().max() <= TOL
    for stage in model.stages:
        for block in stage.blocks:
            attn, mlp = block.attn, block.mlp
            h, d = attn.num_heads, attn.head_dim
            heads = (attn.qkv.weight.abs().sum(1).view(3, h, d).sum((0, 2))
                     + attn.qkv.bias.abs().view(3, h, d).sum((0, 2)) + attn.proj.weight.abs().sum(0).view(h, d).sum(1))
            units = mlp.fc1.weight.abs().sum(1) + mlp.fc1.bias.abs() + mlp.fc2.weight.abs().sum(0)
            assert (heads[:-1] >= heads[1:]).all() and (units[:-1] >= units[1:]).all()
    # It was not already sorted: the first-k sub-network changed.
    small = MINI.min_arch()
    with torch.no_grad():
        assert (model(x, small) - twin(x, small)).abs().max() > 1e-6


@pytest.mark.parametrize("permute_state", [True, False], ids=["with_state", "without_state_negative_control"])
def test_adamw_state_follows_the_weights(permute_state):
    """After sorting, an AdamW step must act on each unit exactly as it would have without sorting: the sorted and
    unsorted supernets stay the same function. Without permuting the moments (the original's behaviour) they do not,
    which shows the check is sensitive."""
    model, opt = _trained(1)
    twin, twin_opt = _copy(model, opt)
    model.sort_by_importance(opt if permute_state else None)
    x = torch.randn(4, 3, 56, 56, dtype=torch.float64)
    _full_step(model, opt, x)
    _full_step(twin, twin_opt, x)
    probe = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    model.eval(), twin.eval()
    with torch.no_grad():
        gap = (model(probe) - twin(probe)).abs().max().item()
    if permute_state:
        assert gap <= TOL
    else:
        assert gap > 1e-6
