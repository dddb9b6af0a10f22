"""Which backends a test may run: the one place that reads RESNAS_EXPECT_EXT.

A build without the C++ extension (RESNAS_BUILD_EXT=0) runs the suite with RESNAS_EXPECT_EXT=0; otherwise a missing
or broken extension fails the tests of its backends instead of skipping them unnoticed."""
import os

import pytest
import torch

EXPECT_EXT = os.environ.get("RESNAS_EXPECT_EXT", "1") != "0"


def require_backend(backend: str, ext_ops=()) -> None:
    """At the start of a test that forces `backend`: the C++ backends (cpu, cuda) need the extension and the ops
    named in `ext_ops` (a missing one fails the test, or skips it under RESNAS_EXPECT_EXT=0); the other backends need
    nothing."""
    if backend not in ("cpu", "cuda"):
        return
    from resnas_kernels import _ext

    if not _ext.extension_available():
        if EXPECT_EXT:
            pytest.fail(f"C++ extension missing: {_ext.load_extension()[1]} (set RESNAS_EXPECT_EXT=0 if you built "
                        f"with RESNAS_BUILD_EXT=0)")
        pytest.skip("extension deliberately not built (RESNAS_EXPECT_EXT=0)")
    missing = [name for name in ext_ops if not hasattr(torch.ops.resnas, name)]
    if missing:
        pytest.fail(f"resnas_kernels._C is built but lacks {missing}: rebuild it (`bash scripts/setup.sh`)")


def model_backend() -> str:
    """The backend a CPU test of a whole model forces: the C++ kernels, or the reference where the extension was
    deliberately not built (RESNAS_EXPECT_EXT=0)."""
    from resnas_kernels import _ext

    if _ext.extension_available():
        return "cpu"
    if EXPECT_EXT:
        pytest.fail(f"C++ extension missing: {_ext.load_extension()[1]} (set RESNAS_EXPECT_EXT=0 if you built with "
                    f"RESNAS_BUILD_EXT=0)")
    return "reference"
