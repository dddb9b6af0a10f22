"""`resnas search`: evolutionary search over a trained supernet (vit_resnas.md section 6), candidates scored many per
forward with a cached stem (`evaluate.CandidateScorer`).

Parsing and exit codes only; the search is `resnas_kernels.search.evolution` (its docstring describes the protocol,
the outputs and --resume).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..evolution import DEMO_SEARCH_DEFAULTS, run
from ._common import given_args, report_errors

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resnas search", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--supernet", default=None, help="checkpoint.pt of `resnas train-supernet` (required, except "
                                                    "with --resume)")
    p.add_argument("--out", required=True, help="search directory")
    p.add_argument("--data", default=None, help="ImageFolder tree: candidates are scored on the supernet's held-out "
                                                "share of train/, the result is reported on val/; default: the data "
                                                "the supernet was trained on")
    p.add_argument("--macs", default=None, help="MAC constraint C, e.g. 1.8G (default: halfway between the space's "
                                                "smallest and largest network)")
    demo = " (the paper's; a demo supernet's default: {})".format
    p.add_argument("--band", type=float, default=0.975,
                   help="candidates must have MACs in [band * C, C]" + demo(DEMO_SEARCH_DEFAULTS["band"]))
    p.add_argument("--generations", type=int, default=20,
                   help="iterations, the random population included" + demo(DEMO_SEARCH_DEFAULTS["generations"]))
    p.add_argument("--population", type=int, default=500,
                   help="random initial population" + demo(DEMO_SEARCH_DEFAULTS["population"]))
    p.add_argument("--parents", type=int, default=75,
                   help="top-k of all evaluated architectures" + demo(DEMO_SEARCH_DEFAULTS["parents"]))
    p.add_argument("--mutations", type=int, default=75, help="children by mutation per generation"
                   + demo(DEMO_SEARCH_DEFAULTS["mutations"]))
    p.add_argument("--crossovers", type=int, default=75, help="children by crossover per generation"
                   + demo(DEMO_SEARCH_DEFAULTS["crossovers"]))
    p.add_argument("--mutate-prob", type=float, default=0.3)
    p.add_argument("--crossover-prob", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-subset", type=int, default=None, help="score candidates on the first N held-out images")
    p.add_argument("--candidates-per-forward", type=int, default=8, help="candidates scored in one ragged forward")
    p.add_argument("--images-per-forward", type=int, default=128, help="held-out images per candidate per forward")
    p.add_argument("--latency-budget", type=float, default=None,
                   help="also require a predicted latency <= this many milliseconds on the current device")
    p.add_argument("--latency-lut", default=None,
                   help="latency lookup table (JSON; measured entries are added, existing ones reused); default "
                        "<out>/latency_lut.json when --latency-budget is given")
    p.add_argument("--latency-batch", type=int, default=1, help="batch size the latencies are measured at")
    p.add_argument("--latency-repeats", type=int, default=10, help="timed repeats per table entry (median)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--resume", action="store_true",
                   help="continue the search in --out with its saved arguments; an argument given again must equal "
                        "the saved one, except --generations (extends the search), --latency-lut, --device and "
                        "the output switches")
    p.add_argument("--no-plot", action="store_true", help="do not write pareto.png")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return report_errors("resnas search", lambda: run(args, given_args(build_parser, argv)))


if __name__ == "__main__":
    sys.exit(main())
