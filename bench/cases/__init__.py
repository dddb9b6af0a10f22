"""Benchmark cases, one module per kernel issue, discovered automatically.

To add a benchmark, write `bench/cases/<name>.py` with

    from resnas_kernels.bench.harness import Case

    def cases(ctx) -> list:        # ctx.device, ctx.quick, ctx.threads (ctx.smoke: smallest shape only)
        return [Case(name="<op>.<mode>", shape="...", dtype="float32", flops=..., bytes=...,
                     providers={"ours": fn, "masked": fn2}, baseline="ours", op="<registered op>")]

Every module of this package that defines a `cases` function is a case file. Peers that are not installed or cannot
run on ctx.device are simply left out of `providers`. A module that fails to import is reported and skipped; it does
not stop the other cases.
"""
from __future__ import annotations

import importlib
import pkgutil
import traceback
from dataclasses import dataclass
from types import ModuleType
from typing import List, Optional, Sequence, Tuple


@dataclass
class CaseFileError:
    module: str
    error: str       # one line: exception type and message
    details: str     # the traceback, for --verbose


def case_files(package: str = __name__) -> List[str]:
    """Names of the candidate case files of `package` (modules not starting with '_'), sorted."""
    pkg = importlib.import_module(package)
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def discover(package: str = __name__, only: Optional[Sequence[str]] = None
             ) -> Tuple[List[ModuleType], List[CaseFileError]]:
    """Import the modules of `package` (all, or the file names in `only`); return those with a `cases` function,
    and the ones that failed to import."""
    modules, errors = [], []
    for short in case_files(package):
        if only is not None and short not in only:
            continue
        name = f"{package}.{short}"
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure of one case file must not stop the others
            errors.append(CaseFileError(name, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
            continue
        if callable(getattr(module, "cases", None)):
            modules.append(module)
    return modules, errors
