"""Runtime switches of the library, read from the environment once (at import) and changeable from Python.

Every `RESNAS_*` variable that changes what the library does at run time is read here and nowhere else. The setters
take precedence over the environment; `set_x(None)` returns a switch to its environment value (or its default).
`override(...)` switches several for a block and restores them, which is what tests use:

    from resnas_kernels import config
    config.set_rsr_conv("blocked")                 # from now on
    with config.override(backend="reference", validate_metadata=True):
        ...                                        # only inside

A malformed environment value is not an import error: the getter of that switch raises a ValueError naming the
variable, the first time (and every time) the switch is used. Build-time variables (RESNAS_BUILD_EXT, ...) belong to
setup.py and test-suite variables (RESNAS_EXPECT_EXT, ...) to tests/conftest.py; neither is read here.

This module imports nothing from the package (nor torch), so every module can import it.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

__all__ = [
    "BACKENDS", "ATTENTION_FWD_CHOICES", "RSR_CONV_CHOICES", "Knob", "KNOBS",
    "requested_backend", "set_backend",
    "extension_disabled", "set_extension_disabled",
    "attention_fwd", "set_attention_fwd",
    "autotune_cache", "set_autotune_cache",
    "rsr_conv", "set_rsr_conv",
    "malloc_tuning", "set_malloc_tuning",
    "validate_metadata", "set_validate_metadata",
    "override", "reset_overrides", "read_environment", "reload_from_environment", "markdown_table",
]

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")
ATTENTION_FWD_CHOICES = ("auto", "triton", "cuda")
RSR_CONV_CHOICES = ("auto", "blocked")


def _choice(choices: Tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise ValueError(f"must be one of {choices}, got {value!r}")
        return value.strip().lower()
    return parse


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("", "0", "false", "no", "off"):
            return False
    raise ValueError(f"must be a boolean (1/0, true/false, yes/no, on/off), got {value!r}")


def _path(value: Any) -> Optional[str]:
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"must be a file path, got {value!r}")
    return os.fspath(value) or None  # empty: no cache


@dataclass(frozen=True)
class Knob:
    name: str                       # the Python name: `override(name=...)`, `set_<name>`
    env: str                        # the environment variable
    default: Any                    # when the variable is unset
    parse: Callable[[Any], Any]     # text or Python value -> value; raises ValueError("must be ...")
    values: str                     # what it accepts, for the README table
    effect: str                     # what it does, for the README table
    read: str                       # when the library looks at it


KNOBS: Dict[str, Knob] = {k.name: k for k in (
    Knob("backend", "RESNAS_BACKEND", "auto", _choice(BACKENDS), " / ".join(BACKENDS),
         "which implementation runs every op (`resnas_kernels.backend`); a forced backend that cannot run a call "
         "raises `BackendUnavailableError`",
         "every op call (torch.compile bakes the choice into a graph when it traces)"),
    Knob("extension_disabled", "RESNAS_DISABLE_EXT", False, _flag, "0 / 1",
         "never load the compiled extension `resnas_kernels._C`: C++ backends unavailable, auto uses Triton or the "
         "reference", "the first op call (the extension is loaded once per process)"),
    Knob("attention_fwd", "RESNAS_ATTENTION_FWD", "auto", _choice(ATTENTION_FWD_CHOICES),
         " / ".join(ATTENTION_FWD_CHOICES),
         "the CUDA attention forward under the auto backend: measured per shape (auto) or always the named one",
         "every CUDA attention call"),
    Knob("autotune_cache", "RESNAS_AUTOTUNE_CACHE", None, _path, "a JSON file path",
         "keeps the auto backend's per-shape measurements across processes (unset: measured again in each process)",
         "when a shape is first measured or looked up"),
    Knob("rsr_conv", "RESNAS_RSR_CONV", "auto", _choice(RSR_CONV_CHOICES), " / ".join(RSR_CONV_CHOICES),
         "the C++ CPU RSR conv: oneDNN's convolution where it applies (auto) or always the blocked implicit GEMM",
         "every CPU RSR conv call"),
    Knob("malloc_tuning", "RESNAS_MALLOC_TUNING", True, _flag, "1 / 0",
         "the `resnas` commands that train or benchmark tune glibc malloc to keep freed memory "
         "(`resnas_kernels.cpu_allocator`); 0 keeps the default allocator. Importing the library never tunes",
         "when such a command starts"),
    Knob("validate_metadata", "RESNAS_VALIDATE_METADATA", False, _flag, "0 / 1",
         "check the values of device widths tensors on CUDA too (a host sync per op call: a debug switch; CPU "
         "widths are always checked)", "every op call"),
)}


class _Current:
    """The value in force of every switch, one attribute each (set at import). Attributes rather than a dict:
    torch.compile guards a traced getter on that one attribute, so setting another switch recompiles nothing."""


_UNSET = object()
_current = _Current()
# name -> parsed environment value, or the ValueError that parsing raised (re-raised by the getter)
_from_env: Dict[str, Any] = {}
_overrides: Dict[str, Any] = {}


def read_environment(environ: Mapping[str, str]) -> Dict[str, Any]:
    """The value of every switch in `environ` (defaults where unset); a malformed one maps to its ValueError."""
    values: Dict[str, Any] = {}
    for knob in KNOBS.values():
        raw = environ.get(knob.env)
        if raw is None:
            values[knob.name] = knob.default
            continue
        try:
            values[knob.name] = knob.parse(raw)
        except ValueError as exc:
            values[knob.name] = ValueError(f"{knob.env} {exc}")
    return values


def _refresh(name: str) -> None:
    setattr(_current, name, _overrides.get(name, _from_env[name]))


def reload_from_environment() -> None:
    """Read the environment again (the setters' values stay in force). For programs that set `os.environ` after
    importing the library; prefer the setters."""
    _from_env.clear()
    _from_env.update(read_environment(os.environ))
    for name in KNOBS:
        _refresh(name)


def _get(name: str) -> Any:
    value = getattr(_current, name)
    if isinstance(value, ValueError):
        raise ValueError(str(value))
    return value


def _set(name: str, value: Any) -> None:
    if value is None:
        _overrides.pop(name, None)
    else:
        try:
            _overrides[name] = KNOBS[name].parse(value)
        except ValueError as exc:
            raise ValueError(f"{name} {exc}") from None
    _refresh(name)


def reset_overrides() -> None:
    """Forget every setter's value: each switch returns to its environment value (or its default)."""
    _overrides.clear()
    for name in KNOBS:
        _refresh(name)


@contextlib.contextmanager
def override(**values: Any) -> Iterator[None]:
    """Set switches by their Python names for the block, then restore the previous settings (also on error).
    A value of None means: the environment's value (or the default) inside the block."""
    unknown = sorted(set(values) - set(KNOBS))
    if unknown:
        raise TypeError(f"unknown switch(es) {unknown}; known: {sorted(KNOBS)}")
    saved = {name: _overrides.get(name, _UNSET) for name in values}
    try:
        for name, value in values.items():
            _set(name, value)
        yield
    finally:
        for name, value in saved.items():
            if value is _UNSET:
                _overrides.pop(name, None)
            else:
                _overrides[name] = value
            _refresh(name)


# -- one getter and one setter per switch (see KNOBS for what each does) -------------------------------------------
def requested_backend() -> str:
    return _get("backend")


def set_backend(name: Optional[str]) -> None:
    _set("backend", name)


def extension_disabled() -> bool:
    return _get("extension_disabled")


def set_extension_disabled(disabled: Optional[bool]) -> None:
    """Takes effect only before the extension is first loaded (the first op call): a loaded library stays loaded."""
    _set("extension_disabled", disabled)


def attention_fwd() -> str:
    return _get("attention_fwd")


def set_attention_fwd(choice: Optional[str]) -> None:
    _set("attention_fwd", choice)


def autotune_cache() -> Optional[str]:
    return _get("autotune_cache")


def set_autotune_cache(path) -> None:
    """A JSON path; "" turns the disk cache off even where the environment sets one; None returns to the
    environment."""
    _set("autotune_cache", path)


def rsr_conv() -> str:
    return _get("rsr_conv")


def set_rsr_conv(route: Optional[str]) -> None:
    _set("rsr_conv", route)


def malloc_tuning() -> bool:
    return _get("malloc_tuning")


def set_malloc_tuning(enabled: Optional[bool]) -> None:
    """Takes effect at the next `tune_cpu_allocator()`; tuning already applied to this process stays."""
    _set("malloc_tuning", enabled)


def validate_metadata() -> bool:
    return _get("validate_metadata")


def set_validate_metadata(enabled: Optional[bool]) -> None:
    _set("validate_metadata", enabled)


def markdown_table() -> str:
    """The table of switches, as the README shows it."""
    rows = ["| Variable | Python | Values (default first) | Effect | Read |", "|---|---|---|---|---|"]
    for knob in KNOBS.values():
        rows.append(f"| `{knob.env}` | `config.set_{knob.name}(...)` | {knob.values} | {knob.effect} | {knob.read} |")
    return "\n".join(rows)


reload_from_environment()
