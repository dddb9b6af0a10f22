"""Keep freed CPU memory in the process: glibc malloc tuning for training and benchmark processes.

PyTorch's CPU tensors come from malloc. glibc serves large blocks (above a dynamic threshold of at most 32 MB) with
fresh `mmap`s, gives them back on free, and trims the heap top back to the OS, so every step of a training loop
page-faults its activations and gradients in again: the kernel zeroes each 4 KB page on first touch, a cost of the
order of the step's own compute for small CPU steps (BENCHMARKS.md, "CPU allocator", has the measurements).
PyTorch's own CPU launcher (`torch.backends.xeon.run_cpu`) fixes this by preloading jemalloc or tcmalloc; this module
does the same with glibc alone, at run time, through `mallopt`:

    M_MMAP_MAX = 0            large blocks come from the heap, like small ones (reused after free)
    M_TRIM_THRESHOLD = 2 GiB  freed heap memory stays in the process for the next step

Caveats:
- Process-wide and permanent: it changes every later allocation of the process (also other libraries'), and memory
  freed by one step is kept for the next instead of returned to the OS (resident memory stays near the peak; that is
  the point). Only the `resnas` command line calls it (set RESNAS_MALLOC_TUNING=0 to opt out); importing the library
  never does.
- Linux with glibc only; elsewhere (musl, macOS, Windows, or a preloaded jemalloc / tcmalloc, which ignore
  `mallopt`'s effect on their own pools) it does nothing and says so.
- Benchmarks record the setting in their `allocator` column; peers in one run share it, so ratios compare like with
  like.
"""
import ctypes
import ctypes.util
import platform

from . import config

__all__ = ["tune_cpu_allocator", "cpu_allocator_state"]

_M_TRIM_THRESHOLD = -1   # glibc malloc.h
_M_MMAP_MAX = -4
_TRIM_THRESHOLD_BYTES = 2 ** 31 - 1  # an int parameter: 2 GiB - 1, "never" for a training process

_state = "default"


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_cpu_allocator() -> bool:
    """Apply the tuning above unless RESNAS_MALLOC_TUNING=0 (`config.set_malloc_tuning(False)`); returns whether it
    is in effect. Idempotent."""
    global _state
    if _state == "glibc-tuned":
        return True
    if not config.malloc_tuning():
        _state = "default (RESNAS_MALLOC_TUNING=0)"
        return False
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        _state = "default (not glibc)"
        return False
    # mallopt returns 1 on success, 0 on error.
    if libc.mallopt(_M_MMAP_MAX, 0) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) != 1:
        _state = "default (mallopt refused)"
        return False
    _state = "glibc-tuned"
    return True


def cpu_allocator_state() -> str:
    """'glibc-tuned' after `tune_cpu_allocator` succeeded in this process, else 'default' and why."""
    return _state
