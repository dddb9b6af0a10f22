"""The attention reference (the oracle of every attention kernel) against stock PyTorch and timm's LeViT buffers."""
import pytest
import torch
import torch.nn.functional as F

from resnas_kernels import Ragged
from resnas_kernels.reference import levit_bias_index, masked_attention, ragged_attention


pytestmark = pytest.mark.usefixtures("one_thread")


def _qkv(b, nq, nk, h, d, dv, dtype=torch.float64, grad=False):
    q = torch.randn(b, nq, h, d, dtype=dtype)
    k = torch.randn(b, nk, h, d, dtype=dtype)
    v = torch.randn(b, nk, h, dv, dtype=dtype)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


# ---------------------------------------------------------------------------------------------------------------------
# levit_bias_index
# ---------------------------------------------------------------------------------------------------------------------
def test_levit_bias_index_matches_timm_levit_128s():
    """All five LeViT index buffers (R = 14, 7, 4 and the shrink cases 14->7, 7->4) of a timm levit_128s."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("levit_128s", pretrained=False)
    seen = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "attention_bias_idxs"):
            r, s = mod.resolution[0], getattr(mod, "stride", 1)
            ours = levit_bias_index(r, s)
            assert ours.dtype == torch.long
            assert torch.equal(ours, mod.attention_bias_idxs), f"{name}: R={r}, stride={s}"
            assert mod.attention_biases.shape[1] == r * r  # the table has R^2 columns
            seen[(r, s)] = tuple(ours.shape)
    assert seen == {(14, 1): (196, 196), (14, 2): (49, 196), (7, 1): (49, 49), (7, 2): (16, 49), (4, 1): (16, 16)}


def test_levit_bias_index_small_case_by_hand():
    # R = 3, stride 2: queries at (0,0), (0,2), (2,0), (2,2); key 4 is the centre (1,1): offset (1,1) -> 1*3+1 = 4.
    idx = levit_bias_index(3, 2)
    assert idx.shape == (4, 9)
    assert idx[:, 4].tolist() == [4, 4, 4, 4]
    assert idx[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert idx[3].tolist() == [8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert int(levit_bias_index(5).max()) == 24


@pytest.mark.parametrize("args", [(0,), (3, 0), (2.0,), (True,), (3, -1)])
def test_levit_bias_index_bad_input(args):
    with pytest.raises(ValueError, match="resolution|stride"):
        levit_bias_index(*args)


# ---------------------------------------------------------------------------------------------------------------------
# Forward semantics
# ---------------------------------------------------------------------------------------------------------------------
def _per_sample_sdpa(q, k, v, heads, bias):
    """Independent oracle: one SDPA call (math backend, fp64) per sample and active head; bias (B|1, H, Nq, Nk)."""
    b_total, n_q, h_max, _ = q.shape
    d_v = v.shape[3]
    out = torch.zeros(b_total, n_q, h_max, d_v, dtype=q.dtype)
    for b, h_active in enumerate(heads.sample_widths()):
        for h in range(h_active):
            mask = None if bias is None else bias[b if bias.shape[0] > 1 else 0, h]
            out[b, :, h] = F.scaled_dot_product_attention(q[b, :, h][None], k[b, :, h][None], v[b, :, h][None],
                                                          attn_mask=mask)[0]
    return out.reshape(b_total, n_q, h_max * d_v)


CASES = [  # (sizes, head widths, Nq, Nk, H_max, d_qk, d_v)
    ((2, 0, 1, 3), (3, 2, 0, 1), 7, 7, 3, 4, 8),
    ((1,), (4,), 16, 49, 4, 16, 32),      # LeViT shrink 7 -> 4 geometry
    ((2, 2), (2, 1), 17, 17, 2, 8, 8),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bias_kind", ["none", "table", "dense_h", "dense_1", "dense_b"])
def test_reference_matches_per_sample_sdpa(case, bias_kind):
    sizes, widths, nq, nk, h_max, d, dv = case
    heads = Ragged(sizes, widths)
    q, k, v = _qkv(heads.batch, nq, nk, h_max, d, dv)
    kwargs, bias = {}, None
    if bias_kind == "table":
        table, index = torch.randn(h_max, 11, dtype=q.dtype), torch.randint(0, 11, (nq, nk))
        kwargs, bias = dict(bias_table=table, bias_index=index), table[:, index][None]
    elif bias_kind.startswith("dense"):
        lead = {"dense_h": (h_max,), "dense_1": (1,), "dense_b": (heads.batch, h_max)}[bias_kind]
        dense = torch.randn(*lead, nq, nk, dtype=q.dtype)
        kwargs, bias = dict(dense_bias=dense), dense if dense.dim() == 4 else dense[None].expand(1, h_max, nq, nk)
    out = ragged_attention(q, k, v, heads, scale=d ** -0.5, **kwargs)
    torch.testing.assert_close(out, _per_sample_sdpa(q, k, v, heads, bias), rtol=1e-12, atol=1e-12)
    masked = masked_attention(q, k, v, heads.mask(h_max), **kwargs)
    torch.testing.assert_close(masked, out, rtol=1e-12, atol=1e-12)


def test_reference_grid_equals_index_and_default_scale():
    q, k, v = _qkv(2, 16, 49, 3, 16, 32)
    table = torch.randn(3, 49, dtype=q.dtype)
    a = ragged_attention(q, k, v, bias_table=table, bias_grid=(7, 2))
    b = ragged_attention(q, k, v, bias_table=table, bias_index=levit_bias_index(7, 2), scale=16 ** -0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = ragged_attention(q, k, v, bias_table=table, bias_index=levit_bias_index(7, 2), scale=0.5)
    assert not torch.allclose(a, c)  # the default scale is d_qk^-0.5, not something else


def test_reference_low_precision_softmax_in_fp32():
    """bf16 inputs: the reference computes in fp32 and rounds once at the end, so its output is the exact result on
    the (bf16-rounded) inputs to within one bf16 rounding (relative 2^-8 at most) plus fp32 noise. Computing the scores
    or the softmax in bf16 instead misses this by orders of magnitude (hundreds of ulps on these inputs)."""
    q, k, v = (t.bfloat16() for t in _qkv(2, 17, 17, 2, 32, 32))
    table, index = torch.randn(2, 5), torch.randint(0, 5, (17, 17))
    exact = ragged_attention(q.double(), k.double(), v.double(), bias_table=table.double(), bias_index=index)
    low = ragged_attention(q, k, v, bias_table=table, bias_index=index)
    assert low.dtype == torch.bfloat16
    one_rounding = exact.abs() * 2.0 ** -8 + 1e-6
    assert ((low.double() - exact).abs() <= one_rounding).all()


# ---------------------------------------------------------------------------------------------------------------------
# Gradients (fp64 gradcheck): the reference is the backward oracle, so its autograd must be right
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias_kind", ["none", "table_index", "table_grid", "dense_h", "dense_1", "dense_b"])
def test_reference_gradcheck_fp64(bias_kind):
    heads = Ragged((1, 2, 0, 1), (2, 1, 3, 0))
    nq, nk = (4, 9) if bias_kind == "table_grid" else (5, 6)  # grid (3, 2): Nq = 2^2, Nk = 3^2
    q, k, v = _qkv(heads.batch, nq, nk, 3, 3, 2, grad=True)
    inputs, make = [q, k, v], None
    if bias_kind.startswith("table"):
        table = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
        index = torch.randint(0, 9, (nq, nk))
        extra = dict(bias_grid=(3, 2)) if bias_kind == "table_grid" else dict(bias_index=index)
        inputs.append(table)
        make = lambda q, k, v, t: ragged_attention(q, k, v, heads, bias_table=t, **extra)  # noqa: E731
    elif bias_kind.startswith("dense"):
        lead = {"dense_h": (3,), "dense_1": (1,), "dense_b": (heads.batch, 3)}[bias_kind]
        inputs.append(torch.randn(*lead, nq, nk, dtype=torch.float64, requires_grad=True))
        make = lambda q, k, v, b: ragged_attention(q, k, v, heads, dense_bias=b)  # noqa: E731
    else:
        make = lambda q, k, v: ragged_attention(q, k, v, heads, scale=0.7)  # noqa: E731
    assert torch.autograd.gradcheck(make, tuple(inputs), eps=1e-6, atol=1e-8)


def test_reference_inactive_heads_get_zero_gradients():
    heads = Ragged((2, 1), (1, 0))
    q, k, v = _qkv(3, 5, 5, 2, 4, 4, grad=True)
    table = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    out = ragged_attention(q, k, v, heads, bias_table=table, bias_index=torch.randint(0, 3, (5, 5)))
    assert (out[:2, :, 4:] == 0).all() and (out[2] == 0).all()
    out.square().sum().backward()
    for t in (q, k, v):
        assert (t.grad[:2, :, 1:] == 0).all() and (t.grad[2] == 0).all()
        assert t.grad[:2, :, 0].abs().sum() > 0
    assert (table.grad[1] == 0).all() and table.grad[0].abs().sum() > 0
