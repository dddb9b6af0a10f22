"""Lazy, non-fatal loading of the compiled extension `resnas_kernels._C` and of Triton.

Nothing here is imported eagerly by the package: a missing or broken extension is recorded and reported by
`resnas info` and by the error raised when its backend is forced, never at `import resnas_kernels`.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Optional


@functools.lru_cache(maxsize=None)
def load_extension() -> tuple[Optional[object], Optional[str]]:
    """(module, None) when `resnas_kernels._C` imports (its TORCH_LIBRARY ops are then registered), else (None, why)."""
    if os.environ.get("RESNAS_DISABLE_EXT", "0") == "1":
        return None, "disabled by RESNAS_DISABLE_EXT=1"
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


@functools.lru_cache(maxsize=None)
def extension_has_cuda() -> bool:
    """True when the extension was compiled with its CUDA sources."""
    module, _ = load_extension()
    return bool(module is not None and getattr(module, "WITH_CUDA", False))


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
