"""`resnas export --arch best.json --supernet checkpoint.pt --out net.pt`: a searched sub-network as a standalone
checkpoint that `timm.create_model` builds and loads.

The file is a dict with `state_dict` (the sub-network's weights: first-k slices of the supernet, removed blocks
dropped, names of `ViTResNASNet(arch.pruned())`), the pruned `arch` and the `timm` call that rebuilds it; timm's
loader reads its `state_dict` entry with weights_only=True. The architecture is not one of the registered names, so
the call passes it explicitly (every registered ViT-ResNAS name accepts `arch=`):

    import timm, resnas_kernels.models
    from resnas_kernels.models.vit_resnas import Arch
    net = timm.create_model("vit_resnas_tiny", arch=Arch.from_dict(arch_dict), img_size=56, num_classes=10,
                            pretrained=True, pretrained_cfg_overlay=dict(file="net.pt", num_classes=10))

`load_exported(path)` does exactly that, and `net.json` next to the checkpoint records the same arguments. To
fine-tune or retrain the searched net with the supernet trainer: `resnas train-subnet --arch best.json --init net.pt
--out DIR` (search/finetune.py), which writes DIR/net.pt in this format.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from resnas_kernels.models.vit_resnas import Arch

from .checkpoint import (EXPORT_FORMAT, VERSION, CheckpointError, read_checkpoint, save_checkpoint,
                         write_json_atomic)

__all__ = ["main", "export", "write_exported", "load_exported", "read_arch", "TIMM_NAME", "EXPORT_FORMAT"]

TIMM_NAME = "vit_resnas_tiny"   # any registered ViT-ResNAS name: `arch=` replaces its architecture


def read_arch(path: str) -> Arch:
    """An arch from best.json (its slot-aligned 'arch'), or from a file holding one arch dict."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--arch {path!r}: cannot read a JSON architecture: {exc}") from None
    if isinstance(doc, dict) and isinstance(doc.get("arch"), dict):
        doc = doc["arch"]
    try:
        return Arch.from_dict(doc)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--arch {path!r}: expected best.json of `resnas search` or an arch dict with 'embed', "
                         f"'head_dim' and 'blocks': {exc}") from None


def export(arch_path: str, supernet_path: str, out: str) -> dict:
    from .data import space_from_dict
    from .train import load_supernet

    arch = read_arch(arch_path)
    model, ckpt = load_supernet(supernet_path)
    space = space_from_dict(ckpt["space"])
    try:
        space.check(arch)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--arch {arch_path!r} is not an architecture of the supernet's {space.name} space: {exc}"
                         f" (export needs the slot-aligned 'arch' of best.json, not 'pruned')") from None
    net = model.extract(arch)
    return write_exported(net, out, img_size=ckpt["args"]["img_size"], num_classes=ckpt["num_classes"],
                          space=space.name, source={"supernet": os.path.abspath(supernet_path),
                                                    "supernet_step": int(ckpt["step"])})


def write_exported(net, out: str, img_size: int, num_classes: int, space: str, source: dict) -> dict:
    """Write `net` (a standalone network, or the one-architecture `ViTResNAS` of `resnas train-subnet`: same
    state-dict names) as an export checkpoint plus its .json; returns the metadata."""
    meta = {"timm_model": TIMM_NAME, "arch": net.arch.pruned().to_dict(), "img_size": img_size,
            "num_classes": num_classes, "space": space, **source}
    save_checkpoint({"format": EXPORT_FORMAT, "version": VERSION, "state_dict": net.state_dict(), **meta}, out)
    write_json_atomic(os.path.splitext(out)[0] + ".json", {**meta, "checkpoint": os.path.abspath(out)})
    return meta


def load_exported(path: str, device="cpu"):
    """The exported network built by `timm.create_model` (eval mode)."""
    import timm

    import resnas_kernels.models  # noqa: F401  (registers the ViT-ResNAS names with timm)

    ckpt = read_checkpoint(path, EXPORT_FORMAT, ("state_dict", "arch", "img_size", "num_classes", "timm_model"))
    n = ckpt["num_classes"]
    net = timm.create_model(ckpt["timm_model"], pretrained=True, arch=Arch.from_dict(ckpt["arch"]),
                            img_size=ckpt["img_size"], num_classes=n,
                            pretrained_cfg_overlay=dict(file=os.path.abspath(path), num_classes=n,
                                                        input_size=(3, ckpt["img_size"], ckpt["img_size"])))
    return net.to(device).eval()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resnas export", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", required=True, help="best.json of `resnas search` (or a JSON arch dict)")
    p.add_argument("--supernet", required=True, help="checkpoint.pt of `resnas train-supernet`")
    p.add_argument("--out", required=True, help="the standalone checkpoint to write (e.g. net.pt)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        meta = export(args.arch, args.supernet, args.out)
    except (ValueError, CheckpointError) as exc:
        print(f"resnas export: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:   # an unwritable --out
        print(f"resnas export: error: {exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}",
              file=sys.stderr)
        return 1
    print(f"export: {args.out} ({Arch.from_dict(meta['arch'])}); load it with "
          f"resnas_kernels.search.export.load_exported({args.out!r}) or timm.create_model({meta['timm_model']!r}, "
          f"arch=..., pretrained=True, pretrained_cfg_overlay=dict(file=...)) as in "
          f"{os.path.splitext(args.out)[0]}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
