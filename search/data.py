"""Data for supernet training and search: the demo and ImageFolder datasets, the three splits of the protocol.

Sources:

* the **demo data** (no `--data`), chosen by `--demo-data`:
  - `shapes` (default): the procedurally generated "shapes in clutter" task of `search/shapes.py` (16 classes,
    seeded, no download; 400 training and 50 validation images per class), hard enough at 56 px that sub-networks
    of different size reach different accuracies;
  - `digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, 10 classes) upscaled to `img_size`,
    a fixed stratified 20 % validation split (seed 0). Kept for supernets trained before `shapes` existed (their
    checkpoints record no `demo_data`, which means digits); most sub-networks solve it, so it cannot rank them.
  Both are paired with the CPU-sized `DEMO_SPACE` (models/vit_resnas/space.py, with the other named spaces) at
  56 px.
* `--data PATH`: an ImageFolder tree with `train/` and `val/` (torchvision), decoded with resize + center crop.

The protocol (vit_resnas.md 5.8 and 6: the paper holds 25 images per class out of ImageNet's training set): the
training set is split into **sub-train** (supernet training) and a **held-out** set of `holdout_per_class` images per
class (`carve_holdout`, seeded, stratified); the search scores candidates on the held-out images, and the
**validation** split is touched only to report the accuracy of the chosen networks. `load_splits` returns the three.

Everything is returned as in-memory tensors (`Split`): images as uint8 (N, 3, S, S), normalised on the fly by
`normalize`. Training batches are chosen by `batch_indices(step)`, a pure function of (seed, step): nothing about
the data order has to be saved to resume exactly; `split_batch` cuts one into the groups of its sub-networks.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["DEMO_DATASETS", "Split", "Splits", "load_demo", "load_shapes", "load_image_folder", "load_data",
           "load_splits", "carve_holdout", "default_holdout", "normalize", "batch_indices", "split_batch",
           "LEGACY_RUN_ARGS"]

DEMO_DATASETS = ("shapes", "digits")
# The demo shapes task: images per class in the training pool (sub-train + held-out) and in validation.
SHAPES_TRAIN_PER_CLASS, SHAPES_VAL_PER_CLASS = 400, 50
# Held-out images per class carved from the training set: the paper's 25 (of ImageNet's ~1,280) with --data; on the
# demo enough for the search to tell candidates apart (800 shapes images; 200 digits).
HOLDOUT_PER_CLASS = {None: 25, "shapes": 50, "digits": 20}
# The held-out carve does not depend on the training seed: runs with different seeds select on the same images.
HOLDOUT_SEED = 0
# What a run's saved arguments mean when they predate these options: digits was the only demo, nothing was held out.
LEGACY_RUN_ARGS = {"demo_data": "digits", "holdout_per_class": 0}

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass
class Split:
    images: torch.Tensor      # (N, 3, S, S) uint8
    labels: torch.Tensor      # (N,) int64
    num_classes: int

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, n: Optional[int]) -> "Split":
        """The first n samples (the splits are already shuffled, so this is a random, fixed subset)."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise ValueError(f"a subset needs at least one sample, got {n}")
        return Split(self.images[:n], self.labels[:n], self.num_classes)


def normalize(images: torch.Tensor, device=None, dtype=torch.float32) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> normalised float images (ImageNet mean / std)."""
    x = images.to(device=device, non_blocking=True).to(dtype).div_(255.0)
    mean = torch.tensor(MEAN, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


class Splits(NamedTuple):
    """The protocol's three splits: supernet training, candidate selection, final report."""
    train: Split      # sub-train: the training set minus the held-out images
    holdout: Split    # held out of the training set: the search's fitness
    val: Split        # untouched until the chosen networks are reported


@functools.lru_cache(maxsize=2)
def _shapes_pool(n: int, img_size: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    # cached: train-supernet, search, export and the demo's evaluation in one process generate the same images once
    from .shapes import generate
    return generate(n, img_size, seed)


def load_shapes(img_size: int = 56, train_per_class: int = SHAPES_TRAIN_PER_CLASS,
                val_per_class: int = SHAPES_VAL_PER_CLASS) -> Tuple[Split, Split]:
    """(train, val) of the generated shapes task (search/shapes.py): two independently seeded draws, class-balanced.
    The generator's images are continuous random scenes, so the two draws share no image."""
    from .shapes import NUM_CLASSES
    x, y = _shapes_pool(train_per_class * NUM_CLASSES, img_size, 1)
    vx, vy = _shapes_pool(val_per_class * NUM_CLASSES, img_size, 2)
    return Split(x, y, NUM_CLASSES), Split(vx, vy, NUM_CLASSES)


def load_demo(img_size: int = 56, val_fraction: float = 0.2) -> Tuple[Split, Split]:
    """sklearn's bundled 8x8 digits, bilinearly upscaled to img_size, 3 channels; stratified split with seed 0."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RuntimeError("the demo data is scikit-learn's bundled digits: `pip install scikit-learn`, or pass "
                           "--data PATH (an ImageFolder tree with train/ and val/)") from None
    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div(16.0)[:, None]          # (1797, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(digits.target).long()
    g = torch.Generator().manual_seed(0)
    train_idx, val_idx = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = int(round(len(idx) * val_fraction))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    train_idx = torch.cat(train_idx)[torch.randperm(sum(map(len, train_idx)), generator=g)]
    val_idx = torch.cat(val_idx)[torch.randperm(sum(map(len, val_idx)), generator=g)]
    return Split(x[train_idx], y[train_idx], 10), Split(x[val_idx], y[val_idx], 10)


def _decode_folder(root: str, img_size: int) -> Split:
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize(int(round(img_size / 0.875)),
                                               interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.CenterCrop(img_size), transforms.PILToTensor()])
    try:
        ds = datasets.ImageFolder(root, transform=tf)
    except FileNotFoundError as exc:   # no class folders, or a class folder without images
        raise ValueError(f"{root} is not a usable ImageFolder split: {exc}") from None
    if len(ds) == 0:
        raise ValueError(f"{root} holds no images")
    images = torch.empty((len(ds), 3, img_size, img_size), dtype=torch.uint8)
    labels = torch.empty(len(ds), dtype=torch.long)
    for i in range(len(ds)):               # decoded once, kept in memory
        img, label = ds[i]
        images[i] = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
        labels[i] = label
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    return Split(images[perm], labels[perm], len(ds.classes))


def load_image_folder(path: str, img_size: int) -> Tuple[Split, Split]:
    for sub in ("train", "val"):
        if not os.path.isdir(os.path.join(path, sub)):
            raise ValueError(f"--data {path!r} must be an ImageFolder tree with train/ and val/ sub-folders "
                             f"(missing {sub}/)")
    # Labels are the positions of the sorted class-folder names: val/ must name exactly train/'s classes, or its
    # labels would silently mean other classes.
    classes = {sub: sorted(e.name for e in os.scandir(os.path.join(path, sub)) if e.is_dir())
               for sub in ("train", "val")}
    if not classes["train"]:
        raise ValueError(f"--data {path!r}: train/ holds no class folders (expected train/<class>/<image>)")
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        raise ValueError(f"--data {path!r}: val/ must hold the same class folders as train/; only in train/: "
                         f"{_names(only_train)}; only in val/: {_names(only_val)}")
    train, val = _decode_folder(os.path.join(path, "train"), img_size), _decode_folder(os.path.join(path, "val"),
                                                                                         img_size)
    return train, val


def _names(names, shown: int = 5) -> str:
    return (", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")) or "none"


def load_data(path: Optional[str], img_size: int, demo: str = "shapes") -> Tuple[Split, Split]:
    """(train, val): the ImageFolder tree at `path`, or the `demo` dataset when `path` is None."""
    if path is not None:
        return load_image_folder(path, img_size)
    if demo == "shapes":
        return load_shapes(img_size)
    if demo == "digits":
        return load_demo(img_size)
    raise ValueError(f"--demo-data must be one of {', '.join(DEMO_DATASETS)}, got {demo!r}")


def default_holdout(path: Optional[str], demo: str = "shapes") -> int:
    """Held-out images per class when none is given: the paper's 25 with --data, more on the small demo sets."""
    return HOLDOUT_PER_CLASS[None if path is not None else demo]


def carve_holdout(train: Split, per_class: int, seed: int = HOLDOUT_SEED) -> Tuple[Split, Split]:
    """(sub-train, held-out): `per_class` images of every class move from `train` to the held-out split, chosen by a
    permutation seeded by `seed` (stratified, as the paper's 25 images per class of ImageNet). Both keep the order
    of `train` (already shuffled), so a prefix of either is still a random subset. per_class 0: (train, empty)."""
    if per_class < 0:
        raise ValueError(f"--holdout-per-class must be >= 0, got {per_class}")
    counts = torch.bincount(train.labels, minlength=train.num_classes)
    if per_class > 0 and int(counts.min()) <= per_class:
        c = int(counts.argmin())
        raise ValueError(f"--holdout-per-class {per_class} leaves no training image of class {c} (it has "
                         f"{int(counts[c])}); hold out fewer")
    g = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(train), dtype=torch.bool)
    for c in range(train.num_classes):
        idx = (train.labels == c).nonzero().flatten()
        held[idx[torch.randperm(len(idx), generator=g)[:per_class]]] = True
    keep = (~held).nonzero().flatten()
    out = held.nonzero().flatten()
    return (Split(train.images[keep], train.labels[keep], train.num_classes),
            Split(train.images[out], train.labels[out], train.num_classes))


def load_splits(path: Optional[str], img_size: int, holdout_per_class: int, demo: str = "shapes") -> Splits:
    """Sub-train, held-out (carved from the training set) and validation splits; see the module docstring."""
    train, val = load_data(path, img_size, demo)
    sub_train, holdout = carve_holdout(train, holdout_per_class)
    return Splits(sub_train, holdout, val)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The global batch of training step `step`: epoch e = step // (n // batch_size) walks a permutation seeded by
    (seed, e) in order, dropping the last partial batch. A pure function of its arguments, so resuming needs no
    sampler state."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch size {batch_size} exceeds the {n} training samples")
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[i * batch_size:(i + 1) * batch_size]


def split_batch(batch: int, groups: int) -> List[int]:
    """Sizes of the contiguous groups a batch is split into, one sub-network each: as equal as possible (the first
    groups get the remainder)."""
    base, extra = divmod(batch, groups)
    return [base + (g < extra) for g in range(groups)]
