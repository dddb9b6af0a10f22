"""`rsr_conv` (the CPU blocked implicit-GEMM / oneDNN conv) against its plain-PyTorch reference backend (im2col +
one matmul per group), fp64 oracle and the tests/_oracle.py rule; route choice, determinism, gradcheck and opcheck."""
import pytest
import torch

import resnas_kernels as rk
from resnas_kernels import config

from _oracle import assert_close_to_oracle
from _rsr_helpers import _make, _require, _wt
from resnas_kernels.ops.rsr_conv import rsr_conv, rsr_conv_bwd, rsr_conv_fwd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("grid,has_cls,k,s,p", [((7, 7), True, 3, 2, 1), ((64, 64), False, 3, 2, 1),
                                                 ((5, 6), True, 5, 2, 2), ((4, 4), False, 1, 1, 0)])
@pytest.mark.parametrize("route", ["default", "blocked"])
def test_conv_matches_reference_cpu(dtype, grid, has_cls, k, s, p, route):
    """The CPU conv vs its reference (im2col + one matmul per group), on both C++ routes: fp32 on 64x64 (20 samples of
    1024 GEMM rows in the first group) takes oneDNN's conv on the channels-last token layout forward, route 'blocked'
    (and every other case, and every backward) the blocked implicit GEMM, here over several blocks of whole samples.
    Groups: empty, width 0, one sample, co = ci."""
    _require("cpu")
    config.set_rsr_conv("blocked" if route == "blocked" else "auto")  # conftest resets the switches after each test
    g, co_w, u, prm, _ = _make((20, 0, 1, 3, 2), (6, 5, 4, 5, 0), (9, 7, 4, 5, 0), 6, 10, grid, has_cls, dtype=dtype,
                               k=k, s=s, p=p, seed=5)
    w2d = prm["conv_weight"].reshape(10, -1)
    args = (list(g.sizes), _wt(g.widths), _wt(co_w), list(grid), k, s, p, has_cls)
    with rk.use_backend("cpu"):
        out = rsr_conv_fwd(u, w2d, *args)
    with rk.use_backend("reference"):
        oracle = rsr_conv_fwd(u.double(), w2d.double(), *args)
        same = rsr_conv_fwd(u, w2d, *args)
    assert_close_to_oracle(out, oracle, same, "conv")
    assert (out[~g.with_widths(co_w).mask(10)[:, None, :].expand_as(out)] == 0).all()
    dout = torch.randn(out.shape, dtype=torch.float64) * g.with_widths(co_w).mask(10, dtype=torch.float64)[:, None]
    with rk.use_backend("cpu"):
        du, dw = rsr_conv_bwd(dout.to(dtype), u, w2d, *args)
    with rk.use_backend("reference"):
        oracle = rsr_conv_bwd(dout, u.double(), w2d.double(), *args)
        same = rsr_conv_bwd(dout.to(dtype), u, w2d, *args)
    assert_close_to_oracle(du, oracle[0], same[0], "du", factor=3.0)
    assert_close_to_oracle(dw.to(dtype), oracle[1], same[1], "dweight", factor=3.0)
    assert dw.dtype == torch.float32 and (du[:, :int(has_cls)] == 0).all()
    assert (du[~g.mask(6)[:, None, :].expand_as(du)] == 0).all()


# The C++ conv's forward takes oneDNN's route only for a group of >= 2048 GEMM rows (samples x Ho*Wo); the backward
# never does (csrc/cpu/rsr_conv.cpp: oneDNN's dweight broke the accuracy rule). A 64x64 grid (1024 rows per sample)
# reaches the threshold with two samples.
@pytest.mark.parametrize("sizes,grid,fwd_onednn", [((3, 0, 1, 2), (16, 16), False), ((1, 0, 1, 1), (64, 64), False),
                                                   ((2, 0, 1, 1), (64, 64), True)])
def test_conv_cpu_routes_and_determinism(sizes, grid, fwd_onednn):
    """Which C++ route runs (seen in the profiler as aten::convolution / convolution_backward), and that the gradients
    are bitwise equal over two runs (groups reduce into dweight in a fixed order)."""
    _require("cpu")
    from torch.profiler import profile

    g, co_w, u, prm, _ = _make(sizes, (6, 5, 4, 5), (9, 7, 4, 5), 6, 10, grid, True, seed=7)
    w2d = prm["conv_weight"].reshape(10, -1)
    args = (list(g.sizes), _wt(g.widths), _wt(co_w), list(grid), 3, 2, 1, True)
    dout = torch.randn(u.shape[0], (grid[0] // 2) * (grid[1] // 2), 10)

    def run():
        with rk.use_backend("cpu"), profile() as prof:
            out = rsr_conv_fwd(u, w2d, *args)
            du, dw = rsr_conv_bwd(dout, u, w2d, *args)
        names = {e.key for e in prof.key_averages()}
        return (out, du, dw), "aten::convolution" in names, "aten::convolution_backward" in names

    config.set_rsr_conv("auto")
    first, fwd_seen, bwd_seen = run()
    assert (fwd_seen, bwd_seen) == (fwd_onednn, False)
    second, _, _ = run()
    for name, a, b in zip(("out", "du", "dweight"), first, second):
        assert torch.equal(a, b), f"{name} differs bitwise between two runs"
    config.set_rsr_conv("blocked")
    blocked, fwd_seen, bwd_seen = run()
    assert not fwd_seen and not bwd_seen
    # Each route against the fp64 reference (tests/_oracle.py's rule): a fixed tolerance between the two fp32 routes
    # would not scale with dweight's sums over thousands of rows.
    with rk.use_backend("reference"):
        oracle = (rsr_conv_fwd(u.double(), w2d.double(), *args),) + rsr_conv_bwd(dout.double(), u.double(),
                                                                                 w2d.double(), *args)
        same = (rsr_conv_fwd(u, w2d, *args),) + rsr_conv_bwd(dout, u, w2d, *args)
    for route, results in (("default", first), ("blocked", blocked)):
        for name, a, o, sm in zip(("out", "du", "dweight"), results, oracle, same):
            assert_close_to_oracle(a, o, sm, f"{route}:{name}", factor=2.0 if name == "out" else 3.0)


def test_conv_fp64_gradcheck_cpu():
    _require("cpu")
    g, co_w, u, prm, _ = _make((1, 0, 2), (3, 0, 2), (4, 0, 3), 3, 4, (5, 4), True, dtype=torch.float64)
    mask = g.mask(3, dtype=torch.float64)[:, None]
    w2d = prm["conv_weight"].reshape(4, -1).contiguous()
    with rk.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda u, w: rsr_conv(u * mask, w, g, co_w, (5, 4), True),
                                        (u.requires_grad_(), w2d.requires_grad_()))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("has_cls", [True, False], ids=["cls", "nocls"])
def test_opcheck(backend, has_cls):
    _require(backend)
    grid = (5, 4)
    g, _, u, _, _ = _make((2, 1), (4, 3), (4, 3), 4, 4, grid, has_cls)
    w2d = torch.randn(6, 4 * 9, requires_grad=True)
    conv_args = (list(g.sizes), _wt(g.widths), _wt([6, 3]), list(grid), 3, 2, 1, has_cls)
    with rk.use_backend(backend):
        torch.library.opcheck(rsr_conv_fwd, (u.requires_grad_(), w2d, *conv_args))
        dconv = torch.randn(g.batch, 6, 6)
        torch.library.opcheck(rsr_conv_bwd, (dconv, u.detach(), w2d.detach(), *conv_args))
        if backend == "cpu":  # the C++-registered public op (C++ autograd, Python fake kernels)
            torch.library.opcheck(torch.ops.resnas.rsr_conv.default, (u, w2d, *conv_args))
