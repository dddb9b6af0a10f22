"""Atomic file writes, shared by checkpoints, search state, latency tables and the autotune cache.

The content goes to a temporary file in the target's directory, is flushed and fsync'ed, and is renamed over the
target (`os.replace`), so a reader (or a resumed run after a kill) sees either the old file or the new one, never a
truncated mix. The directory is fsync'ed too where the platform allows, so the rename itself survives a power loss.
"""
from __future__ import annotations

import os
import tempfile
from typing import IO, Callable

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(path: str, write: Callable[[IO], None], *, binary: bool = True, suffix: str = "") -> None:
    """Call `write(f)` on a temporary file next to `path`, then rename it over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # not every filesystem lets a directory be opened or synced


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)
