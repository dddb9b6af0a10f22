"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, without a GPU.

Kernel modules call `register_aot(kernel, signature, constexprs)` next to each `@triton.jit` kernel with
representative types and constexpr values. `python -m resnas_kernels.aot` (and the test suite, in a subprocess
because TRITON_INTERPRET=1 turns kernels into interpreter objects) compiles every case for every target down to
cubin, and fails if any `@triton.jit` kernel of the package has no registered case, so new kernels are covered.
"""
import argparse
import importlib
import os
import pkgutil
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

TARGETS: Tuple[Tuple[str, int], ...] = (("sm_80", 80), ("sm_90", 90))


@dataclass
class AotCase:
    kernel: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int = 4
    num_stages: int = 3
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        types = sorted({t for t in self.signature.values() if t.startswith("*")})
        return f"{fn.__module__}.{fn.__name__}[{consts}|{'/'.join(types)}|w{self.num_warps}]"


_REGISTRY: List[AotCase] = []


def register_aot(kernel, signature: Dict[str, str], constexprs: Dict[str, object], num_warps: int = 4,
                 num_stages: int = 3) -> None:
    """Declare one representative specialisation of `kernel` to compile ahead of time."""
    _REGISTRY.append(AotCase(kernel, dict(signature), dict(constexprs), num_warps, num_stages))


def registered_cases() -> List[AotCase]:
    return list(_REGISTRY)


def import_all_kernel_modules() -> List[str]:
    """Import every module of resnas_kernels.ops (and resnas_kernels.models), which registers their cases."""
    names = []
    for pkg_name in ("resnas_kernels.ops",):
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, pkg_name + "."):
            importlib.import_module(info.name)
            names.append(info.name)
    return names


def unregistered_kernels(modules: List[str]) -> List[str]:
    """Every launchable @triton.jit kernel (name ending in `_kernel`) defined in `modules` with no AOT case.
    Device helpers (other names) are inlined into their callers and compiled with them."""
    from triton.runtime.jit import JITFunction

    registered = {id(c.kernel) for c in _REGISTRY}
    missing = []
    for name in modules:
        module = sys.modules[name]
        for attr, value in vars(module).items():
            if isinstance(value, JITFunction) and value.__module__ == name and id(value) not in registered:
                if not _is_device_helper(value):
                    missing.append(f"{name}.{attr}")
    return missing


def _is_device_helper(fn) -> bool:
    """Convention: launchable kernels are named `*_kernel`; anything else is a helper called from kernels."""
    return not fn.__name__.endswith("_kernel")


def _make_source(case: AotCase):
    from triton.compiler import ASTSource

    try:  # triton >= 3.3: constexpr params stay in the signature, values passed separately
        return ASTSource(fn=case.kernel, signature=case.signature, constexprs=case.constexprs)
    except TypeError:  # triton 3.2: constexprs are `constants` and absent from the signature
        signature = {k: v for k, v in case.signature.items() if v != "constexpr"}
        return ASTSource(fn=case.kernel, signature=signature, constants=case.constexprs)


def compile_case(case: AotCase, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    return triton.compile(_make_source(case), target=target,
                          options={"num_warps": case.num_warps, "num_stages": case.num_stages})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="*", default=[a for _, a in TARGETS])
    parser.add_argument("--filter", default="", help="compile only cases whose name contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: ahead-of-time compilation needs real @triton.jit kernels", file=sys.stderr)
        return 2
    modules = import_all_kernel_modules()
    missing = unregistered_kernels(modules)
    failures = 0
    cases = [c for c in _REGISTRY if args.filter in c.name]
    for case in cases:
        for arch in args.arch:
            t0 = time.perf_counter()
            try:
                compiled = compile_case(case, arch)
                size = len(compiled.asm.get("cubin", b""))
                print(f"ok    sm_{arch}  {case.name}  cubin={size}B  {time.perf_counter() - t0:.1f}s", flush=True)
                if size == 0:
                    raise RuntimeError("no cubin produced")
            except Exception as exc:  # report every failure, then fail
                failures += 1
                print(f"FAIL  sm_{arch}  {case.name}: {type(exc).__name__}: {exc}", flush=True)
    for name in missing:
        print(f"FAIL  unregistered Triton kernel {name}: add register_aot(...) next to it", flush=True)
    print(f"aot: {len(cases)} cases x {len(args.arch)} targets, {failures} failed, {len(missing)} unregistered")
    return 1 if failures or missing or not cases else 0


if __name__ == "__main__":
    # Under `python -m`, this file runs as __main__, a second copy of the module whose registry is empty: the kernel
    # modules register into the importable `resnas_kernels.aot`, so run that copy's main. (`resnas aot` avoids this.)
    from resnas_kernels.aot import main as _main

    sys.exit(_main())
