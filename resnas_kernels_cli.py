"""The `resnas` console script, kept outside the `resnas_kernels` package so that `resnas --help` (and a wrong
subcommand) answers without importing the package: `import resnas_kernels` loads torch, triton and timm and registers
the models, seconds of start-up that only a subcommand needs. For the same reason `resnas bench --list` is answered
from a cache of its last output while nothing it depends on has changed (`bench_list`). `python -m resnas_kernels.cli`
(torchrun) runs the same `main`."""
import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import io
import json
import os
import sys

# subcommand -> (module, help); each module exposes main(argv) -> int and is imported only when its subcommand runs.
SUBCOMMANDS = {
    "info": ("resnas_kernels.info", "versions, devices, extension status and the backend each op will use"),
    "bench": ("resnas_kernels.bench.runner", "run kernel/model benchmarks against peers, write CSV and plots"),
    "aot": ("resnas_kernels.aot", "compile every Triton kernel ahead of time for sm_80 and sm_90 (no GPU needed); "
                               "--resources: registers, spills, shared memory, occupancy per kernel"),
    "train-supernet": ("resnas_kernels.search.commands.train_supernet",
                       "train a ViT-ResNAS supernet with multi-architectural sampling"),
    "search": ("resnas_kernels.search.commands.search",
               "evolutionary search over a trained supernet, many candidates per forward"),
    "export": ("resnas_kernels.search.commands.export",
               "write a searched sub-network as a standalone timm-loadable checkpoint"),
    "train-subnet": ("resnas_kernels.search.commands.train_subnet",
                     "fine-tune or retrain a searched network with the same trainer"),
    "demo": ("resnas_kernels.search.commands.demo",
             "the whole pipeline on the built-in demo task (train, search, export, evaluate, report): a few CPU "
             "minutes"),
}

# Commands that run long tensor workloads: they keep freed CPU memory in the process (resnas_kernels/cpu_allocator.py).
TUNED_ALLOCATOR = ("bench", "train-supernet", "search", "train-subnet", "demo")
# Commands whose interrupted runs `--resume` continues.
RESUMABLE = ("train-supernet", "search", "train-subnet", "demo")


# Flags after which a command only prints (help, or the benchmark list): no allocator tuning, which imports the package.
PRINT_ONLY = ("-h", "--help", "--list")
# `resnas bench --list` answers from this cache when nothing it depends on changed (see bench_list_key).
BENCH_LIST_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "resnas-kernels", "bench-list")
BENCH_LIST_CACHE_ENTRIES = 16


def tune_cpu_allocator() -> None:
    from resnas_kernels.cpu_allocator import tune_cpu_allocator as tune   # imports the package: only for a command
    tune()


def _package_dirs() -> list:
    """Source folders of the package and of its subpackages (found, not imported: importing runs the package's
    __init__, the seconds this path exists to save). An editable install maps bench/models/search elsewhere."""
    spec = importlib.util.find_spec("resnas_kernels")
    if spec is None or not spec.origin:
        return []
    top = os.path.dirname(spec.origin)
    dirs = [top]
    for sub in ("bench", "models", "search"):
        for finder in sys.meta_path:
            try:
                found = finder.find_spec(f"resnas_kernels.{sub}", [os.path.join(top, sub)])
            except (AttributeError, ImportError, TypeError):
                continue
            if found is not None and found.origin:
                dirs.append(os.path.dirname(found.origin))
                break
    return sorted(set(dirs))


def bench_list_key(argv) -> str:
    """What the case list depends on: the arguments, the interpreter, every source and extension file of the package
    (path, size, mtime), the installed packages (the mtimes of the sys.path folders change on install), the GPU
    device nodes and the environment switches of torch, Triton, CUDA and this package."""
    files = []
    for root in _package_dirs():
        for folder, subdirs, names in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if d not in ("__pycache__", "results"))
            for name in sorted(names):
                if name.endswith((".py", ".so", ".pyd")):
                    st = os.stat(os.path.join(folder, name))
                    files.append((os.path.join(folder, name), st.st_size, st.st_mtime_ns))
    paths = [(p, os.stat(p).st_mtime_ns) for p in sys.path if p and os.path.isdir(p)]
    devices = sorted(n for n in os.listdir("/dev") if n.startswith(("nvidia", "kfd"))) if os.path.isdir("/dev") else []
    switches = sorted((k, v) for k, v in os.environ.items() if k.startswith(("RESNAS_", "TRITON_", "TORCH_", "CUDA_",
                                                                           "OMP_", "MKL_")))
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    state = [list(argv), sys.executable, sys.version, files, paths, devices, switches, threads]
    return hashlib.sha256(json.dumps(state).encode()).hexdigest()[:32]


class _Tee(io.StringIO):
    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def write(self, text):
        self.stream.write(text)
        return super().write(text)

    def flush(self):
        self.stream.flush()


def bench_list(argv) -> int:
    """`resnas bench --list ...`: the case list is declared by importing every case file, which imports torch and the
    package (seconds); the printed list is kept, keyed by everything it depends on, so asking again answers at once."""
    try:
        key = bench_list_key(argv)
    except OSError:
        key = None
    path = os.path.join(BENCH_LIST_CACHE, f"{key}.json")
    if key is not None and os.path.isfile(path):
        try:
            with open(path) as f:
                saved = json.load(f)
            sys.stdout.write(saved["stdout"])
            sys.stderr.write(saved["stderr"])
            return int(saved["rc"])
        except (OSError, ValueError, KeyError, TypeError):
            pass                                           # unreadable: list again and overwrite it
    out, err = _Tee(sys.stdout), _Tee(sys.stderr)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = int(importlib.import_module(SUBCOMMANDS["bench"][0]).main(list(argv)) or 0)
    if key is not None and rc == 0:
        try:
            os.makedirs(BENCH_LIST_CACHE, exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"stdout": out.getvalue(), "stderr": err.getvalue(), "rc": rc}, f)
            os.replace(tmp, path)
            kept = sorted((os.path.join(BENCH_LIST_CACHE, n) for n in os.listdir(BENCH_LIST_CACHE)),
                          key=os.path.getmtime, reverse=True)
            for old in kept[BENCH_LIST_CACHE_ENTRIES:]:   # one entry per source state: drop the stale ones
                os.remove(old)
        except OSError:
            pass                                           # no cache (read-only home): the list was printed anyway
    return rc


def build_parser() -> argparse.ArgumentParser:
    width = max(map(len, SUBCOMMANDS))
    parser = argparse.ArgumentParser(
        prog="resnas", description="resnas-kernels command line; `resnas COMMAND --help` describes a command",
        epilog="commands:\n" + "\n".join(f"  {k:<{width}}  {v[1]}" for k, v in SUBCOMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted(SUBCOMMANDS), metavar="COMMAND", help="one of the commands below")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command = parser.parse_args(argv[:1]).command
    try:
        if command == "bench" and "--list" in argv[1:]:
            return bench_list(argv[1:])
        if command in TUNED_ALLOCATOR and not set(PRINT_ONLY) & set(argv[1:]):
            tune_cpu_allocator()  # before the command allocates anything; RESNAS_MALLOC_TUNING=0 opts out
        module = importlib.import_module(SUBCOMMANDS[command][0])
        return int(module.main(argv[1:]) or 0)
    except KeyboardInterrupt:   # Ctrl-C: no traceback; files are written atomically, so what is on disk is whole
        print(f"resnas {command}: interrupted" + ("; --resume continues from what was saved" if command in RESUMABLE
                                                  else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
