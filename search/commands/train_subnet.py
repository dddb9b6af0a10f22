"""`resnas train-subnet --arch best.json [--init net.pt] --out DIR`: fine-tune (from `resnas export`'s net.pt or a
sliced supernet checkpoint) or retrain from scratch one searched architecture with the supernet trainer
(search/trainer.py: same optimizer, schedule, augmentation, checkpoints, exact --resume, torchrun/DDP). Writes
DIR/net.pt at the end, loadable with `resnas_kernels.search.networks.load_exported` / `timm.create_model`."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from .train_supernet import main as _train_main

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    return _train_main(argv, subnet=True)


if __name__ == "__main__":
    sys.exit(main())
