"""The networks of the pipeline as files: supernets built and loaded from `resnas train-supernet` checkpoints, and
searched sub-networks exported as standalone checkpoints that `timm.create_model` builds and loads.

The export format (`write_exported`, written by `resnas export` and `resnas train-subnet`): a dict with `state_dict`
(the sub-network's weights: first-k slices of the supernet, removed blocks dropped, names of
`ViTResNASNet(arch.pruned())`), the pruned `arch` and the `timm` call that rebuilds it; timm's loader reads its
`state_dict` entry with weights_only=True. The architecture is not one of the registered names, so the call passes
it explicitly (every registered ViT-ResNAS name accepts `arch=`):

    import timm, resnas_kernels.models
    from resnas_kernels.models.vit_resnas import Arch
    net = timm.create_model("vit_resnas_tiny", arch=Arch.from_dict(arch_dict), img_size=56, num_classes=10,
                            pretrained=True, pretrained_cfg_overlay=dict(file="net.pt", num_classes=10))

`load_exported(path)` does exactly that, and `net.json` next to the checkpoint records the same arguments.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from resnas_kernels.models.vit_resnas import Arch, SearchSpace, ViTResNAS
from resnas_kernels.models.vit_resnas.space import space_from_dict

from .checkpoint import (EXPORT_FORMAT, TRAIN_FORMAT, VERSION, CheckpointError, check_checkpoint, describe_load_error,
                         read_checkpoint, save_checkpoint, write_json_atomic)

__all__ = ["build_supernet", "load_supernet", "read_arch", "export_subnet", "write_exported", "load_exported",
           "read_init", "load_init", "TIMM_NAME", "EXPORT_FORMAT"]

TIMM_NAME = "vit_resnas_tiny"   # any registered ViT-ResNAS name: `arch=` replaces its architecture


# ---------------------------------------------------------------------------------------------------------------------
# Supernets
# ---------------------------------------------------------------------------------------------------------------------
def build_supernet(space: SearchSpace, img_size: int, num_classes: int, drop_path: float = 0.0) -> ViTResNAS:
    return ViTResNAS(space=space, img_size=img_size, num_classes=num_classes, drop_path_rate=drop_path)


def load_supernet(path: str, device="cpu", ckpt: Optional[dict] = None):
    """(supernet in eval mode, the training checkpoint dict) from a `resnas train-supernet` checkpoint; `ckpt`: the
    file's contents when the caller has already loaded them (checked the same way)."""
    required = ("model", "space", "args", "num_classes", "step")
    ckpt = (read_checkpoint(path, TRAIN_FORMAT, required) if ckpt is None
            else check_checkpoint(ckpt, path, TRAIN_FORMAT, required))
    if ckpt.get("subnet_arch") is not None:
        raise CheckpointError(f"{path}: a `resnas train-subnet` checkpoint (one architecture), not a supernet; its "
                              f"net.pt is the trained network")
    space = space_from_dict(ckpt["space"])
    model = build_supernet(space, ckpt["args"]["img_size"], ckpt["num_classes"], 0.0)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the {space.name} supernet it declares: "
                              f"{str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), ckpt


# ---------------------------------------------------------------------------------------------------------------------
# Exported sub-networks
# ---------------------------------------------------------------------------------------------------------------------
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


def export_subnet(arch_path: str, supernet_path: str, out: str) -> dict:
    """Slice the architecture in `arch_path` out of the supernet checkpoint and write it to `out` (`resnas export`);
    returns the metadata."""
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


# ---------------------------------------------------------------------------------------------------------------------
# Initial weights of one architecture (`resnas train-subnet --init`)
# ---------------------------------------------------------------------------------------------------------------------
def read_init(path: str) -> Any:
    """The --init file as loaded by torch.load(weights_only=True), read once at start-up."""
    if not os.path.isfile(path):
        raise ValueError(f"--init {path!r}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (a corrupted or foreign file)
        raise CheckpointError(f"--init {path!r}: cannot be read as a checkpoint: {describe_load_error(exc)}") \
            from None


def load_init(model: ViTResNAS, arch: Arch, path: str, obj: Any, img_size: int, num_classes: int) -> None:
    """Load --init (`obj`, the file at `path` as `read_init` loaded it) into the one-architecture model: an exported
    net (same pruned arch) or a supernet (sliced)."""
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if fmt == EXPORT_FORMAT:
        obj = check_checkpoint(obj, path, EXPORT_FORMAT, ("state_dict", "arch", "img_size", "num_classes"))
        if Arch.from_dict(obj["arch"]) != arch.pruned():
            raise ValueError(f"--init {path!r} holds {Arch.from_dict(obj['arch'])}, not the --arch network "
                             f"{arch.pruned()}")
        if (obj["img_size"], obj["num_classes"]) != (img_size, num_classes):
            raise ValueError(f"--init {path!r} was exported for img_size {obj['img_size']} and {obj['num_classes']} "
                             f"classes, this run uses {img_size} and {num_classes}")
        state = obj["state_dict"]
    elif fmt == TRAIN_FORMAT:
        supernet, sck = load_supernet(path, ckpt=obj)
        if (sck["args"]["img_size"], sck["num_classes"]) != (img_size, num_classes):
            raise ValueError(f"--init {path!r} is a supernet for img_size {sck['args']['img_size']} and "
                             f"{sck['num_classes']} classes, this run uses {img_size} and {num_classes}")
        try:
            supernet.space.check(arch)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"--arch is not an architecture of the --init supernet's space: {exc} (slicing a "
                             f"supernet needs the slot-aligned 'arch' of best.json)") from None
        state = supernet.extract(arch).state_dict()
    else:
        raise CheckpointError(f"--init {path!r}: expected a {EXPORT_FORMAT!r} (resnas export) or {TRAIN_FORMAT!r} "
                              f"checkpoint, found {'format ' + repr(fmt) if isinstance(obj, dict) else 'no format'}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"--init {path!r}: its weights do not fit the --arch network: "
                              f"{str(exc).strip().splitlines()[-1].strip()}") from None
