"""ViT-ResNAS models: one supernet training step serving several sub-networks, and searched-model inference.

Cases:
    vit_resnas_supernet.train   Tiny-space supernet (sr_tiny_mh), G = 4 sampled architectures (seed 0, drawn as the
                                original trainer draws them), b images each: zero_grad + forward + cross-entropy +
                                backward (no optimizer step: it costs the same for every provider). Train mode,
                                drop-path 0.2. Providers:
        ours      ViTResNAS(..., mode="ragged"): one pass through the ragged kernels
        masked    mode="masked": the original code's full-width masked formulation (every sample pays the supernet)
        loop      mode="loop": one stock sub-network per group in turn, on sliced views of the shared weights
                  (the AutoFormer / OFA way)
    supernet_overhead.train     the same step at G = 4 x 1 image, 56 px, in every profile and on every device: so
                                little work per op that the step time is the op layer's host cost (dispatch,
                                autograd, metadata); target: ours at least as fast as the loop. Its notes give each
                                provider's aten + resnas:: dispatcher calls per step (bench/op_count.py).
    vit_resnas_{tiny,small,medium}.infer   the searched nets, eval, no grad. Providers:
        ours      the registered timm model (ragged kernels, one group)
        stock     ViTResNASNet: the same architecture and weights from stock PyTorch modules (nn.Linear, nn.LayerNorm,
                  F.scaled_dot_product_attention, Conv2d)

Shapes: CPU full 4 x 8 images at 224 (the issue's shape), quick 4 x 1 at 112, smoke 2 x 1 at 56; CUDA 4 x 64 at 224
(quick 4 x 16). Inference batch: CPU 8 (quick 2), CUDA 128 (quick 32); quick and smoke run the Tiny net only.
dtype: fp32 on CPU, bf16 on CUDA.
FLOPs are the analytic count (2 per MAC, models/vit_resnas/macs.py) of the sampled sub-networks, x3 for forward +
backward; bytes are a floor: every used weight slice read in the forward and the backward, its gradient written, and
the input images read once (inference: weights and images read once).
Before timing, each shape checks that the providers agree (eval-mode logits).
"""
from __future__ import annotations

import functools
import random
from typing import List

import torch
import torch.nn.functional as F

from resnas_kernels.bench.harness import Case, LazyCase
from resnas_kernels.bench.op_count import count_op_calls
from resnas_kernels.models.vit_resnas import (MEDIUM_ARCH, SMALL_ARCH, TINY_ARCH, TINY_SPACE, ViTResNAS,
                                              ViTResNASNet, count_macs)

NUM_GROUPS = 4
# The overhead-bound step: so little work per op that the time is the op layer's host cost (dispatch, autograd,
# metadata); its notes carry the aten + resnas calls per step of each provider (bench/op_count.py).
OVERHEAD_CASE = "supernet_overhead.train"
OVERHEAD_SHAPE = (NUM_GROUPS, 1, 56)
SEARCHED = {"tiny": TINY_ARCH, "small": SMALL_ARCH, "medium": MEDIUM_ARCH}


def _train_shape(ctx):
    if ctx.smoke:
        return 2, 1, 56
    if ctx.device.type == "cuda":
        return NUM_GROUPS, (16 if ctx.quick else 64), 224
    return NUM_GROUPS, (1 if ctx.quick else 8), (112 if ctx.quick else 224)


def _supernet_shape(groups: int, per_group: int, img: int) -> str:
    return f"tiny space, G={groups}x{per_group}, {img}px"


def _inference_shape(ctx):
    if ctx.smoke:
        return 1, 56
    return (128 if ctx.device.type == "cuda" else 8) // (4 if ctx.quick else 1), 224


def _dtype(ctx) -> torch.dtype:
    return torch.bfloat16 if ctx.device.type == "cuda" else torch.float32


def _check_agree(outputs, dtype, what: str) -> None:
    """The providers must compute the same function, or the comparison means nothing."""
    tol = 2e-3 if dtype == torch.float32 else 1e-1
    ref = outputs["ours"].float()
    scale = max(1.0, ref.abs().max().item())
    for name, out in outputs.items():
        err = (out.float() - ref).abs().max().item() / scale
        if not err <= tol:
            raise RuntimeError(f"{what}: provider {name!r} differs from 'ours' by {err:.3g} (relative; "
                               f"tolerance {tol})")


def _param_bytes(model: torch.nn.Module, arch, elem: int) -> int:
    return sum(t.numel() for t in model.sliced_state_dict(arch).values() if t.is_floating_point()) * elem


def _supernet_case(ctx, name: str = "vit_resnas_supernet.train", shape=None) -> Case:
    """The supernet step at `shape` = (groups, images per group, px) (default: the profile's `_train_shape`)."""
    groups, per_group, img = shape if shape is not None else _train_shape(ctx)
    device, dtype = ctx.device, _dtype(ctx)
    torch.manual_seed(0)
    model = ViTResNAS(space=TINY_SPACE, img_size=img, drop_path_rate=0.2).to(device, dtype)
    archs = TINY_SPACE.sample_groups(groups, random.Random(0))
    sizes = (per_group,) * groups
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(groups * per_group, 3, img, img, generator=gen).to(device, dtype)
    target = torch.randint(0, model.num_classes, (x.shape[0],), generator=gen).to(device)

    model.eval()  # BatchNorm on running statistics, so that the loop (one group per batch) agrees as well
    with torch.no_grad():
        outputs = {provider: model(x, archs, sizes, mode=mode)
                   for provider, mode in (("ours", "ragged"), ("masked", "masked"), ("loop", "loop"))}
    _check_agree(outputs, dtype, f"supernet {groups}x{per_group}")
    model.train()

    def step(mode: str):
        def run():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x, archs, sizes, mode=mode).float(), target).backward()
        return run

    macs = [count_macs(a, img) for a in archs]
    full = count_macs(TINY_SPACE.max_arch(), img)
    elem = torch.finfo(dtype).bits // 8
    weights = max(_param_bytes(model, a, elem) for a in archs)  # the union of the groups' slices is the largest one
    share = sum(macs) / (groups * full)
    notes = (f"sub-networks {', '.join(f'{m / 1e9:.2f}' for m in macs)} GMACs = {share:.0%} of the supernet's "
             f"{full / 1e9:.2f} GMACs; archs seed 0")
    if name == OVERHEAD_CASE:
        notes += "; " + "; ".join(f"{provider} {count_op_calls(step(mode)).summary()}"
                                  for provider, mode in (("ours", "ragged"), ("masked", "masked"), ("loop", "loop")))
    return Case(
        name=name, shape=_supernet_shape(groups, per_group, img),
        dtype=str(dtype).replace("torch.", ""), flops=6 * per_group * sum(macs),
        bytes=3 * weights + x.numel() * elem,
        providers={"ours": step("ragged"), "masked": step("masked"), "loop": step("loop")}, baseline="ours",
        items=x.shape[0], cuda_graph=False, notes=notes)


def _inference_case(ctx, name: str, arch) -> Case:
    device, dtype = ctx.device, _dtype(ctx)
    batch, img = _inference_shape(ctx)
    torch.manual_seed(0)
    ours = ViTResNAS(arch, img_size=img).to(device, dtype).eval()
    stock = ViTResNASNet(arch, img_size=img).to(device, dtype).eval()
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(batch, 3, img, img, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    def infer(model):
        def run():
            with torch.inference_mode():
                return model(x)
        return run

    providers = {"ours": infer(ours), "stock": infer(stock)}
    _check_agree({k: fn() for k, fn in providers.items()}, dtype, f"vit_resnas_{name} inference")
    elem = torch.finfo(dtype).bits // 8
    params = sum(p.numel() for p in ours.parameters()) * elem
    return Case(name=f"vit_resnas_{name}.infer", shape=f"B={batch}, {img}px", dtype=str(dtype).replace("torch.", ""),
                flops=2 * batch * count_macs(arch, img), bytes=params + x.numel() * elem, providers=providers,
                baseline="ours", items=batch, notes=f"{count_macs(arch) / 1e9:.3f} GMACs at 224")


def cases(ctx) -> List[LazyCase]:
    dtype = str(_dtype(ctx)).replace("torch.", "")
    groups, per_group, img = _train_shape(ctx)
    steps = ("ours", "masked", "loop")
    out = [LazyCase("vit_resnas_supernet.train", _supernet_shape(groups, per_group, img), dtype, steps,
                    functools.partial(_supernet_case, ctx)),
           LazyCase(OVERHEAD_CASE, _supernet_shape(*OVERHEAD_SHAPE), dtype, steps,
                    functools.partial(_supernet_case, ctx, OVERHEAD_CASE, OVERHEAD_SHAPE))]
    # Quick and smoke profiles time the Tiny net only (each model build alone initialises 40-100 M parameters).
    for name, arch in (list(SEARCHED.items())[:1] if (ctx.smoke or ctx.quick) else SEARCHED.items()):
        batch, img = _inference_shape(ctx)
        out.append(LazyCase(f"vit_resnas_{name}.infer", f"B={batch}, {img}px", dtype, ("ours", "stock"),
                            functools.partial(_inference_case, ctx, name, arch)))
    return out
