"""Which implementation runs an op: `set_backend(...)` / `RESNAS_BACKEND` = auto | reference | triton | cuda | cpu
(the switch lives in `resnas_kernels.config`; `set_backend` here and `config.set_backend` are the same setter).

- reference: the plain PyTorch oracle in `resnas_kernels.reference` (any device, any dtype).
- triton:    Triton kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests only: it is slow).
- cuda:      the CUDA C++ kernels of `resnas_kernels._C`, CUDA tensors.
- cpu:       the C++ CPU kernels of `resnas_kernels._C`, CPU tensors.
- auto:      CUDA tensors use the op's preferred GPU backend (the one its benchmarks measured faster) and fall back to
             the other, then to the reference; CPU tensors use the C++ kernels, or the reference without them.

Forcing a backend that cannot run the call raises `BackendUnavailableError` saying why; auto never raises.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import torch

from . import _ext, config
from .config import BACKENDS

__all__ = ["BACKENDS", "BackendUnavailableError", "set_backend", "get_backend", "use_backend", "resolve_backend",
           "registered_ops"]


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this call (not built, wrong device, op not implemented there)."""


@dataclass(frozen=True)
class OpInfo:
    name: str
    backends: Tuple[str, ...]            # implemented backends besides "reference" ("triton", "cpu", "cuda")
    auto_cuda: Tuple[str, ...] = ("triton", "cuda")  # preference order on CUDA tensors, fastest first
    ext_ops: Tuple[str, ...] = ()        # names in torch.ops.resnas the C++ backends need


_OPS: Dict[str, OpInfo] = {}


def register_op(info: OpInfo) -> OpInfo:
    _OPS[info.name] = info
    return info


def registered_ops() -> Dict[str, OpInfo]:
    """Every op registered so far; `resnas_kernels.ops.all_ops()` imports them all first."""
    return dict(_OPS)


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every op (`None` returns to RESNAS_BACKEND, or auto when that is unset)."""
    config.set_backend(name)


def get_backend() -> str:
    """The requested backend: set_backend(...) if called, else RESNAS_BACKEND, else 'auto'."""
    return config.requested_backend()


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Temporarily force a backend: `with use_backend("reference"): ...`."""
    with config.override(backend=name):
        yield


def why_unavailable(op: OpInfo, backend: str, device: torch.device) -> Optional[str]:
    """None when `backend` can run `op` on `device`, else the reason."""
    if backend == "reference":
        return None
    if backend not in op.backends:
        return f"{op.name} has no {backend} implementation (it has: reference, {', '.join(op.backends)})"
    if backend == "triton":
        triton, why = _ext.load_triton()
        if triton is None:
            return why
        if device.type != "cuda" and not _ext.triton_interpreting():
            return (f"Triton needs CUDA tensors (got {device.type}); on CPU it runs only under TRITON_INTERPRET=1, "
                    f"set before triton is imported")
        return None
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            return f"the {backend} backend needs {backend} tensors, got {device.type} tensors"
        module, why = _ext.load_extension()
        if module is None:
            return why
        if backend == "cuda" and not _ext.extension_has_cuda():
            return "resnas_kernels._C was built without its CUDA sources (no nvcc or RESNAS_BUILD_CUDA=0 at build time)"
        missing = [n for n in op.ext_ops if not hasattr(torch.ops.resnas, n)]
        if missing:
            return f"resnas_kernels._C lacks {missing}; rebuild it (`pip install --no-build-isolation -e .`)"
        return None
    return f"unknown backend {backend!r}"


def resolve_backend(op_name: str, device: torch.device) -> str:
    """The backend that will run `op_name` on `device` now, or BackendUnavailableError for a forced one."""
    op = _OPS[op_name]
    device = torch.device(device)
    requested = get_backend()
    if requested != "auto":
        why = why_unavailable(op, requested, device)
        if why is not None:
            raise BackendUnavailableError(f"backend {requested!r} was requested for {op_name} on {device.type} "
                                          f"tensors but cannot run it: {why}")
        return requested
    order: Tuple[str, ...] = op.auto_cuda if device.type == "cuda" else ("cpu",)
    for candidate in order:
        if why_unavailable(op, candidate, device) is None:
            return candidate
    return "reference"


def resolve_backend_for(op_name: str, t: torch.Tensor) -> str:
    """`resolve_backend` for the tensor `t` an op computes on. One dtype policy for every op: the Triton kernels
    accumulate in fp32, so fp64 inputs (gradient checking) run the reference on the Triton backend."""
    backend = resolve_backend(op_name, t.device)
    return "reference" if backend == "triton" and t.dtype == torch.float64 else backend
