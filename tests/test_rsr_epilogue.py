"""`rsr_epilogue` (bias + pos_embed + pooled shortcut + cls) on every backend against its plain-PyTorch reference
backend, fp64 oracle and the tests/_oracle.py rule; gradcheck and opcheck."""
import pytest
import torch

import resnas_kernels as rk
from resnas_kernels import Ragged

from _oracle import assert_close_to_oracle
from _rsr_helpers import SUB_BACKENDS, _require, _sub_backend, _wt
from resnas_kernels.ops.rsr_epilogue import rsr_epilogue_bwd, rsr_epilogue_fwd


def _epilogue_inputs(grid, has_cls, device, dtype=torch.float32, s=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    in_g = Ragged((2, 0, 1, 2), (5, 0, 3, 0))
    out_w = (7, 0, 3, 0)
    ho, wo = -(-grid[0] // s), -(-grid[1] // s)
    n = int(has_cls)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)

    out_mask = in_g.with_widths(out_w).mask(8, device=device, dtype=dtype)[:, None]
    x = rnd(in_g.batch, n + grid[0] * grid[1], 5) * in_g.mask(5, device=device, dtype=dtype)[:, None]
    conv = rnd(in_g.batch, ho * wo, 8) * out_mask
    cls = rnd(in_g.batch, 1, 8) * out_mask if has_cls else None
    return in_g, out_w, dict(conv=conv, x=x, pos_embed=rnd(1, ho * wo, 8), conv_bias=rnd(8), cls=cls,
                             cls_bias=rnd(8) if has_cls else None)


@pytest.mark.parametrize("backend", SUB_BACKENDS)
@pytest.mark.parametrize("grid,has_cls,s", [((7, 7), True, 2), ((4, 5), False, 2), ((7, 8), True, 3)])
def test_epilogue_matches_reference(backend, grid, has_cls, s):
    backend, device = _sub_backend(backend)
    in_g, out_w, t = _epilogue_inputs(grid, has_cls, device, s=s)
    args = (list(in_g.sizes), _wt(in_g.widths, device), _wt(out_w, device), list(grid), s)
    with rk.use_backend(backend):
        out = rsr_epilogue_fwd(*t.values(), *args)
    with rk.use_backend("reference"):
        oracle = rsr_epilogue_fwd(*(v.double() if v is not None else None for v in t.values()), *args)
        same = rsr_epilogue_fwd(*t.values(), *args)
    assert_close_to_oracle(out, oracle, same, f"{backend}:out")
    assert (out[~in_g.with_widths(out_w).mask(8, device=device)[:, None, :].expand_as(out)] == 0).all()
    dout = torch.randn(out.shape, dtype=torch.float64, device=device)
    bargs = (list(in_g.sizes), _wt(in_g.widths, device), _wt(out_w, device), list(grid), s, has_cls, 5)
    with rk.use_backend(backend):
        grads = rsr_epilogue_bwd(dout.float(), *bargs)
    with rk.use_backend("reference"):
        oracle = rsr_epilogue_bwd(dout, *bargs)
        same = rsr_epilogue_bwd(dout.float(), *bargs)
    names = ("dconv", "dx", "dpos", "dconv_bias", "dcls", "dcls_bias")
    for name, a, o, sm in zip(names, grads, oracle, same):
        assert_close_to_oracle(a, o, sm, f"{backend}:{name}", factor=3.0)


def test_fp64_gradcheck_cpu():
    _require("cpu")
    with rk.use_backend("cpu"):
        in_g, out_w, t = _epilogue_inputs((5, 3), True, "cpu", dtype=torch.float64)
        args = (list(in_g.sizes), _wt(in_g.widths), _wt(out_w), [5, 3], 2)
        leaves = tuple(v.requires_grad_() for v in t.values())
        assert torch.autograd.gradcheck(lambda *v: rsr_epilogue_fwd(*v, *args), leaves)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("has_cls", [True, False], ids=["cls", "nocls"])
def test_opcheck(backend, has_cls):
    _require(backend)
    grid = (5, 4)
    in_g, out_w, t = _epilogue_inputs(grid, has_cls, "cpu")
    args = (list(in_g.sizes), _wt(in_g.widths), _wt(out_w), list(grid), 2)
    leaves = tuple(v.requires_grad_() if v is not None else None for v in t.values())
    with rk.use_backend(backend):
        torch.library.opcheck(rsr_epilogue_fwd, (*leaves, *args))
        dout = torch.randn(in_g.batch, int(has_cls) + 6, 8)
        torch.library.opcheck(rsr_epilogue_bwd, (dout, *args[:-1], 2, has_cls, 5))
        if backend == "cpu":  # the C++-registered public op (C++ autograd, Python fake kernels)
            torch.library.opcheck(torch.ops.resnas.rsr_epilogue.default, (*leaves, *args))
