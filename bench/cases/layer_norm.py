"""Ragged LayerNorm (foundation op) vs the two ways supernets normalise mixed-width batches today.

Providers:
    ours     resnas_kernels.ragged_layer_norm (whichever backend resolve_backend picks; the CSV records it)
    masked   the original ViT-ResNAS MaskedLayerNorm: full-width math, statistics over the mask, output re-masked
             (resnas_kernels.reference.masked_layer_norm with Ragged.mask, built once outside the timed call)
    loop     the AutoFormer / OFA approach: per group, F.layer_norm on the sliced [:w_g] channels, then zero-pad
             and concatenate the groups back into one (B, N, C_max) tensor

Shapes: the three stages of the ViT-ResNAS Tiny supernet (N = 257 / 65 / 17 tokens, C_max = 256 / 512 / 1024), four
groups at widths from the `sr_tiny_mh` search space, 16 samples per group (quick: 4). Modes fwd and fwd+bwd; fp32 on
CPU, fp32 and bf16 on CUDA. Before timing, each shape checks that the three providers agree.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

import resnas_kernels
from resnas_kernels import Ragged
from resnas_kernels.bench.harness import Case, LazyCase, rotating, rotation_copies
from resnas_kernels.reference import masked_layer_norm

# (tokens N, C_max, widths of the four groups): ViT-ResNAS Tiny stages 1-3 (docs: vit_resnas.md, sr_tiny_mh table)
STAGES: Tuple[Tuple[int, int, Tuple[int, ...]], ...] = (
    (257, 256, (256, 224, 192, 160)),
    (65, 512, (512, 448, 384, 320)),
    (17, 1024, (1024, 896, 768, 640)),
)
EPS = 1e-6
# Approximate FLOPs per active element (LayerNorm is memory-bound: GB/s is the rate that matters).
# fwd: sum, subtract mean, square, sum, * rstd, * weight, + bias = 7.
# bwd: recompute xhat (2), w * dy, xhat * wdy, two row sums, dx = (wdy - xhat * c1 - c2) * rstd (3), dw, db (3) = 12.
FWD_FLOPS_PER_ELEMENT = 7
BWD_FLOPS_PER_ELEMENT = 12


def loop_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: Ragged) -> torch.Tensor:
    """The sliced-sub-network approach: one F.layer_norm per group on its first w_g channels, zero-padded back."""
    c_max = x.shape[-1]
    outs = []
    for (start, end), w in zip(zip(groups.offsets[:-1], groups.offsets[1:]), groups.widths):
        y = F.layer_norm(x[start:end, ..., :w], (w,), weight[:w], bias[:w], EPS)
        outs.append(F.pad(y, (0, c_max - w)))
    return torch.cat(outs, dim=0)


def _work(groups: Ragged, tokens: int, c_max: int, elem: int, mode: str) -> Tuple[int, int]:
    """(useful FLOPs, minimum bytes) of our op: reads touch only active channels, writes cover the full width
    (the zeros beyond w_g are part of the contract), weight/bias are read once, row statistics are 4-byte floats."""
    active = groups.active_elements(tokens)
    full = groups.batch * tokens * c_max
    rows = groups.batch * tokens
    params = c_max * elem
    fwd_bytes = active * elem + full * elem + 2 * params
    if mode == "fwd":
        return FWD_FLOPS_PER_ELEMENT * active, fwd_bytes
    # fwd+bwd: fwd also saves mean/rstd; bwd reads dy, x, mean/rstd, weight and writes dx, dweight, dbias.
    bwd_bytes = 2 * active * elem + 2 * rows * 4 + params + full * elem + 2 * params
    return (FWD_FLOPS_PER_ELEMENT + BWD_FLOPS_PER_ELEMENT) * active, fwd_bytes + 2 * rows * 4 + bwd_bytes


def _check_agree(outputs: Dict[str, torch.Tensor], dtype: torch.dtype, what: str) -> None:
    """The providers must compute the same thing, or the comparison is meaningless."""
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    ref = outputs["loop"].float()
    for name, out in outputs.items():
        err = (out.float() - ref).abs().max().item()
        if not err <= tol:
            raise RuntimeError(f"{what}: provider {name!r} differs from 'loop' by {err:.3g} (tolerance {tol})")


def _providers(groups: Ragged, x_sets: List[torch.Tensor], dy_sets: List[torch.Tensor], weight: torch.Tensor,
               bias: torch.Tensor, mode: str) -> Dict[str, Callable[[], object]]:
    mask = groups.mask(x_sets[0].shape[-1], device=x_sets[0].device)[:, None, :]  # (B, 1, C_max), built once
    forwards = {
        "ours": lambda x: resnas_kernels.ragged_layer_norm(x, weight, bias, groups, eps=EPS),
        "masked": lambda x: masked_layer_norm(x, weight, bias, mask, eps=EPS),
        "loop": lambda x: loop_layer_norm(x, weight, bias, groups),
    }
    if mode == "fwd":
        return {name: rotating(fwd, [(x,) for x in x_sets]) for name, fwd in forwards.items()}

    def fwd_bwd(fwd):
        # autograd.grad rather than .backward(): no gradient accumulation kernels in the timed call.
        return lambda x, dy: torch.autograd.grad(fwd(x), (x, weight, bias), dy)

    return {name: rotating(fwd_bwd(fwd), list(zip(x_sets, dy_sets))) for name, fwd in forwards.items()}


def _case(device, dtype: torch.dtype, tokens: int, c_max: int, groups: Ragged, shape: str, mode: str) -> Case:
    gen = torch.Generator(device="cpu").manual_seed(0)
    elem = torch.finfo(dtype).bits // 8
    shape_x = (groups.batch, tokens, c_max)
    mask = groups.mask(c_max)[:, None, :]
    flops, nbytes = _work(groups, tokens, c_max, elem, mode)
    copies = rotation_copies(nbytes, device)
    grad = mode == "fwd+bwd"
    w = (1 + 0.1 * torch.randn(c_max, generator=gen)).to(device, dtype).requires_grad_(grad)
    b = (0.1 * torch.randn(c_max, generator=gen)).to(device, dtype).requires_grad_(grad)
    # Inputs obey the ragged contract: zero beyond each group's width.
    x_sets = [(torch.randn(shape_x, generator=gen) * mask).to(device, dtype).requires_grad_(grad)
              for _ in range(copies)]
    dy_sets = [(torch.randn(shape_x, generator=gen) * mask).to(device, dtype) for _ in range(copies)]
    providers = _providers(groups, x_sets, dy_sets, w, b, mode)
    if mode == "fwd":
        with torch.no_grad():
            _check_agree({name: fn() for name, fn in providers.items()}, dtype,
                         f"ragged_layer_norm.fwd {shape} {dtype}")
    return Case(name=f"ragged_layer_norm.{mode}", shape=shape, dtype=str(dtype).replace("torch.", ""), flops=flops,
                bytes=nbytes, providers=providers, baseline="ours", op="ragged_layer_norm",
                notes=f"{copies} rotating input set(s)")


def cases(ctx) -> List[LazyCase]:
    device = ctx.device
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" and not ctx.smoke else [])
    per_group = 1 if ctx.smoke else (4 if ctx.quick else 16)
    stages = [(17, 256, (256, 224, 192, 160))] if ctx.smoke else STAGES
    modes = ("fwd",) if ctx.smoke else ("fwd", "fwd+bwd")
    out: List[LazyCase] = []
    for dtype in dtypes:
        for tokens, c_max, widths in stages:
            groups = Ragged((per_group,) * len(widths), widths)
            shape = f"G={len(widths)}x{per_group},N={tokens},C={'/'.join(map(str, widths))}"
            for mode in modes:
                out.append(LazyCase(f"ragged_layer_norm.{mode}", shape, str(dtype).replace("torch.", ""),
                                    ("ours", "masked", "loop"),
                                    functools.partial(_case, device, dtype, tokens, c_max, groups, shape, mode)))
    return out
