"""Fused attention with a learnable LeViT bias table vs the ways LeViT attention runs today.

Cases: ragged_attention.infer (forward under torch.inference_mode) and ragged_attention.fwd+bwd (forward + backward
to q, k, v and the bias table), fp32 on CPU, bf16 on CUDA.
Shapes: the five LeViT-128S attention shapes (levit.md section 3/6): stages N = 196 / 49 / 16 (H = 4 / 6 / 8,
d = 16, d_v = 32) and the shrink attentions 196 -> 49 (H = 8, d_v = 64) and 49 -> 16 (H = 16, d_v = 64); batch 16 on
CPU (the paper's CPU protocol), 256 on CUDA. quick: stage 1 and shrink 1; smoke: stage 3 at batch 2.
Providers:
    ours   resnas_kernels.ragged_attention, q / k / v read in place from LeViT's per-head interleaved (B, N, H, 2D+d_v)
           qkv tensor, the table indexed in-kernel (bias_grid); the CSV records the backend that ran
    sdpa   F.scaled_dot_product_attention with the gathered (H, Nq, Nk) bias as attn_mask on (B, H, N, d) views
           (infer: the gathered bias cached outside the timed call, as timm does in eval mode; fwd+bwd: gathered in
           the call so the table gets its gradient), output transposed to (B, Nq, H*d_v) like timm
    naive  timm's eager LeViT math: (q k^T) * scale + bias, softmax, @ v, transpose / reshape
    flex   CUDA only: torch.nn.attention.flex_attention (torch.compile'd) with a score_mod reading the table
FLOPs: 2 * B * H * Nq * Nk * (d + d_v) for the forward (the two matmuls; softmax not counted); fwd+bwd counts 3.5x
(the backward's five matmuls against the forward's two, FlashAttention's convention).
Bytes: the minimum our op moves: q, k, v read once, the output written once, the table (and in fwd+bwd the
log-sum-exp, dO, O, dq, dk, dv and the table gradient).
Before timing, every provider's forward output must agree with ours.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Tuple, Union

import torch
import torch.nn.functional as F

import resnas_kernels as rk
from resnas_kernels.bench.harness import Case, LazyCase, rotating, rotation_copies

# (label, R, stride, H, d, d_v): LeViT-128S's attention layers
SHAPES: Tuple[Tuple[str, int, int, int, int, int], ...] = (
    ("stage1", 14, 1, 4, 16, 32),
    ("shrink1", 14, 2, 8, 16, 64),
    ("stage2", 7, 1, 6, 16, 32),
    ("shrink2", 7, 2, 16, 16, 64),
    ("stage3", 4, 1, 8, 16, 32),
)


def _inputs(b: int, r: int, s: int, h: int, d: int, dv: int, dtype, device, gen, grad: bool):
    """q, k, v as the LeViT module produces them: stride 1, views of one interleaved (B, N, H, 2D + d_v) tensor;
    with a stride, q is its own (B, Nq, H, D) tensor and k / v views of a (B, N, H, D + d_v) one."""
    n, rq = r * r, (r - 1) // s + 1
    if s == 1:
        qkv = torch.randn(b, n, h, 2 * d + dv, generator=gen).to(device, dtype).requires_grad_(grad)
        return (qkv,), lambda t: t[0].split([d, d, dv], dim=3)
    q = torch.randn(b, rq * rq, h, d, generator=gen).to(device, dtype).requires_grad_(grad)
    kv = torch.randn(b, n, h, d + dv, generator=gen).to(device, dtype).requires_grad_(grad)
    return (q, kv), lambda t: (t[0], *t[1].split([d, dv], dim=3))


def _sdpa(q, k, v, bias, scale):
    b, nq, h, _ = q.shape
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias,
                                         scale=scale)
    return out.transpose(1, 2).reshape(b, nq, -1)


def _naive(q, k, v, bias, scale):
    b, nq, h, _ = q.shape
    attn = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * scale + bias
    out = attn.softmax(dim=-1) @ v.transpose(1, 2)
    return out.transpose(1, 2).reshape(b, nq, -1)


def _flex(table: torch.Tensor, r: int, s: int):
    """flex_attention with a score_mod that computes the LeViT index from (q_idx, kv_idx) and reads the table."""
    from torch.nn.attention.flex_attention import flex_attention

    rq = (r - 1) // s + 1
    compiled = torch.compile(flex_attention)

    def score_mod(score, b, h, q_idx, kv_idx):
        qy, qx = (q_idx // rq) * s, (q_idx % rq) * s
        idx = (qy - kv_idx // r).abs() * r + (qx - kv_idx % r).abs()
        return score + table[h, idx]

    def run(q, k, v, scale):
        b, nq, h, _ = q.shape
        out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod, scale=scale)
        return out.transpose(1, 2).reshape(b, nq, -1)

    return run


def _work(b, r, s, h, d, dv, elem, mode) -> Tuple[int, int]:
    n, nq = r * r, ((r - 1) // s + 1) ** 2
    flops = 2 * b * h * nq * n * (d + dv)
    q_bytes, kv_bytes, o_bytes = b * nq * h * d * elem, b * n * h * (d + dv) * elem, b * nq * h * dv * elem
    table = h * n * 4
    fwd = q_bytes + kv_bytes + o_bytes + table
    if mode == "infer":
        return flops, fwd
    lse = b * h * nq * 4
    # bwd reads q, k, v, O, dO, lse, the table; writes dq, dk, dv, dtable
    bwd = 2 * (q_bytes + kv_bytes) + 2 * o_bytes + lse + 2 * table
    return int(3.5 * flops), fwd + lse + bwd


def _providers(device, table, idx, r, s, scale, mode, input_sets, split, dout_sets) -> Dict[str, Callable[[], object]]:
    grid = (r, s)

    def ours(*t):
        q, k, v = split(t)
        return rk.ragged_attention(q, k, v, scale=scale, bias_table=table, bias_grid=grid)

    def sdpa(*t):
        q, k, v = split(t)
        return _sdpa(q, k, v, cached_bias if mode == "infer" else table[:, idx], scale)

    def naive(*t):
        q, k, v = split(t)
        return _naive(q, k, v, cached_bias if mode == "infer" else table[:, idx], scale)

    with torch.no_grad():
        cached_bias = table[:, idx].contiguous()  # timm's eval-mode cache
    fns = {"ours": ours, "sdpa": sdpa, "naive": naive}
    if device.type == "cuda":
        try:
            flex = _flex(table, r, s)
            fns["flex"] = lambda *t: flex(*split(t), scale)
        except Exception:  # flex_attention missing or not compilable here: the case runs without it
            pass
    if mode == "infer":
        def infer(fn):
            def call(*t):
                with torch.inference_mode():
                    return fn(*t)
            return call
        return {name: rotating(infer(fn), input_sets) for name, fn in fns.items()}

    def fwd_bwd(fn):
        def call(*args):
            *t, dout = args
            return torch.autograd.grad(fn(*t), (*t, table), dout)
        return call

    return {name: rotating(fwd_bwd(fn), [(*t, dy) for t, dy in zip(input_sets, dout_sets)])
            for name, fn in fns.items()}


def _check_agree(providers_fwd: Dict[str, torch.Tensor], dtype, what: str) -> None:
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    ref = providers_fwd["ours"].float()
    for name, out in providers_fwd.items():
        err = (out.float() - ref).abs().max().item()
        if not err <= tol * max(1.0, ref.abs().max().item()):
            raise RuntimeError(f"{what}: provider {name!r} differs from 'ours' by {err:.3g}")


def _shape(batch: int, label: str, r: int, s: int, h: int, d: int, dv: int) -> str:
    return f"LeViT-128S {label}: B={batch},H={h},Nq={((r - 1) // s + 1) ** 2},Nk={r * r},d={d},dv={dv},bias=table"


def _case(device, dtype, batch: int, label: str, r: int, s: int, h: int, d: int, dv: int, mode: str) -> Case:
    gen = torch.Generator().manual_seed(0)
    elem = torch.finfo(dtype).bits // 8
    idx = rk.levit_bias_index(r, s, device=device)
    scale = d ** -0.5
    grad = mode != "infer"
    table = torch.randn(h, r * r, generator=gen).to(device).requires_grad_(grad)  # fp32, as LeViT keeps it
    flops, nbytes = _work(batch, r, s, h, d, dv, elem, mode)
    copies = rotation_copies(nbytes, device)
    input_sets, dout_sets, split = [], [], None
    nq = ((r - 1) // s + 1) ** 2
    for _ in range(copies):
        tensors, split = _inputs(batch, r, s, h, d, dv, dtype, device, gen, grad)
        input_sets.append(tensors)
        dout_sets.append(torch.randn(batch, nq, h * dv, generator=gen).to(device, dtype))
    providers = _providers(device, table, idx, r, s, scale, mode, input_sets, split, dout_sets)
    with torch.no_grad():
        fwd = {"ours": rk.ragged_attention(*split(input_sets[0]), scale=scale, bias_table=table, bias_grid=(r, s)),
               "sdpa": _sdpa(*split(input_sets[0]), table[:, idx], scale),
               "naive": _naive(*split(input_sets[0]), table[:, idx], scale)}
    _check_agree(fwd, dtype, f"ragged_attention {label} {mode}")
    return Case(name=f"ragged_attention.{mode}", shape=_shape(batch, label, r, s, h, d, dv),
                dtype=str(dtype).replace("torch.", ""), flops=flops, bytes=nbytes, providers=providers,
                baseline="ours", op="ragged_attention",
                backends={"sdpa": "torch-sdpa", "naive": "torch", "flex": "flex_attention"},
                notes=f"{copies} rotating input set(s); sdpa/naive infer use a cached gathered bias")


def cases(ctx) -> List[Union[Case, LazyCase]]:
    device = torch.device(ctx.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    elem = torch.finfo(dtype).bits // 8
    if ctx.smoke:
        shapes, batch, modes = [s for s in SHAPES if s[0] == "stage3"], 2, ("infer",)
    else:
        shapes = SHAPES[:2] if ctx.quick else SHAPES
        batch, modes = (256 if cuda else 16), ("infer", "fwd+bwd")
    providers = ("ours", "sdpa", "naive") + ("flex",) * cuda
    out: List[Union[Case, LazyCase]] = [
        LazyCase(f"ragged_attention.{mode}", _shape(batch, *shape), str(dtype).replace("torch.", ""), providers,
                 functools.partial(_case, device, dtype, batch, *shape, mode))
        for shape in shapes for mode in modes]
    if cuda and not ctx.smoke:
        out += _no_bias_cases(device, dtype, elem, batch, shapes, torch.Generator().manual_seed(0))
    return out


def _no_bias_fns(split, scale, flash_attn_func, same_dims: bool) -> Dict[str, Callable]:
    def infer(fn):
        def call(*t):
            with torch.inference_mode():
                return fn(*split(t))
        return call

    fns = {"ours": infer(lambda q, k, v: rk.ragged_attention(q, k, v, scale=scale)),
           "sdpa": infer(lambda q, k, v: _sdpa(q, k, v, None, scale))}
    if flash_attn_func is not None and same_dims:  # FlashAttention needs d_qk == d_v
        fns["flash"] = infer(lambda q, k, v: flash_attn_func(q, k, v, softmax_scale=scale).flatten(2))
    return fns


def _no_bias_cases(device, dtype, elem, batch, shapes, gen) -> List[Case]:
    """CUDA only: forward without bias vs SDPA (flash backend eligible: no mask) and FlashAttention when installed."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None
    out = []
    for label, r, s, h, d, dv in shapes:
        if s != 1:
            continue
        flops, nbytes = _work(batch, r, s, h, d, dv, elem, "infer")
        copies = rotation_copies(nbytes, device)
        sets = [_inputs(batch, r, s, h, d, dv, dtype, device, gen, False)[0] for _ in range(copies)]
        split = _inputs(1, r, s, h, d, dv, dtype, device, gen, False)[1]
        scale = d ** -0.5
        fns = _no_bias_fns(split, scale, flash_attn_func, d == dv)
        providers = {name: rotating(fn, sets) for name, fn in fns.items()}
        shape = f"LeViT-128S {label}: B={batch},H={h},N={r * r},d={d},dv={dv},bias=none"
        out.append(Case(name="ragged_attention.infer", shape=shape, dtype=str(dtype).replace("torch.", ""),
                        flops=flops, bytes=nbytes - h * r * r * 4, providers=providers, baseline="ours",
                        op="ragged_attention", backends={"sdpa": "torch-sdpa", "flash": "flash_attn"},
                        notes=f"{copies} rotating input set(s); no bias"))
    return out
