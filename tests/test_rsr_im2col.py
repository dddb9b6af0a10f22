"""`rsr_im2col` (token-layout im2col and its col2im adjoint) on every backend against its plain-PyTorch reference
backend (F.unfold / F.fold), fp64 oracle and the tests/_oracle.py rule; gradcheck and opcheck."""
import pytest
import torch

import resnas_kernels as rk
from resnas_kernels.reference import rsr_output_grid

from _oracle import assert_close_to_oracle
from _rsr_helpers import SUB_BACKENDS, _make, _require, _sub_backend, _wt
from resnas_kernels.ops.rsr_im2col import rsr_im2col, rsr_im2col_bwd, rsr_im2col_fwd


@pytest.mark.parametrize("backend", SUB_BACKENDS)
@pytest.mark.parametrize("grid,has_cls,k,s,p", [((5, 5), True, 3, 2, 1), ((4, 6), False, 3, 2, 1),
                                                 ((3, 3), True, 5, 2, 2), ((4, 4), False, 3, 1, 1)])
def test_im2col_matches_reference(backend, grid, has_cls, k, s, p):
    backend, device = _sub_backend(backend)
    g, _, u, _, _ = _make((2, 0, 1, 1), (5, 0, 3, 0), (5, 0, 3, 0), 5, 5, grid, has_cls, device=device, k=k, s=s,
                          p=p)
    with rk.use_backend(backend):
        cols = rsr_im2col(u, g, grid, has_cls, k, s, p)
    with rk.use_backend("reference"):
        expected = rsr_im2col(u, g, grid, has_cls, k, s, p)
    assert torch.equal(cols, expected), "im2col is a copy: it must match bit for bit"
    # Spot-check the layout independently of F.unfold: column c*k*k + kh*k + kw of output token (oh, ow).
    ho, wo = rsr_output_grid(grid, k, s, p)
    b, oh, ow, c, kh, kw = 0, ho - 1, wo // 2, 2, k - 1, 0
    ih, iw = oh * s - p + kh, ow * s - p + kw
    inside = 0 <= ih < grid[0] and 0 <= iw < grid[1]
    expect = u[b, int(has_cls) + ih * grid[1] + iw, c] if inside else 0
    assert cols[b, oh * wo + ow, c * k * k + kh * k + kw] == expect
    # Backward (col2im as a gather) against F.fold in fp64.
    dcols = torch.randn(cols.shape, dtype=torch.float64, device=device)
    with rk.use_backend(backend):
        du = rsr_im2col_bwd(dcols.to(u.dtype), list(g.sizes), _wt(g.widths, device), list(grid), k, s, p, has_cls)
    with rk.use_backend("reference"):
        oracle = rsr_im2col_bwd(dcols, list(g.sizes), _wt(g.widths, device), list(grid), k, s, p, has_cls)
        same = rsr_im2col_bwd(dcols.to(u.dtype), list(g.sizes), _wt(g.widths, device), list(grid), k, s, p, has_cls)
    assert_close_to_oracle(du, oracle, same, f"{backend}:du", factor=3.0)
    assert (du[:, :int(has_cls)] == 0).all()
    assert (du[~g.mask(5, device=device)[:, None, :].expand_as(du)] == 0).all()


def test_fp64_gradcheck_cpu():
    _require("cpu")
    with rk.use_backend("cpu"):
        g, _, u, _, _ = _make((1, 2), (3, 2), (3, 2), 3, 3, (5, 4), True, dtype=torch.float64)
        mask = g.mask(3, dtype=torch.float64)[:, None]
        assert torch.autograd.gradcheck(lambda u: rsr_im2col(u * mask, g, (5, 4), True), (u.requires_grad_(),))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("has_cls", [True, False], ids=["cls", "nocls"])
def test_opcheck(backend, has_cls):
    _require(backend)
    grid = (5, 4)
    g, _, u, _, _ = _make((2, 1), (4, 3), (4, 3), 4, 4, grid, has_cls)
    args = (list(g.sizes), _wt(g.widths), list(grid), 3, 2, 1, has_cls)
    with rk.use_backend(backend):
        torch.library.opcheck(rsr_im2col_fwd, (u.requires_grad_(), *args))
        cols = rsr_im2col_fwd(u.detach(), *args)
        torch.library.opcheck(rsr_im2col_bwd, (cols, *args))
        if backend == "cpu":  # the C++-registered public op (C++ autograd, Python fake kernels)
            torch.library.opcheck(torch.ops.resnas.rsr_im2col.default, (u, *args))
