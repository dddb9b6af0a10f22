"""Supernet training steps and search scoring.

supernet_train.train   one optimizer-free training step (forward + backward) of K sampled sub-networks, each on a
                       contiguous group of the batch. Providers:
                         ours     one ragged pass (`ViTResNAS.forward(..., mode="ragged")`)
                         masked   the original code: everything at full width, then masks (mode="masked")
                         loop     sequential sliced sub-networks, one per group (mode="loop")
                       items = images, so the CSV has training images/s. fp32 everywhere; on CUDA also the
                       Tiny space at 4 groups x 64 images in bf16 (weights, activations and gradients in bf16, the
                       kernels accumulate in fp32; the loss in fp32): the issue's supernet img/s shape.
supernet_train.train   (CUDA, shape tag "step") a whole training step with the AdamW update, new architectures every
                       call (a cycle of sampled sets, the same for both providers). Providers:
                         ours      eager: forward(x, archs, sizes) + backward + AdamW step
                         captured  `resnas_kernels.cuda_graph.CapturedTrainStep`: the step captured once per group
                                   sizes, replayed with each call's architecture tensor written into it
search_score.infer     top-1 scoring of P candidates on V validation images. Providers:
                         ours                    `CandidateScorer`: stem cached once, P candidates per ragged forward
                         one_model_per_candidate the original search: a standalone network per candidate, run alone
                       items = candidates, so the CSV has candidates scored per second (target >= 10x).

Shapes: the demo space (56 px, digits-sized) on CPU; on CUDA also the Tiny space at 224 px. FLOPs are the sampled
sub-networks' MACs x 2 (x 3 for forward + backward); bytes are the supernet weights read once (a lower bound).
"""
from __future__ import annotations

import functools
import random
from typing import List

import copy

import torch
import torch.nn.functional as F

from resnas_kernels.bench.harness import Case, LazyCase
from resnas_kernels.cuda_graph import CapturedTrainStep
from resnas_kernels.models.vit_resnas import TINY_SPACE, count_macs
from resnas_kernels.models.vit_resnas.space import DEMO_SPACE
from resnas_kernels.search.data import Split, split_batch
from resnas_kernels.search.evaluate import CandidateScorer, score_one_model_per_candidate
from resnas_kernels.search.networks import build_supernet


def _weight_bytes(model) -> int:
    return int(sum(p.numel() * p.element_size() for p in model.parameters()))


def _train_shape(tag: str, img: int, batch: int, groups: int) -> str:
    return f"{tag} img={img} B={batch} K={groups}"


def _search_shape(tag: str, img: int, n_val: int, n_cand: int, per_forward: int) -> str:
    return f"{tag} img={img} V={n_val} candidates={n_cand} P={per_forward}"


def _train_case(space, img, batch, groups, device, tag, dtype=torch.float32) -> Case:
    torch.manual_seed(0)
    model = build_supernet(space, img, 10, drop_path=0.1).to(device=device, dtype=dtype).train()
    archs = space.sample_groups(groups, rng=random.Random(0))
    sizes = split_batch(batch, groups)
    x = torch.randn(batch, 3, img, img, device=device, dtype=dtype)
    y = torch.randint(0, 10, (batch,), device=device)

    def step(mode):
        def fn():
            model.zero_grad(set_to_none=True)
            logits = model(x, archs, sizes, mode=mode).float()
            F.cross_entropy(logits, y, label_smoothing=0.1).backward()
        return fn

    macs = sum(count_macs(a, img, 10) * s for a, s in zip(archs, sizes))
    return Case(name="supernet_train.train", shape=_train_shape(tag, img, batch, groups),
                dtype=str(dtype).replace("torch.", ""), flops=6 * macs, bytes=_weight_bytes(model),
                providers={"ours": step("ragged"), "masked": step("masked"), "loop": step("loop")},
                baseline="ours", items=batch, notes="forward + backward, no optimizer step")


def _step_case(space, img, batch, groups, device, tag) -> Case:
    torch.manual_seed(0)
    model = build_supernet(space, img, 10, drop_path=0.1).to(device).train()
    twin = copy.deepcopy(model)  # the captured provider's own weights and optimizer: the two never share state
    rng = random.Random(0)
    cycle = [space.sample_groups(groups, rng=rng) for _ in range(8)]
    sizes = split_batch(batch, groups)
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def loss_fn(out, labels):
        return F.cross_entropy(out, labels, label_smoothing=0.1)

    def adamw(m):
        return torch.optim.AdamW(m.parameters(), lr=torch.tensor(1e-4, device=device), capturable=True)

    opt = adamw(model)
    captured = CapturedTrainStep(twin, adamw(twin), loss_fn)
    calls = {"ours": 0, "captured": 0}

    def eager():
        archs = cycle[calls["ours"] % len(cycle)]
        calls["ours"] += 1
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x, archs, sizes), y).backward()
        opt.step()

    def replayed():
        archs = cycle[calls["captured"] % len(cycle)]
        calls["captured"] += 1
        captured(x, y, archs, group_sizes=sizes)

    macs = sum(count_macs(a, img, 10) * s for archs in cycle for a, s in zip(archs, sizes)) // len(cycle)
    return Case(name="supernet_train.train", shape=_train_shape(tag + " step", img, batch, groups), dtype="float32",
                flops=6 * macs, bytes=_weight_bytes(model), providers={"ours": eager, "captured": replayed},
                baseline="ours", items=batch, cuda_graph=False,
                notes="forward + backward + AdamW step, a new architecture set every call (cycle of 8)")


def _lazy_step(space, img, batch, groups, device, tag) -> LazyCase:
    return LazyCase("supernet_train.train", _train_shape(tag + " step", img, batch, groups), "float32",
                    ("ours", "captured"), functools.partial(_step_case, space, img, batch, groups, device, tag))


def _search_case(space, img, n_val, n_cand, per_forward, device, tag) -> Case:
    torch.manual_seed(0)
    model = build_supernet(space, img, 10).to(device).eval()
    g = torch.Generator().manual_seed(0)
    val = Split(torch.randint(0, 256, (n_val, 3, img, img), dtype=torch.uint8, generator=g),
                torch.randint(0, 10, (n_val,), generator=g), 10)
    archs = space.sample_groups(n_cand, rng=random.Random(1))
    scorer = CandidateScorer(model, val, device, candidates_per_forward=per_forward, images_per_forward=n_val)
    macs = sum(count_macs(a, img, 10) for a in archs) * n_val
    return Case(name="search_score.infer", shape=_search_shape(tag, img, n_val, n_cand, per_forward),
                dtype="float32", flops=2 * macs, bytes=_weight_bytes(model),
                providers={"ours": lambda: scorer.correct(archs),
                           "one_model_per_candidate": lambda: score_one_model_per_candidate(
                               model, archs, val, device, images_per_forward=n_val)},
                baseline="ours", items=n_cand, cuda_graph=False,
                notes="stem cached at construction (once per search), images decoded in memory")


def _lazy_train(space, img, batch, groups, device, tag, dtype=torch.float32) -> LazyCase:
    return LazyCase("supernet_train.train", _train_shape(tag, img, batch, groups), str(dtype).replace("torch.", ""),
                    ("ours", "masked", "loop"),
                    functools.partial(_train_case, space, img, batch, groups, device, tag, dtype))


def _lazy_search(space, img, n_val, n_cand, per_forward, device, tag) -> LazyCase:
    return LazyCase("search_score.infer", _search_shape(tag, img, n_val, n_cand, per_forward), "float32",
                    ("ours", "one_model_per_candidate"),
                    functools.partial(_search_case, space, img, n_val, n_cand, per_forward, device, tag))


def cases(ctx) -> List[LazyCase]:
    dev = ctx.device
    small = ctx.quick or ctx.smoke
    out = [_lazy_train(DEMO_SPACE, 56, 16 if small else 64, 4, dev, "demo"),
           _lazy_search(DEMO_SPACE, 56, 32 if small else 128, 8 if small else 16, 8, dev, "demo")]
    if dev.type == "cuda" and not ctx.smoke:
        out += [_lazy_step(DEMO_SPACE, 56, 16, 4, dev, "demo"),
                _lazy_step(TINY_SPACE, 224, 64, 4, dev, "tiny"),
                _lazy_train(TINY_SPACE, 224, 64 if small else 128, 4, dev, "tiny"),
                _lazy_train(TINY_SPACE, 224, 4 * 64, 4, dev, "tiny", torch.bfloat16),
                _lazy_search(TINY_SPACE, 224, 64 if small else 256, 16, 16, dev, "tiny")]
    return out
