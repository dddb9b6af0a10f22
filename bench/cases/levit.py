"""LeViT inference: our `levit_*_fused` against timm's `levit_*` with the same weights, eager and torch.compile'd.

Cases: levit_128s.infer and levit_256.infer (issue 8).
    CPU:  batch 16 at 224x224, fp32 (the LeViT paper's CPU protocol); run `resnas bench --case levit --threads 1`
          and `--threads 2` for the two thread counts.
    CUDA: batch 256 and 2048 at 224x224 under bf16 autocast (quick: 256 only).
    quick: LeViT-128S only, without `ours_compiled`; smoke: 128S at batch 1, eager providers only.
Providers (all eval mode under torch.inference_mode, same random weights with non-trivial BN statistics):
    ours           resnas_kernels.models.levit: BN folded into every conv/linear, the attention through
                   resnas_kernels.ragged_attention (bias table read in-kernel), oneDNN fused Hardswish / residual
                   epilogues on CPU
    ours_compiled  torch.compile(ours)
    timm           timm's model, eager (its gathered bias cached per device, BN not folded)
    timm_compiled  torch.compile(timm's model), default mode
torch.compile runs (and warms up) while the case is built, never inside a timed call. Inductor's CPU code is
specialised to the thread count at compile time, which is the run's pinned count (the runner pins threads before it
builds the cases).
FLOPs: `levit_flops` (2 per multiply-add of the convolutions, linears and attention matmuls; softmax and activations
not counted) for one averaged head, e.g. 0.61 GFLOP per image for 128S; the same count divides every provider's time.
Bytes: a floor: the fp32 weights read once, the images read once, the logits written.
Before timing, every provider's logits must agree with timm's.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch

from resnas_kernels.bench.harness import Case
from resnas_kernels.models import levit as L

VARIANTS = ("levit_128s", "levit_256")


@torch.no_grad()
def random_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial BN statistics/affines and bias tables (timm initialises some gammas and all tables to 0), drawn
    from `seed`; works on timm's LeViT and ours alike (the tests use it too)."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            n = mod.num_features
            mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
            mod.bias.copy_(torch.randn(n, generator=g) * 0.2)
            mod.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        if hasattr(mod, "attention_biases"):
            mod.attention_biases.copy_(torch.randn(mod.attention_biases.shape, generator=g))
    return model


def _infer(model: Callable, x: torch.Tensor, autocast: bool) -> Callable[[], torch.Tensor]:
    device_type = x.device.type

    def call():
        with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            return model(x)

    return call


def _check_agree(outputs: Dict[str, torch.Tensor], bf16: bool, what: str) -> None:
    """Same weights, same function: every provider's logits must match timm's eager ones."""
    ref = outputs["timm"].float()
    scale = max(1.0, ref.abs().max().item())
    tol = 5e-2 if bf16 else 1e-3  # relative to the largest logit; bf16 carries ~3 significant digits
    for name, out in outputs.items():
        err = (out.float() - ref).abs().max().item() / scale
        if not err <= tol:
            raise RuntimeError(f"{what}: provider {name!r} differs from timm by {err:.3g} (relative, tolerance {tol})")


def _case(variant: str, batch: int, ctx, compile_ours: bool, compile_timm: bool) -> Case:
    import timm

    device = ctx.device
    cuda = device.type == "cuda"
    ref = random_weights(timm.create_model(variant), seed=0).to(device).eval()
    ours = timm.create_model(f"{variant}_fused").to(device)
    ours.load_state_dict(ref.state_dict())
    ours.fuse()  # eval() + folded weights built now
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
    providers = {"ours": _infer(ours, x, cuda), "timm": _infer(ref, x, cuda)}
    if compile_ours:
        providers["ours_compiled"] = _infer(torch.compile(ours), x, cuda)
    if compile_timm:
        providers["timm_compiled"] = _infer(torch.compile(ref), x, cuda)
    # The first calls compile and warm up (outside any timing) and give the logits for the agreement check.
    outputs = {name: fn() for name, fn in providers.items()}
    outputs = {name: fn() for name, fn in providers.items()}
    _check_agree(outputs, cuda, f"{variant}.infer B={batch}")

    weight_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    nbytes = weight_bytes + x.numel() * x.element_size() + batch * ours.num_classes * 4
    backend = "fused attention: " + ("unavailable, unfused fallback" if not ours.fused_attn else "ragged_attention")
    return Case(name=f"{variant}.infer", shape=f"B={batch},224", dtype="bf16-autocast" if cuda else "float32",
                flops=L.levit_flops(ours, batch), bytes=nbytes, providers=providers, baseline="ours",
                op="ragged_attention" if ours.fused_attn else None, items=batch,
                notes=f"random weights, non-trivial BN stats; {backend}")


def cases(ctx) -> List[Case]:
    if ctx.smoke:
        return [_case("levit_128s", 1, ctx, compile_ours=False, compile_timm=False)]
    variants = ("levit_128s",) if ctx.quick else VARIANTS
    if ctx.device.type == "cuda":
        batches = (256,) if ctx.quick else (256, 2048)
    else:
        batches = (16,)
    return [_case(v, b, ctx, compile_ours=not ctx.quick, compile_timm=True) for v in variants for b in batches]
