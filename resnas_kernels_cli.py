"""The `resnas` console script, kept outside the `resnas_kernels` package so that `resnas --help` (and a wrong
subcommand) answers without importing the package: `import resnas_kernels` loads torch, triton and timm and registers
the models, seconds of start-up that only a subcommand needs. `python -m resnas_kernels.cli` (torchrun) runs the same
`main`."""
import argparse
import importlib
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


def tune_cpu_allocator() -> None:
    from resnas_kernels.cpu_allocator import tune_cpu_allocator as tune   # imports the package: only for a command
    tune()


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
        if command in TUNED_ALLOCATOR:
            tune_cpu_allocator()  # before the command allocates anything; RESNAS_MALLOC_TUNING=0 opts out
        module = importlib.import_module(SUBCOMMANDS[command][0])
        return int(module.main(argv[1:]) or 0)
    except KeyboardInterrupt:   # Ctrl-C: no traceback; files are written atomically, so what is on disk is whole
        print(f"resnas {command}: interrupted" + ("; --resume continues from what was saved" if command in RESUMABLE
                                                  else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
