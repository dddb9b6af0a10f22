"""Ragged LayerNorm through every backend against the reference oracle, forward and backward.

Backends: reference, triton (interpreter on CPU; real kernels on GPU), cpu (C++), cuda (CUDA C++, GPU only).
The C++ backends must be present unless the environment says the extension was deliberately not built
(RESNAS_EXPECT_EXT=0): a missing extension is a failure, not a skip.
"""
import importlib
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import resnas_kernels as rk
from resnas_kernels import Ragged, _ext
from resnas_kernels import reference as ref
from resnas_kernels.ops.ragged_layer_norm import ragged_layer_norm_bwd, ragged_layer_norm_fwd

ln_mod = importlib.import_module("resnas_kernels.ops.ragged_layer_norm")  # the package re-exports the function's name

from _backends import require_backend
from _oracle import assert_close_to_oracle

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def _require(backend: str, device: str):
    require_backend(backend)


CPU_BACKENDS = [("reference", "cpu"), ("triton", "cpu"), ("cpu", "cpu")]
GPU_BACKENDS = [pytest.param(b, "cuda", marks=pytest.mark.gpu) for b in ("reference", "triton", "cuda")]
ALL_BACKENDS = CPU_BACKENDS + GPU_BACKENDS

# (sizes, widths, tokens per sample, C_max). Awkward on purpose: empty groups, one-sample groups, width 0, widths
# that are not powers of two, C_max not a multiple of 16, token counts 1/5/7/17.
CASES = [
    ((2, 0, 3, 1), (40, 0, 17, 0), 7, 40),
    ((1,), (176,), 17, 176),
    ((3, 2), (220, 176), 5, 220),
    ((1, 1, 1, 1), (1, 2, 3, 33), 1, 33),
    ((2, 2), (256, 160), 3, 256),
]


def _inputs(sizes, widths, n, c, dtype, device, residual):
    g = Ragged(sizes, widths)
    mask = g.mask(c, device=device)[:, None, :].to(dtype)
    b = g.batch
    x = (torch.randn(b, n, c, device=device, dtype=dtype) * 2 + 0.5) * mask  # the contract: zeros beyond widths
    r = torch.randn(b, n, c, device=device, dtype=dtype) * mask if residual else None
    w = torch.randn(c, device=device, dtype=dtype) * 0.5 + 1
    bias = torch.randn(c, device=device, dtype=dtype) * 0.1
    return g, x, r, w, bias


def _run(fn, g, x, r, w, b, dy, dz, eps=1e-6):
    leaves = [t.detach().clone().requires_grad_() for t in ((x, w, b) if r is None else (x, r, w, b))]
    if r is None:
        xx, ww, bb = leaves
        y = fn(xx, ww, bb, g, eps)
        loss = (y.double() * dy).sum()
        outs = (y,)
    else:
        xx, rr, ww, bb = leaves
        y, z = fn(xx, ww, bb, g, eps, residual=rr)
        loss = (y.double() * dy).sum() + (z.double() * dz).sum()
        outs = (y, z)
    # allow_unused: with every width 0 the reference never touches weight/bias, whose gradient is then zero.
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return outs, tuple(torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads))


def _check_against_oracle(backend, outs, grads, g, x, r, w, b, dy, dz, c, device):
    """Outputs and gradients of one backend against the fp64 oracle (bound: the same-dtype reference's own error),
    and the contract: exactly zero beyond each group's width, in every output and in dx."""
    oracle_outs, oracle_grads = _run(ref.ragged_layer_norm, g, *(t.double() if t is not None else None
                                                                 for t in (x, r, w, b)), dy, dz)
    same_outs, same_grads = _run(ref.ragged_layer_norm, g, x, r, w, b, dy, dz)
    for name, a, o, s in zip(("y", "z"), outs, oracle_outs, same_outs):
        assert_close_to_oracle(a, o, s, f"{backend}:{name}")
    names = ("dx", "dweight", "dbias") if r is None else ("dx", "dresidual", "dweight", "dbias")
    for name, a, o, s in zip(names, grads, oracle_grads, same_grads):
        assert_close_to_oracle(a, o, s, f"{backend}:{name}", factor=3.0)
    outside = ~g.mask(c, device=device)[:, None, :].expand_as(x)
    for name, t in zip(("y", "z", "dx"), (*outs, grads[0])):
        assert (t[outside] == 0).all(), f"{backend}: {name} is not exactly zero beyond the widths"


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"G{len(c[0])}-N{c[2]}-C{c[3]}")
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_matches_reference_fp32(backend, device, case, residual):
    _require(backend, device)
    sizes, widths, n, c = case
    g, x, r, w, b = _inputs(sizes, widths, n, c, torch.float32, device, residual)
    dy = torch.randn(x.shape, dtype=torch.float64, device=device)
    dz = torch.randn(x.shape, dtype=torch.float64, device=device)
    with rk.use_backend(backend):
        outs, grads = _run(rk.ragged_layer_norm, g, x, r, w, b, dy, dz)
    _check_against_oracle(backend, outs, grads, g, x, r, w, b, dy, dz, c, device)


@pytest.mark.parametrize("backend,device", [("reference", "cpu"), ("cpu", "cpu"),
                                            pytest.param("triton", "cuda", marks=pytest.mark.gpu),
                                            pytest.param("cuda", "cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, device, dtype):
    _require(backend, device)
    g, x, r, w, b = _inputs((3, 1, 2), (176, 0, 220), 17, 220, dtype, device, residual=True)
    dy = torch.randn(x.shape, dtype=torch.float64, device=device)
    dz = torch.randn(x.shape, dtype=torch.float64, device=device)
    with rk.use_backend(backend):
        outs, grads = _run(rk.ragged_layer_norm, g, x, r, w, b, dy, dz)
    oracle_outs, oracle_grads = _run(ref.ragged_layer_norm, g, x.double(), r.double(), w.double(), b.double(), dy, dz)
    same_outs, same_grads = _run(ref.ragged_layer_norm, g, x, r, w, b, dy, dz)
    for name, a, o, s in zip(("y", "z"), outs, oracle_outs, same_outs):
        assert a.dtype == dtype
        assert_close_to_oracle(a, o, s, f"{backend}:{name}")
    for name, a, o, s in zip(("dx", "dresidual", "dweight", "dbias"), grads, oracle_grads, same_grads):
        assert_close_to_oracle(a, o, s, f"{backend}:{name}", factor=3.0)


_HALF = (torch.float16, torch.bfloat16)


# The Triton interpreter has no bfloat16 arithmetic, so on CPU it runs the fp16 case (same code path).
@pytest.mark.parametrize("backend,device,dtype",
                         [(b, "cpu", d) for b in ("reference", "cpu") for d in _HALF] + [("triton", "cpu", torch.float16)]
                         + [pytest.param(b, "cuda", d, marks=pytest.mark.gpu) for b in ("triton", "cuda") for d in _HALF])
def test_residual_sum_is_rounded_before_its_statistics(backend, device, dtype):
    """The fused z = x + r is normalised as stored in the input dtype. Statistics of the unrounded fp32 sum would
    disagree with the stored z the backward reads: on width-1 or near-constant rows rstd ~ eps^-1/2 amplifies that
    rounding into huge dx (seen: 1e5 where the exact gradient is 0)."""
    _require(backend, device)
    g = Ragged((2, 2), (1, 6))
    base = torch.tensor(1.0 + 2.0 ** -9, dtype=torch.float64)  # x + r not representable in fp16/bf16
    x = (torch.full((4, 3, 8), 1.0, dtype=torch.float64) * g.mask(8, dtype=torch.float64)[:, None]).to(device=device, dtype=dtype)
    r = (torch.full((4, 3, 8), base.item() - 1.0, dtype=torch.float64)
         * g.mask(8, dtype=torch.float64)[:, None]).to(device=device, dtype=dtype)
    r = r + (torch.randn_like(r.float()) * 1e-3).to(dtype) * g.mask(8, device=device)[:, None].to(dtype)
    w = torch.ones(8, dtype=dtype, device=device)
    b = torch.zeros(8, dtype=dtype, device=device)
    dy = torch.randn(x.shape, dtype=torch.float64, device=device)
    dz = torch.zeros(x.shape, dtype=torch.float64, device=device)
    with rk.use_backend(backend):
        outs, grads = _run(rk.ragged_layer_norm, g, x, r, w, b, dy, dz)
    # The spec reference rounds z = x + r in the input dtype (a PyTorch add), then normalises it.
    same_outs, same_grads = _run(ref.ragged_layer_norm, g, x, r, w, b, dy, dz)
    torch.testing.assert_close(outs[1], same_outs[1], rtol=0, atol=0)  # z: one rounding of the same sum
    assert (grads[0][:2, :, :1] == 0).all(), "width-1 rows: LN's gradient is exactly 0"
    # The near-constant width-6 rows have genuinely large gradients (rstd ~ 1e3). Kernel and reference normalise the
    # same stored z in fp32, so they differ by fp32 summation order amplified by rstd (~1e-4 of max |dx|) plus one
    # rounding of dx to the dtype (<= 2^-8 relative for bf16): 4e-3 of the largest gradient bounds both.
    scale = same_grads[0].abs().max().item()
    torch.testing.assert_close(grads[0].double(), same_grads[0].double(), rtol=0, atol=4e-3 * scale)


@pytest.mark.parametrize("backend,device", [("reference", "cpu"), ("cpu", "cpu"),
                                            pytest.param("cuda", "cuda", marks=pytest.mark.gpu)])
def test_fp32_weights_with_half_activations(backend, device):
    """Mixed precision as under autocast: bf16 activations, fp32 affine parameters; gradients keep their dtypes."""
    _require(backend, device)
    g, x, r, w, b = _inputs((2, 2), (64, 48), 5, 64, torch.bfloat16, device, residual=False)
    w, b = w.float(), b.float()
    with rk.use_backend(backend):
        xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
        y = rk.ragged_layer_norm(xx, ww, bb, g)
        y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and ww.grad.dtype == torch.float32 and xx.grad.dtype == torch.bfloat16
    oracle = ref.ragged_layer_norm(x.double(), w.double(), b.double(), g)
    same = ref.ragged_layer_norm(x, w, b, g)
    assert_close_to_oracle(y, oracle, same, "y")


@pytest.mark.parametrize("backend,device", [("reference", "cpu"), ("cpu", "cpu")])
def test_fp64_gradcheck(backend, device):
    _require(backend, device)
    g, x, r, w, b = _inputs((2, 0, 1), (5, 0, 3), 3, 6, torch.float64, device, residual=True)
    mask = g.mask(6, dtype=torch.float64)[:, None, :]

    def fn(x, r, w, b):
        # Inputs must stay within the contract (zero beyond widths) when gradcheck perturbs them.
        return rk.ragged_layer_norm(x * mask, w, b, g, residual=r * mask)

    with rk.use_backend(backend):
        assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_() for t in (x, r, w, b)))


@pytest.mark.parametrize("backend,device", [("reference", "cpu"), ("triton", "cpu"), ("cpu", "cpu"),
                                            pytest.param("triton", "cuda", marks=pytest.mark.gpu),
                                            pytest.param("cuda", "cuda", marks=pytest.mark.gpu)])
def test_weight_gradients_are_deterministic(backend, device):
    _require(backend, device)
    g, x, r, w, b = _inputs((5, 3), (64, 40), 9, 64, torch.float32, device, residual=False)
    dy = torch.randn_like(x)
    results = []
    with rk.use_backend(backend):
        for threads in (1, 2) if device == "cpu" else (None, None):
            if threads:
                torch.set_num_threads(threads)
            widths = g.widths_tensor(device)
            _, _, mean, rstd = ragged_layer_norm_fwd(x, None, w, b, list(g.sizes), widths, 1e-6)
            results.append(ragged_layer_norm_bwd(dy, None, x, w, mean, rstd, list(g.sizes), widths))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for a, b_ in zip(*results):
        assert torch.equal(a, b_), "gradients differ bitwise between two runs (or thread counts)"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck(backend):
    _require(backend, "cpu")
    g, x, r, w, b = _inputs((2, 1), (12, 7), 3, 12, torch.float32, "cpu", residual=True)
    with rk.use_backend(backend):
        for residual in (None, r):
            args = (x.requires_grad_(), residual, w.requires_grad_(), b.requires_grad_(), list(g.sizes),
                    g.widths_tensor("cpu"), 1e-6)
            torch.library.opcheck(ragged_layer_norm_fwd, args)


def test_torch_compile_traces_without_graph_breaks():
    g, x, r, w, b = _inputs((2, 1), (12, 7), 3, 12, torch.float32, "cpu", residual=True)

    def block(x, r, w, b):
        y, z = rk.ragged_layer_norm(x, w, b, g, residual=r)
        return y * 2 + z

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
    out = compiled(*leaves)
    out.sum().backward()
    expected = block(*(t.detach() for t in leaves))
    torch.testing.assert_close(out, expected)
    assert all(t.grad is not None for t in leaves)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_property_random_groups_match_reference(data):
    """Random partitions (incl. empty groups), widths and shapes through the default backend vs the fp64 oracle."""
    num_groups = data.draw(st.integers(1, 6))
    c = data.draw(st.integers(1, 96))
    sizes = tuple(data.draw(st.lists(st.integers(0, 3), min_size=num_groups, max_size=num_groups)))
    if sum(sizes) == 0:
        sizes = sizes[:-1] + (1,)
    widths = tuple(data.draw(st.lists(st.integers(0, c), min_size=num_groups, max_size=num_groups)))
    n = data.draw(st.integers(1, 9))
    residual = data.draw(st.booleans())
    g, x, r, w, b = _inputs(sizes, widths, n, c, torch.float32, "cpu", residual)
    dy = torch.randn(x.shape, dtype=torch.float64)
    dz = torch.randn(x.shape, dtype=torch.float64)
    outs, grads = _run(rk.ragged_layer_norm, g, x, r, w, b, dy, dz)
    oracle_outs, oracle_grads = _run(ref.ragged_layer_norm, g, *(t.double() if t is not None else None
                                                                 for t in (x, r, w, b)), dy, dz)
    same_outs, same_grads = _run(ref.ragged_layer_norm, g, x, r, w, b, dy, dz)
    for a, o, s in zip(outs + grads, oracle_outs + oracle_grads, same_outs + same_grads):
        assert_close_to_oracle(a, o, s, "property", factor=3.0)


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
def test_near_constant_rows_are_as_accurate_as_their_spread_allows(backend):
    """Rows whose |mean| is ~300 times their spread. The fp32 mean is off by its rounding error (~u |mean|), which
    shifts every z - mean alike; uncentred, rstd turns that into errors ~u |mean| rstd in y and the backward's
    cancellation into far larger ones in dx (up to ~4000 u rstd max|w dy| per row; PyTorch's own backward alike, so
    the oracle rule's same-dtype bound is a noisy yardstick on such rows). Every backend centres twice (package
    docstring), so each row stays within a few ulps of what its spread allows. Bounds per row, against the fp64
    oracle: |y err| <= 8 u max(|w xhat| + |b|), |dx err| <= 16 u rstd max|w dy|."""
    _require(backend, "cpu")
    g = Ragged((6, 6, 6, 6), (2, 3, 17, 64))
    b_, n, c = 24, 4, 64
    base = torch.randn(b_, n, 1, dtype=torch.float64) * 3
    x = ((base + torch.randn(b_, n, c, dtype=torch.float64) * base.abs() / 300) * g.mask(c, dtype=torch.float64)[:, None]).float()
    w = torch.randn(c) * 0.5 + 1
    bias = torch.randn(c) * 0.1
    dy = torch.randn(x.shape, dtype=torch.float64)
    with rk.use_backend(backend):
        (y,), (dx, _, _) = _run(rk.ragged_layer_norm, g, x, None, w, bias, dy, None)
    (y_o,), (dx_o, _, _) = _run(ref.ragged_layer_norm, g, x.double(), None, w.double(), bias.double(), dy, None)
    u = torch.finfo(torch.float32).eps / 2
    active = g.mask(c, dtype=torch.bool)[:, None, :].expand_as(x)
    xd = torch.where(active, x.double(), float("nan"))
    var = (xd - xd.nanmean(-1, keepdim=True)).pow(2).nanmean(-1)
    rstd = (var + 1e-6).rsqrt()
    xhat = torch.where(active, (xd - xd.nanmean(-1, keepdim=True)) * rstd[..., None], 0.0)
    y_scale = torch.where(active, (w.double() * xhat).abs() + bias.double().abs(), 0.0).amax(-1)
    dx_scale = rstd * torch.where(active, (w.double() * dy).abs(), 0.0).amax(-1)
    y_err = (y.double() - y_o).abs().amax(-1)
    dx_err = (dx.double() - dx_o).abs().amax(-1)
    assert (y_err <= 8 * u * y_scale).all(), f"y: worst {(y_err / (u * y_scale)).nan_to_num().max():.1f} u"
    assert (dx_err <= 16 * u * dx_scale).all(), f"dx: worst {(dx_err / (u * dx_scale)).nan_to_num().max():.1f} u"


def test_masked_layer_norm_equals_the_ragged_reference():
    """The original code's full-width MaskedLayerNorm and the sliced formulation agree (the supernet's parity)."""
    g, x, _, w, b = _inputs((2, 3, 1), (40, 17, 0), 7, 40, torch.float64, "cpu", residual=False)
    masked = ref.masked_layer_norm(x, w, b, g.mask(40, dtype=torch.float64)[:, None, :])
    torch.testing.assert_close(masked, ref.ragged_layer_norm(x, w, b, g), rtol=1e-10, atol=1e-10)


def test_reference_equals_stock_layer_norm_per_group():
    g, x, _, w, b = _inputs((2, 3), (40, 17), 7, 40, torch.float64, "cpu", residual=False)
    y = ref.ragged_layer_norm(x, w, b, g, eps=1e-5)
    for (start, end), c in zip(zip(g.offsets, g.offsets[1:]), g.widths):
        ln = torch.nn.LayerNorm(c, eps=1e-5, dtype=torch.float64)
        with torch.no_grad():
            ln.weight.copy_(w[:c])
            ln.bias.copy_(b[:c])
        torch.testing.assert_close(y[start:end, :, :c], ln(x[start:end, :, :c]), rtol=0, atol=1e-12)
        assert (y[start:end, :, c:] == 0).all()


class TestBadInput:
    def setup_method(self):
        self.x = torch.randn(4, 3, 8)
        self.w = torch.ones(8)
        self.b = torch.zeros(8)
        self.g = Ragged((2, 2), (8, 5))

    def test_dtype(self):
        with pytest.raises(TypeError, match="x must have dtype in"):
            rk.ragged_layer_norm(self.x.int(), self.w, self.b, self.g)

    def test_rank(self):
        with pytest.raises(ValueError, match="x must have at least 2 dims"):
            rk.ragged_layer_norm(torch.randn(8), self.w, self.b, Ragged((8,), (8,)))

    def test_non_contiguous(self):
        with pytest.raises(ValueError, match="x must be contiguous"):
            rk.ragged_layer_norm(torch.randn(4, 8, 3).transpose(1, 2), self.w, self.b, self.g)

    def test_width_beyond_channels(self):
        with pytest.raises(ValueError, match=r"groups.widths\[0\]=9 exceeds the maximum width 8 of x"):
            rk.ragged_layer_norm(self.x, self.w, self.b, Ragged((2, 2), (9, 5)))

    def test_group_sizes_must_cover_the_batch(self):
        with pytest.raises(ValueError, match="must equal the batch size of x"):
            rk.ragged_layer_norm(self.x, self.w, self.b, Ragged((2, 1), (8, 5)))

    def test_weight_shape_and_dtype(self):
        with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
            rk.ragged_layer_norm(self.x, torch.ones(7), self.b, self.g)
        with pytest.raises(TypeError, match="bias must have dtype in"):
            rk.ragged_layer_norm(self.x.half(), self.w.half(), self.b.double(), self.g)

    def test_residual_mismatch(self):
        with pytest.raises(ValueError, match="residual must match x in shape and dtype"):
            rk.ragged_layer_norm(self.x, self.w, self.b, self.g, residual=torch.zeros(4, 2, 8))

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match="weight must be on the same device as x"):
            rk.ragged_layer_norm(self.x, self.w.to("meta"), self.b, self.g)

    def test_eps(self):
        with pytest.raises(ValueError, match="eps must be a positive float"):
            rk.ragged_layer_norm(self.x, self.w, self.b, self.g, eps=0.0)

    def test_groups_type(self):
        with pytest.raises(TypeError, match="groups must be a resnas_kernels.Ragged"):
            rk.ragged_layer_norm(self.x, self.w, self.b, [(2, 2), (8, 5)])

    def test_eps_type(self):
        with pytest.raises(ValueError, match="eps must be a positive float, got 'x'"):
            rk.ragged_layer_norm(self.x, self.w, self.b, self.g, eps="x")


# ---------------------------------------------------------------------------------------------------------------------
# Device metadata: the widths as an int32 tensor on x's device (what a supernet passes), through every backend
# ---------------------------------------------------------------------------------------------------------------------
def _device_groups(sizes, widths, device) -> Ragged:
    return Ragged(sizes, torch.tensor(widths, dtype=torch.int32, device=device))


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]], ids=lambda c: f"G{len(c[0])}-N{c[2]}-C{c[3]}")
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_device_widths_match_reference(backend, device, case, residual):
    """The same op with its widths as a tensor: forward and backward against the fp64 oracle (host widths)."""
    _require(backend, device)
    sizes, widths, n, c = case
    g, x, r, w, b = _inputs(sizes, widths, n, c, torch.float32, device, residual)
    dy = torch.randn(x.shape, dtype=torch.float64, device=device)
    dz = torch.randn(x.shape, dtype=torch.float64, device=device)
    with rk.use_backend(backend):
        outs, grads = _run(rk.ragged_layer_norm, _device_groups(sizes, widths, device), x, r, w, b, dy, dz)
    _check_against_oracle(backend, outs, grads, g, x, r, w, b, dy, dz, c, device)


class TestBadDeviceWidths:
    """A widths tensor of the wrong dtype, device, length or values gets a clear error on every backend."""

    def setup_method(self):
        self.x = torch.randn(4, 3, 8)
        self.w = torch.ones(8)
        self.b = torch.zeros(8)

    @pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
    @pytest.mark.parametrize("widths,match", [
        ([8, 9], r"groups.widths\[1\]=9 .*\[0, 8\]"),
        ([-1, 3], r"groups.widths\[0\]=-1 must lie in \[0, 8\]"),
    ], ids=["above-bound", "negative"])
    def test_values_outside_the_bound(self, backend, widths, match):
        _require(backend, "cpu")
        with rk.use_backend(backend), pytest.raises(ValueError, match=match):
            rk.ragged_layer_norm(self.x, self.w, self.b, _device_groups((2, 2), widths, "cpu"))

    @pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
    def test_device(self, backend):
        _require(backend, "cpu")
        groups = Ragged((2, 2), torch.tensor([8, 5], dtype=torch.int32, device="meta"))
        with rk.use_backend(backend), pytest.raises(
                ValueError, match="groups.widths must be on the same device as x: x is on cpu, groups.widths is on meta"):
            rk.ragged_layer_norm(self.x, self.w, self.b, groups)

    def test_dtype_and_length_are_refused_by_ragged(self):
        with pytest.raises(TypeError, match="widths must be an int32 tensor"):
            Ragged((2, 2), torch.tensor([8, 5]))
        with pytest.raises(ValueError, match="widths must have one entry per group"):
            Ragged((2, 2), torch.tensor([8, 5, 1], dtype=torch.int32))

    @pytest.mark.parametrize("backend", ["reference", "cpu"])
    def test_dtype_and_length_at_the_ops(self, backend):
        """Direct op calls, which no Ragged validated: the Python custom op and the C++ op check them too."""
        _require(backend, "cpu")
        long_widths, three = torch.tensor([8, 5]), torch.tensor([8, 5, 1], dtype=torch.int32)
        with rk.use_backend(backend):
            with pytest.raises(TypeError, match="widths must be an int32 tensor"):
                ragged_layer_norm_fwd(self.x, None, self.w, self.b, [2, 2], long_widths, 1e-6)
            with pytest.raises(ValueError, match="widths must have one entry per group"):
                ragged_layer_norm_fwd(self.x, None, self.w, self.b, [2, 2], three, 1e-6)
        if backend == "cpu":
            op = torch.ops.resnas.ragged_layer_norm
            with pytest.raises(TypeError, match="groups.widths must be an int32 tensor .*got dtype torch.int64"):
                op(self.x, self.w, self.b, [2, 2], long_widths, 1e-6)
            with pytest.raises(ValueError, match=r"groups.widths must have shape \(2,\) .*got \(3,\)"):
                op(self.x, self.w, self.b, [2, 2], three, 1e-6)


@pytest.mark.skipif(not _ext.triton_interpreting(), reason="watches the Triton interpreter's memory accesses")
def test_out_of_range_widths_are_clamped_inside_the_tensors(monkeypatch):
    """Launchers and the reference never trust the widths: -3 acts as 0 and 12 as C_max = 8, and no load or store of
    the Triton kernels leaves its tensors (the guard regions after each tensor stay untouched)."""
    from test_fuzz_findings import _watch_memory

    groups = _device_groups((2, 1), (12, -3), "cpu")  # unchecked: as a direct launch would pass them
    clamped = Ragged((2, 1), (8, 0))
    with _watch_memory(monkeypatch) as mem:
        x, r, w, b = mem.tensor(6, 8), mem.tensor(6, 8), mem.tensor(8), mem.tensor(8)
        dy, dz = mem.tensor(6, 8), mem.tensor(6, 8)
        y, z, mean, rstd = ln_mod._triton_fwd(x, r, w, b, groups, 2, 1e-6)
        grads = ln_mod._triton_bwd(dy, dz, z, w, mean, rstd, groups, 2)
    want = ln_mod._reference_fwd(x, r, w, b, clamped, 2, 1e-6)
    for got, expected in zip((y, z, mean, rstd), want):
        torch.testing.assert_close(got, expected)
    for got, expected in zip(grads, ln_mod._reference_bwd(dy, dz, z, w, mean, rstd, clamped, 2)):
        torch.testing.assert_close(got, expected)
    # The reference backend clamps by its masks too.
    for got, expected in zip(ln_mod._reference_fwd(x, r, w, b, groups, 2, 1e-6), want):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compiles_once_for_any_widths_tensor(backend):
    """torch.compile(fullgraph=True) of a block calling the op with the widths as a tensor argument: four different
    architectures (widths values) run one compiled graph, forward and backward, equal to eager."""
    _require(backend, "cpu")
    from torch._dynamo.testing import CompileCounterWithBackend

    sizes, c = (2, 1, 1), 24

    def block(x, r, w, b, widths):
        y, z = rk.ragged_layer_norm(x, w, b, Ragged(sizes, widths), residual=r)
        return y * 2 + z

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    with rk.use_backend(backend):
        for widths in ((24, 0, 7), (5, 24, 1), (13, 13, 13), (0, 0, 24)):
            g, x, r, w, b = _inputs(sizes, widths, 3, c, torch.float32, "cpu", residual=True)
            widths_t = torch.tensor(widths, dtype=torch.int32)
            leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
            out = compiled(*leaves, widths_t)
            grads = torch.autograd.grad(out.sum(), leaves)
            eager_leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
            expected = block(*eager_leaves, widths_t)
            expected_grads = torch.autograd.grad(expected.sum(), eager_leaves)
            torch.testing.assert_close(out, expected)
            for got, want in zip(grads, expected_grads):
                torch.testing.assert_close(got, want)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for 4 widths tensors"
