"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, without a GPU.

Kernel modules call `register_aot(kernel, signature, constexprs)` next to each `@triton.jit` kernel with
representative types and constexpr values. `python -m resnas_kernels.aot` (and the test suite, in a subprocess
because TRITON_INTERPRET=1 turns kernels into interpreter objects) compiles every case for every target down to
cubin, and fails if any `@triton.jit` kernel of the package has no registered case, so new kernels are covered.
`--resources` adds the static resource check of `resnas_kernels.aot_resources` (Triton and CUDA C++ kernels).
"""
import argparse
import importlib
import os
import pkgutil
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

TARGETS: Tuple[Tuple[str, int], ...] = (("sm_80", 80), ("sm_90", 90))


@dataclass
class AotCase:
    kernel: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int = 4
    num_stages: int = 3
    extra: Dict[str, object] = field(default_factory=dict)
    archs: Optional[Tuple[int, ...]] = None  # the targets a launcher runs this case on (None: every target)

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        types = sorted({t for t in self.signature.values() if t.startswith("*")})
        # the type set can coincide for different signatures (fp32 vs bf16 gradient outputs): a short hash of the
        # full signature keeps every registered case's name unique
        sig = zlib.crc32(repr(sorted(self.signature.items())).encode()) & 0xFFFF
        return (f"{fn.__module__}.{fn.__name__}[{consts}|{'/'.join(types)}|w{self.num_warps} s{self.num_stages} "
                f"sig{sig:04x}]")


_REGISTRY: List[AotCase] = []


def register_aot(kernel, signature: Dict[str, str], constexprs: Dict[str, object], num_warps: int = 4,
                 num_stages: int = 3, archs: Optional[Sequence[int]] = None) -> None:
    """Declare one representative specialisation of `kernel` to compile ahead of time (a repeat is ignored: an
    autotune candidate may coincide with a launcher's default configuration). `archs`: only for these targets (e.g.
    (90,) for a kernel whose launcher never runs it below sm_90); None: every target."""
    case = AotCase(kernel, dict(signature), dict(constexprs), num_warps, num_stages,
                   archs=tuple(archs) if archs is not None else None)
    if all(c.name != case.name for c in _REGISTRY):
        _REGISTRY.append(case)


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
    parser.add_argument("--resources", action="store_true",
                        help="also print registers, spills, shared memory and occupancy limits per kernel, "
                             "configuration and target, for the CUDA C++ kernels of csrc/cuda too (compiled in a "
                             "temporary folder); fail on any spill or shared memory above the target's limit")
    parser.add_argument("--no-cuda-cxx", action="store_true", help="with --resources: skip the CUDA C++ kernels")
    parser.add_argument("--record-known-spills", action="store_true",
                        help="with --resources: rewrite resnas_kernels/aot_known_spills.json with this run's spills "
                             "(only to record a spill deliberately accepted; each entry is a defect to fix)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: ahead-of-time compilation needs real @triton.jit kernels", file=sys.stderr)
        return 2
    modules = import_all_kernel_modules()
    missing = unregistered_kernels(modules)
    failures = 0
    cases = [c for c in _REGISTRY if args.filter in c.name]
    resources = []
    cuda_job = _start_cuda_resources(args.arch) if args.resources and not args.no_cuda_cxx else None
    for case in cases:
        for arch in args.arch:
            if case.archs is not None and arch not in case.archs:
                continue
            t0 = time.perf_counter()
            try:
                compiled = compile_case(case, arch)
                size = len(compiled.asm.get("cubin", b""))
                print(f"ok    sm_{arch}  {case.name}  cubin={size}B  {time.perf_counter() - t0:.1f}s", flush=True)
                if size == 0:
                    raise RuntimeError("no cubin produced")
                if args.resources:
                    from .aot_resources import triton_resources

                    resources.append(triton_resources(case, compiled, arch))
            except Exception as exc:  # report every failure, then fail
                failures += 1
                print(f"FAIL  sm_{arch}  {case.name}: {type(exc).__name__}: {exc}", flush=True)
    for name in missing:
        print(f"FAIL  unregistered Triton kernel {name}: add register_aot(...) next to it", flush=True)
    print(f"aot: {len(cases)} cases x {len(args.arch)} targets, {failures} failed, {len(missing)} unregistered")
    bad_resources = _report_resources(resources, cuda_job, args.record_known_spills) if args.resources else 0
    return 1 if failures or missing or not cases or bad_resources else 0


def _start_cuda_resources(archs):
    """The CUDA C++ resource compile runs in the background while Triton compiles (it is mostly nvcc's front end)."""
    from concurrent.futures import ThreadPoolExecutor

    from .aot_resources import cuda_resources, cuda_sources, find_tool

    if find_tool("nvcc") is None:
        return "nvcc not found"
    pool = ThreadPoolExecutor(1)
    future = pool.submit(cuda_resources, cuda_sources(), archs, os.cpu_count() or 1)
    pool.shutdown(wait=False)
    return future


def _report_resources(resources, cuda_job, record_known_spills: bool = False) -> int:
    """Print the full table and the per-kernel summary; returns the number of failing rows (plus 1 when the CUDA C++
    kernels could not be compiled). Spills recorded in aot_known_spills.json are reported as known, not failing,
    while they stay at their recorded size (see `aot_resources.check_against_known`)."""
    from .aot_resources import HEADER, check_against_known, load_known_spills, summary, write_known_spills

    broken = 0
    if isinstance(cuda_job, str):
        print(f"resources: CUDA C++ kernels skipped: {cuda_job}")
    elif cuda_job is not None:
        try:
            resources = resources + cuda_job.result()
        except Exception as exc:
            print(f"FAIL  resources of the CUDA C++ kernels: {type(exc).__name__}: {exc}")
            broken = 1
    print("\n" + HEADER)
    for row in resources:
        print(row.row())
    print("\n" + summary(resources))
    if record_known_spills and not broken:
        path = write_known_spills(resources)
        print(f"resources: recorded {sum(1 for r in resources if r.spill)} spilling configurations in {path}")
    known = load_known_spills()
    failing, known_rows = check_against_known(resources, known)
    for r, why in failing:
        print(f"FAIL  resources sm_{r.arch}  {r.kernel} [{r.config}]: {why}")
    print(f"resources: {len(resources)} kernel configurations, {len(known_rows)} with a known (recorded) spill, "
          f"{len(failing)} failing the check")
    return len(failing) + broken


if __name__ == "__main__":
    # Under `python -m`, this file runs as __main__, a second copy of the module whose registry is empty: the kernel
    # modules register into the importable `resnas_kernels.aot`, so run that copy's main. (`resnas aot` avoids this.)
    from resnas_kernels.aot import main as _main

    sys.exit(_main())
