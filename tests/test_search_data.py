"""Data loading: the demo digits split and an ImageFolder tree (decoded once into memory)."""
import numpy as np
import pytest
import torch
from PIL import Image

from resnas_kernels.search import data


def test_demo_split_is_fixed_stratified_and_disjoint():
    train, val = data.load_demo(56)
    assert len(train) + len(val) == 1797 and train.images.shape[1:] == (3, 56, 56)
    assert train.images.dtype == torch.uint8 and train.num_classes == 10
    counts = torch.bincount(val.labels, minlength=10)
    assert counts.min() >= 30                                   # about 20 % of every class
    again_train, again_val = data.load_demo(56)
    assert torch.equal(again_val.images, val.images) and torch.equal(again_train.labels, train.labels)
    flat = lambda s: {bytes(x.numpy().tobytes()) for x in s.images}  # noqa: E731
    # digits has a handful of exact duplicate images; the splits must not share (almost) any
    assert len(flat(train) & flat(val)) < 10


def test_batch_indices_cover_each_epoch_once():
    seen = torch.cat([data.batch_indices(50, 8, s, seed=1) for s in range(6)])   # 6 steps = one epoch
    assert len(set(seen.tolist())) == 48
    assert not torch.equal(data.batch_indices(50, 8, 0, 1), data.batch_indices(50, 8, 6, 1))  # next epoch reshuffles
    with pytest.raises(ValueError, match="exceeds"):
        data.batch_indices(5, 8, 0, 0)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png")
    train, val = data.load_data(str(tmp_path), 56)
    assert train.images.shape == (6, 3, 56, 56) and val.num_classes == 2
    assert sorted(train.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="val/"):
        data.load_image_folder(str(tmp_path / "train"), 56)


def test_space_round_trip_and_names():
    assert data.space_from_dict(data.space_to_dict(data.DEMO_SPACE)) == data.DEMO_SPACE
    assert data.resolve_space("tiny").name == "tiny"
    with pytest.raises(ValueError, match="unknown search space"):
        data.resolve_space("huge")
    with pytest.raises(ValueError, match="search-space record"):
        data.space_from_dict({"name": "x"})
