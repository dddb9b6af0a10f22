"""The RSR reference against stock modules (LayerNorm, Conv2d, AvgPool2d, Linear, cat) and the masked formulation."""
import pytest
import torch
from torch import nn

from resnas_kernels import Ragged
from resnas_kernels.reference import masked_residual_spatial_reduction, residual_spatial_reduction, rsr_output_grid


def _params(ci_max, co_max, out_tokens, dtype=torch.float64):
    return dict(
        ln_weight=torch.randn(ci_max, dtype=dtype) * 0.3 + 1, ln_bias=torch.randn(ci_max, dtype=dtype) * 0.1,
        conv_weight=torch.randn(co_max, ci_max, 3, 3, dtype=dtype) * 0.1, conv_bias=torch.randn(co_max, dtype=dtype),
        pos_embed=torch.randn(1, out_tokens, co_max, dtype=dtype) * 0.02,
        cls_weight=torch.randn(co_max, ci_max, dtype=dtype) * 0.1, cls_bias=torch.randn(co_max, dtype=dtype))


def _stock_rsr(xg, ci, co, p, grid, has_cls, eps=1e-6):
    """One group through freshly built stock modules holding sliced copies of the weights."""
    ln = nn.LayerNorm(ci, eps=eps, dtype=xg.dtype)
    conv = nn.Conv2d(ci, co, 3, 2, 1, dtype=xg.dtype)
    cls = nn.Linear(ci, co, dtype=xg.dtype)
    with torch.no_grad():
        ln.weight.copy_(p["ln_weight"][:ci]); ln.bias.copy_(p["ln_bias"][:ci])
        conv.weight.copy_(p["conv_weight"][:co, :ci]); conv.bias.copy_(p["conv_bias"][:co])
        cls.weight.copy_(p["cls_weight"][:co, :ci]); cls.bias.copy_(p["cls_bias"][:co])
    pool = nn.AvgPool2d(2, 2, ceil_mode=True)
    n_cls = int(has_cls)
    x = xg[..., :ci]
    u = ln(x)
    b = x.shape[0]
    img = u[:, n_cls:].transpose(1, 2).reshape(b, ci, *grid)
    raw = x[:, n_cls:].transpose(1, 2).reshape(b, ci, *grid)
    main = conv(img).flatten(2).transpose(1, 2) + p["pos_embed"][..., :co]
    short = pool(raw).flatten(2).transpose(1, 2)
    short = torch.cat([short, short.new_zeros(*short.shape[:2], co - ci)], dim=-1)
    out = main + short
    if has_cls:
        cls_out = cls(u[:, :1]) + torch.cat([x[:, :1], x.new_zeros(b, 1, co - ci)], dim=-1)
        out = torch.cat([cls_out, out], dim=1)
    return out


@pytest.mark.parametrize("grid", [(16, 16), (8, 8), (4, 4), (14, 14), (7, 7)], ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("has_cls", [True, False], ids=["cls", "nocls"])
def test_reference_equals_stock_modules_and_masked(grid, has_cls):
    sizes, ci_w, co_w = (2, 0, 1, 3), (12, 0, 8, 5), (20, 0, 8, 16)
    ci_max, co_max = 12, 24
    g = Ragged(sizes, ci_w)
    out_grid = rsr_output_grid(grid)
    p = _params(ci_max, co_max, out_grid[0] * out_grid[1])
    n = int(has_cls) + grid[0] * grid[1]
    x = torch.randn(g.batch, n, ci_max, dtype=torch.float64) * g.mask(ci_max, dtype=torch.float64)[:, None]
    y = residual_spatial_reduction(x, g, co_w, **p, grid=grid, has_cls=has_cls)
    assert y.shape == (g.batch, int(has_cls) + out_grid[0] * out_grid[1], co_max)
    for (start, end), ci, co in zip(zip(g.offsets, g.offsets[1:]), ci_w, co_w):
        if end == start or co == 0:
            assert (y[start:end] == 0).all()
            continue
        expected = _stock_rsr(x[start:end], ci, co, p, grid, has_cls)
        torch.testing.assert_close(y[start:end, :, :co], expected, rtol=1e-12, atol=1e-12)
        assert (y[start:end, :, co:] == 0).all()
    out_mask = g.with_widths(co_w).mask(co_max, dtype=torch.float64)[:, None]
    masked = masked_residual_spatial_reduction(x, g.mask(ci_max, dtype=torch.float64)[:, None], out_mask, **p,
                                               grid=grid, has_cls=has_cls)
    torch.testing.assert_close(masked, y, rtol=1e-10, atol=1e-10)


def test_odd_grid_rounds_up_and_averages_only_existing_tokens():
    assert rsr_output_grid((7, 7)) == (4, 4) and rsr_output_grid((16, 16)) == (8, 8)
    g = Ragged((1,), (4,))
    p = _params(4, 4, 16)
    for k in ("conv_weight", "conv_bias", "pos_embed", "cls_weight", "cls_bias"):
        p[k].zero_()
    x = torch.arange(49 * 4, dtype=torch.float64).reshape(1, 49, 4)
    y = residual_spatial_reduction(x, g, (4,), **p, grid=(7, 7), has_cls=False)
    # The bottom-right output token's window holds only token (6, 6): its average is that token itself.
    torch.testing.assert_close(y[0, -1], x[0, 48])


def test_gradcheck():
    g = Ragged((1, 2), (3, 2))
    p = {k: v.requires_grad_() for k, v in _params(3, 5, 4).items()}
    mask = g.mask(3, dtype=torch.float64)[:, None]
    x = (torch.randn(3, 17, 3, dtype=torch.float64) * mask).requires_grad_()

    def fn(x, *params):
        kw = dict(zip(p.keys(), params))
        return residual_spatial_reduction(x * mask, g, (5, 4), **kw, grid=(4, 4))

    assert torch.autograd.gradcheck(fn, (x, *p.values()))


def test_bad_input():
    g = Ragged((1,), (8,))
    p = _params(8, 8, 16)
    x = torch.randn(1, 65, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"out_widths\[0\]=6 must be >= in_groups.widths\[0\]=8"):
        residual_spatial_reduction(x, g, (6,), **p, grid=(8, 8))
    with pytest.raises(ValueError, match=r"in_groups.widths\[0\] is 0 but out_widths\[0\]=4"):
        residual_spatial_reduction(x, Ragged((1,), (0,)), (4,), **p, grid=(8, 8))
    with pytest.raises(ValueError, match=r"x has 65 tokens but grid=\(7, 7\) with has_cls=True needs 50"):
        residual_spatial_reduction(x, g, (8,), **p, grid=(7, 7))
    with pytest.raises(ValueError, match=r"out_widths\[0\]=9 exceeds the maximum width 8"):
        residual_spatial_reduction(x, g, (9,), **p, grid=(8, 8))
    with pytest.raises(ValueError, match="by the conv but to"):
        rsr_output_grid((8, 8), kernel_size=3, stride=2, padding=0)
