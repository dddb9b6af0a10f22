"""Every Triton kernel at the tile sizes a GPU runs, executed under the interpreter against the fp64 oracle.

Elsewhere the launchers pick small interpreter tiles (the interpreter is slow per program), so the GPU's block sizes
would otherwise never execute before a GPU is lent. Here `_ext.production_tiles()` makes the launchers take their GPU
path (autotuned kernels run one pinned candidate each), on small shapes that still leave a partial tile at every edge
(rows, columns, reduction) and contain an empty group and zero widths. Each test then checks that every tile
configuration compiled ahead of time for its kernels (`register_aot`), and every autotune candidate, was launched.

Under the interpreter num_warps / num_stages change nothing, so autotune candidates that differ only in those are one
configuration here; their register and shared-memory fit is checked by `resnas aot --resources`.
"""
import importlib
from typing import Dict, Set, Tuple

import pytest
import torch

import resnas_kernels as rk
from resnas_kernels import Ragged, _ext, aot
from resnas_kernels import reference as ref

from _oracle import assert_close_to_oracle

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not _ext.triton_interpreting() or _ext.load_triton()[0] is None,
                                 reason="interpreter test: needs triton with TRITON_INTERPRET=1 (tests/conftest.py)")]

ln_mod = importlib.import_module("resnas_kernels.ops.ragged_layer_norm")
linear_mod = importlib.import_module("resnas_kernels.ops.ragged_linear")

LN_KERNELS = {"_ragged_layer_norm_fwd_kernel", "_ragged_layer_norm_bwd_kernel"}
LINEAR_KERNELS = {"_ragged_linear_fwd_kernel", "_ragged_linear_bwd_prologue_kernel", "_ragged_linear_dx_kernel",
                  "_ragged_linear_dw_kernel"}
ATTENTION_KERNELS = {"_attn_fwd_small_kernel", "_attn_fwd_tiled_kernel", "_attn_bwd_small_kernel",
                     "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dbias_kernel",
                     "_bias_table_grad_kernel"}
RSR_KERNELS = {"_rsr_im2col_fwd_kernel", "_rsr_im2col_bwd_kernel", "_rsr_epilogue_fwd_kernel",
               "_rsr_epilogue_bwd_kernel", "_rsr_epilogue_colsum_kernel"}


def _tile_key(name: str) -> bool:
    return name.startswith("BLOCK") or name == "ROWS_PER_PROGRAM"


def _tiles(kwargs) -> Tuple:
    return tuple(sorted((k, v) for k, v in kwargs.items() if _tile_key(k)))


@pytest.fixture
def launches(monkeypatch) -> Dict[str, Set[Tuple]]:
    """kernel name -> tile configurations launched (recorded at the interpreter's launch entry point)."""
    from triton.runtime.interpreter import InterpretedFunction

    seen: Dict[str, Set[Tuple]] = {}
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        seen.setdefault(self.fn.__name__, set()).add(_tiles(kwargs))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return seen


def _aot_tiles(kernels: Set[str]) -> Dict[str, Set[Tuple]]:
    aot.import_all_kernel_modules()
    out: Dict[str, Set[Tuple]] = {}
    for case in aot.registered_cases():
        name = getattr(case.kernel, "fn", case.kernel).__name__
        if name in kernels:
            out.setdefault(name, set()).add(_tiles(case.constexprs))
    return out


def _assert_covered(launched: Dict[str, Set[Tuple]], kernels: Set[str]) -> None:
    assert kernels <= set(launched), f"never launched: {sorted(kernels - set(launched))}"
    for name, wanted in _aot_tiles(kernels).items():
        missing = wanted - launched[name]
        assert not missing, f"{name}: production tiles compiled ahead of time but never executed: {sorted(missing)}"


def _distinct_candidates(kind: str, precision: str):
    """Indices of the autotune candidates of `kind` at a dot precision with distinct constexprs (the ones that differ
    here)."""
    _, configs, _ = linear_mod._autotune_spec(kind, precision)
    first = {}
    for i, config in enumerate(configs):
        first.setdefault(tuple(sorted(config.kwargs.items())), i)
    return sorted(first.values())


def _check(kernel_fn, reference_fn, inputs, label: str, candidate: int = 0) -> None:
    """Outputs and input gradients of kernel_fn (Triton backend, production tiles) against reference_fn in fp64, each
    bounded by the error of reference_fn in the inputs' own dtype (tests/_oracle.py)."""
    def run(fn, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        outs = fn(*leaves)
        return (outs if isinstance(outs, tuple) else (outs,)), leaves

    with rk.use_backend("triton"), _ext.production_tiles(candidate):
        outs, leaves = run(kernel_fn, inputs)
    cotangents = [torch.randn(o.shape, dtype=torch.float64) for o in outs]

    def grads(outs, leaves):
        total = sum((o.double() * c).sum() for o, c in zip(outs, cotangents))
        return torch.autograd.grad(total, leaves, allow_unused=True)

    with rk.use_backend("triton"), _ext.production_tiles(candidate):  # the backward launches run here
        kernel_grads = grads(outs, leaves)
    oracle, oracle_leaves = run(reference_fn, [t.double() for t in inputs])
    same, same_leaves = run(reference_fn, inputs)
    oracle_grads, same_grads = grads(oracle, oracle_leaves), grads(same, same_leaves)
    for i, (a, o, s) in enumerate(zip(outs, oracle, same)):
        assert_close_to_oracle(a, o, s, f"{label}:out{i}")
    for i, (a, o, s) in enumerate(zip(kernel_grads, oracle_grads, same_grads)):
        if o is None:
            continue
        assert a is not None, f"{label}: no gradient for input {i}"
        assert_close_to_oracle(a, o, s, f"{label}:grad{i}", factor=3.0)


# ---------------------------------------------------------------------------------------------------------------------
def test_layer_norm_production_tiles(launches, monkeypatch):
    """BLOCK_C 256 / 1024 / 2048 (C_max 200 / 700 / 1100: partial column blocks), 16 and 64 rows per backward program
    (25 rows: partial row blocks; the 64-row switch is lowered so few rows reach it), with and without residual."""
    for many_rows in (ln_mod.triton_kernels._MANY_ROWS, 16):
        monkeypatch.setattr(ln_mod.triton_kernels, "_MANY_ROWS", many_rows)
        for c_max in (200, 700, 1100):
            groups = Ragged((2, 0, 1, 1, 1), (c_max, 7, 0, c_max - 3, 1))
            x = torch.randn(5, 5, c_max) * groups.mask(c_max)[:, None, :]
            r = torch.randn(5, 5, c_max) * groups.mask(c_max)[:, None, :]
            w, b = torch.randn(c_max), torch.randn(c_max)
            if many_rows == 16:  # residual: the fused sum output and its gradient (HAS_DZ)
                _check(lambda x, r, w, b: rk.ragged_layer_norm(x, w, b, groups, residual=r),
                       lambda x, r, w, b: ref.ragged_layer_norm(x, w, b, groups, residual=r), [x, r, w, b],
                       f"ln-res-C{c_max}")
            else:
                _check(lambda x, w, b: rk.ragged_layer_norm(x, w, b, groups),
                       lambda x, w, b: ref.ragged_layer_norm(x, w, b, groups), [x, w, b], f"ln-C{c_max}")
    assert {dict(t)["ROWS_PER_PROGRAM"] for t in launches["_ragged_layer_norm_bwd_kernel"]} == {16, 64}
    _assert_covered(launches, LN_KERNELS)


def test_linear_production_tiles_and_autotune_candidates(launches, monkeypatch):
    """64 x 64 tiles (and 128 x 64 for half types: the tall-group switch is lowered so few rows reach it), each
    distinct autotune candidate of the forward and dx kernels at each dot precision (fp32: "ieee" at torch's default
    matmul precision; fp16: the tensor-core list). K = N = 70: a full and a partial block on every axis; 18 / 9 rows
    per group: partial row tiles; an empty group, k_g = 0 (bias only) and n_g = 0 groups. Both dtypes run in one test,
    so the AOT set (which spans both precisions' candidates) is checked against what they executed together."""
    groups = Ragged((2, 0, 1, 1), (40, 9, 0, 70))
    out_widths = (70, 5, 30, 0)
    k_max = n_max = 70
    x = torch.randn(4, 9, k_max) * groups.mask(k_max)[:, None, :]
    out_mask = torch.arange(n_max)[None, :] < torch.tensor([70, 70, 30, 0])[:, None]
    r = torch.randn(4, 9, n_max) * out_mask[:, None, :]
    w, b = torch.randn(n_max, k_max) / k_max ** 0.5, torch.randn(n_max) * 0.5
    scale = (torch.rand(4) > 0.3).float() / 0.7
    for dtype in (torch.float32, torch.float16):
        launches.clear()
        tall = [linear_mod.triton_kernels._TALL_GROUP_ROWS] + ([8] if dtype != torch.float32 else [])
        precision = linear_mod.triton_kernels._precision(dtype)  # fp32: "ieee" at torch's default matmul precision
        candidates = sorted(set(_distinct_candidates("fwd", precision)) | set(_distinct_candidates("dx", precision)))
        assert len(candidates) >= 2
        for tall_rows in tall:
            monkeypatch.setattr(linear_mod.triton_kernels, "_TALL_GROUP_ROWS", tall_rows)
            for candidate in candidates:
                _check(lambda x, w, b, r: rk.ragged_linear(x, w, b, groups, out_widths, activation="gelu",
                                                           residual=r, row_scale=scale),
                       lambda x, w, b, r: ref.ragged_linear(x, w, b, groups, out_widths, activation="gelu",
                                                            residual=r, row_scale=scale.to(x.dtype)
                                                            if x.dtype == torch.float64 else scale),
                       [t.to(dtype) for t in (x, w, b, r)], f"linear-{dtype}-tall{tall_rows}-cand{candidate}",
                       candidate=candidate)
        fwd_blocks = {(d["BLOCK_M"], d["BLOCK_N"], d["BLOCK_K"])
                      for d in map(dict, launches["_ragged_linear_fwd_kernel"])}
        for kind, kernel in (("fwd", "_ragged_linear_fwd_kernel"), ("dx", "_ragged_linear_dx_kernel")):
            for config in linear_mod._autotune_spec(kind, precision)[1]:
                for name, value in config.kwargs.items():
                    assert any(dict(t)[name] == value for t in launches[kernel]), \
                        f"{kernel} ({dtype}): candidate {config} unused"
        assert {bm for bm, _, _ in fwd_blocks} == ({64, 128} if dtype != torch.float32 else {64})
        if dtype == torch.float32:
            fp32_launches = {name: set(tiles) for name, tiles in launches.items()}
    for name, tiles in fp32_launches.items():
        launches.setdefault(name, set()).update(tiles)
    _assert_covered(launches, LINEAR_KERNELS)


def _attention_case(nq, nk, d, dv, bias, dtype):
    """(fn kwargs builder, inputs) for one attention problem; groups of 2 / 0 / 1 samples with 2 / 1 / 1 heads."""
    heads = Ragged((2, 0, 1), (2, 1, 1))
    q, k, v = torch.randn(3, nq, 2, d), torch.randn(3, nk, 2, d), torch.randn(3, nk, 2, dv)
    inputs = [q, k, v]
    kw = {}
    if bias == "grid":
        r, s = {(81, 81): (9, 1), (16, 49): (7, 2), (49, 49): (7, 1)}[(nq, nk)]
        inputs.append(torch.randn(2, r * r) * 0.5)
        kw = lambda t: dict(bias_table=t, bias_grid=(r, s))  # noqa: E731
    elif bias == "index":
        t_cols = 11
        index = torch.randint(0, t_cols, (nq, nk))
        inputs.append(torch.randn(2, t_cols) * 0.5)
        kw = lambda t: dict(bias_table=t, bias_index=index)  # noqa: E731
    elif bias == "dense":
        inputs.append(torch.randn(2, nq, nk) * 0.5)
        kw = lambda t: dict(dense_bias=t)  # noqa: E731
    return heads, [t.to(dtype) for t in inputs], kw


# (Nq, Nk, d_qk, d_v, bias): the tiled kernels at their GPU tiles (N > 64, not a multiple of 64) and the small-N
# kernel at the block shapes compiled ahead of time (16 x 64 for LeViT's subsampling attention, 64 x 64).
ATTENTION_CASES = [
    (81, 81, 16, 32, "grid"), (70, 67, 64, 64, "dense"), (66, 80, 32, 64, "index"), (65, 70, 64, 64, "none"),
    (16, 49, 16, 32, "grid"), (13, 40, 32, 64, "index"), (40, 37, 64, 64, "none"), (50, 45, 64, 64, "dense"),
    # the small-N tiles of every bias kind the AOT set compiles: 64 x 64 with the LeViT grid (stage 2, 49 tokens) and
    # an index, 16 x 64 without a bias and with a dense one (a dense bias takes 64 x 64 tiles through the tiled kernels)
    (49, 49, 16, 32, "grid"), (33, 60, 32, 64, "index"), (9, 40, 64, 64, "none"), (12, 50, 64, 64, "dense"),
]


def test_attention_production_tiles(launches):
    """fp32 takes the tiled kernels at its FMA tiles; fp16 (with bf16's tiles: the interpreter cannot run bf16 dots)
    the small-N kernels and the tensor-core tiles."""
    for dtype in (torch.float32, torch.float16):
        for nq, nk, d, dv, bias in ATTENTION_CASES:
            heads, inputs, kw = _attention_case(nq, nk, d, dv, bias, dtype)
            if bias == "none":
                kernel_fn = lambda q, k, v: rk.ragged_attention(q, k, v, heads)  # noqa: E731
                reference_fn = lambda q, k, v: ref.ragged_attention(q, k, v, heads)  # noqa: E731
            else:
                kernel_fn = lambda q, k, v, t: rk.ragged_attention(q, k, v, heads, **kw(t))  # noqa: E731
                reference_fn = lambda q, k, v, t: ref.ragged_attention(q, k, v, heads, **kw(t))  # noqa: E731
            _check(kernel_fn, reference_fn, inputs, f"attention-{nq}x{nk}-d{d}-{bias}-{dtype}")
    assert {(dict(t)["BLOCK_M"], dict(t)["BLOCK_N"]) for t in launches["_attn_fwd_tiled_kernel"]} == {(32, 32),
                                                                                                     (64, 32)}
    _assert_covered(launches, ATTENTION_KERNELS)


def test_rsr_production_tiles(launches):
    """im2col (Ci * 9 = 1080 columns: a full and a partial 1024-block), epilogue and column sums (Co = 130: a full and
    a partial 128-block), and the conv GEMM through the linear kernels at their GPU tiles; an empty group."""
    ci, co, grid = 120, 130, (5, 5)
    groups = Ragged((1, 0, 1), (120, 5, 64))
    out_widths = (130, 5, 100)
    x = torch.randn(2, 1 + grid[0] * grid[1], ci) * groups.mask(ci)[:, None, :]
    params = [torch.randn(ci) * 0.5 + 1, torch.randn(ci) * 0.5, torch.randn(co, ci, 3, 3) / 30, torch.randn(co),
              torch.randn(1, 9, co), torch.randn(co, ci) / 11, torch.randn(co)]

    def call(fn):
        return lambda x, lw, lb, cw, cb, pos, clw, clb: fn(x, groups, out_widths, lw, lb, cw, cb, pos, clw, clb,
                                                           grid=grid, has_cls=True)
    _check(call(rk.residual_spatial_reduction), call(ref.residual_spatial_reduction), [x, *params], "rsr")
    _assert_covered(launches, RSR_KERNELS)


def test_every_registered_kernel_is_covered_here():
    """A new Triton kernel (it must have an AOT case) must be added to one of the production-tile tests above."""
    aot.import_all_kernel_modules()
    registered = {getattr(c.kernel, "fn", c.kernel).__name__ for c in aot.registered_cases()}
    covered = LN_KERNELS | LINEAR_KERNELS | ATTENTION_KERNELS | RSR_KERNELS
    assert registered == covered, f"not covered: {sorted(registered - covered)}; stale: {sorted(covered - registered)}"
