"""Shared inputs and the stock-module oracle of the RSR tests (test_residual_spatial_reduction.py and the per-op files
test_rsr_im2col.py, test_rsr_conv.py, test_rsr_epilogue.py).

The oracle runs, per group, stock nn.LayerNorm / nn.Conv2d / nn.AvgPool2d(ceil_mode=True) / nn.Linear / torch.cat on
the sliced shared parameters (torch.func.functional_call, so gradients flow back into the full-size parameters), in
fp64. Tolerances follow tests/_oracle.py.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call

import resnas_kernels as rk
from resnas_kernels import Ragged, _ext
from resnas_kernels.reference import rsr_output_grid

from _backends import require_backend as _require  # noqa: F401 (re-exported to the RSR test files)
from _oracle import assert_close_to_oracle, max_err

PARAMS = ("ln_weight", "ln_bias", "conv_weight", "conv_bias", "pos_embed", "cls_weight", "cls_bias")


# ---------------------------------------------------------------------------------------------------------------------
# Inputs and the stock-module oracle
# ---------------------------------------------------------------------------------------------------------------------
def _make(sizes, ci_w, co_w, ci_max, co_max, grid, has_cls, dtype=torch.float32, device="cpu", k=3, s=2, p=1,
          seed=0):
    """Fresh random inputs obeying the ragged contract, shared parameters and an output gradient."""
    gen = torch.Generator().manual_seed(seed)
    g = Ragged(sizes, ci_w)
    ho, wo = rsr_output_grid(grid, k, s, p)
    n_in, n_out = int(has_cls) + grid[0] * grid[1], int(has_cls) + ho * wo

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(device, dtype)

    x = rnd(g.batch, n_in, ci_max, scale=2.0, shift=0.5) * g.mask(ci_max, device=device, dtype=dtype)[:, None]
    params = dict(ln_weight=rnd(ci_max, scale=0.3, shift=1.0), ln_bias=rnd(ci_max, scale=0.1),
                  conv_weight=rnd(co_max, ci_max, k, k, scale=0.1), conv_bias=rnd(co_max, scale=0.5),
                  pos_embed=rnd(1, ho * wo, co_max, scale=0.02), cls_weight=rnd(co_max, ci_max, scale=0.1),
                  cls_bias=rnd(co_max, scale=0.5))
    dy = torch.randn(g.batch, n_out, co_max, generator=gen, dtype=torch.float64).to(device)
    return g, tuple(co_w), x, params, dy


def stock_rsr(x, in_groups, out_widths, p, grid, has_cls, eps=1e-6, k=3, s=2, pad=1):
    """Per group, stock modules run on sliced views of the shared parameters; zero-padded and concatenated."""
    n_cls = int(has_cls)
    ho, wo = rsr_output_grid(grid, k, s, pad)
    co_max = p["conv_weight"].shape[0]
    outs = []
    for (start, end), ci, co in zip(zip(in_groups.offsets, in_groups.offsets[1:]), in_groups.widths, out_widths):
        b = end - start
        if b == 0 or co == 0:
            outs.append(x.new_zeros(b, n_cls + ho * wo, co_max))
            continue
        ln = nn.LayerNorm(ci, eps=eps, device="meta")
        conv = nn.Conv2d(ci, co, k, s, pad, device="meta")
        pool = nn.AvgPool2d(s, s, ceil_mode=True)
        lin = nn.Linear(ci, co, device="meta")
        xg = x[start:end, :, :ci]
        u = functional_call(ln, {"weight": p["ln_weight"][:ci], "bias": p["ln_bias"][:ci]}, (xg,))
        img = u[:, n_cls:].transpose(1, 2).reshape(b, ci, *grid)
        main = functional_call(conv, {"weight": p["conv_weight"][:co, :ci], "bias": p["conv_bias"][:co]}, (img,))
        main = main.flatten(2).transpose(1, 2) + p["pos_embed"][..., :co]
        short = pool(xg[:, n_cls:].transpose(1, 2).reshape(b, ci, *grid)).flatten(2).transpose(1, 2)
        y = main + torch.cat([short, short.new_zeros(b, ho * wo, co - ci)], dim=-1)
        if has_cls:
            cls = functional_call(lin, {"weight": p["cls_weight"][:co, :ci], "bias": p["cls_bias"][:co]}, (u[:, :1],))
            y = torch.cat([cls + torch.cat([xg[:, :1], xg.new_zeros(b, 1, co - ci)], dim=-1), y], dim=1)
        outs.append(torch.cat([y, y.new_zeros(b, y.shape[1], co_max - co)], dim=-1))
    return torch.cat(outs, dim=0)


def _run(fn, x, params, dy):
    """(output, gradients of x and of every parameter) of fn(x, **params) for the loss <out, dy>."""
    leaves = [x.detach().clone().requires_grad_()] + [params[n].detach().clone().requires_grad_() for n in PARAMS]
    out = fn(leaves[0], dict(zip(PARAMS, leaves[1:])))
    if not out.requires_grad:  # the stock chain builds all-zero outputs when every group has width 0
        return out, tuple(torch.zeros_like(t) for t in leaves)
    grads = torch.autograd.grad((out.double() * dy).sum(), leaves, allow_unused=True)
    return out, tuple(torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads))


def _fused_call(groups, co_w, grid, has_cls, k=3, s=2, p=1):
    def fn(x, params):
        return rk.residual_spatial_reduction(x, groups, co_w, **params, grid=grid, has_cls=has_cls, kernel_size=k,
                                             stride=s, padding=p)
    return fn


def _stock_call(groups, co_w, grid, has_cls, k=3, s=2, p=1):
    def fn(x, params):
        return stock_rsr(x, groups, co_w, params, grid, has_cls, k=k, s=s, pad=p)
    return fn


def _nudged(t: torch.Tensor, seed: int) -> torch.Tensor:
    """t with every non-zero element moved by -2..2 ulps of its dtype (zeros stay zero: the ragged contract)."""
    steps = torch.randint(-2, 3, t.shape, generator=torch.Generator().manual_seed(seed)).to(t.device)
    up, down = torch.full_like(t, float("inf")), torch.full_like(t, float("-inf"))
    out = t.clone()
    for k in (1, 2):
        out = torch.where(steps >= k, torch.nextafter(out, up), out)
        out = torch.where(steps <= -k, torch.nextafter(out, down), out)
    return torch.where(t == 0, t, out)


def _check_against_stock(backend, groups, co_w, x, params, dy, grid, has_cls, k=3, s=2, p=1, fn=None,
                         rounding_samples=0):
    """The op on `backend` against the fp64 stock-module oracle (tests/_oracle.py's rule).

    rounding_samples > 0 (random inputs): the same-dtype stock chain's error, the scale the bound is built on, is the
    largest over the given inputs and that many copies nudged by a few ulps. On random inputs a single
    ill-conditioned element can dominate every max error (a LayerNorm row of two nearly equal values has rstd ~ 100,
    and its backward cancels terms ~100x larger than its result), and there one sample of the stock chain's rounding
    error is a noisy estimate of its size: it is several times smaller than typical in a few % of draws. The nudged
    copies have the same conditioning and independent rounding."""
    fn = fn or _fused_call(groups, co_w, grid, has_cls, k, s, p)
    with rk.use_backend(backend):
        out, grads = _run(fn, x, params, dy)
    stock = _stock_call(groups, co_w, grid, has_cls, k, s, p)
    oracle_out, oracle_grads = _run(stock, x.double(), {n: t.double() for n, t in params.items()}, dy)
    same_out, same_grads = _run(stock, x, params, dy)
    same_err = [max_err(same, oracle) for same, oracle in zip((same_out,) + same_grads, (oracle_out,) + oracle_grads)]
    for seed in range(rounding_samples):
        xn, pn = _nudged(x, seed), {n: _nudged(t, 1000 + seed) for n, t in params.items()}
        o_out, o_grads = _run(stock, xn.double(), {n: t.double() for n, t in pn.items()}, dy)
        s_out, s_grads = _run(stock, xn, pn, dy)
        same_err = [max(e, max_err(a, b)) for e, a, b in zip(same_err, (s_out,) + s_grads, (o_out,) + o_grads)]
    assert out.dtype == x.dtype
    assert_close_to_oracle(out, oracle_out, same_out, f"{backend}:out", same_dtype_err=same_err[0])
    for name, a, o, sm, err in zip(("dx",) + PARAMS, grads, oracle_grads, same_grads, same_err[1:]):
        assert a.dtype == (x.dtype if name == "dx" else params[name].dtype), f"{name} dtype {a.dtype}"
        assert_close_to_oracle(a, o, sm, f"{backend}:d{name}", factor=3.0, same_dtype_err=err)
    # The contract: exactly zero beyond c_out,g in the output and beyond c_in,g in dx.
    co_max, ci_max = out.shape[-1], x.shape[-1]
    assert (out[~groups.with_widths(co_w).mask(co_max, device=out.device)[:, None, :].expand_as(out)] == 0).all()
    assert (grads[0][~groups.mask(ci_max, device=x.device)[:, None, :].expand_as(x)] == 0).all()
    return out, grads


SUB_BACKENDS = ["cpu", "triton", pytest.param("cuda", marks=pytest.mark.gpu),
                pytest.param("triton-cuda", marks=pytest.mark.gpu)]


def _wt(widths, device="cpu") -> torch.Tensor:
    """Widths as the custom ops take them: an int32 tensor on the activations' device."""
    return torch.tensor(list(widths), dtype=torch.int32, device=device)


def _sub_backend(backend):
    _require(backend.split("-")[0])
    return backend.split("-")[0], ("cuda" if backend.endswith("cuda") else "cpu")
