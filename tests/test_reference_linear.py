"""The ragged-linear reference itself: equal to stock per-group nn.Linear sub-modules on sliced weights (the sliced
sub-network, AutoFormer-style) and to the original full-width masked formulation (ViT-ResNAS), in fp64, tightly.

These pin down the spec every kernel is tested against (tests/test_ragged_linear.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from resnas_kernels import Ragged
from resnas_kernels import reference as ref

# fp64, same math in a different order (one GEMM per group vs one full-width GEMM): differences are a few ulps of
# the O(10) outputs; 1e-12 is ~1e3 ulps of fp64 and still 1e-4 of fp32's ulp, so an fp32 slip would fail.
TOL = dict(rtol=0, atol=1e-12)


def _out_mask(sizes, n_widths, seg_width, segments):
    """(B, N_max) bool: the first n_g columns of every segment for the samples of group g."""
    cols = torch.arange(seg_width * segments) % seg_width
    widths = torch.tensor([n for s, n in zip(sizes, n_widths) for _ in range(s)], dtype=torch.long)
    return cols[None, :] < widths[:, None]


def _inputs(sizes, k_widths, tokens, k_max, n_max):
    g = Ragged(sizes, k_widths)
    x = torch.randn(g.batch, tokens, k_max, dtype=torch.float64) * g.mask(k_max, dtype=torch.float64)[:, None, :]
    w = torch.randn(n_max, k_max, dtype=torch.float64) / math.sqrt(k_max)
    b = torch.randn(n_max, dtype=torch.float64)
    return g, x, w, b


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # nn.Linear(k, 0) for the width-0 group
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_equals_per_group_nn_linear_on_sliced_weights(activation):
    sizes, k_widths, n_widths = (2, 1, 0, 3), (20, 7, 13, 0), (9, 0, 4, 16)
    g, x, w, b = _inputs(sizes, k_widths, 5, 20, 16)
    y = ref.ragged_linear(x, w, b, g, n_widths, activation=activation)
    assert y.shape == (g.batch, 5, 16)
    for (start, end), k, n in zip(zip(g.offsets, g.offsets[1:]), k_widths, n_widths):
        lin = torch.nn.Linear(k, n, dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(w[:n, :k])
            lin.bias.copy_(b[:n])
        expected = lin(x[start:end, :, :k])
        if activation == "gelu":
            expected = torch.nn.GELU()(expected)
        torch.testing.assert_close(y[start:end, :, :n], expected, **TOL)
        assert (y[start:end, :, n:] == 0).all()


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # nn.Linear(0, n) for the k_g = 0 group
def test_segmented_qkv_equals_three_sliced_linears_per_group():
    """qkv: q, k and v each take the first n_g = heads * head_dim rows of their own third of the weight."""
    heads_max, d = 4, 8
    seg = heads_max * d
    sizes, k_widths, heads = (2, 3, 1), (24, 16, 0), (3, 4, 2)
    n_widths = tuple(h * d for h in heads)
    g, x, w, b = _inputs(sizes, k_widths, 7, 24, 3 * seg)
    y = ref.ragged_linear(x, w, b, g, n_widths, segments=3)
    qkv = y.view(g.batch, 7, 3, heads_max, d)
    for (start, end), k, h in zip(zip(g.offsets, g.offsets[1:]), k_widths, heads):
        for s in range(3):
            lin = torch.nn.Linear(k, h * d, dtype=torch.float64)
            with torch.no_grad():
                lin.weight.copy_(w[s * seg:s * seg + h * d, :k])
                lin.bias.copy_(b[s * seg:s * seg + h * d])
            expected = lin(x[start:end, :, :k]).view(end - start, 7, h, d)
            torch.testing.assert_close(qkv[start:end, :, s, :h], expected, **TOL)
            assert (qkv[start:end, :, s, h:] == 0).all()


@pytest.mark.parametrize("segments", [1, 3])
@pytest.mark.parametrize("epilogue", ["bias", "gelu", "residual", "drop_path"])
def test_equals_masked_full_width_linear(segments, epilogue):
    sizes, k_widths, n_widths = (3, 0, 2, 1), (32, 8, 17, 0), (10, 12, 0, 5)
    seg = 12
    g, x, w, b = _inputs(sizes, k_widths, 4, 32, seg * segments)
    in_mask = g.mask(32)[:, None, :]
    out_mask = _out_mask(sizes, n_widths, seg, segments)[:, None, :]
    kwargs = {}
    if epilogue == "gelu":
        kwargs["activation"] = "gelu"
    if epilogue in ("residual", "drop_path"):
        kwargs["residual"] = torch.randn(g.batch, 4, seg * segments, dtype=torch.float64) * out_mask
    if epilogue == "drop_path":
        kwargs["row_scale"] = (torch.rand(g.batch) > 0.4).double() / 0.6
    y = ref.ragged_linear(x, w, b, g, n_widths, segments=segments, **kwargs)
    masked = ref.masked_linear(x, w, b, in_mask, out_mask, **kwargs)
    torch.testing.assert_close(y, masked, **TOL)


def test_widths_zero_and_out_widths_as_ragged():
    """k_g = 0 gives act(bias) on the active outputs; n_g = 0 gives zeros; out_widths may be a Ragged."""
    g, x, w, b = _inputs((2, 2), (0, 6), 3, 6, 8)
    y = ref.ragged_linear(x, w, b, g, Ragged((2, 2), (5, 0)), activation="gelu")
    torch.testing.assert_close(y[:2, :, :5], F.gelu(b[:5]).expand(2, 3, 5), **TOL)
    assert (y[:2, :, 5:] == 0).all() and (y[2:] == 0).all()
    with pytest.raises(ValueError, match="same groups"):
        ref.ragged_linear(x, w, b, g, Ragged((3, 1), (5, 0)))
