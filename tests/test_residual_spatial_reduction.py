"""The composite `residual_spatial_reduction` and its `FusedResidualSpatialReduction` module against a reference built
from stock modules (tests/_rsr_helpers.py), forward and backward. Tolerances follow tests/_oracle.py: the kernel's
error against the fp64 oracle may be at most 2x (outputs) or 3x (gradients) the error of the same stock chain
evaluated in the kernel's dtype, plus 8 ulps of the output's magnitude.

Backends: reference (the spec), cpu (C++ LN, blocked implicit-GEMM conv, cls ragged GEMM, epilogue), triton
(interpreter on CPU, small shapes: LN, im2col, ragged GEMM, epilogue), and, on a GPU machine only (gpu marker), triton
and the CUDA C++ epilogue / im2col. The pieces are tested one by one in test_rsr_im2col.py, test_rsr_conv.py and
test_rsr_epilogue.py; their Triton kernels compile ahead of time in test_aot_compile.py.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import resnas_kernels as rk
from resnas_kernels import Ragged, _ext
from resnas_kernels.layers import FusedResidualSpatialReduction
from resnas_kernels.ops.residual_spatial_reduction import _fused
from resnas_kernels.ops.rsr_conv import rsr_conv_fwd
from resnas_kernels.ops.rsr_im2col import rsr_im2col_fwd

from _oracle import assert_close_to_oracle
from _rsr_helpers import PARAMS, _check_against_stock, _fused_call, _make, _require, _run, _stock_call, _wt


# ---------------------------------------------------------------------------------------------------------------------
# The whole op against stock modules
# ---------------------------------------------------------------------------------------------------------------------
# Ragged on purpose: an empty group, a width-0 group, a one-sample group, c_out = c_in, widths not powers of two.
RAGGED = dict(sizes=(2, 0, 1, 3, 1), ci_w=(12, 7, 8, 5, 0), co_w=(20, 9, 8, 16, 0), ci_max=12, co_max=24)
GRIDS = [(16, 16), (8, 8), (4, 4), (14, 14), (7, 7), (5, 8)]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("has_cls", [True, False], ids=["cls", "nocls"])
def test_matches_stock_modules_fp32(backend, grid, has_cls):
    _require(backend)
    g, co_w, x, params, dy = _make(**RAGGED, grid=grid, has_cls=has_cls, seed=hash((grid, has_cls)) % 1000)
    _check_against_stock(backend, g, co_w, x, params, dy, grid, has_cls)


TRITON_CASES = [((4, 4), True), ((7, 7), False), ((8, 8), True)]


@pytest.mark.parametrize("grid,has_cls", TRITON_CASES, ids=lambda v: str(v))
def test_triton_matches_stock_modules_fp32(grid, has_cls):
    """Every piece on Triton (LN, im2col, ragged GEMM, epilogue); the interpreter on CPU, so small shapes."""
    g, co_w, x, params, dy = _make((1, 0, 2, 1), (6, 0, 4, 0), (10, 0, 4, 0), 6, 10, grid, has_cls, seed=7)
    _check_against_stock("triton", g, co_w, x, params, dy, grid, has_cls)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("grid", [(16, 16), (7, 7)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_gpu_matches_stock_modules(backend, grid):
    g, co_w, x, params, dy = _make(**RAGGED, grid=grid, has_cls=True, device="cuda")
    _check_against_stock(backend, g, co_w, x, params, dy, grid, True)


@pytest.mark.parametrize("backend,k,s,p", [("cpu", 5, 2, 2), ("cpu", 3, 3, 1), ("cpu", 3, 1, 1), ("cpu", 1, 1, 0),
                                            ("triton", 5, 2, 2), ("triton", 3, 3, 1)])
def test_other_conv_geometries(backend, k, s, p):
    """kernel_size / stride / padding are parameters: any odd k with p = (k - 1) // 2 and pooling by the stride."""
    _require(backend)
    grid = (7, 6) if backend == "cpu" else (5, 4)
    g, co_w, x, params, dy = _make((2, 1), (6, 4), (8, 4), 6, 8, grid, True, k=k, s=s, p=p, seed=k * 10 + s)
    _check_against_stock(backend, g, co_w, x, params, dy, grid, True, k, s, p)


def test_fused_chain_on_reference_sub_ops_matches_stock_modules():
    """The fused composition with every sub-op on its reference backend: validates the sub-ops' references too."""
    grid = (7, 7)
    g, co_w, x, params, dy = _make(**RAGGED, grid=grid, has_cls=True, seed=3)

    def fn(x, prm):
        return _fused(x, g, g.with_widths(co_w), *(prm[n] for n in PARAMS[:5]), prm["cls_weight"], prm["cls_bias"],
                      grid, True, 1e-6, 3, 2, 1)

    _check_against_stock("reference", g, co_w, x, params, dy, grid, True, fn=fn)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("param_dtype", ["same", "fp32"])
def test_half_precision_cpu(dtype, param_dtype):
    """Half-precision activations; parameters in x's dtype, or fp32 master weights (gradients keep their dtypes).
    The same-dtype comparator is the stock chain with activations and parameters in `dtype`."""
    _require("cpu")
    grid = (8, 8)
    g, co_w, x, params, dy = _make(**RAGGED, grid=grid, has_cls=True, dtype=dtype, seed=11)
    fused_params = params if param_dtype == "same" else {n: t.float() for n, t in params.items()}
    with rk.use_backend("cpu"):
        out, grads = _run(_fused_call(g, co_w, grid, True), x, fused_params, dy)
    stock = _stock_call(g, co_w, grid, True)
    oracle_out, oracle_grads = _run(stock, x.double(), {n: t.double() for n, t in fused_params.items()}, dy)
    same_out, same_grads = _run(stock, x, params, dy)
    assert out.dtype == dtype
    assert_close_to_oracle(out, oracle_out, same_out, "out")
    for name, a, o, sm in zip(("dx",) + PARAMS, grads, oracle_grads, same_grads):
        assert a.dtype == (dtype if name == "dx" else fused_params[name].dtype)
        assert_close_to_oracle(a.to(dtype), o, sm, f"d{name}", factor=3.0)


@pytest.mark.parametrize("grid,has_cls", [((4, 4), True), ((3, 5), False)], ids=["4x4-cls", "3x5-nocls"])
def test_fp64_gradcheck_cpu(grid, has_cls):
    """fp64 gradcheck of the whole C++ chain (fast mode: random projections of the Jacobian, ~350 inputs)."""
    _require("cpu")
    g, co_w, x, params, _ = _make((1, 0, 2), (3, 0, 2), (5, 0, 4), 3, 5, grid, has_cls, dtype=torch.float64)
    mask = g.mask(3, dtype=torch.float64)[:, None]
    names = PARAMS if has_cls else PARAMS[:5]

    def fn(x, *prm):
        kw = dict(zip(names, prm))
        # x * mask: gradcheck's perturbations must keep the input inside the ragged contract.
        return rk.residual_spatial_reduction(x * mask, g, co_w, **kw, grid=grid, has_cls=has_cls)

    with rk.use_backend("cpu"):
        assert torch.autograd.gradcheck(fn, (x.requires_grad_(), *(params[n].requires_grad_() for n in names)),
                                        fast_mode=True)


@pytest.mark.parametrize("backend", ["cpu", "triton", pytest.param("auto-cuda", marks=pytest.mark.gpu)])
def test_gradients_are_deterministic(backend):
    """Bitwise-equal outputs and gradients over two runs. On CPU also across thread counts (1 vs 2) for the gradients
    our own kernels reduce over the batch (pos_embed, conv_bias, cls_bias): conv_weight / cls_weight / x gradients
    come from ragged_linear's BLAS calls, which MKL / oneDNN keep reproducible run to run but not across thread
    counts (ragged_linear's documented caveat)."""
    _require("cpu" if backend == "cpu" else "triton")
    device = "cuda" if backend == "auto-cuda" else "cpu"
    grid = (4, 4) if backend == "triton" else (8, 8)
    g, co_w, x, params, dy = _make((2, 1), (6, 4), (10, 6), 6, 10, grid, True, device=device)
    fn = _fused_call(g, co_w, grid, True)
    threads_before = torch.get_num_threads()
    runs = {}
    try:
        for key, threads in (("a", None), ("b", None)) + ((("one", 1), ("two", 2)) if backend == "cpu" else ()):
            if threads:
                torch.set_num_threads(threads)
            with rk.use_backend("auto" if backend == "auto-cuda" else backend):
                runs[key] = _run(fn, x, params, dy)
    finally:
        torch.set_num_threads(threads_before)
    assert torch.equal(runs["a"][0], runs["b"][0])
    for name, a, b in zip(("dx",) + PARAMS, runs["a"][1], runs["b"][1]):
        assert torch.equal(a, b), f"d{name} differs bitwise between two runs"
    if backend == "cpu":
        for name in ("pos_embed", "conv_bias", "cls_bias"):
            i = 1 + PARAMS.index(name)
            assert torch.equal(runs["one"][1][i], runs["two"][1][i]), f"d{name} depends on the thread count"


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_property_random_groups_cpu(data):
    """Random partitions (incl. empty groups and width-0 groups), widths and grids vs the fp64 stock oracle."""
    _require("cpu")
    num_groups = data.draw(st.integers(1, 4))
    ci_max = data.draw(st.integers(1, 10))
    co_max = data.draw(st.integers(ci_max, 14))
    sizes = list(data.draw(st.lists(st.integers(0, 2), min_size=num_groups, max_size=num_groups)))
    if sum(sizes) == 0:
        sizes[-1] = 1
    ci_w = data.draw(st.lists(st.integers(0, ci_max), min_size=num_groups, max_size=num_groups))
    co_w = [0 if ci == 0 else data.draw(st.integers(ci, co_max)) for ci in ci_w]
    grid = (data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9)))
    has_cls = data.draw(st.booleans())
    g, co_w, x, params, dy = _make(tuple(sizes), tuple(ci_w), tuple(co_w), ci_max, co_max, grid, has_cls,
                                   seed=data.draw(st.integers(0, 10_000)))
    _check_against_stock("cpu", g, co_w, x, params, dy, grid, has_cls, rounding_samples=4)


# ---------------------------------------------------------------------------------------------------------------------
# Widths as data: int32 tensors (device metadata) through every backend, and one compiled graph for every architecture
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("grid,has_cls", [((5, 5), True), ((4, 3), False)], ids=["5x5-cls", "4x3-nocls"])
@pytest.mark.parametrize("out_as", ["tensor", "ragged"])
def test_device_widths_match_stock_modules(backend, grid, has_cls, out_as):
    """Ragged(sizes, int32 tensor) and out_widths as a tensor (or a Ragged of one) through the public op, forward and
    backward, against the stock modules on host widths: odd grids, an empty group, a width-0 group, co = ci."""
    _require(backend)
    g, co_w, x, params, dy = _make((2, 0, 1, 1), (6, 3, 4, 0), (9, 5, 4, 0), 6, 10, grid, has_cls,
                                   seed=17 + grid[1])
    dev_groups = Ragged(g.sizes, _wt(g.widths))
    dev_out = _wt(co_w) if out_as == "tensor" else dev_groups.with_widths(_wt(co_w))
    _check_against_stock(backend, g, co_w, x, params, dy, grid, has_cls,
                         fn=_fused_call(dev_groups, dev_out, grid, has_cls))


def test_device_widths_layer():
    """The module with device widths derives its default out_widths on the device (no host value)."""
    _require("cpu")
    torch.manual_seed(0)
    m = FusedResidualSpatialReduction(6, 10, grid=(4, 4), has_cls=True)
    g = Ragged((2, 1), (6, 0))
    x = torch.randn(3, 17, 6) * g.mask(6)[:, None]
    with rk.use_backend("cpu"):
        expected = m(x, g)
        got = m(x, Ragged(g.sizes, _wt(g.widths)))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_widths_tensor_errors():
    """Bad widths tensors get a clear error naming the argument: dtype, length, device, values above the bound or
    against the shortcut rule (CPU tensors: their values are free to read)."""
    _require("cpu")
    grid = (4, 4)
    g, co_w, x, params, _ = _make((1, 1), (6, 4), (8, 4), 6, 10, grid, True)
    sizes = g.sizes

    def call(in_w, out_w):
        with rk.use_backend("cpu"):
            return rk.residual_spatial_reduction(x, Ragged(sizes, in_w) if isinstance(in_w, torch.Tensor) else in_w,
                                                 out_w, **params, grid=grid)

    with pytest.raises(TypeError, match="widths must be an int32 tensor"):
        call(_wt(g.widths).long(), _wt(co_w))
    with pytest.raises(TypeError, match="widths must be an int32 tensor"):
        call(_wt(g.widths), _wt(co_w).long())
    with pytest.raises(ValueError, match=r"widths must have one entry per group: len\(sizes\)=2"):
        call(_wt((6, 4, 4)), _wt(co_w))
    with pytest.raises(ValueError, match=r"widths must have one entry per group"):
        call(_wt(g.widths), _wt((8, 4, 4)))
    with pytest.raises(ValueError, match="in_groups.widths must be on the same device as x"):
        call(_wt(g.widths).to("meta"), _wt(co_w))
    with pytest.raises(ValueError, match="out_widths must be on the same device as"):
        call(_wt(g.widths), _wt(co_w).to("meta"))
    with pytest.raises(ValueError, match=r"in_groups.widths\[1\]=7 must lie in \[0, 6\]"):
        call(_wt((6, 7)), _wt((8, 8)))
    with pytest.raises(ValueError, match=r"out_widths\[0\]=11 must lie in \[0, 10\]"):
        call(_wt(g.widths), _wt((11, 4)))
    with pytest.raises(ValueError, match=r"out_widths\[1\]=3 must be >= in_groups.widths\[1\]=4"):
        call(_wt(g.widths), _wt((8, 3)))
    with pytest.raises(ValueError, match=r"in_groups.widths\[1\] is 0 but out_widths\[1\]=4"):
        call(_wt((6, 0)), _wt((8, 4)))
    # the custom ops check too (direct torch.ops calls)
    u = torch.zeros(2, 17, 6)
    with pytest.raises(ValueError, match=r"widths\[0\]=7 must lie in \[0, 6\] \(the bound of u\)"):
        rsr_im2col_fwd(u, [1, 1], _wt((7, 1)), [4, 4], 3, 2, 1, True)
    with pytest.raises(TypeError, match="widths must be an int32 tensor"):
        rsr_im2col_fwd(u, [1, 1], _wt((6, 1)).short(), [4, 4], 3, 2, 1, True)
    with pytest.raises(ValueError, match="widths must have one entry per group"):
        rsr_conv_fwd(u, torch.zeros(10, 54), [1, 1], _wt((6,)), _wt((8, 4)), [4, 4], 3, 2, 1, True)


def test_cpu_path_is_one_cxx_op_per_piece():
    """On the C++ backend each piece is one C++-registered op (autograd in C++): the Python custom ops never run."""
    _require("cpu")
    from torch.profiler import profile

    g, co_w, x, params, dy = _make((2, 1), (6, 4), (8, 4), 6, 10, (4, 4), True)
    with rk.use_backend("cpu"), profile() as prof:
        out, _ = _run(_fused_call(Ragged(g.sizes, _wt(g.widths)), _wt(co_w), (4, 4), True), x, params, dy)
    names = {e.key for e in prof.key_averages()}
    assert {"resnas::rsr_conv", "resnas::rsr_epilogue", "resnas::ext_rsr_conv_bwd",
            "resnas::ext_rsr_epilogue_bwd"} <= names, sorted(n for n in names if "resnas" in n)
    assert not names & {"resnas::rsr_conv_fwd", "resnas::rsr_conv_bwd", "resnas::rsr_epilogue_fwd",
                        "resnas::rsr_epilogue_bwd"}


def _compile_case(seed):
    """Three architectures over the same group sizes (incl. a width-0 group and co = ci), one input each."""
    archs = [((6, 4, 5), (10, 4, 8)), ((3, 6, 0), (3, 10, 0)), ((5, 2, 6), (9, 7, 6))]
    sizes, grid = (2, 1, 1), (5, 4)
    _, _, x, params, dy = _make(sizes, archs[0][0], archs[0][1], 6, 10, grid, True, seed=seed)
    return sizes, grid, archs, x, params, dy


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compiles_once_for_every_architecture(backend):
    """torch.compile(fullgraph=True) of forward + backward: new widths tensors are new values, not new constants, so
    three architectures run through one compiled graph, each equal to eager."""
    _require(backend)
    from torch._dynamo.testing import CompileCounterWithBackend

    sizes, grid, archs, x, params, dy = _compile_case(seed=23)

    def forward(x, in_w, out_w, *prm):
        return rk.residual_spatial_reduction(x, Ragged(sizes, in_w), out_w, *prm, grid=grid, has_cls=True)

    def run(fn, xi, in_w, out_w):
        leaves = [xi.detach().clone().requires_grad_()] + [params[n].detach().clone().requires_grad_()
                                                           for n in PARAMS]
        out = fn(leaves[0], in_w, out_w, *leaves[1:])
        (out * dy.to(out.dtype)).sum().backward()
        return out.detach(), [t.grad for t in leaves]

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(forward, fullgraph=True, backend=counter)
    with rk.use_backend(backend):
        for ci, co in archs:
            xi = x * Ragged(sizes, ci).mask(6)[:, None]
            eager_out, eager_grads = run(forward, xi, _wt(ci), _wt(co))
            out, grads = run(compiled, xi, _wt(ci), _wt(co))
            torch.testing.assert_close(out, eager_out, rtol=1e-6, atol=1e-6)
            for name, a, b in zip(("x",) + PARAMS, grads, eager_grads):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"d{name}: {m}")
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for {len(archs)} architectures"


# ---------------------------------------------------------------------------------------------------------------------
# The drop-in module
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("has_cls", [True, False], ids=["cls", "nocls"])
def test_module_full_width_equals_its_own_stock_modules(has_cls):
    """groups=None: the module equals running its own ln / conv / AvgPool2d / cls Linear as stock modules."""
    _require("cpu")
    torch.manual_seed(0)
    m = FusedResidualSpatialReduction(8, 12, grid=(7, 7), has_cls=has_cls)
    expected_keys = {"ln.weight", "ln.bias", "conv.weight", "conv.bias", "pos_embed"}
    expected_keys |= {"cls.weight", "cls.bias"} if has_cls else set()
    assert set(m.state_dict()) == expected_keys
    assert isinstance(m.conv, nn.Conv2d) and m.conv.weight.shape == (12, 8, 3, 3) and m.pos_embed.shape == (1, 16, 12)
    x = torch.randn(3, int(has_cls) + 49, 8)
    with torch.no_grad():
        u = m.ln(x)
        img = u[:, int(has_cls):].transpose(1, 2).reshape(3, 8, 7, 7)
        raw = x[:, int(has_cls):].transpose(1, 2).reshape(3, 8, 7, 7)
        short = nn.AvgPool2d(2, 2, ceil_mode=True)(raw).flatten(2).transpose(1, 2)
        y = m.conv(img).flatten(2).transpose(1, 2) + m.pos_embed + torch.cat([short, short.new_zeros(3, 16, 4)], -1)
        if has_cls:
            y = torch.cat([m.cls(u[:, :1]) + torch.cat([x[:, :1], x.new_zeros(3, 1, 4)], -1), y], dim=1)
        for backend in ("reference", "cpu"):
            with rk.use_backend(backend):
                torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)


def test_module_ragged_forward_backward_matches_functional():
    _require("cpu")
    torch.manual_seed(1)
    m = FusedResidualSpatialReduction(8, 12, grid=(8, 8))
    g = Ragged((2, 1, 1), (8, 5, 0))
    x = torch.randn(4, 65, 8) * g.mask(8)[:, None]
    y = m(x, g)  # out_widths default: 12 for groups with input, 0 for the width-0 group
    assert y.shape == (4, 17, 12) and (y[3] == 0).all()
    expected = rk.reference.residual_spatial_reduction(x, g, (12, 12, 0), m.ln.weight, m.ln.bias, m.conv.weight,
                                                       m.conv.bias, m.pos_embed, m.cls.weight, m.cls.bias, grid=(8, 8))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_torch_compile_traces_without_graph_breaks():
    _require("cpu")
    torch.manual_seed(2)
    m = FusedResidualSpatialReduction(6, 8, grid=(4, 4))
    g = Ragged((1, 2), (6, 4))
    x = torch.randn(3, 17, 6) * g.mask(6)[:, None]
    compiled = torch.compile(lambda x: m(x, g, (8, 5)) * 2, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, m(x, g, (8, 5)) * 2)
    assert all(p.grad is not None for p in m.parameters())


def test_old_layer_name_is_a_deprecated_alias():
    import resnas_kernels.layers as layers
    from resnas_kernels.models.vit_resnas.subnet import ResidualSpatialReduction as StockRSR

    with pytest.warns(DeprecationWarning, match="FusedResidualSpatialReduction"):
        assert layers.ResidualSpatialReduction is FusedResidualSpatialReduction
    assert StockRSR is not FusedResidualSpatialReduction  # the sub-network's stock module is a different class
    with pytest.raises(AttributeError, match="no_such_layer"):
        layers.no_such_layer

# ---------------------------------------------------------------------------------------------------------------------
# Build artefacts: the compiled CUDA C++
# ---------------------------------------------------------------------------------------------------------------------
def test_cuda_kernels_are_compiled_into_the_extension():
    _require("cpu")
    if not _ext.extension_has_cuda():
        pytest.skip("the extension was built without its CUDA sources (no nvcc here)")
    for name in ("ext_rsr_im2col_fwd", "ext_rsr_im2col_bwd", "ext_rsr_epilogue_fwd", "ext_rsr_epilogue_bwd"):
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnas::{name}", key), f"{name} lacks {key}"
    for name in ("ext_rsr_conv_fwd", "ext_rsr_conv_bwd"):  # the CPU conv path; CUDA uses im2col + ragged_linear
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnas::{name}", "CPU")


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------
class TestBadInput:
    def setup_method(self):
        self.g, _, self.x, self.p, _ = _make((1,), (8,), (8,), 8, 8, (8, 8), True)

    def call(self, x=None, groups=None, out_widths=(8,), **kw):
        p = dict(self.p)
        p.update({k: v for k, v in kw.items() if k in PARAMS})
        opts = {k: v for k, v in kw.items() if k not in PARAMS}
        opts.setdefault("grid", (8, 8))
        return rk.residual_spatial_reduction(self.x if x is None else x, groups or self.g, out_widths, **p, **opts)

    def test_c_out_below_c_in(self):
        with pytest.raises(ValueError, match=r"out_widths\[0\]=6 must be >= in_groups.widths\[0\]=8"):
            self.call(out_widths=(6,))

    def test_zero_input_width_with_output(self):
        with pytest.raises(ValueError, match=r"in_groups.widths\[0\] is 0 but out_widths\[0\]=4"):
            self.call(groups=Ragged((1,), (0,)), out_widths=(4,))

    def test_grid_not_matching_tokens(self):
        with pytest.raises(ValueError, match=r"x has 65 tokens but grid=\(7, 7\) with has_cls=True needs 50"):
            self.call(grid=(7, 7))
        with pytest.raises(ValueError, match=r"x has 65 tokens but grid=\(8, 8\) with has_cls=False needs 64"):
            self.call(has_cls=False)
        with pytest.raises(ValueError, match="grid must be a pair of positive ints"):
            self.call(grid=(8, 0))

    def test_output_width_beyond_conv(self):
        with pytest.raises(ValueError, match=r"out_widths\[0\]=9 exceeds the maximum width 8"):
            self.call(out_widths=(9,))

    def test_param_shapes(self):
        with pytest.raises(ValueError, match=r"pos_embed must have shape \(1, 16, 8\)"):
            self.call(pos_embed=torch.zeros(1, 17, 8))
        with pytest.raises(ValueError, match=r"conv_weight must have shape \(Co_max, 8, 3, 3\)"):
            self.call(conv_weight=torch.zeros(8, 7, 3, 3))
        with pytest.raises(ValueError, match=r"conv_weight must have shape \(Co_max, 8, 5, 5\)"):
            self.call(kernel_size=5, padding=2)
        with pytest.raises(ValueError, match="fewer than x's 8"):
            self.call(conv_weight=torch.zeros(6, 8, 3, 3))
        with pytest.raises(ValueError, match=r"ln_weight must have shape \(8,\)"):
            self.call(ln_weight=torch.ones(9))
        with pytest.raises(ValueError, match=r"cls_weight must have shape \(8, 8\)"):
            self.call(cls_weight=torch.zeros(8, 7))
        with pytest.raises(ValueError, match="cls_weight and cls_bias are required"):
            self.call(cls_bias=None)

    def test_geometry(self):
        with pytest.raises(ValueError, match="by the conv but to"):
            self.call(padding=0)
        with pytest.raises(ValueError, match="stride must be an int >= 1"):
            self.call(stride=0)

    def test_dtypes_layout_device(self):
        with pytest.raises(TypeError, match="x must have dtype in"):
            self.call(x=self.x.int())
        with pytest.raises(ValueError, match="x must be contiguous"):
            self.call(x=torch.randn(1, 8, 65).transpose(1, 2))
        with pytest.raises(TypeError, match=r"conv_bias must have x's dtype \(torch.float32\) or float32"):
            self.call(conv_bias=self.p["conv_bias"].double())
        with pytest.raises(ValueError, match="pos_embed must be on the same device as x"):
            self.call(pos_embed=self.p["pos_embed"].to("meta"))
        with pytest.raises(ValueError, match="eps must be a positive float"):
            self.call(eps=0.0)

    def test_cxx_ops_name_the_bad_argument(self):
        _require("cpu")
        g, x = self.g, self.x
        w8, w9, w6 = _wt([8]), _wt([9]), _wt([6])
        with pytest.raises(RuntimeError, match="ext_rsr_im2col_fwd: u has 65 tokens but grid \\(7, 7\\)"):
            torch.ops.resnas.ext_rsr_im2col_fwd(x, [1], w8, [7, 7], 3, 2, 1, True)
        with pytest.raises(ValueError, match=r"ext_rsr_im2col_fwd: widths\[0\]=9 must lie in \[0, 8\]"):
            torch.ops.resnas.ext_rsr_im2col_fwd(x, [1], w9, [8, 8], 3, 2, 1, True)
        conv = torch.zeros(1, 16, 8)
        with pytest.raises(RuntimeError, match=r"ext_rsr_epilogue_fwd: pos_embed must have shape \[1, 16, 8\]"):
            torch.ops.resnas.ext_rsr_epilogue_fwd(conv, x, torch.zeros(1, 15, 8), torch.zeros(8), torch.zeros(1, 1, 8),
                                                  torch.zeros(8), [1], w8, w8, [8, 8], 2)
        with pytest.raises(RuntimeError, match=r"ext_rsr_epilogue_fwd: x has 65 tokens but grid \(8, 8\) with "
                                               r"has_cls=False needs 64"):
            torch.ops.resnas.ext_rsr_epilogue_fwd(conv, x, torch.zeros(1, 16, 8), torch.zeros(8), None, None, [1],
                                                  w8, w8, [8, 8], 2)
        with pytest.raises(ValueError, match=r"out_widths\[0\]=6 must be >= in_widths\[0\]=8"):
            torch.ops.resnas.ext_rsr_epilogue_fwd(conv, x[:, 1:].contiguous(), torch.zeros(1, 16, 8), torch.zeros(8),
                                                  None, None, [1], w8, w6, [8, 8], 2)
        with pytest.raises(RuntimeError, match="cls and cls_bias must be given together"):
            torch.ops.resnas.ext_rsr_epilogue_fwd(conv, x, torch.zeros(1, 16, 8), torch.zeros(8),
                                                  torch.zeros(1, 1, 8), None, [1], w8, w8, [8, 8], 2)
        with pytest.raises(RuntimeError, match=r"ext_rsr_conv_fwd: weight must be 2-D \(Co_max, C\*k\*k\) = "
                                               r"\(Co_max, 72\)"):
            torch.ops.resnas.ext_rsr_conv_fwd(x, torch.zeros(8, 71), [1], w8, w8, [8, 8], 3, 2, 1, True)
        with pytest.raises(RuntimeError, match=r"ext_rsr_conv_bwd: dout must have shape \(1, 16, 8\)"):
            torch.ops.resnas.ext_rsr_conv_bwd(torch.zeros(1, 17, 8), x, torch.zeros(8, 72), [1], w8, w8, [8, 8], 3,
                                              2, 1, True)
        with pytest.raises(RuntimeError, match="ext_rsr_epilogue_bwd: dout has 16 tokens"):
            torch.ops.resnas.ext_rsr_epilogue_bwd(conv, [1], w8, w8, [8, 8], 2, True, 8)
        # widths tensors: dtype and length (their values are read on CPU only, where that is free)
        with pytest.raises(TypeError, match=r"ext_rsr_im2col_fwd: widths must be an int32 tensor"):
            torch.ops.resnas.ext_rsr_im2col_fwd(x, [1], w8.long(), [8, 8], 3, 2, 1, True)
        with pytest.raises(ValueError, match=r"ext_rsr_conv_fwd: out_widths must have shape \(1,\)"):
            torch.ops.resnas.ext_rsr_conv_fwd(x, torch.zeros(8, 72), [1], w8, _wt([8, 8]), [8, 8], 3, 2, 1, True)
