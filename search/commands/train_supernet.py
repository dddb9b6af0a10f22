"""`resnas train-supernet`: supernet training with multi-architectural sampling (vit_resnas.md section 5).

Also `resnas train-subnet` (train_subnet.py): the same trainer on one fixed architecture. Parsing and exit codes only;
the trainer is `resnas_kernels.search.trainer` (its docstring describes the run, its outputs and --resume).
"""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Optional, Sequence

from ..data import DEMO_DATASETS
from ..trainer import WARMUP_RUN_FRACTION, TrainingDiverged, TrainingStopped, run
from ._common import given_args, report_errors

__all__ = ["main", "build_parser"]


def build_parser(subnet: bool = False) -> argparse.ArgumentParser:
    """The train-supernet parser; with `subnet`, the train-subnet one (--arch, --init; no sampling options)."""
    if subnet:
        p = argparse.ArgumentParser(prog="resnas train-subnet", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                    description="fine-tune or retrain one (searched) architecture with the supernet "
                                                "trainer; writes net.pt (timm-loadable) at the end")
        p.add_argument("--arch", required=True, help="best.json of `resnas search` (or a JSON arch dict)")
        p.add_argument("--init", default=None, help="initial weights: net.pt of `resnas export` (fine-tuning) or a "
                                                    "train-supernet checkpoint.pt (sliced); default: from scratch")
    else:
        p = argparse.ArgumentParser(prog="resnas train-supernet", description=__doc__.split("\n\n")[0],
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(arch=None, init=None)
    p.add_argument("--out", required=True, help="run directory (checkpoint.pt, metrics.jsonl, config.json)")
    p.add_argument("--data", default=None, help="ImageFolder tree with train/ and val/; default: the demo data")
    p.add_argument("--demo-data", choices=DEMO_DATASETS, default=None,
                   help="demo dataset without --data: shapes (generated, 16 classes) or digits (sklearn's 8x8)")
    p.add_argument("--holdout-per-class", type=int, default=None,
                   help="training images per class held out for the search to score candidates on (never trained "
                        "on); default 25 with --data (the paper), 50 shapes, 20 digits" +
                        ("; 0 for train-subnet (the final net trains on all of train/)" if subnet else ""))
    if not subnet:
        p.add_argument("--space", default=None, help="search space: demo | tiny | small (default: demo without "
                                                     "--data, tiny with it)")
    p.add_argument("--img-size", type=int, default=None, help="input side, a multiple of 56 (default 56 demo, 224)")
    p.add_argument("--epochs", type=int, default=None, help="default 120 (recipe), 15 for the demo")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default 1024 recipe, 64 demo)")
    if not subnet:
        p.add_argument("--archs-per-step", type=int, default=None,
                       help="K architectures per rank and step, each on a contiguous group (default: batch / 64 per "
                            "rank as the recipe, 2 for the demo)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak LR (default: the recipe's linear scaling 5e-4 * batch / 512, e.g. 1e-3 at batch 1024 "
                        "and 2.3e-5 at batch 24, so small batches train slowly: raise it by hand; demo 1e-3)")
    p.add_argument("--min-lr", type=float, default=None, help="LR at the end of the cosine (default lr / 100, the "
                                                              "recipe's 1e-5 at lr 1e-3)")
    p.add_argument("--warmup-lr", type=float, default=None, help="LR the warm-up starts from (default lr / 1000, the "
                                                                 "recipe's 1e-6 at lr 1e-3)")
    p.add_argument("--lr-warmup-epochs", type=float, default=None,
                   help=f"linear LR warm-up (default: the recipe's 5 epochs, 1 for the demo, at most "
                        f"1/{WARMUP_RUN_FRACTION} of a shorter run's --epochs)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--drop-path", type=float, default=None, help="default 0.2 tiny, 0.3 small, 0.1 demo")
    if subnet:   # one fixed architecture: nothing to sample, warm up or sort
        p.set_defaults(space=None, archs_per_step=1, width_warmup_epochs=0, sort_importance=False)
    else:
        p.add_argument("--width-warmup-epochs", type=int, default=None,
                       help="progressive width warm-up and importance sorting (default: the recipe's 30 of 120 "
                            "epochs, at most epochs // 4 in a shorter run and on the demo; 0 disables both)")
        p.add_argument("--no-sort-importance", dest="sort_importance", action="store_false",
                       help="no importance sorting during the width warm-up")
    p.add_argument("--aa", default=None, help="timm RandAugment string or 'none' (default: the recipe's "
                                          "rand-m9-mstd0.5-inc1 with --data, none on the demo data)")
    p.add_argument("--hflip", type=float, default=None, help="horizontal-flip probability (default 0.5 with --data, "
                                                             "0 demo)")
    p.add_argument("--reprob", type=float, default=None, help="random-erasing probability (default 0.25 with "
                                                              "--data, 0 demo)")
    p.add_argument("--mixup", type=float, default=0.0, help="timm Mixup alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=0.0, help="timm CutMix alpha (0: off)")
    p.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixing a batch")
    p.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="autocast on GPU (auto: bf16 on GPU, none on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--ckpt-every", type=int, default=None,
                   help="checkpoint every N steps, at step 0 and at the end (default 100; --resume keeps the run's "
                        "value unless given)")
    p.add_argument("--resume", action="store_true",
                   help="continue from --out/checkpoint.pt (exactly); the run's arguments come from the checkpoint")
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="checkpoint and stop after this many steps (a planned interruption; --resume continues)")
    p.add_argument("--eval-every-epoch", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the largest and smallest sub-networks on val at each epoch end")
    p.add_argument("--throttle", type=float, default=0.0, help="sleep this many seconds after each step (testing, "
                                                               "or sharing a busy machine)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (the per-epoch evaluation lines are still printed)")
    return p


def main(argv: Optional[Sequence[str]] = None, subnet: bool = False) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(subnet)
    args = parser.parse_args(argv)
    given = given_args(functools.partial(build_parser, subnet), argv)
    try:
        return report_errors(parser.prog, lambda: run(args, given))
    except TrainingDiverged as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except TrainingStopped as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; --resume continues from the last checkpoint in {args.out}, if any",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
