"""`resnas` console script: `resnas info`, `resnas bench`, `resnas aot`, and later `train-supernet`, `search`, ..."""
import argparse
import importlib
import sys

from .cpu_allocator import tune_cpu_allocator

# subcommand -> (module, help); each module exposes main(argv) -> int. Modules import lazily so `resnas info`
# works even when an optional dependency of another subcommand is missing.
SUBCOMMANDS = {
    "info": ("resnas_kernels.info", "versions, devices, extension status and the backend each op will use"),
    "bench": ("resnas_kernels.bench.runner", "run kernel/model benchmarks against peers, write CSV and plots"),
    "aot": ("resnas_kernels.aot", "compile every Triton kernel ahead of time for sm_80 and sm_90 (no GPU needed)"),
    "train-supernet": ("resnas_kernels.search.train", "train a ViT-ResNAS supernet with multi-architectural sampling"),
    "search": ("resnas_kernels.search.evolution", "evolutionary search over a trained supernet, many candidates per forward"),
    "export": ("resnas_kernels.search.export", "write a searched sub-network as a standalone timm-loadable checkpoint"),
    "train-subnet": ("resnas_kernels.search.finetune", "fine-tune or retrain a searched network with the same trainer"),
}

# Commands that run long tensor workloads: they keep freed CPU memory in the process (resnas_kernels/cpu_allocator.py).
TUNED_ALLOCATOR = ("bench", "train-supernet", "search", "train-subnet")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="resnas", description="resnas-kernels command line")
    parser.add_argument("command", choices=sorted(SUBCOMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in
                                                                           sorted(SUBCOMMANDS.items())))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    if args.command in TUNED_ALLOCATOR:
        tune_cpu_allocator()  # before the command allocates anything; RESNAS_MALLOC_TUNING=0 opts out
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
