"""Per-call cost of each public op at a tiny size, against the stock PyTorch op it replaces (the op layer's overhead).

At these sizes the arithmetic takes a few microseconds, so the time per call is almost all argument checking,
dispatch, autograd bookkeeping and the host-side handling of the ragged metadata: what a supernet step pays a few
hundred times whatever its batch. Target: ours <= 2x the stock op's time per call (stated in BENCHMARKS.md; speed is
never asserted in tests).

Cases (`dispatch.<op>.<mode>`): fwd = a forward with no input requiring grad (no autograd node); fwd+bwd = inputs and
parameters require grad, forward then `torch.autograd.grad` of every input and parameter (no accumulation kernels).
Providers:
    ours    the public op: ragged_layer_norm, ragged_linear (with bias), ragged_attention (no bias),
            residual_spatial_reduction
    stock   F.layer_norm / F.linear / F.scaled_dot_product_attention / the stock RSR chain of bench/cases/rsr.py
            (LayerNorm, Conv2d, AvgPool2d, cls Linear and the layout copies between them, the sliced sub-network way)
Shapes: B = 4 samples as 4 groups of 1, every group at full width, so ours computes exactly the stock op's function
(checked before timing) while still taking the ragged metadata path a supernet takes: LN / linear (4, 16, 64) with a
64 x 64 weight; attention (4, 16, 2 heads, 32); RSR 4x4 -> 2x2 patches + cls token, 32 -> 64 channels. SDPA gets
(B, H, N, d) views of the (B, N, H, d) inputs and returns a (B, N, H, d) view of its output (no copies). fp32 on
every device.
FLOPs and bytes are the tiny op's own, for completeness; the number to read is the time per call and the ratio.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from resnas_kernels.bench.harness import Case, LazyCase

BATCH, TOKENS, WIDTH = 4, 16, 64
HEADS, HEAD_DIM = 2, 32
RSR_GRID, RSR_IN, RSR_OUT = (4, 4), 32, 64
EPS = 1e-6
MODES = ("fwd", "fwd+bwd")
OPS = ("ragged_layer_norm", "ragged_linear", "ragged_attention", "residual_spatial_reduction")
TARGET = "target: ours <= 2x stock per call"


def _groups(width: int):
    from resnas_kernels import Ragged

    return Ragged((1,) * BATCH, (width,) * BATCH)


def _layer_norm(gen: torch.Generator, device, grad: bool):
    import resnas_kernels as rk

    groups = _groups(WIDTH)
    x = torch.randn(BATCH, TOKENS, WIDTH, generator=gen).to(device)
    w = (1 + 0.1 * torch.randn(WIDTH, generator=gen)).to(device)
    b = (0.1 * torch.randn(WIDTH, generator=gen)).to(device)
    inputs = [t.requires_grad_(grad) for t in (x, w, b)]
    fns = {"ours": lambda x, w, b: rk.ragged_layer_norm(x, w, b, groups, eps=EPS),
           "stock": lambda x, w, b: F.layer_norm(x, (WIDTH,), w, b, EPS)}
    elements = x.numel()
    return fns, inputs, 7 * elements, (2 * elements + 2 * WIDTH) * 4


def _linear(gen: torch.Generator, device, grad: bool):
    import resnas_kernels as rk

    groups = _groups(WIDTH)
    out_widths = (WIDTH,) * BATCH
    x = torch.randn(BATCH, TOKENS, WIDTH, generator=gen).to(device)
    w = (torch.randn(WIDTH, WIDTH, generator=gen) * WIDTH ** -0.5).to(device)
    b = (0.1 * torch.randn(WIDTH, generator=gen)).to(device)
    inputs = [t.requires_grad_(grad) for t in (x, w, b)]
    fns = {"ours": lambda x, w, b: rk.ragged_linear(x, w, b, groups, out_widths),
           "stock": lambda x, w, b: F.linear(x, w, b)}
    rows = BATCH * TOKENS
    return fns, inputs, 2 * rows * WIDTH * WIDTH, (2 * rows * WIDTH + WIDTH * WIDTH + WIDTH) * 4


def _attention(gen: torch.Generator, device, grad: bool):
    import resnas_kernels as rk

    heads = _groups(HEADS)
    q, k, v = (torch.randn(BATCH, TOKENS, HEADS, HEAD_DIM, generator=gen).to(device).requires_grad_(grad)
               for _ in range(3))

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    fns = {"ours": lambda q, k, v: rk.ragged_attention(q, k, v, heads),
           "stock": sdpa}
    flops = 2 * BATCH * HEADS * TOKENS * TOKENS * 2 * HEAD_DIM
    return fns, [q, k, v], flops, 4 * q.numel() * 4


def _rsr(gen: torch.Generator, device, grad: bool):
    import resnas_kernels as rk
    from resnas_kernels import Ragged
    from resnas_kernels.bench.cases.rsr import PARAMS, _params, stock_rsr
    from resnas_kernels.reference import rsr_output_grid

    groups = _groups(RSR_IN)
    one_group = Ragged((BATCH,), (RSR_IN,))  # the stock chain at full width is one sub-network's module
    out_widths = (RSR_OUT,) * BATCH
    ho, wo = rsr_output_grid(RSR_GRID)
    p = _params(RSR_IN, RSR_OUT, ho * wo, gen, device, torch.float32)
    x = torch.randn(BATCH, 1 + RSR_GRID[0] * RSR_GRID[1], RSR_IN, generator=gen).to(device)
    inputs = [t.requires_grad_(grad) for t in [x] + [p[n] for n in PARAMS]]

    def params_of(tensors):
        return dict(zip(PARAMS, tensors))

    fns = {"ours": lambda x, *ps: rk.residual_spatial_reduction(x, groups, out_widths, **params_of(ps),
                                                                 grid=RSR_GRID, eps=EPS),
           "stock": lambda x, *ps: stock_rsr(x, one_group, (RSR_OUT,), params_of(ps), RSR_GRID)}
    flops = 2 * BATCH * (ho * wo * 9 * RSR_IN * RSR_OUT + RSR_IN * RSR_OUT)
    nbytes = (x.numel() + BATCH * (1 + ho * wo) * RSR_OUT + sum(t.numel() for t in p.values())) * 4
    return fns, inputs, flops, nbytes


BUILDERS = {"ragged_layer_norm": _layer_norm, "ragged_linear": _linear, "ragged_attention": _attention,
            "residual_spatial_reduction": _rsr}
SHAPES = {"ragged_layer_norm": f"B={BATCH} as {BATCH}x1, N={TOKENS}, C={WIDTH}",
          "ragged_linear": f"B={BATCH} as {BATCH}x1, N={TOKENS}, {WIDTH}->{WIDTH}, bias",
          "ragged_attention": f"B={BATCH} as {BATCH}x1, N={TOKENS}, H={HEADS}, d={HEAD_DIM}, no bias",
          "residual_spatial_reduction": f"B={BATCH} as {BATCH}x1, {RSR_GRID[0]}x{RSR_GRID[1]}->2x2, "
                                        f"C={RSR_IN}->{RSR_OUT}"}


def _check_agree(outputs: Dict[str, torch.Tensor], what: str) -> None:
    """Same function (every group at full width): ours must match the stock op, or the ratio means nothing."""
    ours, stock = (outputs[name].reshape(outputs["ours"].shape[:2] + (-1,)) for name in ("ours", "stock"))
    err = (ours - stock).abs().max().item()
    if not err <= 1e-4:
        raise RuntimeError(f"{what}: ours differs from the stock op by {err:.3g} (tolerance 1e-4)")


def _providers(fns: Dict[str, Callable], inputs: List[torch.Tensor], mode: str) -> Dict[str, Callable[[], object]]:
    if mode == "fwd":
        return {name: functools.partial(fn, *inputs) for name, fn in fns.items()}

    def fwd_bwd(fn):
        with torch.no_grad():
            dout = torch.randn(fn(*inputs).shape, generator=torch.Generator().manual_seed(1)).to(inputs[0].device)
        return lambda: torch.autograd.grad(fn(*inputs), inputs, dout)

    return {name: fwd_bwd(fn) for name, fn in fns.items()}


def _build(op: str, mode: str, device: torch.device) -> Case:
    gen = torch.Generator().manual_seed(0)
    fns, inputs, flops, nbytes = BUILDERS[op](gen, device, mode == "fwd+bwd")
    with torch.no_grad():
        _check_agree({name: fn(*inputs) for name, fn in fns.items()}, f"dispatch.{op}")
    providers = _providers(fns, inputs, mode)
    fwd = mode == "fwd"
    return Case(name=f"dispatch.{op}.{mode}", shape=SHAPES[op], dtype="float32", flops=flops if fwd else 3 * flops,
                bytes=nbytes if fwd else 3 * nbytes, providers=providers, baseline="ours", op=op,
                backends={"stock": "torch"}, notes=f"tiny shape: per-call overhead; {TARGET}")


def cases(ctx) -> List[LazyCase]:
    # Every profile runs the same tiny shapes: they are cheap, and the smoke profile then builds what a real run does.
    return [LazyCase(f"dispatch.{op}.{mode}", SHAPES[op], "float32", ("ours", "stock"),
                     functools.partial(_build, op, mode, torch.device(ctx.device)))
            for op in OPS for mode in MODES]
