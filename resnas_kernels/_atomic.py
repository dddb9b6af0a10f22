"""Atomic file writes, shared by checkpoints, search state, latency tables and the autotune cache.

The content goes to a temporary file in the target's directory, is flushed and fsync'ed, and is renamed over the
target (`os.replace`), so a reader (or a resumed run after a kill) sees either the old file or the new one, never a
truncated mix. The directory is fsync'ed too where the platform allows, so the rename itself survives a power loss.

The temporary file is created with mode 0666 filtered by the umask (like `open(path, "w")`; `tempfile.mkstemp`
would make every result readable by its owner only) and is named `.tmp-<target>.<pid>.<random>`: an exception or
Ctrl-C removes it, and after a `kill -9` `sweep_stale_temporaries` recognises it as left behind by a dead process.
"""
from __future__ import annotations

import os
import re
import secrets
from typing import IO, Callable, List

__all__ = ["atomic_write", "atomic_write_text", "sweep_stale_temporaries"]

_TMP_NAME = re.compile(r"\.tmp-.+\.(\d+)\.[0-9a-f]{16}(\.[^.]*)?")


def _create_temporary(directory: str, target: str, suffix: str):
    while True:
        tmp = os.path.join(directory, f".tmp-{target}.{os.getpid()}.{secrets.token_hex(8)}{suffix}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue


def atomic_write(path: str, write: Callable[[IO], None], *, binary: bool = True, suffix: str = "") -> None:
    """Call `write(f)` on a temporary file next to `path`, then rename it over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = _create_temporary(directory, os.path.basename(path), suffix)
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # exists, owned by someone else
    return True


def sweep_stale_temporaries(directory: str) -> List[str]:
    """Remove the temporary files of `atomic_write` in `directory` whose writing process no longer runs (a run
    killed mid-write); files of live writers are left alone. Returns the removed paths."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _TMP_NAME.fullmatch(name)
        if m is None or _alive(int(m.group(1))):
            continue
        path = os.path.join(directory, name)
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass   # gone already, or not ours to remove
    return removed
