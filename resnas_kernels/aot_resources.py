"""Static resource use of every kernel per target, without a GPU: registers, spills, shared memory, occupancy limit.

Triton kernels: read from the cubin `resnas aot` compiles (`cuobjdump --dump-resource-usage`; registers and stack
frame), shared memory from Triton's metadata (it allocates shared memory dynamically), exact spill bytes from
`ptxas -v` on the kernel's PTX when the cubin has a stack frame (no frame means no spill). CUDA C++ kernels
(csrc/cuda/*.cu): each file compiled to device code only in a temporary directory (`nvcc --fatbin -Xptxas -v`, never
the extension itself), threads per block from `__launch_bounds__` (`.maxntid` in the kept PTX).

A kernel configuration fails the check when it needs more shared memory per block than the target allows, or when
it spills and the spill is not recorded in `aot_known_spills.json` at exactly that size. The record is a ratchet, not
an allowance: every entry is a defect to fix (BENCHMARKS.md lists them), a new or grown spill fails, and so does an
entry whose configuration no longer spills (remove it, the record only shrinks). `resnas aot --resources
--record-known-spills` rewrites the record from a full run.
"""
import json
import glob
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits of a compute capability (CUDA C++ Programming Guide, compute capabilities 8.0 and 9.0)."""
    smem_per_sm: int
    smem_per_block: int            # the opt-in maximum per block
    regs_per_sm: int = 65536
    reg_unit: int = 256            # registers are allocated per warp in units of 256
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    smem_reserved_per_block: int = 1024  # the runtime reserves 1 KB of shared memory per block


LIMITS: Dict[int, ArchLimits] = {
    80: ArchLimits(smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
    90: ArchLimits(smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
}


@dataclass
class KernelResources:
    kind: str            # "triton" | "cuda"
    kernel: str
    config: str
    arch: int
    regs: int
    stack: int           # stack frame bytes per thread
    spill: int           # spill store bytes per thread
    smem: int            # shared memory per block (static + dynamic known at compile time)
    threads: int         # threads per block (0: unknown)

    @property
    def limits(self) -> ArchLimits:
        return LIMITS[self.arch]

    def blocks_by_regs(self) -> Optional[int]:
        if not self.threads:
            return None
        lim = self.limits
        warps = -(-self.threads // 32)
        per_warp = -(-max(self.regs, 1) * 32 // lim.reg_unit) * lim.reg_unit
        # four SM sub-partitions, each with a quarter of the register file
        warps_fit = (lim.regs_per_sm // 4 // per_warp) * 4
        return min(min(warps_fit, lim.max_warps_per_sm) // warps, lim.max_blocks_per_sm)

    def blocks_by_smem(self) -> int:
        lim = self.limits
        if self.smem == 0:
            return lim.max_blocks_per_sm
        return min(lim.smem_per_sm // (self.smem + lim.smem_reserved_per_block), lim.max_blocks_per_sm)

    def problems(self) -> List[str]:
        out = []
        if self.spill:
            out.append(f"spills {self.spill} bytes per thread")
        if self.smem > self.limits.smem_per_block:
            out.append(f"needs {self.smem} B of shared memory per block, above sm_{self.arch}'s "
                       f"{self.limits.smem_per_block} B")
        if self.threads and self.blocks_by_regs() == 0:
            out.append(f"{self.regs} registers x {self.threads} threads do not fit one SM")
        return out

    def row(self) -> str:
        regs_blocks = self.blocks_by_regs()
        return (f"| {self.kernel} | {self.config} | sm_{self.arch} | {self.regs} | {self.spill} | {self.stack} | "
                f"{self.smem} | {self.threads or '?'} | {'?' if regs_blocks is None else regs_blocks} | "
                f"{self.blocks_by_smem()} | {'; '.join(self.problems()) or 'ok'} |")


HEADER = ("| kernel | configuration | target | regs/thread | spill B | stack B | smem B/block | threads | "
          "blocks/SM (regs) | blocks/SM (smem) | check |\n|---|---|---|---|---|---|---|---|---|---|---|")


# ---------------------------------------------------------------------------------------------------------------------
def find_tool(name: str) -> Optional[str]:
    """cuobjdump / ptxas / nvcc: Triton's bundled copy first (for cuobjdump, ptxas), then CUDA_HOME, the usual
    toolkit folders, PATH."""
    try:
        import triton

        tool = getattr(triton.knobs.nvidia, name, None)
        if tool is not None and tool.path and os.path.exists(tool.path):
            return tool.path
    except Exception:  # older triton without knobs, or none at all
        pass
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in homes:
        path = os.path.join(home, "bin", name)
        if home and os.path.exists(path):
            return path
    return shutil.which(name)


_RESOURCE_RE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def cuobjdump_usage(binary: bytes) -> Dict[str, Tuple[int, int, int, int]]:
    """function -> (registers, stack, static shared, local) of every function in a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(binary)
        out = subprocess.run([find_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                             text=True, check=True).stdout
    return {m[1]: (int(m[2]), int(m[3]), int(m[4]), int(m[5])) for m in _RESOURCE_RE.finditer(out)}


def ptxas_spill(ptx: str, arch: int) -> int:
    """Spill store bytes per thread reported by `ptxas -v` for the PTX (the largest over its functions)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # Triton's own ptxas flags (its sm_90 PTX uses wgmma, which needs the sm_90a target)
        log = subprocess.run([find_tool("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={_ptxas_arch(arch)}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    return max((int(m[2]) for m in _SPILL_RE.finditer(log)), default=0)


def _ptxas_arch(arch: int) -> str:
    try:
        from triton.backends.nvidia.compiler import sm_arch_from_capability

        return sm_arch_from_capability(arch)
    except ImportError:
        return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


def triton_resources(case, compiled, arch: int) -> KernelResources:
    fn = getattr(case.kernel, "fn", case.kernel)
    usage = cuobjdump_usage(compiled.asm["cubin"])
    name = compiled.metadata.name if compiled.metadata.name in usage else next(iter(usage))
    regs, stack, static_smem, local = usage[name]
    spill = ptxas_spill(compiled.asm["ptx"], arch) if (stack or local) else 0
    config = case.name[case.name.index("[") + 1:-1].replace("|", " ")  # "|" would split a markdown cell
    return KernelResources("triton", f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}", config, arch, regs, stack,
                           spill, static_smem + int(compiled.metadata.shared), compiled.metadata.num_warps * 32)


# ---------------------------------------------------------------------------------------------------------------------
_ENTRY_RE = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
_USED_RE = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def _short_cxx_name(mangled: str) -> str:
    """`kernel<T, ...>` from a mangled name: demangled, namespaces and argument lists dropped."""
    try:
        name = subprocess.run(["c++filt", mangled], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return mangled
    name = name.replace("(anonymous namespace)::", "")
    name = re.sub(r"\b(?:resnas|c10|at)::", "", name)
    name = name[len("void "):] if name.startswith("void ") else name
    return name.split("(")[0]  # drop the parameter list


def _maxntid(ptx_dir: str) -> Dict[str, int]:
    threads = {}
    for path in glob.glob(os.path.join(ptx_dir, "*.ptx")):
        text = open(path).read()
        for m in re.finditer(r"\.entry (\S+)\(.*?\)\s*((?:\.\w+[^\n{]*\n\s*)*)\{", text, re.S):
            nt = re.search(r"\.maxntid (\d+), (\d+), (\d+)", m[2])
            if nt:
                threads[m[1]] = int(nt[1]) * int(nt[2]) * int(nt[3])
    return threads


def compile_cuda_file(path: str, archs: Sequence[int], tmp: str) -> Tuple[str, str]:
    """(ptxas log, kept-PTX folder) of one .cu compiled to device code only for `archs`."""
    import torch.utils.cpp_extension as cpp_extension

    keep = os.path.join(tmp, os.path.basename(path))
    os.makedirs(keep, exist_ok=True)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    cmd = [find_tool("nvcc"), "--fatbin", "-o", os.path.join(keep, "k.fatbin"), path, *includes, "-std=c++20", "-O3",
           "--expt-relaxed-constexpr", "-Xptxas", "-v", "--keep", "--keep-dir", keep, *gencode]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {path}:\n{proc.stderr[-3000:]}")
    return proc.stderr, keep


def cuda_resources(sources: Sequence[str], archs: Sequence[int], jobs: int) -> List[KernelResources]:
    """Resources of every __global__ kernel instantiated in `sources`, per target."""
    out: List[KernelResources] = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max(1, jobs)) as pool:
        results = list(pool.map(lambda p: (p, *compile_cuda_file(p, archs, tmp)), sources))
        for path, log, keep in results:
            threads = _maxntid(keep)
            current = None
            for line in log.splitlines():
                m = _ENTRY_RE.search(line)
                if m:
                    current = dict(name=m[1], arch=int(m[2]), stack=0, spill=0)
                    continue
                if current is None:
                    continue
                m = _SPILL_RE.search(line)
                if m:
                    current.update(stack=int(m[1]), spill=int(m[2]))
                m = _USED_RE.search(line)
                if m:
                    out.append(KernelResources(
                        "cuda", os.path.basename(path), _short_cxx_name(current["name"]), current["arch"],
                        int(m[1]), current["stack"], current["spill"], int(m[2] or 0),
                        threads.get(current["name"], 0)))
                    current = None
    return out


def cuda_sources(root: Optional[str] = None) -> List[str]:
    root = root or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "cuda")
    return sorted(glob.glob(os.path.join(root, "*.cu")))


KNOWN_SPILLS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aot_known_spills.json")


def _spill_key(r: KernelResources) -> str:
    return f"{r.kind} sm_{r.arch} {r.kernel} [{r.config}]"


# The Triton release scripts/setup.sh installs (with torch 2.14): CI holds it to no spill at all (its record is empty).
ZERO_SPILL_TRITON = "3.8"


def triton_minor() -> str:
    """The installed Triton as "major.minor": spill records are per Triton release (its compiler allocates registers
    differently from one release to the next)."""
    import triton

    return ".".join(triton.__version__.split(".")[:2])


def load_known_spills(path: str = KNOWN_SPILLS_PATH, triton_version: Optional[str] = None) -> Dict[str, int]:
    """Recorded spills of this Triton release (`triton_minor()` unless given): key (kind, target, kernel,
    configuration) -> spill bytes per thread. The CUDA C++ entries sit under the Triton release they were recorded
    with, like the rest."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        doc = json.load(f)
    by_triton = doc.get("by_triton", {})
    return {str(k): int(v) for k, v in by_triton.get(triton_version or triton_minor(), {}).items()}


def write_known_spills(rows: Sequence[KernelResources], path: str = KNOWN_SPILLS_PATH) -> str:
    """Record this run's spills for the installed Triton release, keeping the other releases' records."""
    from ._atomic import atomic_write_text

    by_triton: Dict[str, Dict[str, int]] = {}
    if os.path.exists(path):
        with open(path) as f:
            by_triton = json.load(f).get("by_triton", {})
    by_triton[triton_minor()] = {_spill_key(r): r.spill for r in sorted(rows, key=_spill_key) if r.spill}
    doc = {"about": "Spilling kernel configurations recorded by `resnas aot --resources --record-known-spills`, per "
                    "Triton release (major.minor; the CUDA C++ kernels under the release they were checked with); "
                    "each one is a defect to fix, see BENCHMARKS.md. The check fails on any spill not listed for the "
                    "installed release at exactly this size, and on a listed configuration that no longer spills.",
           "by_triton": dict(sorted(by_triton.items()))}
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    return path


def check_against_known(rows: Sequence[KernelResources], known: Dict[str, int]
                        ) -> Tuple[List[Tuple[KernelResources, str]], List[KernelResources]]:
    """(failing rows with the reason, rows whose spill matches the record). Only the configurations compiled in this
    run are compared, so a filtered run (`--filter`, one `--arch`) checks what it compiled."""
    failing, known_rows = [], []
    for r in rows:
        problems = [p for p in r.problems() if not p.startswith("spills")]
        recorded = known.get(_spill_key(r))
        if r.spill and recorded is None:
            problems.append(f"spills {r.spill} bytes per thread (a new spill)")
        elif r.spill and r.spill != recorded:
            problems.append(f"spills {r.spill} bytes per thread, recorded {recorded} (re-record only if it shrank)"
                            if r.spill < recorded else f"spills {r.spill} bytes per thread, more than the recorded "
                            f"{recorded}")
        elif not r.spill and recorded is not None:
            problems.append(f"no longer spills (recorded {recorded} bytes): remove it from aot_known_spills.json")
        elif r.spill:
            known_rows.append(r)
        if problems:
            failing.append((r, "; ".join(problems)))
    return failing, known_rows


def summary(rows: Sequence[KernelResources]) -> str:
    """Per kernel and target: configurations, the worst registers / spill / shared memory / occupancy over them."""
    groups: Dict[Tuple[str, str, int], List[KernelResources]] = {}
    for r in rows:
        key = (r.kind, r.kernel if r.kind == "triton" else f"{r.kernel}: {r.config.split('<')[0]}", r.arch)
        groups.setdefault(key, []).append(r)
    lines = ["| kind | kernel | target | configs | max regs/thread | max spill B | max smem B/block | "
             "min blocks/SM (regs) | min blocks/SM (smem) | check |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (kind, kernel, arch), rs in sorted(groups.items()):
        by_regs = [b for b in (r.blocks_by_regs() for r in rs) if b is not None]
        bad = sum(1 for r in rs if r.problems())
        lines.append(f"| {kind} | {kernel} | sm_{arch} | {len(rs)} | {max(r.regs for r in rs)} | "
                     f"{max(r.spill for r in rs)} | {max(r.smem for r in rs)} | "
                     f"{min(by_regs) if by_regs else '?'} | {min(r.blocks_by_smem() for r in rs)} | "
                     f"{f'{bad} failing' if bad else 'ok'} |")
    return "\n".join(lines)
