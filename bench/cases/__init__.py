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
from typing import List, Tuple


@dataclass
class CaseFileError:
    module: str
    error: str       # one line: exception type and message
    details: str     # the traceback, for --verbose


def discover(package: str = __name__) -> Tuple[List[ModuleType], List[CaseFileError]]:
    """Import every module of `package`; return those with a `cases` function, and the ones that failed."""
    pkg = importlib.import_module(package)
    modules, errors = [], []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        name = f"{package}.{info.name}"
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure of one case file must not stop the others
            errors.append(CaseFileError(name, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
            continue
        if callable(getattr(module, "cases", None)):
            modules.append(module)
    return modules, errors
