"""Lazy, non-fatal loading of the compiled extension `resnas_kernels._C` and of Triton.

Nothing here is imported eagerly by the package: a missing or broken extension is recorded and reported by
`resnas info` and by the error raised when its backend is forced, never at `import resnas_kernels`.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
from typing import Optional

from . import config


@functools.lru_cache(maxsize=None)
def load_extension() -> tuple[Optional[object], Optional[str]]:
    """(module, None) when `resnas_kernels._C` imports (its TORCH_LIBRARY ops are then registered), else (None, why)."""
    if config.extension_disabled():
        return None, "disabled by RESNAS_DISABLE_EXT=1 (or config.set_extension_disabled(True))"
    try:
        import torch  # noqa: F401  (the extension links against libtorch)

        module = importlib.import_module("resnas_kernels._C")
    except ImportError as exc:
        return None, f"resnas_kernels._C not importable ({exc}); build with `pip install --no-build-isolation -e .`"
    except OSError as exc:  # e.g. built against another torch
        return None, f"resnas_kernels._C failed to load ({exc}); rebuild it against the installed torch"
    return module, None


def extension_available() -> bool:
    return load_extension()[0] is not None


def register_cxx_fakes(fakes) -> bool:
    """Register the fake kernels of C++ ops (`{"resnas::name": fn}`) so torch.compile traces through their C++
    autograd. Only when the extension is loaded and defines every one of them: a stale build then only loses its
    C++ path (`resnas info` names the missing ops) instead of failing the import."""
    import torch

    if not extension_available() or not all(hasattr(torch.ops.resnas, n.split("::")[1]) for n in fakes):
        return False
    for name, fn in fakes.items():
        torch.library.register_fake(name)(fn)
    return True


@functools.lru_cache(maxsize=None)
def extension_has_cuda() -> bool:
    """True when the extension was compiled with its CUDA sources."""
    module, _ = load_extension()
    return bool(module is not None and getattr(module, "WITH_CUDA", False))


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Launchers pick smaller tiles under the interpreter (it is slow per program); tests switch that off with
# `production_tiles()` so the tile sizes a GPU runs are executed somewhere too. Module state, not an env var: set only
# by the context manager, read by the launchers' tile choices.
_production_tiles = False
_autotune_candidate = 0


def interpreter_tiles() -> bool:
    """True when the launchers should use their small interpreter tiles (interpreting, no production override)."""
    return triton_interpreting() and not _production_tiles


def pinned_autotune_config(configs):
    """Under `production_tiles()`, the autotune candidate the interpreter runs in place of autotuning (which needs a
    GPU to time candidates): candidate `autotune_candidate` modulo the list length."""
    return configs[_autotune_candidate % len(configs)]


@contextlib.contextmanager
def production_tiles(autotune_candidate: int = 0):
    """Inside: the launchers choose the GPU's tile sizes even under TRITON_INTERPRET=1, and autotuned kernels run
    their `autotune_candidate`-th configuration. Outside the interpreter this changes nothing."""
    global _production_tiles, _autotune_candidate
    saved = _production_tiles, _autotune_candidate
    _production_tiles, _autotune_candidate = True, int(autotune_candidate)
    try:
        yield
    finally:
        _production_tiles, _autotune_candidate = saved


@functools.lru_cache(maxsize=None)
def load_triton() -> tuple[Optional[object], Optional[str]]:
    try:
        import triton
    except ImportError as exc:
        return None, f"triton is not installed ({exc})"
    return triton, None


def triton_version() -> Optional[str]:
    triton, _ = load_triton()
    return getattr(triton, "__version__", None) if triton is not None else None
