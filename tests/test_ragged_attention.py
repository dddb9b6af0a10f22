"""Fused ragged attention (issue 5) through every backend against the reference oracle, forward and backward.

Backends: reference, cpu (C++), triton (interpreter on CPU at small shapes; real kernels on GPU), cuda (GPU only).
Tolerances (tests/_oracle.py, FlashAttention's rule): the oracle is the reference evaluated in fp64 on the same
inputs; a backend passes if its max error is at most 2x (outputs) / 3x (gradients, one more accumulation) the error of
the reference evaluated in the input dtype (PyTorch ops, fp32 softmax), plus a few ulps. So fp32 and bf16 are held to
what their precision allows on that very input, with no hand-tuned atol.
"""
import importlib
import os

import pytest
import torch

import resnas_kernels as rk
from resnas_kernels import Ragged, _ext
from resnas_kernels import reference as ref

from _backends import require_backend as _require
from _oracle import assert_close_to_oracle

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------------
def _bias(kind: str, b: int, nq: int, nk: int, h: int, dtype, device, grid=None):
    """Bias kwargs of `kind`: none | index | grid | dense_h | dense_1 | dense_b. A non-trivial table (std 1)."""
    if kind == "none":
        return {}
    if kind in ("index", "grid"):
        if grid is not None:
            r, s = grid
            table = torch.randn(h, r * r + 3, dtype=dtype, device=device)  # T > R^2 is allowed
            if kind == "grid":
                return dict(bias_table=table, bias_grid=(r, s))
            return dict(bias_table=table, bias_index=rk.levit_bias_index(r, s, device=device))
        t = 13
        return dict(bias_table=torch.randn(h, t, dtype=dtype, device=device),
                    bias_index=torch.randint(0, t, (nq, nk), device=device))
    lead = {"dense_h": (h,), "dense_1": (1,), "dense_b": (b, h)}[kind]
    return dict(dense_bias=torch.randn(*lead, nq, nk, dtype=dtype, device=device))


def _qkv(b, nq, nk, h, d, dv, dtype, device, layout="plain"):
    """q, k, v with unit stride on the head dim. layout: plain | segmented ((B, N, 3, H, d) view, as written by the
    ragged linear; needs nq == nk and d == dv) | levit ((B, N, H, 2d + dv) per-head interleaved view)."""
    if layout == "segmented":
        qkv = torch.randn(b, nq, 3, h, d, dtype=dtype, device=device)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if layout == "levit":
        x = torch.randn(b, nq, h, 2 * d + dv, dtype=dtype, device=device)
        return x.split([d, d, dv], dim=3)
    return (torch.randn(b, nq, h, d, dtype=dtype, device=device), torch.randn(b, nk, h, d, dtype=dtype, device=device),
            torch.randn(b, nk, h, dv, dtype=dtype, device=device))


def _run(fn, q, k, v, heads, kw, dout, scale=None):
    """Forward + backward of fn on fresh leaves; returns (out, grads of q, k, v[, bias])."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    kw = dict(kw)
    for name in ("bias_table", "dense_bias"):
        if name in kw:
            kw[name] = kw[name].detach().clone().requires_grad_()
            leaves.append(kw[name])
    out = fn(*leaves[:3], heads, scale=scale, **kw)
    grads = torch.autograd.grad((out.double() * dout).sum(), leaves, allow_unused=True)
    return out, tuple(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads))


def _as(kw, dtype):
    return {n: (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in kw.items()}


def _device_heads(heads: Ragged, device) -> Ragged:
    """The same heads as device metadata: an int32 (G,) tensor on `device`."""
    return Ragged(heads.sizes, torch.tensor(heads.widths, dtype=torch.int32, device=device))


def _check_against_oracle(backend, q, k, v, heads, kw, scale=None, tag="", device_heads=False):
    """Runs `backend` and the reference (fp64 oracle and same-dtype) and compares outputs and every gradient. With
    device_heads, the backend gets the heads as an int32 tensor on q's device (the oracle keeps host ints)."""
    b, nq, h, _ = q.shape
    dout = torch.randn(b, nq, h * v.shape[3], dtype=torch.float64, device=q.device)
    op_heads = _device_heads(heads, q.device) if device_heads else heads
    with rk.use_backend(backend):
        out, grads = _run(rk.ragged_attention, q, k, v, op_heads, kw, dout, scale)
    oracle_out, oracle_grads = _run(ref.ragged_attention, q.double(), k.double(), v.double(), heads,
                                    _as(kw, torch.float64), dout, scale)
    same_out, same_grads = _run(ref.ragged_attention, q, k, v, heads, kw, dout, scale)
    assert out.dtype == q.dtype and out.shape == (b, nq, h * v.shape[3])
    assert_close_to_oracle(out, oracle_out, same_out, f"{backend}{tag}:out")
    names = ["dq", "dk", "dv"] + [n for n in ("bias_table", "dense_bias") if n in kw]
    for name, a, o, s in zip(names, grads, oracle_grads, same_grads):
        assert a.dtype == s.dtype, f"{backend}{tag}:{name} dtype {a.dtype} != {s.dtype}"
        assert_close_to_oracle(a, o, s, f"{backend}{tag}:{name}", factor=3.0)
    # The contract: exactly zero for inactive heads, in the output and in dq / dk / dv.
    mask = (heads or Ragged.uniform(b, h)).mask(h, device=q.device)  # (B, H)
    assert (out.view(b, nq, h, -1)[~mask[:, None, :].expand(b, nq, h)] == 0).all(), f"{backend}: out not zero"
    for name, g in zip(("dq", "dk", "dv"), grads[:3]):
        assert (g[~mask[:, None, :].expand(b, g.shape[1], h)] == 0).all(), f"{backend}: {name} not zero"
    return out, grads


# ---------------------------------------------------------------------------------------------------------------------
# LeViT shapes on the C++ path (and the reference backend): N = 196 / 49 / 16, shrink 196 -> 49 and 49 -> 16
# ---------------------------------------------------------------------------------------------------------------------
# (R, stride, d_qk, d_v, H_max, sizes, head widths): LeViT-128S/192/384 stage and shrink geometries, ragged heads.
LEVIT = [
    (14, 1, 16, 32, 4, (2, 1), (4, 3)),        # 128S stage 1: N = 196
    (14, 2, 16, 64, 8, (1, 0, 2), (8, 4, 5)),  # 128S shrink 1: 196 -> 49, V = 4D
    (7, 1, 32, 64, 5, (2,), (5,)),             # 192 stage 2: N = 49, H = 5
    (7, 2, 32, 64, 12, (1, 1), (12, 7)),       # shrink 2: 49 -> 16, H = 12
    (4, 1, 32, 64, 12, (2, 1), (3, 12)),       # 384 stage 3: N = 16, H = 12
    (4, 1, 16, 32, 3, (3,), (3,)),             # N = 16, H = 3
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", LEVIT, ids=lambda c: f"R{c[0]}s{c[1]}-d{c[2]}v{c[3]}-H{c[4]}")
@pytest.mark.parametrize("bias_kind", ["grid", "index"])
def test_levit_shapes(backend, case, bias_kind):
    _require(backend)
    r, s, d, dv, h, sizes, widths = case
    heads = Ragged(sizes, widths)
    rq = (r - 1) // s + 1
    q, k, v = _qkv(heads.batch, rq * rq, r * r, h, d, dv, torch.float32, "cpu", layout="plain")
    kw = _bias(bias_kind, heads.batch, rq * rq, r * r, h, torch.float32, "cpu", grid=(r, s))
    _check_against_oracle(backend, q, k, v, heads, kw)


# ---------------------------------------------------------------------------------------------------------------------
# ViT-ResNAS shapes: N = 257 / 65 / 17, d = 32 / 48 / 64, ragged heads (a group of size 0, one of size 1, one with 0
# heads), no bias and dense biases of every shape
# ---------------------------------------------------------------------------------------------------------------------
VIT = [  # (N, d, H_max, sizes, head widths)
    (257, 64, 3, (1, 0, 1, 1), (3, 2, 0, 2)),
    (65, 48, 4, (2, 1, 1), (4, 1, 0)),
    (17, 32, 6, (1, 2, 0, 1), (6, 5, 3, 0)),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", VIT, ids=lambda c: f"N{c[0]}-d{c[1]}-H{c[2]}")
@pytest.mark.parametrize("bias_kind", ["none", "dense_h", "dense_1", "dense_b"])
def test_vit_resnas_shapes(backend, case, bias_kind):
    _require(backend)
    n, d, h, sizes, widths = case
    heads = Ragged(sizes, widths)
    q, k, v = _qkv(heads.batch, n, n, h, d, d, torch.float32, "cpu", layout="segmented")
    _check_against_oracle(backend, q, k, v, heads, _bias(bias_kind, heads.batch, n, n, h, torch.float32, "cpu"))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_awkward_shapes_and_scale(backend):
    """Nq != Nk without a grid, head dims that are not multiples of 16, a table index, an explicit scale, B = 1."""
    _require(backend)
    heads = Ragged((1, 2), (2, 1))
    q, k, v = _qkv(3, 5, 23, 2, 7, 13, torch.float32, "cpu")
    _check_against_oracle(backend, q, k, v, heads, _bias("index", 3, 5, 23, 2, torch.float32, "cpu"), scale=0.3)
    q, k, v = _qkv(1, 1, 1, 1, 1, 1, torch.float32, "cpu")
    _check_against_oracle(backend, q, k, v, None, {})


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cpu(backend, dtype):
    """bf16 / fp16 on the C++ path: computed in fp32 and rounded once, so held to the same 2x / 3x rule against the
    reference evaluated in that dtype (which also computes in fp32): no extra slack for half precision."""
    _require(backend)
    heads = Ragged((2, 1), (4, 2))
    q, k, v = _qkv(3, 49, 196, 4, 16, 64, dtype, "cpu", layout="plain")
    _check_against_oracle(backend, q, k, v, heads, _bias("grid", 3, 49, 196, 4, dtype, "cpu", grid=(14, 2)))
    q, k, v = _qkv(3, 17, 17, 4, 32, 32, dtype, "cpu", layout="segmented")
    _check_against_oracle(backend, q, k, v, heads, _bias("dense_h", 3, 17, 17, 4, torch.float32, "cpu"))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_float64(backend):
    _require(backend)
    heads = Ragged((1, 1), (2, 1))
    q, k, v = _qkv(2, 16, 49, 2, 16, 32, torch.float64, "cpu")
    kw = _bias("grid", 2, 16, 49, 2, torch.float64, "cpu", grid=(7, 2))
    dout = torch.randn(2, 16, 64, dtype=torch.float64)
    with rk.use_backend(backend):
        out, grads = _run(rk.ragged_attention, q, k, v, heads, kw, dout)
    o_ref, g_ref = _run(ref.ragged_attention, q, k, v, heads, kw, dout)
    torch.testing.assert_close(out, o_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


# ---------------------------------------------------------------------------------------------------------------------
# Triton under the interpreter: small-N kernel (N <= 64) and tiled kernel (16 x 16 tiles here, so N = 33 spans 3)
# ---------------------------------------------------------------------------------------------------------------------
TRITON = [  # (Nq, Nk, d, dv, H, sizes, widths, bias kind, grid)
    (17, 17, 32, 32, 2, (1, 0, 2), (2, 1, 1), "index", None),         # small-N, ragged, empty group
    (16, 49, 16, 32, 2, (2, 1), (2, 0), "grid", (7, 2)),               # small-N shrink 49 -> 16, a 0-head group
    (33, 33, 16, 16, 2, (2, 1), (1, 2), "dense_h", None),              # tiled
    (33, 20, 8, 24, 2, (1, 2), (2, 1), "dense_b", None),               # tiled, Nq != Nk, odd head dims
    (25, 81, 16, 32, 1, (2,), (1,), "grid", (9, 2)),                   # tiled shrink 81 -> 25
    (33, 33, 16, 16, 2, (1, 1), (2, 1), "none", None),
    (17, 17, 16, 16, 2, (2, 1), (2, 1), "dense_1", None),
]


@pytest.mark.parametrize("case", TRITON, ids=lambda c: f"{c[0]}x{c[1]}-d{c[2]}v{c[3]}-{c[7]}")
def test_triton_interpreter(case):
    nq, nk, d, dv, h, sizes, widths, kind, grid = case
    heads = Ragged(sizes, widths)
    q, k, v = _qkv(heads.batch, nq, nk, h, d, dv, torch.float32, "cpu")
    _check_against_oracle("triton", q, k, v, heads, _bias(kind, heads.batch, nq, nk, h, torch.float32, "cpu", grid))


def test_triton_table_grad_spans_several_chunks():
    """B = 10 > the 8-sample bias chunk: the table gradient sums two chunk partials (small-N and tiled kernels)."""
    heads = Ragged((7, 3), (2, 1))
    for n in (17, 33):
        q, k, v = _qkv(10, n, n, 2, 16, 16, torch.float32, "cpu")
        _check_against_oracle("triton", q, k, v, heads, _bias("index", 10, n, n, 2, torch.float32, "cpu"),
                              tag=f"-N{n}")


# ---------------------------------------------------------------------------------------------------------------------
# Contract details
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_strided_views_are_read_in_place(backend):
    """q/k/v as views of a segmented (B, N, 3, H, d) tensor and of LeViT's per-head [q|k|v] tensor give the same bits
    as contiguous copies, and the gradient lands in the parent tensor."""
    _require(backend)
    heads = Ragged((2, 1), (3, 1))
    n = 16 if backend == "triton" else 49
    for layout, (d, dv) in (("segmented", (16, 16)), ("levit", (16, 32))):
        q, k, v = _qkv(3, n, n, 3, d, dv, torch.float32, "cpu", layout=layout)
        assert not q.is_contiguous()
        kw = _bias("grid", 3, n, n, 3, torch.float32, "cpu", grid=(int(n ** 0.5), 1))
        with rk.use_backend(backend):
            a = rk.ragged_attention(q, k, v, heads, **kw)
            b = rk.ragged_attention(q.contiguous(), k.contiguous(), v.contiguous(), heads, **kw)
            assert torch.equal(a, b), f"{backend}/{layout}: strided and contiguous inputs differ"
            parent = q._base.detach().clone().requires_grad_()
            views = parent.unbind(2) if layout == "segmented" else parent.split([d, d, dv], dim=3)
            rk.ragged_attention(*views, heads, **kw).sum().backward()
        assert parent.grad.shape == parent.shape and parent.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_inactive_heads_are_never_read(backend):
    """NaN in every inactive head of q, k, v changes nothing: those heads cost nothing and leak nothing."""
    _require(backend)
    heads = Ragged((2, 1, 1), (1, 3, 0))
    q, k, v = _qkv(4, 17, 17, 3, 16, 16, torch.float32, "cpu")
    kw = _bias("index", 4, 17, 17, 3, torch.float32, "cpu")
    inactive = ~heads.mask(3)[:, None, :, None]
    poisoned = [t.masked_fill(inactive, float("nan")) for t in (q, k, v)]
    with rk.use_backend(backend):
        clean = rk.ragged_attention(q, k, v, heads, **kw)
        dirty = rk.ragged_attention(*poisoned, heads, **kw)
    assert torch.equal(clean, dirty)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("kind", ["index", "grid", "dense_h"])
def test_bias_gradient_is_bitwise_deterministic(backend, kind):
    """Two runs (and, on the C++ path, 1 vs 2 threads) give bitwise-equal bias gradients: fixed-order reductions."""
    _require(backend)
    heads = Ragged((7, 4), (3, 2))  # 11 samples: more than one 8-sample chunk
    nq, nk, grid = (16, 49, (7, 2)) if kind == "grid" else (33, 33, None)
    q, k, v = _qkv(11, nq, nk, 3, 16, 32, torch.float32, "cpu")
    kw = _bias(kind, 11, nq, nk, 3, torch.float32, "cpu", grid)
    dout = torch.randn(11, nq, 3 * 32, dtype=torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n_threads in ((1, 2, 2) if backend == "cpu" else (threads, threads)):
            torch.set_num_threads(n_threads)
            with rk.use_backend(backend):
                results.append(_run(rk.ragged_attention, q, k, v, heads, kw, dout)[1][3])
    finally:
        torch.set_num_threads(threads)
    assert results[0].abs().sum() > 0
    for r in results[1:]:
        assert torch.equal(results[0], r), "bias gradient differs between runs"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_default_scale_is_d_qk_inverse_sqrt(backend):
    _require(backend)
    q, k, v = _qkv(2, 16, 16, 2, 16, 32, torch.float32, "cpu")
    with rk.use_backend(backend):
        a = rk.ragged_attention(q, k, v)
        b = rk.ragged_attention(q, k, v, scale=16 ** -0.5)
        c = rk.ragged_attention(q, k, v, scale=1.0)
    assert torch.equal(a, b) and not torch.allclose(a, c)


# ---------------------------------------------------------------------------------------------------------------------
# torch.library: opcheck, torch.compile
# ---------------------------------------------------------------------------------------------------------------------
def _opcheck_cases():
    heads = Ragged((2, 1), (2, 1))
    q, k, v = (t.requires_grad_() for t in _qkv(3, 16, 49, 2, 16, 32, torch.float32, "cpu", layout="plain"))
    table = torch.randn(2, 49, requires_grad=True)
    idx = rk.levit_bias_index(7, 2)
    widths = torch.tensor([2, 1], dtype=torch.int32)
    yield "index", (q, k, v, table, idx, None, [2, 1], widths, 0.25, [])
    yield "grid", (q, k, v, table, None, None, [2, 1], widths, 0.25, [7, 2])
    qs, ks, vs = (t.detach().requires_grad_() for t in _qkv(3, 17, 17, 2, 16, 16, torch.float32, "cpu",
                                                            layout="segmented"))
    dense = torch.randn(2, 17, 17, requires_grad=True)
    yield "dense_strided", (qs, ks, vs, None, None, dense, [2, 1], widths, 0.25, [])


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_opcheck(backend):
    _require(backend)
    for name, args in _opcheck_cases():
        with rk.use_backend(backend):
            result = torch.library.opcheck(torch.ops.resnas.ragged_attention_fwd.default, args)
        assert all(v == "SUCCESS" for v in result.values()), f"{backend}/{name}: {result}"


def test_opcheck_cpp_ops():
    """The C++ path: the public op `resnas::ragged_attention` (C++ autograd) and its kernels with their Python fakes."""
    _require("cpu")
    rk.ragged_attention(*_qkv(1, 4, 4, 1, 8, 8, torch.float32, "cpu"))  # first C++ call: registers the fakes
    for name, args in _opcheck_cases():
        result = torch.library.opcheck(torch.ops.resnas.ragged_attention.default, args)
        assert all(v == "SUCCESS" for v in result.values()), f"ragged_attention/{name}: {result}"
        detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        result = torch.library.opcheck(torch.ops.resnas.ext_ragged_attention_fwd.default, detached)
        assert all(v == "SUCCESS" for v in result.values()), f"ext_ragged_attention_fwd/{name}: {result}"


def test_torch_compile_fullgraph_cpu():
    """The op is opaque to torch.compile: the whole function (argument checks included) compiles with the default
    backend without graph breaks, and forward and backward match eager bitwise (the same C++ kernels run)."""
    backend = "cpu" if _ext.extension_available() else "reference"
    heads = Ragged((2, 1), (4, 2))
    q, k, v = _qkv(3, 16, 16, 4, 16, 32, torch.float32, "cpu", layout="levit")
    table = torch.randn(4, 16)
    dout = torch.randn(3, 16, 4 * 32)

    def fn(q, k, v, table):
        return rk.ragged_attention(q, k, v, heads, bias_table=table, bias_grid=(4, 1))

    compiled = torch.compile(fn, fullgraph=True)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, table)]
    with rk.use_backend(backend):
        y = compiled(*leaves)
        grads = torch.autograd.grad(y, leaves, dout)
        y_eager = fn(*leaves)
        grads_eager = torch.autograd.grad(y_eager, leaves, dout)
    assert torch.equal(y, y_eager)
    for a, b in zip(grads, grads_eager):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: every error names the argument and what was expected
# ---------------------------------------------------------------------------------------------------------------------
def _ok():
    q, k, v = _qkv(2, 4, 9, 2, 8, 8, torch.float32, "cpu")
    return q, k, v, torch.randn(2, 9)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda q, k, v, t: dict(bias_table=t, bias_index=torch.full((4, 9), 9)), ValueError,
     r"bias_index values .*\[0, 9\)"),
    (lambda q, k, v, t: dict(bias_table=t, bias_index=torch.full((4, 9), -1)), ValueError, r"bias_index values"),
    (lambda q, k, v, t: dict(bias_table=t, bias_index=torch.zeros(4, 8, dtype=torch.long)), ValueError,
     r"bias_index must have shape \(Nq, Nk\) = \(4, 9\)"),
    (lambda q, k, v, t: dict(bias_table=t, bias_index=torch.zeros(4, 9)), TypeError, r"bias_index must be an integer"),
    (lambda q, k, v, t: dict(bias_table=torch.randn(3, 9), bias_grid=(3, 2)), ValueError,
     r"bias_table must have shape \(H_max, T\) = \(2, T"),
    (lambda q, k, v, t: dict(bias_table=t, bias_grid=(3, 2), bias_index=torch.zeros(4, 9, dtype=torch.long)),
     ValueError, r"exactly one of bias_index .* or bias_grid"),
    (lambda q, k, v, t: dict(bias_table=t), ValueError, r"exactly one of bias_index"),
    (lambda q, k, v, t: dict(bias_grid=(3, 2)), ValueError, r"bias_table is None"),
    (lambda q, k, v, t: dict(bias_table=t, bias_grid=(3, 1)), ValueError, r"bias_grid=\(3, 1\) means .* Nq = "),
    (lambda q, k, v, t: dict(bias_table=t[:, :5], bias_grid=(3, 2)), ValueError, r"needs T >= 9"),
    (lambda q, k, v, t: dict(bias_table=t, bias_grid=(3.0, 2)), ValueError, r"bias_grid must be a pair of ints"),
    (lambda q, k, v, t: dict(bias_table=t.half(), bias_grid=(3, 2)), TypeError, r"bias_table must have q's dtype"),
    (lambda q, k, v, t: dict(bias_table=t, bias_grid=(3, 2), dense_bias=torch.zeros(1, 4, 9)), ValueError,
     r"at most one bias"),
    (lambda q, k, v, t: dict(dense_bias=torch.zeros(3, 4, 9)), ValueError, r"dense_bias must have shape \(1 or H_max"),
    (lambda q, k, v, t: dict(dense_bias=torch.zeros(1, 2, 4, 9)), ValueError, r"\(B, H_max, Nq, Nk\) = \(2, 2, 4, 9\)"),
    (lambda q, k, v, t: dict(dense_bias=torch.zeros(1, 4, 9, device="meta")), ValueError,
     r"dense_bias must be on the same device as q"),
    (lambda q, k, v, t: dict(bias_table=t.to("meta"), bias_grid=(3, 2)), ValueError,
     r"bias_table must be on the same device as q"),
])
def test_bad_bias_arguments(mutate, exc, match):
    q, k, v, t = _ok()
    with pytest.raises(exc, match=match):
        rk.ragged_attention(q, k, v, **mutate(q, k, v, t))


@pytest.mark.parametrize("make,exc,match", [
    (lambda q, k, v: (q, k[:, :, :1], v), ValueError, r"same number of heads H_max"),
    (lambda q, k, v: (q, k, v[:1]), ValueError, r"same batch size"),
    (lambda q, k, v: (q, k[..., :4], v), ValueError, r"same head dim d_qk"),
    (lambda q, k, v: (q, k, v[:, :5]), ValueError, r"same number of keys Nk"),
    (lambda q, k, v: (q[0], k, v), ValueError, r"q must be 4-D"),
    (lambda q, k, v: (q, k.double(), v), TypeError, r"k must have q's dtype"),
    (lambda q, k, v: (q.int(), k, v), TypeError, r"q must have dtype in"),
    (lambda q, k, v: (q.transpose(2, 3), k, v), ValueError, r"unit stride on its last"),
    (lambda q, k, v: (q, k.to("meta"), v), ValueError, r"k must be on the same device as q"),
    (lambda q, k, v: ("q", k, v), TypeError, r"q must be a torch.Tensor"),
])
def test_bad_qkv(make, exc, match):
    q, k, v, _ = _ok()
    if match == r"unit stride on its last":
        q = torch.randn(2, 4, 8, 2).transpose(2, 3)  # (2, 4, 2, 8) with stride 2 on the head dim
        make = lambda q_, k_, v_: (q, k_, v_)  # noqa: E731
    with pytest.raises(exc, match=match):
        rk.ragged_attention(*make(q, k, v))


def test_bad_heads_and_scale():
    q, k, v, _ = _ok()
    with pytest.raises(ValueError, match=r"heads.widths\[1\]=3 exceeds the maximum width 2"):
        rk.ragged_attention(q, k, v, Ragged((1, 1), (2, 3)))
    with pytest.raises(ValueError, match=r"sum of group sizes \(3"):
        rk.ragged_attention(q, k, v, Ragged((1, 2), (2, 2)))
    with pytest.raises(TypeError, match=r"groups must be a resnas_kernels.Ragged"):
        rk.ragged_attention(q, k, v, (2,))
    with pytest.raises(ValueError, match=r"scale must be a finite float"):
        rk.ragged_attention(q, k, v, scale=float("nan"))


def test_cpp_op_checks_its_arguments():
    """Direct callers of the C++ ops (bypassing the Python checks) get the public function's errors, and a bad index
    is caught before any table read."""
    _require("cpu")
    q, k, v, t = _ok()
    two = torch.tensor([2], dtype=torch.int32)
    for op in (torch.ops.resnas.ext_ragged_attention_fwd, torch.ops.resnas.ragged_attention):
        with pytest.raises(ValueError, match=r"bias_index values must lie in \[0, T\) = \[0, 9\)"):
            op(q, k, v, t, torch.full((4, 9), 9, dtype=torch.int32), None, [2], two, 1.0, [])
        with pytest.raises(ValueError, match=r"bias_index values must lie in \[0, T\)"):
            op(q, k, v, t, torch.full((4, 9), 2 ** 32 + 1, dtype=torch.long), None, [2], two, 1.0, [])
        with pytest.raises(ValueError, match=r"widths\[0\]=3 must lie in \[0, 2\] \(the bound of q \(dim 2, H_max\)\)"):
            op(q, k, v, None, None, None, [2], torch.tensor([3], dtype=torch.int32), 1.0, [])
        with pytest.raises(ValueError, match=r"bias_grid=\(3, 1\) means Nk = R\^2 = 9 keys and Nq = .* = 9"):
            op(q, k, v, t, None, None, [2], two, 1.0, [3, 1])
        with pytest.raises(ValueError, match=r"dense_bias must have shape"):
            op(q, k, v, None, None, torch.zeros(3, 2, 4, 9), [2], two, 1.0, [])
        with pytest.raises(ValueError, match=r"sum of group sizes \(3, sizes=\(1, 2\)\) must equal the batch size"):
            op(q, k, v, None, None, None, [1, 2], torch.tensor([2, 2], dtype=torch.int32), 1.0, [])
        with pytest.raises(TypeError, match=r"bias_table must have q's dtype \(torch.float32\) or float32"):
            op(q, k, v, t.double(), None, None, [2], two, 1.0, [3, 2])


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
def test_bad_heads_tensor(backend):
    """A heads tensor of the wrong dtype, length or device, or with values outside [0, H_max] (readable on the host
    for CPU tensors), gets a named error on every backend, through the public function and the ops."""
    _require(backend)
    q, k, v, _ = _ok()  # B = 2, H_max = 2
    with rk.use_backend(backend):
        with pytest.raises(ValueError, match=r"widths\[1\]=3 must lie in \[0, 2\]"):
            rk.ragged_attention(q, k, v, Ragged((1, 1), torch.tensor([2, 3], dtype=torch.int32)))
        with pytest.raises(ValueError, match=r"widths\[0\]=-1 must lie in \[0, 2\]"):
            rk.ragged_attention(q, k, v, Ragged((1, 1), torch.tensor([-1, 2], dtype=torch.int32)))
        with pytest.raises(ValueError, match=r"widths must be on the same device as q"):
            rk.ragged_attention(q, k, v, Ragged((1, 1), torch.tensor([2, 2], dtype=torch.int32, device="meta")))
        with pytest.raises(ValueError, match=r"sum of group sizes \(3"):
            rk.ragged_attention(q, k, v, Ragged((1, 2), torch.tensor([2, 2], dtype=torch.int32)))
    # dtype and length: refused when the metadata is built, and by the ops themselves
    with pytest.raises(TypeError, match=r"widths must be an int32 tensor"):
        Ragged((1, 1), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match=r"widths must have one entry per group"):
        Ragged((1, 1), torch.tensor([2, 2, 2], dtype=torch.int32))
    ops = [torch.ops.resnas.ragged_attention_fwd]
    if backend == "cpu":
        ops += [torch.ops.resnas.ragged_attention, torch.ops.resnas.ext_ragged_attention_fwd]
    with rk.use_backend(backend):
        for op in ops:
            with pytest.raises(TypeError, match=r"widths must be an int32 tensor"):
                op(q, k, v, None, None, None, [1, 1], torch.tensor([2, 2]), 1.0, [])
            with pytest.raises(ValueError, match=r"widths must have (shape \(2,\)|one entry per group)"):
                op(q, k, v, None, None, None, [1, 1], torch.tensor([2, 2, 2], dtype=torch.int32), 1.0, [])
            with pytest.raises(ValueError, match=r"widths\[1\]=5 must lie in \[0, 2\]"):
                op(q, k, v, None, None, None, [1, 1], torch.tensor([1, 5], dtype=torch.int32), 1.0, [])


# ---------------------------------------------------------------------------------------------------------------------
# GPU tier (skipped without CUDA): Triton and CUDA C++ in fp32 / bf16 / fp16 at the real shapes
# ---------------------------------------------------------------------------------------------------------------------
GPU_CASES = [  # (Nq, Nk, d, dv, H, sizes, widths, bias kind, grid)
    (196, 196, 16, 32, 4, (3, 2), (4, 2), "grid", (14, 1)),
    (49, 196, 16, 64, 8, (2, 2), (8, 3), "grid", (14, 2)),
    (16, 49, 32, 64, 12, (3, 1), (12, 5), "index", (7, 2)),
    (257, 257, 64, 64, 3, (2, 0, 1), (3, 2, 1), "none", None),
    (65, 65, 48, 48, 4, (1, 2), (4, 2), "dense_h", None),
    (17, 17, 32, 32, 6, (2, 1), (6, 0), "dense_b", None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}x{c[1]}-d{c[2]}v{c[3]}-{c[7]}")
def test_gpu(backend, dtype, case):
    _require(backend)
    nq, nk, d, dv, h, sizes, widths, kind, grid = case
    heads = Ragged(sizes, widths)
    q, k, v = _qkv(heads.batch, nq, nk, h, d, dv, dtype, "cuda")
    kw = _bias(kind, heads.batch, nq, nk, h, torch.float32, "cuda", grid)
    # The cuda backend runs the CUDA C++ forward and the Triton backward.
    _check_against_oracle(backend, q, k, v, heads, kw)


# ---------------------------------------------------------------------------------------------------------------------
# Half precision in Triton (interpreter): fp16 only. The Triton 3.8 interpreter computes tl.dot on bf16 operands wrongly
# (errors ~1e10 on a plain 16x16 bf16 dot, unrelated to this kernel), so bf16 runs in the GPU tier (test_gpu) only.
# ---------------------------------------------------------------------------------------------------------------------
TRITON_HALF = [  # (Nq, Nk, d, dv, H, sizes, widths, bias kind, grid)
    (16, 49, 16, 32, 2, (2, 1), (2, 1), "grid", (7, 2)),     # small-N kernel
    (33, 33, 16, 16, 2, (1, 1), (2, 1), "dense_h", None),    # tiled kernel (3 key tiles)
]


@pytest.mark.parametrize("case", TRITON_HALF, ids=lambda c: f"{c[0]}x{c[1]}-{c[7]}")
def test_triton_interpreter_fp16(case):
    """fp16 Triton: P and dS are rounded to fp16 for the dots (fp32 accumulation), as FlashAttention and SDPA's fused
    kernels do. Held to the oracle rule, and the output also to 2x the error of torch SDPA in fp16 on the same
    input (with the gathered bias as attn_mask): at least as accurate as SDPA."""
    nq, nk, d, dv, h, sizes, widths, kind, grid = case
    heads = Ragged(sizes, widths)
    dtype = torch.float16
    q, k, v = _qkv(heads.batch, nq, nk, h, d, dv, dtype, "cpu")
    kw = _bias(kind, heads.batch, nq, nk, h, dtype, "cpu", grid)
    out, _ = _check_against_oracle("triton", q, k, v, heads, kw)
    oracle = ref.ragged_attention(q.double(), k.double(), v.double(), heads, **_as(kw, torch.float64))
    bias = kw["dense_bias"] if "dense_bias" in kw else kw["bias_table"][:, rk.levit_bias_index(*grid)]
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            attn_mask=bias.to(dtype)).transpose(1, 2)
    mask = heads.mask(h, device="cpu")[:, None, :, None]  # inactive heads are zero in ours and the oracle
    sdpa = (sdpa * mask).reshape(out.shape)
    assert_close_to_oracle(out, oracle, sdpa, "triton-fp16-vs-sdpa:out")


# ---------------------------------------------------------------------------------------------------------------------
# Auto dispatch between the CUDA C++ and Triton forwards (the picker's own logic: tests/test_attention_auto_pick.py)
# ---------------------------------------------------------------------------------------------------------------------
def test_auto_pick_stays_off_the_cpu_path(monkeypatch):
    """On CPU tensors the forward runs the C++ kernel directly: the picker is never consulted."""
    _require("cpu")
    mod = importlib.import_module("resnas_kernels.ops.ragged_attention")
    monkeypatch.setattr(mod.FWD_PICKER, "pick", lambda *a, **k: pytest.fail("picker used on CPU"))
    q, k, v = _qkv(2, 16, 16, 2, 16, 16, torch.float32, "cpu")
    rk.ragged_attention(q, k, v)


def test_cpp_op_matches_the_python_custom_op():
    """The cpu backend's one-hop C++ op (with its C++ autograd) gives the same bits, forward and backward, as the
    Python custom op running the same kernels."""
    _require("cpu")
    sizes, widths = [2, 1], torch.tensor([3, 1], dtype=torch.int32)
    q, k, v = _qkv(3, 16, 49, 3, 16, 32, torch.float32, "cpu")
    table = torch.randn(3, 49)
    dout = torch.randn(3, 16, 3 * 32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, table)]
    with torch.inference_mode():  # inference tensors skip the Autograd key: the CompositeExplicitAutograd kernel
        fast = torch.ops.resnas.ragged_attention(q, k, v, table, None, None, sizes, widths, 0.25, [7, 2])
    out = torch.ops.resnas.ragged_attention(*leaves, None, None, sizes, widths, 0.25, [7, 2])
    grads = torch.autograd.grad(out, leaves, dout)
    with rk.use_backend("cpu"):
        slow, lse = torch.ops.resnas.ragged_attention_fwd(q, k, v, table, None, None, sizes, widths, 0.25, [7, 2])
        ref_grads = torch.ops.resnas.ragged_attention_bwd(dout, q, k, v, slow, lse, table, None, None, sizes, widths,
                                                          0.25, [7, 2], True, False)
    assert torch.equal(fast, slow) and torch.equal(out, slow)
    for a, b in zip(grads, ref_grads[:4]):
        assert torch.equal(a, b)
    # only the gradients asked for are computed: no table gradient without the table among the inputs
    g_q, = torch.autograd.grad(torch.ops.resnas.ragged_attention(*leaves, None, None, sizes, widths, 0.25, [7, 2]),
                               leaves[:1], dout)
    assert torch.equal(g_q, ref_grads[0])


# ---------------------------------------------------------------------------------------------------------------------
# Heads as device metadata (an int32 tensor): every backend against the reference, kernels clamp, compile once
# ---------------------------------------------------------------------------------------------------------------------
DEVICE_HEADS = [  # (Nq, Nk, d, dv, H, sizes, widths, bias kind, grid)
    (17, 17, 16, 32, 3, (1, 0, 2), (3, 2, 1), "index", None),     # d_v != d_qk, an empty group, one-sample group
    (16, 49, 48, 16, 2, (2, 1), (2, 0), "grid", (7, 2)),          # LeViT shrink 49 -> 16, a 0-head group, d 48
    (49, 49, 32, 32, 2, (1, 2), (1, 2), "grid", (7, 1)),          # N = 49, table via the grid (tiled on Triton)
    (17, 17, 32, 16, 2, (3,), (1,), "dense_b", None),             # one group
]


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
@pytest.mark.parametrize("case", DEVICE_HEADS, ids=lambda c: f"{c[0]}x{c[1]}-d{c[2]}v{c[3]}-{c[7]}")
def test_device_heads_against_reference(backend, case):
    _require(backend)
    nq, nk, d, dv, h, sizes, widths, kind, grid = case
    heads = Ragged(sizes, widths)
    q, k, v = _qkv(heads.batch, nq, nk, h, d, dv, torch.float32, "cpu")
    _check_against_oracle(backend, q, k, v, heads, _bias(kind, heads.batch, nq, nk, h, torch.float32, "cpu", grid),
                          device_heads=True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_kernels_clamp_head_counts(backend):
    """Widths outside [0, H_max] (possible on CUDA, where values are not read on the host) act as clamped: the
    launchers' output equals the one for the clamped widths, and nothing outside the tensors is touched."""
    mod = importlib.import_module("resnas_kernels.ops.ragged_attention")
    fwd, bwd = {"reference": (mod._reference_fwd, mod._reference_bwd), "triton": (mod._triton_fwd, mod._triton_bwd)}[
        backend]
    sizes = [1, 2, 1]
    q, k, v = _qkv(4, 17, 17, 2, 16, 16, torch.float32, "cpu")
    dense = torch.randn(2, 17, 17)
    dout = torch.randn(4, 17, 2 * 16)
    bad, clamped = (torch.tensor(w, dtype=torch.int32) for w in ([7, -3, 1], [2, 0, 1]))
    results = []
    for widths in (bad, clamped):
        out, lse = fwd(q, k, v, None, None, dense, sizes, widths, 0.25, [])
        results.append((out, lse, *bwd(dout, q, k, v, out, lse, None, None, dense, sizes, widths, 0.25, [], False,
                                       True)))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert results[0][0].abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compile_once_for_new_heads_tensors(backend):
    """torch.compile(fullgraph=True) of the op: 3 heads tensors of one shape (new architectures) run one compiled
    graph (forward and backward), with outputs and gradients equal to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    _require(backend)
    torch._dynamo.reset()
    sizes = (2, 1, 1)
    q, k, v = _qkv(4, 16, 49, 2, 16, 32, torch.float32, "cpu")
    table = torch.randn(2, 49)
    dout = torch.randn(4, 16, 2 * 32)

    def fn(q, k, v, table, widths):
        return rk.ragged_attention(q, k, v, Ragged(sizes, widths), bias_table=table, bias_grid=(7, 2))

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    with rk.use_backend(backend):
        for widths in ([2, 1, 0], [1, 2, 2], [0, 0, 1]):
            w = torch.tensor(widths, dtype=torch.int32)
            results = []
            for f in (compiled, fn):
                leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, table)]
                out = f(*leaves, w)
                results.append((out, *torch.autograd.grad(out, leaves, dout)))
            for name, a, b in zip(("out", "dq", "dk", "dv", "dtable"), *results):
                assert torch.equal(a, b), f"{backend} {widths}: {name} differs from eager"
    assert counter.frame_count == 1, f"{backend}: {counter.frame_count} compilations for 3 heads tensors"
