"""Regression tests for what an odd-shape fuzz of every op found: fp64 on the Triton backend, unchecked custom ops and
kernels that trusted the metadata's widths, bf16 under the Triton interpreter, NaN in the reference LayerNorm's
padding, LeViT's caches after writes through `.data`, and two error messages.

Triton runs under TRITON_INTERPRET=1 here (tests/conftest.py). The kernel-bounds tests watch every load and store the
interpreter executes and fail on any address in a guard region placed right after an input tensor.
"""
import contextlib
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import resnas_kernels as rk
from resnas_kernels import BackendUnavailableError, Ragged, _ext

from _oracle import assert_close_to_oracle

# The ops' Triton launchers (one module per op folder; resnas_kernels.ops re-exports functions under the op names).
ln_mod = importlib.import_module("resnas_kernels.ops.ragged_layer_norm")
lin_mod, epi_mod, im2col_mod = (importlib.import_module(f"resnas_kernels.ops.{name}.triton_kernels") for name in (
    "ragged_linear", "rsr_epilogue", "rsr_im2col"))
im2col_geometry = importlib.import_module("resnas_kernels.ops.rsr_im2col.registration")._geometry

pytestmark = pytest.mark.skipif(not _ext.triton_interpreting(), reason="needs the Triton interpreter (CPU tier)")


# ---------------------------------------------------------------------------------------------------------------------
# 1. fp64 on the Triton backend is computed in fp64 (by the reference, as every op does)
# ---------------------------------------------------------------------------------------------------------------------
def test_triton_layer_norm_fp64_matches_fp64_layer_norm():
    x = (torch.randn(4, 3, 64, dtype=torch.float64) + 3).requires_grad_()
    w = torch.randn(64, dtype=torch.float64, requires_grad=True)
    b = torch.randn(64, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 3, 64, dtype=torch.float64)
    results = {}
    for backend in ("triton", "reference"):
        with rk.use_backend(backend):
            y = rk.ragged_layer_norm(x, w, b)
        results[backend] = (y, *torch.autograd.grad(y, (x, w, b), dy))
    y = F.layer_norm(x, (64,), w, b, 1e-6)
    oracle = (y, *torch.autograd.grad(y, (x, w, b), dy))
    for name, got, want, same in zip(("y", "dx", "dw", "db"), results["triton"], oracle, results["reference"]):
        assert got.dtype == torch.float64
        assert_close_to_oracle(got, want, same, f"triton fp64 {name}")


def _rsr_case(dtype):
    groups, out_widths, grid = Ragged((2, 1), (8, 5)), (12, 6), (4, 4)
    x = torch.randn(3, 1 + 16, 8, dtype=dtype) * groups.mask(8, dtype=dtype)[:, None, :]
    params = dict(ln_weight=torch.randn(8), ln_bias=torch.randn(8), conv_weight=torch.randn(12, 8, 3, 3) * 0.2,
                  conv_bias=torch.randn(12), pos_embed=torch.randn(1, 4, 12), cls_weight=torch.randn(12, 8) * 0.3,
                  cls_bias=torch.randn(12))
    params = {n: p.to(dtype).requires_grad_() for n, p in params.items()}
    return groups, out_widths, grid, x.requires_grad_(), params


def test_triton_rsr_fp64_gradients_match_the_reference():
    """LN, im2col / col2im and the epilogue (its shortcut gradient) all computed fp64 in fp32 on Triton."""
    groups, out_widths, grid, x, params = _rsr_case(torch.float64)
    dy = torch.randn(3, 1 + 4, 12, dtype=torch.float64)
    results = {}
    for backend in ("triton", "reference"):
        with rk.use_backend(backend):
            out = rk.residual_spatial_reduction(x, groups, out_widths, **params, grid=grid)
        results[backend] = (out, *torch.autograd.grad(out, (x, *params.values()), dy))
    names = ("out", "dx", *params)
    for name, got, want in zip(names, results["triton"], results["reference"]):
        assert_close_to_oracle(got, want, want, f"triton fp64 {name}")


# ---------------------------------------------------------------------------------------------------------------------
# 2a. The registered custom ops check their metadata on every backend
# ---------------------------------------------------------------------------------------------------------------------
def _ln_call(sizes, widths):
    x, widths = torch.randn(2, 3, 8), torch.tensor(widths, dtype=torch.int32)
    return lambda: torch.ops.resnas.ragged_layer_norm_fwd(x, None, torch.ones(8), torch.zeros(8), sizes, widths, 1e-6)


def _linear_call(sizes, in_widths, out_widths):
    x, w = torch.randn(2, 3, 8), torch.randn(6, 8)
    in_w, out_w = (torch.tensor(v, dtype=torch.int32) for v in (in_widths, out_widths))
    return lambda: torch.ops.resnas.ragged_linear_fwd(x, w, None, None, None, sizes, in_w, out_w, 1, "none", False)


def _attention_call(sizes, heads):
    q, k, v = torch.randn(3, 4, 2, 16), torch.randn(3, 5, 2, 16), torch.randn(3, 5, 2, 16)
    widths = torch.tensor(heads, dtype=torch.int32)  # the op takes the heads as device metadata
    return lambda: torch.ops.resnas.ragged_attention_fwd(q, k, v, None, None, None, sizes, widths, 0.25, [])


def _im2col_call(sizes, widths):
    u = torch.randn(1, 17, 8)
    return lambda: torch.ops.resnas.rsr_im2col_fwd(u, sizes, torch.tensor(widths, dtype=torch.int32), [4, 4], 3, 2, 1,
                                                   True)


def _epilogue_call(sizes, in_widths, out_widths):
    conv, x = torch.randn(1, 4, 12), torch.randn(1, 17, 8)
    return lambda: torch.ops.resnas.rsr_epilogue_fwd(conv, x, torch.zeros(1, 4, 12), torch.zeros(12),
                                                     torch.zeros(1, 1, 12), torch.zeros(12), sizes,
                                                     torch.tensor(in_widths, dtype=torch.int32),
                                                     torch.tensor(out_widths, dtype=torch.int32), [4, 4], 2)


def _conv_call(sizes, in_widths, out_widths):
    u = torch.randn(1, 17, 8)
    return lambda: torch.ops.resnas.rsr_conv_fwd(u, torch.randn(12, 72), sizes,
                                                 torch.tensor(in_widths, dtype=torch.int32),
                                                 torch.tensor(out_widths, dtype=torch.int32), [4, 4], 3, 2, 1, True)


BOTH = ("reference", "triton")
BAD_METADATA = [  # (op call, expected message, backends); first the out-of-bounds reproducer (width 12, x 8 wide)
    (_ln_call([2], [12]), r"widths\[0\]=12 must lie in \[0, 8\] \(the bound of x\)", BOTH),
    (_ln_call([1], [8]), r"sum of group sizes \(1, .*\) must equal the batch size of x \(dim 0: 2\)", BOTH),
    (_ln_call([1, 1], [8]), r"widths must have one entry per group", BOTH),
    (_linear_call([2], [9], [6]), r"in_widths\[0\]=9 exceeds the maximum width 8 of x", BOTH),
    (_linear_call([2], [8], [7]), r"out_widths\[0\]=7 exceeds the segment width 6", BOTH),
    (_linear_call([3], [8], [6]), r"must equal the batch size of x", BOTH),
    (_attention_call([3], [3]), r"widths\[0\]=3 must lie in \[0, 2\] \(the bound of q \(dim 2, H_max\)\)", BOTH),
    (_attention_call([2], [2]), r"must equal the batch size of q \(dim 0: 3\)", BOTH),
    (_im2col_call([1], [9]), r"widths\[0\]=9 must lie in \[0, 8\] \(the bound of u\)", BOTH),
    (_epilogue_call([1], [8], [13]), r"out_widths\[0\]=13 must lie in \[0, 12\] \(the bound of conv", BOTH),
    (_epilogue_call([1], [9], [12]), r"in_widths\[0\]=9 must lie in \[0, 8\] \(the bound of x\)", BOTH),
    (_conv_call([1], [8], [13]), r"out_widths\[0\]=13 must lie in \[0, 12\] \(the bound of weight", ("reference",)),
]


@pytest.mark.parametrize("backend,call,match", [(backend, call, match) for call, match, backends in BAD_METADATA
                                                for backend in backends])
def test_custom_ops_check_their_metadata(backend, call, match):
    with rk.use_backend(backend):
        with pytest.raises(ValueError, match=match):
            call()


def test_custom_op_backwards_check_their_metadata():
    x = torch.randn(2, 3, 8)
    w, b = torch.ones(8), torch.zeros(8)
    width_8, width_9 = torch.tensor([8], dtype=torch.int32), torch.tensor([9], dtype=torch.int32)
    _, _, mean, rstd = torch.ops.resnas.ragged_layer_norm_fwd(x, None, w, b, [2], width_8, 1e-6)
    with rk.use_backend("reference"):
        with pytest.raises(ValueError, match=r"widths\[0\]=9 must lie in \[0, 8\] \(the bound of z\)"):
            torch.ops.resnas.ragged_layer_norm_bwd(torch.ones_like(x), None, x, w, mean, rstd, [2], width_9)
        with pytest.raises(ValueError, match=r"mean must have shape \(6,\)"):
            torch.ops.resnas.ragged_layer_norm_bwd(torch.ones_like(x), None, x, w, mean[:5], rstd, [2], width_8)
        with pytest.raises(ValueError, match=r"dcols must have shape"):
            torch.ops.resnas.rsr_im2col_bwd(torch.zeros(1, 5, 72), [1], torch.tensor([8], dtype=torch.int32), [4, 4], 3,
                                            2, 1, True)
        with pytest.raises(ValueError, match=r"out_widths\[0\]=13 must lie in \[0, 12\] \(the bound of dout"):
            torch.ops.resnas.rsr_epilogue_bwd(torch.zeros(1, 5, 12), [1], torch.tensor([8], dtype=torch.int32),
                                              torch.tensor([13], dtype=torch.int32), [4, 4], 2, True, 8)


# ---------------------------------------------------------------------------------------------------------------------
# 2b. The Triton kernels stay inside their tensors whatever the metadata (launchers called without any checks)
# ---------------------------------------------------------------------------------------------------------------------
class _Guards:
    """Input tensors followed by guard regions; every load and store the interpreter executes is checked."""

    GUARD = 256  # elements after each tensor

    def __init__(self):
        self.ranges = []
        self.hits = []
        self.buffers = []  # kept alive: a freed guard region could be reused by a legitimate allocation

    def tensor(self, *shape, dtype=torch.float32):
        n = int(np.prod(shape))
        buf = torch.full((n + self.GUARD,), float("nan"), dtype=dtype)
        self.buffers.append(buf)
        t = buf[:n].view(shape)
        t.copy_(torch.randn(shape, dtype=dtype))
        start = buf.data_ptr() + n * buf.element_size()
        self.ranges.append((start, start + self.GUARD * buf.element_size()))
        return t

    def check(self, ptrs, mask):
        live = np.asarray(ptrs).astype(np.uint64)[np.asarray(mask, dtype=bool)]
        for lo, hi in self.ranges:
            if np.any((live >= lo) & (live < hi)):
                self.hits.append((lo, hi))


@contextlib.contextmanager
def _watch_memory(monkeypatch):
    from triton.runtime.interpreter import InterpreterBuilder

    guards = _Guards()
    load, store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store

    def checked_load(self, ptrs, mask, *args):
        guards.check(ptrs.data, mask.data)
        return load(self, ptrs, mask, *args)

    def checked_store(self, ptrs, value, mask, *args):
        guards.check(ptrs.data, mask.data)
        return store(self, ptrs, value, mask, *args)

    monkeypatch.setattr(InterpreterBuilder, "create_masked_load", checked_load)
    monkeypatch.setattr(InterpreterBuilder, "create_masked_store", checked_store)
    yield guards
    assert not guards.hits, f"kernel accessed {len(guards.hits)} guard regions past its tensors"


def test_guards_catch_an_access_past_a_tensor(monkeypatch):
    """The watcher itself: the last element is fine, one element further is reported."""
    with pytest.raises(AssertionError, match="guard regions"):
        with _watch_memory(monkeypatch) as mem:
            x = mem.tensor(2, 8)
            mem.check([x.data_ptr() + 15 * 4], [True])
            assert not mem.hits
            mem.check([x.data_ptr() + 16 * 4], [True])


def test_layer_norm_kernels_mask_by_c_max(monkeypatch):
    groups = Ragged((3,), (12,))  # width 12 > C_max = 8: unchecked, as a direct launch would pass it
    with _watch_memory(monkeypatch) as mem:
        x, w, b = mem.tensor(6, 8), mem.tensor(8), mem.tensor(8)
        y, _, mean, rstd = ln_mod._triton_fwd(x, None, w, b, groups, 2, 1e-6)
        dx, dw, db = ln_mod._triton_bwd(mem.tensor(6, 8), None, x, w, mean, rstd, groups, 2)
    assert all(torch.isfinite(t).all() for t in (y, mean, rstd, dx, dw, db))


def test_linear_kernels_mask_by_k_max_and_segment(monkeypatch):
    rows = (6,)
    with _watch_memory(monkeypatch) as mem:
        x, w = mem.tensor(6, 8), mem.tensor(8, 8)
        # k_g = 13 > K_max = 8, n_g = 11 > the segment width 8
        k_w, n_w = torch.tensor([13], dtype=torch.int32), torch.tensor([11], dtype=torch.int32)
        y, _ = lin_mod._triton_fwd(x, w, None, None, None, rows, k_w, n_w, 1, 2, False, False)
        dx, dw, _, _ = lin_mod._triton_bwd(mem.tensor(6, 8), x, w, None, None, rows, k_w, n_w, 1, 2, False, False,
                                           False)
    assert all(torch.isfinite(t).all() for t in (y, dx, dw))


def test_rsr_kernels_mask_by_channel_bounds(monkeypatch):
    grid, n_tokens = (4, 4), 17
    with _watch_memory(monkeypatch) as mem:
        u = mem.tensor(1, n_tokens, 8)
        geo = im2col_geometry(list(grid), 3, 2, 1, True)
        cols = im2col_mod._triton_fwd(u, Ragged((1,), (11,)), geo)          # width 11 > C = 8
        du = im2col_mod._triton_bwd(mem.tensor(1, 4, 72), Ragged((1,), (11,)), geo)
        egeo = epi_mod._geometry(grid, 2, True)
        conv, pos, bias = mem.tensor(1, 4, 12), mem.tensor(1, 4, 12), mem.tensor(12)
        out = epi_mod._triton_fwd(conv, u, pos, bias, mem.tensor(1, 1, 12), mem.tensor(12), Ragged((1,), (11,)),
                                  Ragged((1,), (15,)), egeo)                # ci 11 > Ci = 8, co 15 > Co = 12
        grads = epi_mod._triton_bwd(mem.tensor(1, 5, 12), Ragged((1,), (11,)), Ragged((1,), (15,)), egeo, 8)
    assert all(torch.isfinite(t).all() for t in (cols, du, out, *grads))


# ---------------------------------------------------------------------------------------------------------------------
# 3. bf16 under the Triton interpreter is refused (its bf16 tl.dot is wrong), not silently wrong
# ---------------------------------------------------------------------------------------------------------------------
def test_bf16_under_the_interpreter_is_refused():
    x, w = torch.randn(2, 3, 16, dtype=torch.bfloat16), torch.randn(16, 16, dtype=torch.bfloat16)
    q = torch.randn(2, 16, 2, 16, dtype=torch.bfloat16)
    with rk.use_backend("triton"):
        with pytest.raises(BackendUnavailableError, match="bf16 on the Triton backend under TRITON_INTERPRET=1"):
            rk.ragged_linear(x, w, None, Ragged((2,), (16,)), (16,))
        with pytest.raises(BackendUnavailableError, match="bf16 on the Triton backend under TRITON_INTERPRET=1"):
            rk.ragged_attention(q, q, q)
        # fp16 runs (the interpreter computes it right)
        rk.ragged_linear(x.half(), w.half(), None, Ragged((2,), (16,)), (16,))


# ---------------------------------------------------------------------------------------------------------------------
# 4. The reference backend ignores the padded columns, even when they hold NaN
# ---------------------------------------------------------------------------------------------------------------------
def test_reference_backend_ignores_nan_beyond_the_width():
    groups = Ragged((2, 1), (8, 5))
    x = torch.randn(3, 4, 8)
    x[2, :, 5:] = float("nan")  # breaks the contract (zeros there); the kernels never read those columns
    w, b = torch.randn(8), torch.randn(8)
    dy = torch.randn(3, 4, 8)
    dy[2, :, 5:] = float("nan")
    with rk.use_backend("reference"):
        widths = torch.tensor([8, 5], dtype=torch.int32)
        y, _, mean, rstd = ln_mod.ragged_layer_norm_fwd(x, None, w, b, [2, 1], widths, 1e-6)
        dx, dw, db = ln_mod.ragged_layer_norm_bwd(dy, None, x, w, mean, rstd, [2, 1], widths)
    torch.testing.assert_close(y[2, :, :5], F.layer_norm(x[2, :, :5], (5,), w[:5], b[:5], 1e-6))
    assert (y[2, :, 5:] == 0).all() and (dx[2, :, 5:] == 0).all()
    assert all(torch.isfinite(t).all() for t in (y, dx, dw, db))
    # the RSR epilogue's reference: the pooled shortcut and the cls shortcut, NaN beyond ci = 5 < co = 8
    xr = torch.randn(1, 17, 8)
    xr[:, :, 5:] = float("nan")
    with rk.use_backend("reference"):
        out = torch.ops.resnas.rsr_epilogue_fwd(torch.randn(1, 4, 8), xr, torch.zeros(1, 4, 8), torch.zeros(8),
                                                torch.zeros(1, 1, 8), torch.zeros(8), [1],
                                                torch.tensor([5], dtype=torch.int32),
                                                torch.tensor([8], dtype=torch.int32), [4, 4], 2)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------------------------
# 5. LeViT: one call drops the caches after writes through `.data` (which no version counter sees)
# ---------------------------------------------------------------------------------------------------------------------
def test_levit_clear_caches_after_data_writes():
    import timm

    import resnas_kernels.models  # noqa: F401  (registers levit_*_fused)

    model = timm.create_model("levit_128s_fused").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        model(x)  # builds the caches
        for p in model.parameters():
            p.data.mul_(0.9)
        stale = model(x)
        assert model.clear_caches() is model
        fresh = model(x)
        model.train(), model.eval()  # rebuilds every cache from the current weights
        rebuilt = model(x)
    assert not torch.equal(stale, rebuilt)  # the stale cache is real (documented, not detected)
    torch.testing.assert_close(fresh, rebuilt, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# 6. Error messages
# ---------------------------------------------------------------------------------------------------------------------
def test_error_messages_name_what_was_expected():
    x = torch.randn(2, 3, 8)
    with pytest.raises(TypeError) as err:
        rk.ragged_layer_norm(x, torch.ones(8, dtype=torch.float16), torch.zeros(8))
    assert str(err.value) == "weight must have dtype in ['torch.float32'], got torch.float16"
    q = torch.randn(3, 4, 2, 16)
    with pytest.raises(ValueError) as err:
        rk.ragged_attention(q, q, q, Ragged((1, 1), (2, 2)))
    assert "batch size of q (dim 0: 3)" in str(err.value) and "H_max" not in str(err.value)

