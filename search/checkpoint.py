"""Files of the training / search runs: atomic writes, validated `weights_only` loads, JSONL logs.

Every file is written to a temporary file in the same directory and renamed over the target (`os.replace`), so a run
killed at any moment leaves either the previous version or the new one, never a truncated file. Checkpoints are
dicts tagged with a `format` string and a `version`; `read_checkpoint` refuses anything else with an error naming
what it expected (a foreign `.pt`, a truncated or corrupted file, a checkpoint of the other kind).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, List

import torch

from resnas_kernels._atomic import atomic_write_text
from resnas_kernels.models.vit_resnas.checkpoint import save_checkpoint

__all__ = ["CheckpointError", "save_checkpoint", "read_checkpoint", "write_text_atomic", "write_json_atomic",
           "append_jsonl", "read_jsonl", "describe_load_error", "TRAIN_FORMAT", "SEARCH_FORMAT", "EXPORT_FORMAT"]

TRAIN_FORMAT = "resnas-supernet-train"
SEARCH_FORMAT = "resnas-search-state"
EXPORT_FORMAT = "resnas-subnet"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not the checkpoint the caller expected."""


def read_checkpoint(path: str, fmt: str, required: Iterable[str] = ()) -> dict:
    """Load `path` with weights_only=True and check it is a `fmt` checkpoint holding the `required` keys."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file (expected a {fmt!r} checkpoint)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle of arbitrary classes, random bytes...
        raise CheckpointError(f"{path}: cannot be read as a {fmt!r} checkpoint (corrupted, truncated or not written "
                              f"by resnas): {describe_load_error(exc)}") from None
    return check_checkpoint(obj, path, fmt, required)


def describe_load_error(exc: BaseException) -> str:
    """One line on why torch.load(weights_only=True) failed. torch's own message for a refused object advises
    loading with weights_only=False, which would run the file's code: not advice to pass on for a file that is not
    a resnas checkpoint anyway."""
    text = str(exc)
    if "Weights only load failed" in text:
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        return ("it holds Python objects that weights-only loading refuses"
                + (f" ({unsupported.group(1)})" if unsupported else ""))
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first.split('. ')[0]}" if first else type(exc).__name__


def check_checkpoint(obj: Any, path: str, fmt: str, required: Iterable[str] = ()) -> dict:
    """`obj` (the contents of `path`, already loaded) is a `fmt` checkpoint of this version holding `required`."""
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: expected a {fmt!r} checkpoint, found "
                              f"{'format ' + repr(found) if isinstance(obj, dict) else found}")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"{path}: {fmt!r} checkpoint version {obj.get('version')!r}, this code reads "
                              f"version {VERSION}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: {fmt!r} checkpoint lacks {missing}")
    return obj


def write_text_atomic(path: str, text: str) -> None:
    atomic_write_text(path, text)

def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def append_jsonl(path: str, records: Iterable[dict]) -> None:
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
        f.flush()


def read_jsonl(path: str) -> List[dict]:
    """Records of a JSONL file; a torn last line (a kill mid-write) is ignored."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out
