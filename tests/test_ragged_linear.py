"""Ragged linear through every backend against the reference oracle, forward and backward.

Backends: reference (the op's explicit formulas), triton (interpreter on CPU at small shapes; real kernels on GPU),
cpu (C++). The C++ backend must be present unless the environment says the extension was deliberately not built
(RESNAS_EXPECT_EXT=0); an extension that loads but lacks this op is always a failure.

Tolerances: the shared oracle rule of tests/_oracle.py. The oracle is the reference in fp64; a kernel output in dtype D
passes if its max error is at most 2x (outputs) / 3x (gradients: one more accumulation) the error of the reference
run in D itself (PyTorch's F.linear / F.gelu in D), plus 8 ulps of D at the output's magnitude. So fp32 is held to
fp32 GEMM rounding and bf16/fp16 to half-precision rounding, scaled by the conditioning of each input; nothing is a
hand-picked atol. Exact-zero checks (beyond the widths) and determinism checks are bitwise.
"""
import functools
import importlib
import math
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import resnas_kernels as rk
from resnas_kernels import Ragged, _ext
from resnas_kernels import reference as ref
from resnas_kernels.ops.ragged_linear import ragged_linear_bwd, ragged_linear_fwd

from _backends import require_backend
from _oracle import assert_close_to_oracle

# The module (resnas_kernels.ops re-exports the function under the same name).
rl_mod = importlib.import_module("resnas_kernels.ops.ragged_linear")

EXT_OPS = ("ragged_linear", "ext_ragged_linear_fwd", "ext_ragged_linear_bwd")


def _require(backend: str):
    require_backend(backend, EXT_OPS)


# ---------------------------------------------------------------------------------------------------------------------
# Inputs and runs
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """One problem: groups (sizes, k_g, n_g), tokens per sample, K_max, segment width, segments."""
    sizes: Tuple[int, ...]
    k_widths: Tuple[int, ...]
    n_widths: Tuple[int, ...]
    tokens: int
    k_max: int
    seg_width: int
    segments: int = 1

    @property
    def n_max(self):
        return self.seg_width * self.segments

    def id(self):
        return (f"G{len(self.sizes)}-T{self.tokens}-K{self.k_max}-N{self.seg_width}"
                + (f"x{self.segments}" if self.segments > 1 else ""))


# Interpreter-sized (Triton under TRITON_INTERPRET=1 is slow): widths that are not multiples of 16, empty groups,
# one-sample groups, width 0 on either side, rows 17..65 per group.
SMALL = [
    Spec((2, 0, 3, 1), (20, 33, 0, 44), (24, 7, 5, 0), 17, 44, 24),
    Spec((1,), (33,), (20,), 17, 33, 20),
    Spec((3, 1), (44, 20), (88, 33), 5, 44, 88),
    Spec((1, 1, 1, 1), (1, 2, 3, 33), (33, 1, 0, 2), 13, 33, 33),
    Spec((2, 1), (20, 44), (24, 16), 9, 44, 24, segments=3),  # qkv-like: 3 segments of 24 (heads x head_dim)
]
# ViT-ResNAS-sized, for the C++ and reference backends (and the GPU): widths 176/220/352/440/880/1120, rows 17..4k.
LARGE = [
    Spec((3, 0, 1, 2), (176, 220, 0, 220), (440, 352, 176, 0), 17, 220, 440),
    Spec((8, 4, 4), (352, 440, 220), (880, 1120, 440), 257, 440, 1120),
    Spec((2, 3), (880, 1120), (352, 440), 65, 1120, 440),
    Spec((1, 2, 1), (220, 176, 0), (96, 160, 192), 17, 220, 192, segments=3),  # qkv: heads x 32, 3 segments
]
EPILOGUES = {
    "plain": dict(bias=False),
    "bias": dict(),
    "gelu": dict(activation="gelu"),
    "residual": dict(residual=True),
    "drop_path": dict(residual=True, row_scale=True),
    "gelu_drop_path": dict(activation="gelu", residual=True, row_scale=True),
}


@dataclass
class Inputs:
    spec: Spec
    groups: Ragged
    x: torch.Tensor
    w: torch.Tensor
    b: Optional[torch.Tensor]
    r: Optional[torch.Tensor]
    s: Optional[torch.Tensor]
    activation: Optional[str]

    def to(self, dtype):
        conv = (lambda t: None if t is None else t.to(dtype))
        return replace(self, x=conv(self.x), w=conv(self.w), b=conv(self.b), r=conv(self.r),
                       s=None if self.s is None else (self.s.double() if dtype == torch.float64 else self.s))


def out_mask(spec: Spec, device="cpu") -> torch.Tensor:
    """(B, N_max) bool: the first n_g columns of every segment for the samples of group g."""
    cols = torch.arange(spec.n_max, device=device) % spec.seg_width
    widths = torch.tensor([n for s, n in zip(spec.sizes, spec.n_widths) for _ in range(s)], dtype=torch.long,
                          device=device)
    return cols[None, :] < widths[:, None]


def make_inputs(spec: Spec, dtype=torch.float32, device="cpu", bias=True, residual=False, row_scale=False,
                activation=None) -> Inputs:
    g = Ragged(spec.sizes, spec.k_widths)
    x = torch.randn(g.batch, spec.tokens, spec.k_max, device=device) * g.mask(spec.k_max, device=device)[:, None, :]
    w = torch.randn(spec.n_max, spec.k_max, device=device) / math.sqrt(spec.k_max)  # keeps outputs O(1)
    b = torch.randn(spec.n_max, device=device) * 0.5 if bias else None
    r = (torch.randn(g.batch, spec.tokens, spec.n_max, device=device) * out_mask(spec, device)[:, None, :]
         if residual else None)
    s = (torch.rand(g.batch, device=device) > 0.3).float() / 0.7 if row_scale else None  # drop-path keep / keep_prob
    return Inputs(spec, g, x, w, b, r, s, activation).to(dtype)


def run(fn, inp: Inputs, dy: torch.Tensor):
    """Forward and gradients of sum(y * dy) with respect to x, weight, bias, residual (zeros where unused)."""
    leaves = [t.detach().clone().requires_grad_() for t in (inp.x, inp.w, inp.b, inp.r) if t is not None]
    it = iter(leaves)
    x, w = next(it), next(it)
    b = next(it) if inp.b is not None else None
    r = next(it) if inp.r is not None else None
    y = fn(x, w, b, inp.groups, inp.spec.n_widths, segments=inp.spec.segments, activation=inp.activation,
           residual=r, row_scale=inp.s)
    grads = torch.autograd.grad((y.double() * dy).sum(), leaves, allow_unused=True)
    return y, tuple(torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads))


def grad_names(inp: Inputs):
    return ["dx", "dweight"] + (["dbias"] if inp.b is not None else []) + (["dresidual"] if inp.r is not None else [])


def check_against_oracle(backend: str, inp: Inputs, label: str, fn=rk.ragged_linear):
    device = inp.x.device
    dy = torch.randn(inp.x.shape[0], inp.spec.tokens, inp.spec.n_max, dtype=torch.float64, device=device)
    with rk.use_backend(backend):
        y, grads = run(fn, inp, dy)
    y_oracle, g_oracle = run(ref.ragged_linear, inp.to(torch.float64), dy)
    y_same, g_same = run(ref.ragged_linear, inp, dy)
    assert y.dtype == inp.x.dtype
    assert_close_to_oracle(y, y_oracle, y_same, f"{backend}:{label}:y")
    for name, a, o, s in zip(grad_names(inp), grads, g_oracle, g_same):
        assert a.dtype == inp.x.dtype
        assert_close_to_oracle(a, o, s, f"{backend}:{label}:{name}", factor=3.0)
    # The contract: exactly zero beyond the output widths (every segment), beyond k_g in dx, and in dresidual.
    outside_y = ~out_mask(inp.spec, device)[:, None, :].expand_as(y)
    assert (y[outside_y] == 0).all(), f"{backend}:{label}: y is not exactly zero beyond n_g"
    outside_x = ~inp.groups.mask(inp.spec.k_max, device=device)[:, None, :].expand_as(inp.x)
    assert (grads[0][outside_x] == 0).all(), f"{backend}:{label}: dx is not exactly zero beyond k_g"
    if inp.r is not None:
        assert (grads[-1][outside_y] == 0).all(), f"{backend}:{label}: dresidual is not zero beyond n_g"


CPU_BACKENDS = ["reference", "triton", "cpu"]


# ---------------------------------------------------------------------------------------------------------------------
# Correctness against the oracle
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("spec", SMALL, ids=Spec.id)
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_small_shapes_fp32(backend, spec, epilogue):
    _require(backend)
    inp = make_inputs(spec, torch.float32, **EPILOGUES[epilogue])
    check_against_oracle(backend, inp, f"{spec.id()}:{epilogue}")


# The 4k-row case (the slowest: its fp64 oracle) runs once, with every epilogue stage at the same time.
LARGE_RUNS = [(spec, epilogue) for spec in LARGE for epilogue in ("bias", "gelu", "drop_path") if spec is not LARGE[1]]
LARGE_RUNS += [(LARGE[1], "gelu_drop_path")]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("spec,epilogue", LARGE_RUNS, ids=[f"{s.id()}-{e}" for s, e in LARGE_RUNS])
def test_vit_resnas_widths_fp32(backend, spec, epilogue):
    _require(backend)
    inp = make_inputs(spec, torch.float32, **EPILOGUES[epilogue])
    check_against_oracle(backend, inp, f"{spec.id()}:{epilogue}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", [LARGE[0], LARGE[3]], ids=Spec.id)
@pytest.mark.parametrize("epilogue", ["bias", "gelu_drop_path"])
def test_half_precision_cpu(dtype, spec, epilogue):
    _require("cpu")
    inp = make_inputs(spec, dtype, **EPILOGUES[epilogue])
    check_against_oracle("cpu", inp, f"{spec.id()}:{epilogue}:{dtype}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sixteen_groups_with_empty_and_single_sample_groups(backend):
    _require(backend)
    sizes = (1, 0, 2, 1, 0, 1, 3, 1, 1, 0, 2, 1, 1, 1, 0, 1)
    k_widths = (33, 20, 0, 1, 44, 17, 44, 5, 28, 44, 12, 0, 40, 31, 9, 44)
    n_widths = (24, 0, 13, 24, 7, 1, 20, 0, 24, 11, 5, 9, 16, 3, 24, 22)
    inp = make_inputs(Spec(sizes, k_widths, n_widths, 3, 44, 24), residual=True, row_scale=True, activation="gelu")
    check_against_oracle(backend, inp, "G16")


@pytest.mark.parametrize("epilogue", ["bias", "gelu", "drop_path"])
def test_cpu_wide_output_column_tiles(epilogue):
    """Outputs over 4x wider than the C++ forward's row block are cut into column tiles (fwd_tasks in
    csrc/cpu/ragged_linear.cpp); the tiles' epilogues and the zeros beyond n_g must still be exact. Group 2 has k_g = 0
    (y is act(bias) on every column tile), group 3 is as wide as the segment, group 4 has n_g = 0."""
    _require("cpu")
    spec = Spec((3, 2, 1, 1, 1), (64, 40, 0, 64, 33), (1100, 700, 1030, 1152, 0), 20, 64, 1152)
    inp = make_inputs(spec, residual=epilogue == "drop_path", row_scale=epilogue == "drop_path",
                      activation="gelu" if epilogue == "gelu" else None)
    check_against_oracle("cpu", inp, f"wide-{epilogue}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_qkv_output_is_a_strided_qkv_view(backend):
    """y.view(B, N, 3, H_max, d): q = y[:, :, 0] is a view (no copy) and holds each group's first h_g heads."""
    _require(backend)
    heads_max, d = 3, 8
    spec = Spec((2, 1, 1), (20, 44, 0), (16, 24, 8), 5, 44, heads_max * d, segments=3)
    inp = make_inputs(spec)
    with rk.use_backend(backend):
        y = rk.ragged_linear(inp.x, inp.w, inp.b, inp.groups, spec.n_widths, segments=3)
    qkv = y.view(inp.groups.batch, 5, 3, heads_max, d)
    q = qkv[:, :, 0]
    assert q.data_ptr() == y.data_ptr() and not q.is_contiguous()
    expected = ref.ragged_linear(inp.x.double(), inp.w.double(), inp.b.double(), inp.groups, spec.n_widths,
                                 segments=3).view_as(qkv)
    torch.testing.assert_close(qkv.double(), expected, rtol=1e-5, atol=1e-5)  # fp32 GEMM of K <= 44, O(1) values
    for (start, end), n in zip(zip(inp.groups.offsets, inp.groups.offsets[1:]), spec.n_widths):
        h = n // d
        assert (qkv[start:end, :, :, h:] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_never_reads_beyond_the_widths(backend):
    """NaN in x beyond k_g, in dy beyond n_g and in the rows / columns of W no group uses must not reach any output:
    the kernels read only the active slices (the contract lets them assume zeros there, but they never look)."""
    _require(backend)
    spec = Spec((2, 1, 2), (20, 0, 33), (16, 7, 20), 9, 44, 24, segments=2)
    inp = make_inputs(spec, residual=True, activation="gelu")
    nan_x = inp.x.clone()
    nan_x[~inp.groups.mask(44)[:, None, :].expand_as(nan_x)] = float("nan")
    nan_w = inp.w.clone()
    used = torch.zeros_like(nan_w, dtype=torch.bool)
    for s in range(spec.segments):
        used[s * 24:s * 24 + 20, :33] = True
    nan_w[~used] = float("nan")
    dy = torch.randn(inp.x.shape[0], 9, spec.n_max, dtype=torch.float64)
    nan_dy = dy.masked_fill(~out_mask(spec)[:, None, :], float("nan"))
    with rk.use_backend(backend):
        y, grads = run(rk.ragged_linear, replace(inp, x=nan_x, w=nan_w), nan_dy)
        y_clean, grads_clean = run(rk.ragged_linear, inp, dy.masked_fill(~out_mask(spec)[:, None, :], 0.0))
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in grads)
    assert (grads[1][~used] == 0).all(), "dW must be zero where no group's slice reaches"
    torch.testing.assert_close(y, y_clean, rtol=0, atol=0)
    for a, b_ in zip(grads, grads_clean):
        torch.testing.assert_close(a, b_, rtol=0, atol=0)


def test_row_blocks_depend_on_the_sizes_only_and_cover_every_row_once():
    """The Triton grids' static axis: (group, first row) per BLOCK_M-row block, blocks never crossing groups (empty
    groups have none). The widths are not an input: one table serves every architecture."""
    row_counts, bm = (17, 0, 34, 5, 40), 16
    table = rl_mod._row_blocks(row_counts, bm, "cpu")
    assert table.dtype == torch.int32 and table.shape == (sum(-(-r // bm) for r in row_counts), 2)
    starts = [0, 17, 17, 51, 56, 96]
    covered = []
    for g, row0 in table.tolist():
        assert starts[g] <= row0 < starts[g + 1]
        covered.extend(range(row0, min(row0 + bm, starts[g + 1])))
    assert covered == list(range(96))


# ---------------------------------------------------------------------------------------------------------------------
# Device metadata: widths as int32 tensors (what a supernet passes), through every backend
# ---------------------------------------------------------------------------------------------------------------------
DEVICE_WIDTH_RUNS = [  # odd shapes: three segments, empty groups, k_g = 0 / n_g = 0, partial tiles
    (Spec((2, 0, 1, 2), (20, 33, 0, 44), (24, 7, 5, 0), 5, 44, 24, segments=3), "gelu_drop_path"),
    (Spec((1, 2, 1), (33, 44, 12), (20, 24, 0), 3, 44, 24), "gelu"),
    (Spec((2, 1), (44, 7), (24, 13), 4, 44, 24, segments=2), "drop_path"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("spec,epilogue", DEVICE_WIDTH_RUNS, ids=[f"{s.id()}-{e}" for s, e in DEVICE_WIDTH_RUNS])
def test_device_widths_match_the_oracle(backend, spec, epilogue):
    """in_groups with an int32 widths tensor and out_widths a Ragged with device widths: forward and backward equal
    the fp64 oracle's (run from host widths) within the oracle rule, exactly zero beyond the widths."""
    _require(backend)
    inp = make_inputs(spec, **EPILOGUES[epilogue])
    in_groups = Ragged(spec.sizes, _widths(spec.k_widths))
    out_groups = Ragged(spec.sizes, _widths(spec.n_widths))

    def with_device_widths(x, w, b, _groups, _n_widths, **kw):
        return rk.ragged_linear(x, w, b, in_groups, out_groups, **kw)

    check_against_oracle(backend, inp, f"device-widths:{spec.id()}:{epilogue}", fn=with_device_widths)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_widths_tensor_errors(backend):
    """Bad widths tensors are ValueError / TypeError naming the argument: dtype, length, device, and on CPU (where
    reading them costs no device sync) values outside [0, bound]."""
    _require(backend)
    x, w, sizes = torch.randn(4, 3, 8), torch.randn(6, 8), (2, 2)

    def call(in_widths, out_widths):
        return rk.ragged_linear(x, w, None, Ragged(sizes, in_widths), out_widths)

    with rk.use_backend(backend):
        call(_widths([8, 5]), _widths([6, 3]))  # the good call runs
        with pytest.raises(TypeError, match="widths must be an int32 tensor"):
            Ragged(sizes, _widths([8, 5]).long())
        with pytest.raises(TypeError, match="out_widths must be an int32 tensor"):
            call(_widths([8, 5]), _widths([6, 3]).long())
        with pytest.raises(ValueError, match=r"out_widths must have shape \(2,\) \(one width per group\)"):
            call(_widths([8, 5]), _widths([6, 3, 1]))
        with pytest.raises(ValueError, match=r"in_(groups\.)?widths must be on the same device as x"):
            call(_widths([8, 5]).to("meta"), _widths([6, 3]))
        with pytest.raises(ValueError, match=r"in_groups.widths\[1\]=9 exceeds the maximum width 8 of x"):
            call(_widths([8, 9]), _widths([6, 3]))
        with pytest.raises(ValueError, match=r"out_widths\[0\]=7 exceeds the segment width 6"):
            call(_widths([8, 5]), Ragged(sizes, _widths([7, 3])))
        with pytest.raises(ValueError, match="must be >= 0"):
            call(_widths([8, -1]), _widths([6, 3]))


# ---------------------------------------------------------------------------------------------------------------------
# Determinism, gradcheck, opcheck, compile
# ---------------------------------------------------------------------------------------------------------------------
def _widths(values, device="cpu") -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def _bwd_args(inp: Inputs, activation: Optional[str]):
    """(sizes, in_widths, out_widths) of a direct op call: host sizes, int32 widths tensors on x's device."""
    device = inp.x.device
    return list(inp.groups.sizes), _widths(inp.groups.widths, device), _widths(inp.spec.n_widths, device)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_weight_gradients_are_bitwise_deterministic(backend, activation):
    """Two backward runs give bitwise-equal dW / db / dx. The Triton shape is large enough to use several dW row
    splits (fp32 partials summed in a fixed order), which is the path that could go wrong."""
    _require(backend)
    spec = Spec((5, 3, 2), (44, 20, 33), (24, 16, 7), 9, 44, 24)
    inp = make_inputs(spec, residual=True, row_scale=True, activation=activation)
    if backend == "triton":
        rows = inp.groups.batch * spec.tokens
        block_n, block_k, block_m = rl_mod._INTERP_BLOCKS["dw"]
        tiles = -(-spec.n_max // block_n) * -(-spec.k_max // block_k)
        assert -(-rows // rl_mod._split_rows(rows, tiles, block_m)) > 1, "shape must exercise several dW splits"
    sizes, kw, nw = _bwd_args(inp, activation)
    act = activation or "none"
    dy = torch.randn(inp.groups.batch, spec.tokens, spec.n_max)
    results = []
    with rk.use_backend(backend):
        _, pre = ragged_linear_fwd(inp.x, inp.w, inp.b, inp.r, inp.s, sizes, kw, nw, 1, act, True)
        for _ in range(2):
            results.append(ragged_linear_bwd(dy, inp.x, inp.w, pre if activation else None, inp.s, sizes, kw, nw, 1,
                                             act, True, True))
    for name, a, b_ in zip(("dx", "dweight", "dbias", "dresidual"), *results):
        assert torch.equal(a, b_), f"{backend}: {name} differs bitwise between two runs"


@pytest.mark.parametrize("spec", [
    Spec((5, 3, 2), (220, 176, 0), (352, 440, 96), 17, 220, 440),                # small W: fused row-chunk path
    Spec((3, 2, 1, 2), (400, 352, 0, 176), (240, 160, 96, 0), 5, 400, 240, segments=3),  # large W: dW tiles
], ids=lambda s: s.id())
def test_cpu_gradients_do_not_depend_on_the_thread_count(spec):
    """The C++ backward gives each dW tile / row chunk and each row block to one thread with a fixed summation order,
    so even the thread count does not change a bit (stronger than run-to-run determinism). The two specs take the two
    backward paths of csrc/cpu/ragged_linear.cpp (W up to / over kFusedMaxWeight elements)."""
    _require("cpu")
    inp = make_inputs(spec, residual=True, row_scale=True, activation="gelu")
    sizes, kw, nw = _bwd_args(inp, "gelu")
    dy = torch.randn(inp.groups.batch, spec.tokens, spec.n_max)
    results = []
    threads_before = torch.get_num_threads()
    try:
        with rk.use_backend("cpu"):
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                y, pre = ragged_linear_fwd(inp.x, inp.w, inp.b, inp.r, inp.s, sizes, kw, nw, spec.segments, "gelu",
                                           True)
                results.append((y,) + ragged_linear_bwd(dy, inp.x, inp.w, pre, inp.s, sizes, kw, nw, spec.segments,
                                                        "gelu", True, True))
    finally:
        torch.set_num_threads(threads_before)
    for other in results[1:]:
        for name, a, b_ in zip(("y", "dx", "dweight", "dbias", "dresidual"), results[0], other):
            assert torch.equal(a, b_), f"cpu: {name} depends on the thread count"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("segments,activation", [(1, None), (2, "gelu")])
def test_fp64_gradcheck(backend, segments, activation):
    _require(backend)
    spec = Spec((2, 0, 1), (5, 3, 3), (4, 2, 1), 3, 6, 4, segments=segments)
    inp = make_inputs(spec, torch.float64, residual=True, row_scale=True, activation=activation)
    in_mask = inp.groups.mask(6, dtype=torch.float64)[:, None, :]
    omask = out_mask(spec).double()[:, None, :]

    def fn(x, w, b, r):
        # Inputs must stay within the contract (zero beyond widths) when gradcheck perturbs them.
        return rk.ragged_linear(x * in_mask, w, b, inp.groups, spec.n_widths, segments=segments,
                                activation=activation, residual=r * omask, row_scale=inp.s)

    with rk.use_backend(backend):
        assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_() for t in (inp.x, inp.w, inp.b, inp.r)))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("epilogue", ["plain", "gelu_drop_path"])
def test_opcheck(backend, epilogue):
    _require(backend)
    opts = EPILOGUES[epilogue]
    spec = Spec((2, 1), (12, 7), (5, 8), 3, 12, 8, segments=2)
    inp = make_inputs(spec, **opts)
    act = opts.get("activation") or "none"
    sizes, kw, nw = _bwd_args(inp, opts.get("activation"))
    with rk.use_backend(backend):
        args = (inp.x.requires_grad_(), inp.w.requires_grad_(), inp.b, inp.r, inp.s, sizes, kw, nw, 2, act,
                act == "gelu")
        torch.library.opcheck(ragged_linear_fwd, args)
        _, pre = ragged_linear_fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        dy = torch.randn(inp.groups.batch, 3, spec.n_max)
        torch.library.opcheck(ragged_linear_bwd, (dy, inp.x.detach(), inp.w.detach(), pre if act == "gelu" else None,
                                                  inp.s, sizes, kw, nw, 2, act, inp.b is not None, inp.r is not None))


@pytest.mark.parametrize("epilogue", ["plain", "gelu_drop_path"])
def test_opcheck_cpp_ops(epilogue):
    """The C++-registered op (schema, Autograd kernel, fake) and its kernels through torch.library.opcheck."""
    _require("cpu")
    opts = EPILOGUES[epilogue]
    spec = Spec((2, 1), (12, 7), (5, 8), 3, 12, 8, segments=2)
    inp = make_inputs(spec, **opts)
    sizes, kw, nw = _bwd_args(inp, opts.get("activation"))
    gelu = opts.get("activation") == "gelu"
    torch.library.opcheck(torch.ops.resnas.ragged_linear.default,
                          (inp.x.requires_grad_(), inp.w.requires_grad_(), inp.b, inp.r, inp.s, sizes, kw, nw, 2,
                           opts.get("activation")))
    fwd_args = (inp.x.detach(), inp.w.detach(), inp.b, inp.r, inp.s, sizes, kw, nw, 2, gelu, gelu)
    torch.library.opcheck(torch.ops.resnas.ext_ragged_linear_fwd.default, fwd_args)
    _, pre = torch.ops.resnas.ext_ragged_linear_fwd(*fwd_args)
    dy = torch.randn(inp.groups.batch, 3, spec.n_max)
    torch.library.opcheck(torch.ops.resnas.ext_ragged_linear_bwd.default,
                          (dy, inp.x.detach(), inp.w.detach(), pre if gelu else None, inp.s, sizes, kw, nw, 2, gelu,
                           inp.b is not None, inp.r is not None))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_torch_compile_fullgraph(backend):
    _require(backend)
    spec = Spec((2, 1), (12, 7), (8, 5), 3, 12, 8)
    inp = make_inputs(spec, residual=True, row_scale=True)

    hidden = Ragged(inp.groups.sizes, (8, 5))

    def mlp(x, w1, b1, w2, b2, r):
        h = rk.ragged_linear(x, w1, b1, inp.groups, (8, 5), activation="gelu")
        return rk.ragged_linear(h, w2, b2, hidden, (12, 7), residual=r, row_scale=inp.s)

    w2 = torch.randn(12, 8) / 3
    b2 = torch.randn(12)
    r = torch.randn(3, 3, 12) * inp.groups.mask(12)[:, None, :]
    leaves = [t.clone().requires_grad_() for t in (inp.x, inp.w, inp.b, w2, b2, r)]
    with rk.use_backend(backend):
        compiled = torch.compile(mlp, backend="aot_eager", fullgraph=True)
        out = compiled(*leaves)
        out.sum().backward()
        expected = mlp(*(t.detach() for t in leaves))
    torch.testing.assert_close(out, expected)
    assert all(t.grad is not None for t in leaves)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_torch_compile_serves_new_widths_tensors_without_recompiling(backend):
    """A compiled MLP (fullgraph, aot_eager) fed three architectures as widths tensors of one shape: one
    compilation, outputs and gradients equal to eager."""
    _require(backend)
    from torch._dynamo.testing import CompileCounterWithBackend

    sizes, tokens, k_max, hidden = (2, 1, 1), 3, 12, 8
    inp = make_inputs(Spec(sizes, (12, 12, 12), (hidden,) * 3, tokens, k_max, hidden), residual=True,
                      row_scale=True)
    w2, b2 = torch.randn(k_max, hidden) / 3, torch.randn(k_max)

    def mlp(x, w1, b1, w2, b2, r, in_groups, hidden_groups):
        h = rk.ragged_linear(x, w1, b1, in_groups, hidden_groups, activation="gelu")
        return rk.ragged_linear(h, w2, b2, hidden_groups, in_groups, residual=r, row_scale=inp.s)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(mlp, backend=counter, fullgraph=True)
    for k_widths, n_widths in (((12, 7, 3), (8, 5, 2)), ((5, 12, 0), (3, 8, 8)), ((9, 9, 12), (0, 6, 1))):
        in_groups, hidden_groups = Ragged(sizes, _widths(k_widths)), Ragged(sizes, _widths(n_widths))
        mask = in_groups.mask(k_max)[:, None, :]
        x, r = inp.x * mask, torch.randn(4, tokens, k_max) * mask
        dy = torch.randn(4, tokens, k_max)
        results = []
        for fn in (compiled, mlp):
            leaves = [t.clone().requires_grad_() for t in (x, inp.w, inp.b, w2, b2, r)]
            with rk.use_backend(backend):
                out = fn(*leaves, in_groups, hidden_groups)
                results.append((out, *torch.autograd.grad(out, leaves, dy)))
        for name, a, b_ in zip(("y", "dx", "dw1", "db1", "dw2", "db2", "dr"), *results):
            torch.testing.assert_close(a, b_, msg=f"{backend} {k_widths}/{n_widths}: compiled {name} differs")
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for 3 widths tensors of one shape"


def test_no_pre_activation_saved_without_grad_and_missing_pre_is_an_error():
    spec = Spec((2,), (12,), (8,), 3, 12, 8)
    inp = make_inputs(spec, activation="gelu")
    sizes, kw, nw = _bwd_args(inp, "gelu")
    _, pre = ragged_linear_fwd(inp.x, inp.w, inp.b, None, None, sizes, kw, nw, 1, "gelu", False)
    assert pre.numel() == 0
    x = inp.x.clone().requires_grad_()
    y, _ = ragged_linear_fwd(x, inp.w, inp.b, None, None, sizes, kw, nw, 1, "gelu", False)
    with pytest.raises(RuntimeError, match="save_pre"):
        y.sum().backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    _require(backend)
    x = torch.zeros(0, 5, 12)
    w = torch.randn(8, 12, requires_grad=True)
    with rk.use_backend(backend):
        y = rk.ragged_linear(x.requires_grad_(), w, None, Ragged((0, 0), (12, 3)), (8, 2))
        y.sum().backward()
    assert y.shape == (0, 5, 8) and (w.grad == 0).all()


def test_auto_backend_on_cpu_tensors():
    _require("cpu")
    assert rk.resolve_backend("ragged_linear", torch.device("cpu")) == "cpu"


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_property_random_groups_match_reference(data):
    """Random partitions (incl. empty groups), widths, segments and epilogues through the default backend vs the
    fp64 oracle."""
    num_groups = data.draw(st.integers(1, 6))
    segments = data.draw(st.sampled_from([1, 1, 2, 3]))
    k_max = data.draw(st.integers(1, 40))
    seg_width = data.draw(st.integers(1, 24))
    sizes = tuple(data.draw(st.lists(st.integers(0, 3), min_size=num_groups, max_size=num_groups)))
    if sum(sizes) == 0:
        sizes = sizes[:-1] + (1,)
    kw = tuple(data.draw(st.lists(st.integers(0, k_max), min_size=num_groups, max_size=num_groups)))
    nw = tuple(data.draw(st.lists(st.integers(0, seg_width), min_size=num_groups, max_size=num_groups)))
    tokens = data.draw(st.integers(1, 9))
    epilogue = data.draw(st.sampled_from(list(EPILOGUES)))
    inp = make_inputs(Spec(sizes, kw, nw, tokens, k_max, seg_width, segments), **EPILOGUES[epilogue])
    check_against_oracle(rk.resolve_backend("ragged_linear", torch.device("cpu")), inp, f"property:{epilogue}")


# ---------------------------------------------------------------------------------------------------------------------
# GPU tier (skipped without CUDA): real Triton kernels, fp32 (IEEE) and bf16 / fp16 at ViT-ResNAS shapes
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", SMALL + LARGE, ids=Spec.id)
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_gpu_triton(dtype, spec, epilogue):
    # fp32 runs at torch's default "highest" matmul precision, so the kernel uses IEEE fp32 dots like cuBLAS; bf16 /
    # fp16 are held to the same-dtype cuBLAS reference by the oracle rule (fp32 accumulation on both sides).
    inp = make_inputs(spec, dtype, "cuda", **EPILOGUES[epilogue])
    check_against_oracle("triton", inp, f"{spec.id()}:{epilogue}:{dtype}")


@pytest.mark.gpu
def test_gpu_weight_gradients_deterministic_at_scale():
    spec = Spec((64, 64, 64, 64), (256, 224, 192, 160), (768, 640, 512, 384), 257, 256, 768)
    inp = make_inputs(spec, torch.bfloat16, "cuda", activation="gelu")
    sizes, kw, nw = _bwd_args(inp, "gelu")
    dy = torch.randn(inp.groups.batch, spec.tokens, spec.n_max, device="cuda", dtype=torch.bfloat16)
    with rk.use_backend("triton"):
        _, pre = ragged_linear_fwd(inp.x, inp.w, inp.b, None, None, sizes, kw, nw, 1, "gelu", True)
        first = ragged_linear_bwd(dy, inp.x, inp.w, pre, None, sizes, kw, nw, 1, "gelu", True, False)
        second = ragged_linear_bwd(dy, inp.x, inp.w, pre, None, sizes, kw, nw, 1, "gelu", True, False)
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: every message names the argument and what was expected
# ---------------------------------------------------------------------------------------------------------------------
class TestBadInput:
    def setup_method(self):
        self.x = torch.randn(4, 3, 8)
        self.w = torch.randn(6, 8)
        self.b = torch.zeros(6)
        self.g = Ragged((2, 2), (8, 5))
        self.n = (6, 3)

    def call(self, **kw):
        args = dict(x=self.x, weight=self.w, bias=self.b, in_groups=self.g, out_widths=self.n)
        args.update(kw)
        return rk.ragged_linear(args.pop("x"), args.pop("weight"), args.pop("bias"), args.pop("in_groups"),
                                args.pop("out_widths"), **args)

    def test_x_dtype_rank_contiguity(self):
        with pytest.raises(TypeError, match="x must have dtype in"):
            self.call(x=self.x.int())
        with pytest.raises(ValueError, match="x must have at least 2 dims"):
            self.call(x=torch.randn(8), in_groups=Ragged((8,), (8,)), out_widths=(6,))
        with pytest.raises(ValueError, match="x must be contiguous"):
            self.call(x=torch.randn(4, 8, 3).transpose(1, 2))

    def test_weight(self):
        with pytest.raises(ValueError, match=r"weight must have shape \(N_max >= 1, K_max\) with K_max = "
                                             r"x.shape\[-1\] = 8"):
            self.call(weight=torch.randn(6, 7))
        with pytest.raises(TypeError, match="weight must have x's dtype"):
            self.call(weight=self.w.double())
        with pytest.raises(ValueError, match="weight must be contiguous"):
            self.call(weight=torch.randn(8, 6).t())
        with pytest.raises(ValueError, match="weight must be on the same device as x"):
            self.call(weight=self.w.to("meta"))

    def test_bias(self):
        with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
            self.call(bias=torch.zeros(5))
        with pytest.raises(TypeError, match="bias must have x's dtype"):
            self.call(bias=self.b.half())

    def test_groups_and_widths(self):
        with pytest.raises(TypeError, match="in_groups must be a resnas_kernels.Ragged"):
            self.call(in_groups=[(2, 2), (8, 5)])
        with pytest.raises(ValueError, match=r"in_groups.widths\[0\]=9 exceeds the maximum width 8 of x"):
            self.call(in_groups=Ragged((2, 2), (9, 5)))
        with pytest.raises(ValueError, match="must equal the batch size of x"):
            self.call(in_groups=Ragged((2, 1), (8, 5)))
        with pytest.raises(ValueError, match=r"out_widths\[1\]=7 exceeds the segment width 6"):
            self.call(out_widths=(6, 7))
        with pytest.raises(ValueError, match=r"out_widths\[1\]=4 exceeds the segment width 3"):
            self.call(out_widths=(3, 4), segments=2)
        with pytest.raises(ValueError, match="widths must have one entry per group"):
            self.call(out_widths=(6,))
        with pytest.raises(ValueError, match="must be >= 0"):
            self.call(out_widths=(6, -1))
        with pytest.raises(ValueError, match="same groups"):
            self.call(out_widths=Ragged((3, 1), (6, 3)))

    def test_segments_and_activation(self):
        with pytest.raises(ValueError, match="segments=4 must divide N_max = weight.shape\\[0\\] = 6"):
            self.call(segments=4, out_widths=(1, 1))
        with pytest.raises(ValueError, match="segments must be an int >= 1"):
            self.call(segments=0)
        with pytest.raises(ValueError, match="activation must be None or 'gelu'"):
            self.call(activation="relu")

    def test_residual_and_row_scale(self):
        r = torch.zeros(4, 3, 6)
        with pytest.raises(ValueError, match=r"residual must have the output's shape \(4, 3, 6\)"):
            self.call(residual=torch.zeros(4, 3, 8))
        with pytest.raises(ValueError, match="row_scale needs a residual"):
            self.call(row_scale=torch.ones(4))
        with pytest.raises(ValueError, match=r"row_scale must have shape \(4,\)"):
            self.call(residual=r, row_scale=torch.ones(4, 3))
        with pytest.raises(TypeError, match="row_scale must have dtype"):
            self.call(residual=r, row_scale=torch.ones(4, dtype=torch.float64))
        with pytest.raises(ValueError, match="row_scale must not require grad"):
            self.call(residual=r, row_scale=torch.ones(4, requires_grad=True))

    def test_cpp_kernels_check_their_arguments(self):
        _require("cpu")
        fwd, bwd = torch.ops.resnas.ext_ragged_linear_fwd, torch.ops.resnas.ext_ragged_linear_bwd
        with pytest.raises(ValueError, match=r"ext_ragged_linear_fwd: in_groups.widths\[1\]=9 exceeds the maximum "
                                             r"width 8 of x"):
            fwd(self.x, self.w, None, None, None, [2, 2], _widths([8, 9]), _widths([6, 3]), 1, False, False)
        with pytest.raises(ValueError, match=r"ext_ragged_linear_fwd: out_widths\[0\]=-1 must be >= 0"):
            fwd(self.x, self.w, None, None, None, [2, 2], _widths([8, 5]), _widths([-1, 3]), 1, False, False)
        with pytest.raises(RuntimeError, match="ext_ragged_linear_fwd: segments=4 must be >= 1 and divide N_max"):
            fwd(self.x, self.w, None, None, None, [2, 2], _widths([8, 5]), _widths([1, 1]), 4, False, False)
        with pytest.raises(TypeError, match="ext_ragged_linear_fwd: in_widths must be an int32 tensor"):
            fwd(self.x, self.w, None, None, None, [2, 2], _widths([8, 5]).long(), _widths([6, 3]), 1, False, False)
        with pytest.raises(RuntimeError, match="ext_ragged_linear_bwd: gelu=True needs the saved pre-activation"):
            bwd(torch.zeros(4, 3, 6), self.x, self.w, None, None, [2, 2], _widths([8, 5]), _widths([6, 3]), 1, True,
                True, False)


@pytest.mark.parametrize("epilogue", ["plain", "bias", "gelu", "drop_path", "gelu_drop_path"])
@pytest.mark.parametrize("spec", [
    Spec((2, 1), (44, 44), (24, 24), 17, 44, 24),                 # one weight for all: a plain linear
    Spec((2, 0, 1), (44, 20, 44), (24, 8, 24), 5, 44, 24, segments=3),  # dense qkv; an empty group's widths don't count
], ids=Spec.id)
def test_cpu_dense_and_almost_dense_calls_match_the_oracle(spec, epilogue):
    """Full-width calls (a searched net's layers) take the C++ kernel's one-GEMM forward (every group with rows at
    full width; an empty group's widths do not count); one group one column narrower takes the ragged tiles."""
    _require("cpu")
    check_against_oracle("cpu", make_inputs(spec, **EPILOGUES[epilogue]), f"dense-{epilogue}")
    ragged = replace(spec, n_widths=(spec.n_widths[0] - 1,) + spec.n_widths[1:])
    check_against_oracle("cpu", make_inputs(ragged, **EPILOGUES[epilogue]), f"ragged-{epilogue}")


def test_cpp_path_makes_one_op_call_and_no_tensor_views():
    """The cpu backend's forward + backward cross the dispatcher a handful of times whatever the groups and tiles:
    one resnas::ragged_linear call, its two kernels, their output allocations; the GEMMs run on raw pointers, so no
    view (narrow / slice / as_strided) or matmul op is dispatched per group or tile."""
    _require("cpu")
    from resnas_kernels.bench.op_count import count_op_calls

    spec = Spec((3, 0, 2, 1, 2), (20, 33, 0, 44, 7), (24, 7, 5, 0, 13), 5, 44, 24, segments=3)
    inp = make_inputs(spec, activation="gelu", residual=True, row_scale=True)
    x, w = inp.x.requires_grad_(), inp.w.requires_grad_()

    def step():
        y = rk.ragged_linear(x, w, inp.b, inp.groups, spec.n_widths, segments=3, activation="gelu", residual=inp.r,
                             row_scale=inp.s)
        torch.autograd.grad(y, (x, w), torch.ones_like(y))

    step()  # the first call copies the host widths to cached tensors
    calls = count_op_calls(step)
    names = dict(calls.top_aten)
    assert calls.resnas == 3, calls.summary()
    assert not {"aten::narrow", "aten::slice", "aten::as_strided", "aten::mm", "aten::addmm"} & set(names), \
        calls.summary()
    assert calls.aten <= 10, calls.summary()  # ones_like and the kernels' output allocations


def test_cpp_op_without_grad_and_in_inference_mode_equals_the_autograd_forward():
    """resnas::ragged_linear runs its Autograd kernel (grad), the same forward without a graph (no grad) and its
    CompositeExplicitAutograd kernel (inference mode, below autograd): bitwise the same y."""
    _require("cpu")
    spec = Spec((2, 1), (44, 20), (24, 16), 5, 44, 24, segments=3)
    inp = make_inputs(spec, activation="gelu", residual=True, row_scale=True)
    w = torch.nn.Parameter(inp.w)
    call = functools.partial(rk.ragged_linear, inp.x, w, inp.b, inp.groups, spec.n_widths, segments=3,
                             activation="gelu", residual=inp.r, row_scale=inp.s)
    y_grad = call()
    assert y_grad.grad_fn is not None
    with torch.no_grad():
        y_no_grad = call()
    with torch.inference_mode():
        y_inference = call()
    assert y_no_grad.grad_fn is None
    assert torch.equal(y_grad, y_no_grad) and torch.equal(y_grad, y_inference)
