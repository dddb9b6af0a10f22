"""`triton` and `triton.language`, or harmless stand-ins where Triton is not installed.

Kernel modules import `triton, tl` from here so they still import (and their reference/C++ paths still work) on
machines without a Triton wheel; the Triton backend then reports itself unavailable and is never launched.
Kernel files must not use `from __future__ import annotations`: Triton reads `tl.constexpr` annotations as objects.
"""
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on platforms without triton wheels
    class _MissingTriton:
        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 << max(0, (int(n) - 1).bit_length())

    class _MissingLanguage:
        constexpr = "constexpr"

    triton = _MissingTriton()
    tl = _MissingLanguage()

__all__ = ["triton", "tl"]
