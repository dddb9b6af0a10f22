"""The Ragged metadata object: validation, derived facts, device tables."""
import numpy as np
import pytest
import torch

from resnas_kernels import Ragged
from resnas_kernels.ragged import as_ragged


def test_derived_facts():
    g = Ragged((2, 0, 3), (40, 0, 17))
    assert g.num_groups == 3 and g.batch == 5 and g.max_width == 40
    assert g.offsets == (0, 2, 2, 5)
    assert g.row_counts(7) == (14, 0, 21)
    assert g.active_elements(7) == 2 * 7 * 40 + 3 * 7 * 17
    assert g.sample_widths() == (40, 40, 17, 17, 17)
    m = g.mask(45)
    assert m.shape == (5, 45) and m.dtype == torch.bool
    assert m.sum(1).tolist() == [40, 40, 17, 17, 17]
    assert m[:, :17].all() and not m[:, 40:].any()


def test_numpy_ints_are_accepted_and_normalised():
    g = Ragged(np.array([1, 2]), [np.int64(3), 4])
    assert g.sizes == (1, 2) and g.widths == (3, 4)
    assert all(type(v) is int for v in g.sizes + g.widths)
    assert hash(g) == hash(Ragged((1, 2), (3, 4)))


@pytest.mark.parametrize("sizes,widths,exc,match", [
    ((), (), ValueError, "at least one group"),
    ((1, 2), (3,), ValueError, "one entry per group"),
    ((-1, 2), (3, 3), ValueError, r"sizes\[0\] must be >= 0"),
    ((1, 2), (3, -3), ValueError, r"widths\[1\] must be >= 0"),
    ((1.0, 2), (3, 3), TypeError, r"sizes\[0\] must be an int"),
    ((True, 2), (3, 3), TypeError, r"sizes\[0\] must be an int"),
    (torch.tensor([1, 2]), (3, 3), TypeError, "host-side"),
    (5, (3,), TypeError, "sequence of ints"),
])
def test_invalid_metadata_is_refused_with_a_clear_message(sizes, widths, exc, match):
    with pytest.raises(exc, match=match):
        Ragged(sizes, widths)


def test_check_against_a_tensor():
    g = Ragged((2, 3), (10, 12))
    g.check(5, 12)
    with pytest.raises(ValueError, match=r"sum of group sizes \(5.*must equal the batch size of x \(6\)"):
        g.check(6, 12)
    with pytest.raises(ValueError, match=r"widths\[1\]=12 exceeds the maximum width 11 of x"):
        g.check(5, 11)


def test_helpers():
    g = Ragged((1, 2), (3, 4))
    assert g.with_widths((5, 6)) == Ragged((1, 2), (5, 6))
    assert as_ragged(None, 3, 8) == Ragged((3,), (8,))
    with pytest.raises(TypeError, match="groups must be a resnas_kernels.Ragged"):
        as_ragged(((1, 2), (3, 4)), 3, 8)
