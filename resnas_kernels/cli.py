"""`python -m resnas_kernels.cli COMMAND ...` (e.g. under torchrun): the `resnas` console script. The script itself
is the top-level module `resnas_kernels_cli`, outside this package, so that `resnas --help` does not import it."""
import sys

from resnas_kernels_cli import RESUMABLE, SUBCOMMANDS, TUNED_ALLOCATOR, main

__all__ = ["main", "SUBCOMMANDS", "TUNED_ALLOCATOR", "RESUMABLE"]


if __name__ == "__main__":
    sys.exit(main())
