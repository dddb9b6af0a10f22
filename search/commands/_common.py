"""What the search commands share: which arguments a command line names, and its errors as one-line messages."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence, Set

from ..checkpoint import CheckpointError

__all__ = ["given_args", "report_errors"]


def given_args(make_parser: Callable[[], argparse.ArgumentParser], argv: Sequence[str]) -> Set[str]:
    """The arguments `argv` names, however spelled (`--epo 3`, `--epochs=3`): parsed with a marker as every default,
    they are the ones without it. A --resume must not contradict them; the others come from the saved run."""
    parser, unset = make_parser(), object()
    parser.set_defaults(**{k: unset for k in vars(make_parser().parse_args(argv))})
    return {k for k, v in vars(parser.parse_args(argv)).items() if v is not unset}


def report_errors(prog: str, work: Callable[[], int]) -> int:
    """`work()`, with a bad argument or file (exit 2) and an OS error such as an unwritable --out or a full disk
    (exit 1) reported as one line instead of a traceback."""
    try:
        return work()
    except (ValueError, CheckpointError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{prog}: error: {exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}",
              file=sys.stderr)
        return 1
