"""Ragged linear vs the two ways supernets run mixed-width linears today, plus the single-GEMM ceiling.

Providers:
    ours     resnas_kernels.ragged_linear (whichever backend resolve_backend picks; the CSV records it)
    masked   the original ViT-ResNAS approach: F.linear on the whole padded batch with the whole weight, then the
             output mask (resnas_kernels.reference.masked_linear; masks built once, outside the timed call)
    loop     the AutoFormer / OFA approach: per group (and per q/k/v segment) F.linear on the sliced weight
             W[:n_g, :k_g], then zero-pad and concatenate back into one (B, N, N_max) tensor
             (resnas_kernels.reference.ragged_linear)
    matmul   single-group cases only: torch.matmul(x, W^T) at full width, the BLAS / cuBLAS ceiling

Shapes: ViT-ResNAS Tiny supernet (docs: vit_resnas.md section 4.2, `sr_tiny_mh`): stage 1 (N = 257 tokens,
C_max = 256, heads x 32 <= 192, MLP hidden <= 768) and stage 3 (N = 17, C_max = 1024, heads x 64 <= 768, hidden
<= 3072). Per group the widths are the space's choices spread so that their mean is the space's mean choice:
embed (256, 224, 176, 160) ~ 201.6, heads (6, 5, 4, 3) x d, hidden (768, 640, 512, 384) = 576 (stage 1); 16 groups
cycle through all the choices. Layers: qkv (C -> 3 x h*d, segmented), proj (h*d -> C, + drop-path residual), fc1
(C -> hidden, + GELU), fc2 (hidden -> C, + drop-path residual). Groups of 64 images (16-group stage-1 cases use 16
images per group on CPU to keep a full run in minutes); quick: 4 images per group (16 groups: 1). Modes fwd and
fwd+bwd; fp32 on CPU, fp32 and bf16 on CUDA. Before timing, each shape checks that the providers agree.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import resnas_kernels
from resnas_kernels import Ragged
from resnas_kernels.bench.harness import Case, LazyCase, rotating, rotation_copies
from resnas_kernels.reference import masked_linear
from resnas_kernels.reference import ragged_linear as loop_linear

# Per stage: tokens, C choices, head_dim, head choices, MLP hidden choices (vit_resnas.md 4.2, Tiny space).
TINY = {
    1: dict(tokens=257, embed=(256, 224, 192, 176, 160), head_dim=32, heads=(6, 5, 4, 3),
            hidden=(768, 704, 640, 576, 512, 448, 384)),
    3: dict(tokens=17, embed=(1024, 896, 768, 704, 640), head_dim=64, heads=(12, 10, 8, 6),
            hidden=(3072, 2816, 2560, 2304, 2048, 1792, 1536)),
}


def _spread(choices: Sequence[int], groups: int) -> Tuple[int, ...]:
    """`groups` widths whose mean is close to the mean choice: 4 groups take an even spread (max, ..., min) of the
    choices, dropping the median of 5 or every other inner one of 7; more groups cycle through all the choices."""
    if groups == 4 and len(choices) == 5:
        return (choices[0], choices[1], choices[3], choices[4])
    if groups == 4 and len(choices) in (4, 7):
        step = (len(choices) - 1) / 3
        return tuple(choices[round(i * step)] for i in range(4))
    return tuple(choices[i % len(choices)] for i in range(groups))


def layer_shapes(stage: int, groups: int) -> Dict[str, dict]:
    """k_g / n_g per layer of one transformer block of `stage`, and its K_max / Nseg / segments / epilogue."""
    t = TINY[stage]
    d = t["head_dim"]
    c = _spread(t["embed"], groups)
    attn = tuple(h * d for h in _spread(t["heads"], groups))
    hidden = _spread(t["hidden"], groups)
    c_max, a_max, h_max = max(t["embed"]), max(t["heads"]) * d, max(t["hidden"])
    return {
        "qkv": dict(k=c, n=attn, k_max=c_max, seg=a_max, segments=3, epilogue="bias"),
        "proj": dict(k=attn, n=c, k_max=a_max, seg=c_max, segments=1, epilogue="drop_path"),
        "fc1": dict(k=c, n=hidden, k_max=c_max, seg=h_max, segments=1, epilogue="gelu"),
        "fc2": dict(k=hidden, n=c, k_max=h_max, seg=c_max, segments=1, epilogue="drop_path"),
    }


def _out_mask(sizes, n_widths, seg, segments, device) -> torch.Tensor:
    cols = torch.arange(seg * segments, device=device) % seg
    widths = torch.tensor([n for s, n in zip(sizes, n_widths) for _ in range(s)], device=device)
    return cols[None, :] < widths[:, None]


def _check_agree(outputs: Dict[str, torch.Tensor], dtype: torch.dtype, what: str) -> None:
    """The providers must compute the same thing, or the comparison is meaningless (fp32: K <= 3072 sums of O(1)
    terms; bf16: a few bf16 ulps of O(1) outputs)."""
    tol = 2e-3 if dtype == torch.float32 else 1e-1
    base = outputs.get("loop", outputs.get("matmul")).float()
    for name, out in outputs.items():
        err = (out.float() - base).abs().max().item()
        if not err <= tol:
            raise RuntimeError(f"{what}: provider {name!r} differs by {err:.3g} (tolerance {tol})")


def _work(sizes, k, n, segments, tokens, k_max, n_max, elem, mode) -> Tuple[int, int]:
    """(useful FLOPs, minimum bytes) of our ragged work: 2 * rows * k_g * n_g per segment for the forward, three
    times that with the backward (dx and dW are GEMMs of the same size). Bytes: the active inputs and weight slices
    are read once, the output is written at full width (its zeros are part of the contract)."""
    macs = sum(s * tokens * kg * ng * segments for s, kg, ng in zip(sizes, k, n))
    rows = sum(sizes) * tokens
    x_bytes = sum(s * tokens * kg for s, kg in zip(sizes, k)) * elem
    w_bytes = max(nk * kk for nk, kk in zip(n, k)) * segments * elem
    y_bytes = rows * n_max * elem
    if mode == "fwd":
        return 2 * macs, x_bytes + w_bytes + y_bytes
    # backward: read dy, x, W slices; write dx (full width), dW (full)
    return 6 * macs, 2 * (x_bytes + w_bytes + y_bytes) + rows * k_max * elem + n_max * k_max * elem


def _layer(stage: int, layer: str, groups: int, single_group: bool):
    """(layer shape, k widths, n widths, epilogue) of one case; single_group: the ceiling, one group at full width,
    no epilogue."""
    shape = layer_shapes(stage, groups)[layer]
    if single_group:
        return shape, (shape["k_max"],), (shape["seg"],), "none"
    return shape, shape["k"], shape["n"], shape["epilogue"]


def _label(stage: int, layer: str, groups: int, per_group: int, single_group: bool) -> str:
    shape, k, n, epilogue = _layer(stage, layer, groups, single_group)
    segments = shape["segments"]
    return (f"S{stage}.{layer},G={groups}x{per_group},N={TINY[stage]['tokens']},K={'/'.join(map(str, k))}->"
            f"{'/'.join(map(str, n))}" + (f"x{segments}" if segments > 1 else "") + f",{epilogue}")


def _case(device, dtype, stage: int, layer: str, groups: int, per_group: int, mode: str,
          single_group: bool = False) -> Case:
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape, k, n, epilogue = _layer(stage, layer, groups, single_group)
    tokens = TINY[stage]["tokens"]
    sizes = (per_group,) * groups
    k_max, seg, segments = shape["k_max"], shape["seg"], shape["segments"]
    n_max = seg * segments
    elem = torch.finfo(dtype).bits // 8
    groups_in = Ragged(sizes, k)
    batch = groups_in.batch
    in_mask = groups_in.mask(k_max, device=device)[:, None, :]
    out_mask = _out_mask(sizes, n, seg, segments, device)[:, None, :]
    weight = (torch.randn(n_max, k_max, generator=gen) / k_max ** 0.5).to(device, dtype)
    bias = None if single_group else (0.1 * torch.randn(n_max, generator=gen)).to(device, dtype)
    flops, nbytes = _work(sizes, k, n, segments, tokens, k_max, n_max, elem, mode)
    copies = rotation_copies(nbytes, device)
    grad = mode == "fwd+bwd"
    x_sets = [(torch.randn(batch, tokens, k_max, generator=gen).to(device, dtype) * in_mask).requires_grad_(grad)
              for _ in range(copies)]
    dy_sets = [torch.randn(batch, tokens, n_max, generator=gen).to(device, dtype) for _ in range(copies if grad else 0)]
    activation = "gelu" if epilogue == "gelu" else None
    residual: Optional[torch.Tensor] = None
    row_scale: Optional[torch.Tensor] = None
    if epilogue == "drop_path":
        residual = (torch.randn(batch, tokens, n_max, generator=gen).to(device, dtype) * out_mask)
        row_scale = ((torch.rand(batch, generator=gen) > 0.2).float() / 0.8).to(device)  # keep_prob 0.8
    w = weight.detach().clone().requires_grad_(grad)
    b = bias.detach().clone().requires_grad_(grad) if bias is not None else None
    r = residual.detach().clone().requires_grad_(grad) if residual is not None else None
    kw = dict(activation=activation, residual=r, row_scale=row_scale)
    forwards: Dict[str, Callable] = {
        "ours": lambda x: resnas_kernels.ragged_linear(x, w, b, groups_in, n, segments=segments, **kw),
        "masked": lambda x: masked_linear(x, w, b, in_mask, out_mask, **kw),
        "loop": lambda x: loop_linear(x, w, b, groups_in, n, segments=segments, **kw),
    }
    if single_group:
        forwards["matmul"] = lambda x: torch.matmul(x, w.t())
    if mode == "fwd":
        providers = {name: rotating(fwd, [(x,) for x in x_sets]) for name, fwd in forwards.items()}
    else:
        leaves = [t for t in (w, b, r) if t is not None]

        def fwd_bwd(fwd):
            # autograd.grad rather than .backward(): no gradient accumulation kernels in the timed call.
            return lambda x, dy: torch.autograd.grad(fwd(x), (x, *leaves), dy)

        providers = {name: rotating(fwd_bwd(fwd), list(zip(x_sets, dy_sets))) for name, fwd in forwards.items()}
    label = _label(stage, layer, groups, per_group, single_group)
    if mode == "fwd":
        with torch.no_grad():
            outputs = {name: fwd(x_sets[0]) for name, fwd in forwards.items()}
        _check_agree(outputs, dtype, f"ragged_linear.fwd {label} {dtype}")
    backends = {"matmul": "cublas" if device.type == "cuda" else "blas"}
    return Case(name=f"ragged_linear.{mode}", shape=label, dtype=str(dtype).replace("torch.", ""), flops=flops,
                bytes=nbytes, providers=providers, baseline="ours", op="ragged_linear", backends=backends,
                notes=f"{copies} rotating input set(s)")


def cases(ctx) -> List[LazyCase]:
    device = ctx.device
    cuda = device.type == "cuda"
    smoke = getattr(ctx, "smoke", False)
    dtypes = [torch.float32] + ([torch.bfloat16] if cuda and not smoke else [])
    if smoke:
        plan = [(1, "fc1", 4, 1, "fwd", False)]
    elif ctx.quick:
        plan = [(1, layer, 4, 4, mode, False) for layer in ("qkv", "fc1") for mode in ("fwd", "fwd+bwd")]
        plan += [(1, "fc1", 16, 1, "fwd", False), (1, "fc1", 1, 16, "fwd", True)]
    else:
        plan = [(1, layer, 4, 64, mode, False) for layer in ("qkv", "proj", "fc1", "fc2")
                for mode in ("fwd", "fwd+bwd")]
        plan += [(3, layer, 4, 64, mode, False) for layer in ("qkv", "fc1") for mode in ("fwd", "fwd+bwd")]
        plan += [(1, "fc1", 16, 64 if cuda else 16, mode, False) for mode in ("fwd", "fwd+bwd")]
        plan += [(3, layer, 16, 64, mode, False) for layer in ("qkv", "fc1") for mode in ("fwd", "fwd+bwd")]
        plan += [(1, "fc1", 1, 256, "fwd", True), (3, "fc1", 1, 256, "fwd", True)]
    out: List[LazyCase] = []
    for dtype in dtypes:
        for stage, layer, groups, per_group, mode, single in plan:
            out.append(LazyCase(f"ragged_linear.{mode}", _label(stage, layer, groups, per_group, single),
                                str(dtype).replace("torch.", ""), ("ours", "masked", "loop") + ("matmul",) * single,
                                functools.partial(_case, device, dtype, stage, layer, groups, per_group, mode,
                                                  single_group=single)))
    return out
