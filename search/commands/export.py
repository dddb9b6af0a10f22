"""`resnas export --arch best.json --supernet checkpoint.pt --out net.pt`: a searched sub-network as a standalone
checkpoint that `timm.create_model` builds and loads.

The format and its loader are in `resnas_kernels.search.networks` (`load_exported`). To fine-tune or retrain the
searched net with the supernet trainer: `resnas train-subnet --arch best.json --init net.pt --out DIR`, which writes
DIR/net.pt in this format.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from resnas_kernels.models.vit_resnas import Arch

from ..networks import export_subnet
from ._common import report_errors

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resnas export", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", required=True, help="best.json of `resnas search` (or a JSON arch dict)")
    p.add_argument("--supernet", required=True, help="checkpoint.pt of `resnas train-supernet`")
    p.add_argument("--out", required=True, help="the standalone checkpoint to write (e.g. net.pt)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    meta = {}

    def work() -> int:
        meta.update(export_subnet(args.arch, args.supernet, args.out))
        return 0

    rc = report_errors("resnas export", work)
    if rc:
        return rc
    print(f"export: {args.out} ({Arch.from_dict(meta['arch'])}); load it with "
          f"resnas_kernels.search.networks.load_exported({args.out!r}) or timm.create_model({meta['timm_model']!r}, "
          f"arch=..., pretrained=True, pretrained_cfg_overlay=dict(file=...)) as in "
          f"{os.path.splitext(args.out)[0]}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
