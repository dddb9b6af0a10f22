"""Data loading: the demo digits split and an ImageFolder tree (decoded once into memory)."""
import numpy as np
import pytest
import torch
from PIL import Image

from resnas_kernels.models.vit_resnas.space import DEMO_SPACE, get_space, space_from_dict, space_to_dict
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
    assert space_from_dict(space_to_dict(DEMO_SPACE)) == DEMO_SPACE
    assert get_space("tiny").name == "tiny"
    with pytest.raises(ValueError, match="unknown search space"):
        get_space("huge")
    with pytest.raises(ValueError, match="search-space record"):
        space_from_dict({"name": "x"})


def test_shapes_generator_is_seeded_and_class_balanced():
    from resnas_kernels.search import shapes
    x, y = shapes.generate(40, 56, seed=3)
    assert x.shape == (40, 3, 56, 56) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.bincount(y, minlength=16).tolist() == [3] * 8 + [2] * 8          # 40 = 2 * 16 + 8
    x2, y2 = shapes.generate(40, 56, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = shapes.generate(40, 56, seed=4)
    assert not torch.equal(x, x3)
    assert x.float().std() > 20                                                    # not blank images
    with pytest.raises(ValueError, match="n >= 1"):
        shapes.generate(0)


def test_holdout_is_carved_from_train_stratified_disjoint_and_seeded():
    n, classes = 60, 3
    ids = torch.arange(n)
    # every image carries its id in its first pixels, so membership can be read back from the pixels
    images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = ids % 256, ids // 256
    full = data.Split(images, torch.arange(n) % classes, classes)
    tr, ho = data.carve_holdout(full, 5, seed=7)
    read = lambda s: set((s.images[:, 0, 0, 0].long() + 256 * s.images[:, 0, 0, 1].long()).tolist())  # noqa: E731
    assert len(ho) == 15 and len(tr) == 45 and not (read(tr) & read(ho)) and read(tr) | read(ho) == set(range(n))
    assert torch.bincount(ho.labels, minlength=3).tolist() == [5, 5, 5]
    assert all(full.labels[i] == lab for i, lab in zip(sorted(read(ho)), ho.labels[torch.argsort(
        ho.images[:, 0, 0, 0].long() + 256 * ho.images[:, 0, 0, 1].long())].tolist()))
    tr2, ho2 = data.carve_holdout(full, 5, seed=7)
    assert torch.equal(ho2.images, ho.images) and torch.equal(tr2.labels, tr.labels)   # deterministic
    assert read(data.carve_holdout(full, 5, seed=8)[1]) != read(ho)                     # the seed matters
    assert len(data.carve_holdout(full, 0)[1]) == 0
    with pytest.raises(ValueError, match="--holdout-per-class 20 leaves no training image"):
        data.carve_holdout(full, 20)
    with pytest.raises(ValueError, match="--holdout-per-class"):
        data.carve_holdout(full, -1)


def test_demo_splits_are_disjoint_and_sized():
    splits = data.load_splits(None, 56, 50)
    assert (len(splits.train), len(splits.holdout), len(splits.val)) == (16 * 350, 16 * 50, 16 * 50)
    assert torch.bincount(splits.holdout.labels, minlength=16).tolist() == [50] * 16
    rows = lambda s: {bytes(x.numpy().tobytes()) for x in s.images}  # noqa: E731
    train, holdout, val = rows(splits.train), rows(splits.holdout), rows(splits.val)
    assert not (train & holdout) and not (train & val) and not (holdout & val)
    again = data.load_splits(None, 56, 50)
    assert torch.equal(again.holdout.images, splits.holdout.images)
    assert data.default_holdout(None, "shapes") == 50 and data.default_holdout("/x") == 25
