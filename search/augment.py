"""Training augmentation of the recipe (vit_resnas.md 5.8): RandAugment, horizontal flip, random erasing, and timm's
Mixup / CutMix, all on the in-memory uint8 batches of `data.Split`, built from timm's data utilities.

    uint8 batch --(per image, PIL)--> RandAugment (`timm.data.auto_augment.rand_augment_transform`), h-flip
                --> normalise on the device --> RandomErasing (`timm.data.random_erasing`, per-pixel noise)
                --> Mixup / CutMix (`timm.data.Mixup`: soft targets that already include label smoothing)

Defaults (trainer.py): the recipe's `rand-m9-mstd0.5-inc1`, erasing 0.25 and flip 0.5 with `--data`; everything off on
the demo data (the tiny demo must learn in minutes; on the digits a flipped or rotated digit is another digit).
Not implemented: the recipe's patch-token mixup (3.4), which needs the per-patch head; timm's Mixup / CutMix (off by
default) is the configurable stand-in. Color jitter is not applied, as timm does not with RandAugment.

Exact resume: timm draws from Python's `random`, NumPy's global RNG and torch's; `Augment.__call__` seeds all three
from (seed, rank, step) and restores the Python and NumPy states afterwards, so step t's augmentation is a pure
function of t, like its batch and architectures.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from .data import MEAN, normalize

__all__ = ["AugmentConfig", "Augment"]


@dataclass(frozen=True)
class AugmentConfig:
    auto_augment: Optional[str] = None    # timm RandAugment string, e.g. "rand-m9-mstd0.5-inc1"; None: off
    hflip: float = 0.0                    # probability of a horizontal flip per image
    reprob: float = 0.0                   # random-erasing probability per image
    mixup: float = 0.0                    # Mixup alpha (0: off)
    cutmix: float = 0.0                   # CutMix alpha (0: off)
    mixup_prob: float = 1.0               # probability of mixing a batch when mixup or cutmix is on

    def check(self) -> None:
        for name in ("hflip", "reprob", "mixup_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        for name in ("mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.auto_augment is not None and not self.auto_augment.startswith("rand"):
            raise ValueError(f"--aa must be a timm RandAugment string starting with 'rand' (e.g. "
                             f"rand-m9-mstd0.5-inc1) or 'none', got {self.auto_augment!r}")

    @property
    def active(self) -> bool:
        return bool(self.auto_augment or self.hflip or self.reprob or self.mixup or self.cutmix)


class Augment:
    """Callable (uint8 images, labels, seed) -> (normalised images on `device`, targets, soft?)."""

    def __init__(self, cfg: AugmentConfig, img_size: int, num_classes: int, label_smoothing: float, device):
        cfg.check()
        self.cfg, self.device = cfg, torch.device(device)
        self.ra = None
        if cfg.auto_augment:
            from timm.data.auto_augment import rand_augment_transform
            try:
                self.ra = rand_augment_transform(cfg.auto_augment, {
                    "translate_const": int(img_size * 0.45), "img_mean": tuple(round(255 * m) for m in MEAN)})
            except Exception as exc:  # noqa: BLE001  (timm raises assorted errors on a malformed string)
                raise ValueError(f"--aa {cfg.auto_augment!r}: not a valid timm RandAugment string: {exc}") from None
        self.erase = None
        if cfg.reprob > 0:
            from timm.data.random_erasing import RandomErasing
            self.erase = RandomErasing(cfg.reprob, mode="pixel", device=str(self.device))
        self.mix = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup
            self.mix = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                             label_smoothing=label_smoothing, num_classes=num_classes)

    def _pil_ops(self, images: torch.Tensor) -> torch.Tensor:
        from PIL import Image
        out = images.clone()
        for i in range(images.shape[0]):
            img = Image.fromarray(images[i].permute(1, 2, 0).numpy())
            if self.cfg.hflip and random.random() < self.cfg.hflip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            if self.ra is not None:
                img = self.ra(img)
            out[i] = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
        return out

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                        bool]:
        if not self.cfg.active:
            return normalize(images, self.device), labels.to(self.device), False
        if self.mix is not None and images.shape[0] % 2:
            raise ValueError(f"--mixup / --cutmix need an even per-rank batch, got {images.shape[0]}")
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed % (2 ** 32))
        torch.manual_seed(seed)
        try:
            if self.ra is not None or self.cfg.hflip:
                images = self._pil_ops(images)
            x = normalize(images, self.device)
            y = labels.to(self.device)
            if self.erase is not None:
                x = self.erase(x)
            if self.mix is not None:
                x, soft = self.mix(x, y)
                return x, soft, True
            return x, y, False
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
