"""Residual spatial reduction: the fused op vs the stock-module chain and the original masked formulation.

Providers:
    ours     resnas_kernels.residual_spatial_reduction (auto backend: C++ LN / im2col / ragged GEMM / epilogue on CPU;
             Triton LN / im2col / GEMM + CUDA C++ epilogue on CUDA; the CSV records the backend resolved for the op)
    stock    the sliced sub-network approach (AutoFormer / OFA style), per group: LayerNorm, Conv2d, AvgPool2d
             (ceil_mode), zero-padding cat and the cls Linear on the sliced weights (F.layer_norm / F.conv2d /
             F.avg_pool2d / F.linear, i.e. the stock modules' functional forms), with the (B, N, C) <-> (B, C, H, W)
             reshapes between, then padded to C_max and concatenated
    masked   the original ViT-ResNAS code: everything at full width with per-sample channel masks
             (resnas_kernels.reference.masked_residual_spatial_reduction; masks built once outside the timed call)

Shapes: the two RSRs of the ViT-ResNAS Tiny supernet (16x16 -> 8x8, C 256 -> 512 max; 8x8 -> 4x4, 512 -> 1024) and of
the Small supernet (320 -> 640, 640 -> 1280), four groups at widths from the search spaces (vit_resnas.md 4.2), 64
samples per group as in supernet training (quick: 2 per group, Tiny only; smoke: 1 per group, one small shape). Modes
fwd and fwd+bwd (gradients of x and of every parameter); fp32 on CPU, fp32 and bf16 on CUDA. Each shape first checks
that the three providers agree.

FLOPs count our useful (ragged) work: the conv GEMM 2 * b_g * Ho*Wo * 9*ci_g * co_g plus the cls GEMV 2 * b_g * ci_g
* co_g per group (x3 for fwd+bwd); LN, pooling and adds are ignored (as the paper's MAC estimator does). Bytes are the
minimum our op must move: x's active elements, the full-width output (its zeros are part of the contract) and the
active parameter slices (fwd); fwd+bwd adds dy, dx, the parameter gradients and a second read of x.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

import resnas_kernels
from resnas_kernels import Ragged
from resnas_kernels.bench.harness import Case, LazyCase, rotating, rotation_copies
from resnas_kernels.reference import masked_residual_spatial_reduction, rsr_output_grid

EPS = 1e-6
PARAMS = ("ln_weight", "ln_bias", "conv_weight", "conv_bias", "pos_embed", "cls_weight", "cls_bias")

# (name, grid, Ci_max, Co_max, input widths, output widths): four groups from each search space.
SHAPES: Tuple[Tuple[str, Tuple[int, int], int, int, Tuple[int, ...], Tuple[int, ...]], ...] = (
    ("tiny-s1s2", (16, 16), 256, 512, (256, 224, 192, 160), (512, 448, 384, 320)),
    ("tiny-s2s3", (8, 8), 512, 1024, (512, 448, 384, 320), (1024, 896, 768, 640)),
    ("small-s1s2", (16, 16), 320, 640, (320, 280, 240, 200), (640, 560, 480, 400)),
    ("small-s2s3", (8, 8), 640, 1280, (640, 560, 480, 400), (1280, 1120, 960, 800)),
)


def stock_rsr(x: torch.Tensor, groups: Ragged, out_widths, p: Dict[str, torch.Tensor], grid) -> torch.Tensor:
    """The sliced-sub-network chain, per group, with the layout copies the eager code makes."""
    co_max = p["conv_weight"].shape[0]
    outs = []
    for (start, end), ci, co in zip(zip(groups.offsets, groups.offsets[1:]), groups.widths, out_widths):
        b = end - start
        xg = x[start:end, :, :ci]
        u = F.layer_norm(xg, (ci,), p["ln_weight"][:ci], p["ln_bias"][:ci], EPS)
        img = u[:, 1:].transpose(1, 2).reshape(b, ci, *grid)
        main = F.conv2d(img, p["conv_weight"][:co, :ci], p["conv_bias"][:co], stride=2, padding=1)
        main = main.flatten(2).transpose(1, 2) + p["pos_embed"][..., :co]
        raw = xg[:, 1:].transpose(1, 2).reshape(b, ci, *grid)
        short = F.avg_pool2d(raw, 2, 2, ceil_mode=True).flatten(2).transpose(1, 2)
        patches = main + torch.cat([short, short.new_zeros(b, short.shape[1], co - ci)], dim=-1)
        cls = F.linear(u[:, :1], p["cls_weight"][:co, :ci], p["cls_bias"][:co])
        cls = cls + torch.cat([xg[:, :1], xg.new_zeros(b, 1, co - ci)], dim=-1)
        y = torch.cat([cls, patches], dim=1)
        outs.append(torch.cat([y, y.new_zeros(b, y.shape[1], co_max - co)], dim=-1))
    return torch.cat(outs, dim=0)


def _work(groups: Ragged, out_widths, grid, ci_max: int, co_max: int, elem: int, mode: str) -> Tuple[int, int]:
    ho, wo = rsr_output_grid(grid)
    L = ho * wo
    n_in, n_out = 1 + grid[0] * grid[1], 1 + L
    gemm = sum(2 * b * (L * 9 * ci * co + ci * co) for b, ci, co in zip(groups.sizes, groups.widths, out_widths))
    x_active = groups.active_elements(n_in)
    out_full = groups.batch * n_out * co_max
    params = max(ci * co * 10 + co * (L + 2) + 2 * ci for ci, co in zip(groups.widths, out_widths))
    fwd_bytes = (x_active + out_full + params) * elem
    if mode == "fwd":
        return gemm, fwd_bytes
    bwd_bytes = (out_full + 2 * x_active + params) * elem  # read dy and x, write dx and the parameter gradients
    return 3 * gemm, fwd_bytes + bwd_bytes


def _params(ci_max: int, co_max: int, L: int, gen: torch.Generator, device, dtype) -> Dict[str, torch.Tensor]:
    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device, dtype)

    return dict(ln_weight=rnd(ci_max, scale=0.1, shift=1.0), ln_bias=rnd(ci_max, scale=0.1),
                conv_weight=rnd(co_max, ci_max, 3, 3, scale=(9 * ci_max) ** -0.5), conv_bias=rnd(co_max, scale=0.1),
                pos_embed=rnd(1, L, co_max, scale=0.02), cls_weight=rnd(co_max, ci_max, scale=0.02),
                cls_bias=rnd(co_max, scale=0.1))


def _check_agree(outputs: Dict[str, torch.Tensor], dtype: torch.dtype, what: str) -> None:
    tol = 2e-3 if dtype == torch.float32 else 1e-1
    ref = outputs["stock"].float()
    for name, out in outputs.items():
        err = (out.float() - ref).abs().max().item()
        if not err <= tol:
            raise RuntimeError(f"{what}: provider {name!r} differs from 'stock' by {err:.3g} (tolerance {tol})")


def _providers(groups: Ragged, out_widths, grid, p: Dict[str, torch.Tensor], x_sets, dy_sets,
               mode: str) -> Dict[str, Callable[[], object]]:
    ci_max, co_max = x_sets[0].shape[-1], p["conv_weight"].shape[0]
    in_mask = groups.mask(ci_max, device=x_sets[0].device, dtype=x_sets[0].dtype)[:, None, :]
    out_mask = groups.with_widths(out_widths).mask(co_max, device=x_sets[0].device, dtype=x_sets[0].dtype)[:, None]
    forwards = {
        "ours": lambda x: resnas_kernels.residual_spatial_reduction(x, groups, out_widths, **p, grid=grid, eps=EPS),
        "stock": lambda x: stock_rsr(x, groups, out_widths, p, grid),
        "masked": lambda x: masked_residual_spatial_reduction(x, in_mask, out_mask, **p, grid=grid, eps=EPS),
    }
    if mode == "fwd":
        return {name: rotating(fwd, [(x,) for x in x_sets]) for name, fwd in forwards.items()}
    leaves = [p[n] for n in PARAMS]

    def fwd_bwd(fwd):
        # autograd.grad rather than .backward(): no gradient accumulation kernels in the timed call.
        return lambda x, dy: torch.autograd.grad(fwd(x), [x] + leaves, dy)

    return {name: rotating(fwd_bwd(fwd), list(zip(x_sets, dy_sets))) for name, fwd in forwards.items()}


def _case(device, dtype: torch.dtype, groups: Ragged, grid, ci_max: int, co_max: int, out_w, shape: str,
          mode: str) -> Case:
    gen = torch.Generator(device="cpu").manual_seed(0)
    elem = torch.finfo(dtype).bits // 8
    ho, wo = rsr_output_grid(grid)
    n_in = 1 + grid[0] * grid[1]
    mask = groups.mask(ci_max)[:, None, :]
    grad = mode == "fwd+bwd"
    p = {k: v.requires_grad_(grad) for k, v in _params(ci_max, co_max, ho * wo, gen, device, dtype).items()}
    flops, nbytes = _work(groups, out_w, grid, ci_max, co_max, elem, mode)
    copies = rotation_copies(nbytes, device)
    x_sets = [(torch.randn(groups.batch, n_in, ci_max, generator=gen) * mask).to(device, dtype)
              .requires_grad_(grad) for _ in range(copies)]
    dy_sets = [(torch.randn(groups.batch, 1 + ho * wo, co_max, generator=gen)).to(device, dtype)
               for _ in range(copies)]
    providers = _providers(groups, out_w, grid, p, x_sets, dy_sets, mode)
    if mode == "fwd":
        with torch.no_grad():
            _check_agree({k: fn() for k, fn in providers.items()}, dtype, f"rsr.fwd {shape} {dtype}")
    return Case(name=f"residual_spatial_reduction.{mode}", shape=shape, dtype=str(dtype).replace("torch.", ""),
                flops=flops, bytes=nbytes, providers=providers, baseline="ours", op="residual_spatial_reduction",
                notes=f"{copies} rotating input set(s); ours = fused chain")


def cases(ctx) -> List[LazyCase]:
    device = ctx.device
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" and not ctx.smoke else [])
    if ctx.smoke:
        per_group, shapes = 1, [("smoke", (4, 4), 32, 64, (32, 28, 24, 20), (64, 56, 48, 40))]
    elif ctx.quick:
        per_group, shapes = 2, SHAPES[:2]
    else:
        per_group, shapes = 64, SHAPES
    modes = ("fwd",) if ctx.smoke else ("fwd", "fwd+bwd")
    out: List[LazyCase] = []
    for dtype in dtypes:
        for name, grid, ci_max, co_max, in_w, out_w in shapes:
            groups = Ragged((per_group,) * len(in_w), in_w)
            ho, wo = rsr_output_grid(grid)
            shape = (f"{name} G={len(in_w)}x{per_group} {grid[0]}x{grid[1]}->{ho}x{wo} "
                     f"C={'/'.join(map(str, in_w))}->{'/'.join(map(str, out_w))}")
            for mode in modes:
                out.append(LazyCase(f"residual_spatial_reduction.{mode}", shape, str(dtype).replace("torch.", ""),
                                    ("ours", "stock", "masked"),
                                    functools.partial(_case, device, dtype, groups, grid, ci_max, co_max, out_w,
                                                      shape, mode)))
    return out
