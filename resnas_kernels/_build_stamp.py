"""Is the compiled extension of a source checkout current, and how must a rebuild start?

`scripts/setup.sh` runs this file as a script (`python resnas_kernels/_build_stamp.py plan|record`), without
importing the package or torch, so a re-run with nothing changed costs well under a second here. After an install it
records a stamp of what went into the build (build/ext/stamp.json); the next run compares:

- clean build: the torch version, the Python ABI, a build switch (`BUILD_SWITCHES`), the nvcc on PATH or
  `setup.py` changed, or there is no stamp: the compiled objects are not reusable.
- incremental: a source under csrc/ (its content), pyproject.toml or the requested extras changed, the package is not
  installed from this checkout, the library is missing, or a source is newer than the library: re-run the install,
  ninja recompiles only what changed.
- current: skip the install.

`resnas info` uses `source_status` to say when a source is newer than the built library of an editable install.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Mapping, Optional

try:
    from ._atomic import atomic_write_text
except ImportError:  # run as a script: the package (and torch with it) is deliberately not imported
    from _atomic import atomic_write_text

# Environment variables read by setup.py (and torch's cpp_extension) that change the compiled code.
BUILD_SWITCHES = ("RESNAS_BUILD_EXT", "RESNAS_FORCE_CUDA", "RESNAS_BUILD_CUDA", "TORCH_CUDA_ARCH_LIST",
                  "RESNAS_CPU_NATIVE", "RESNAS_DEBUG", "CUDA_HOME", "CUDA_PATH", "CXX")
SOURCE_SUFFIXES = (".cpp", ".cc", ".cu", ".h", ".hpp", ".cuh")
REBUILD_COMMAND = "bash scripts/setup.sh"
STAMP_NAME = "stamp.json"


def extension_sources(root: Path) -> list[Path]:
    """The C++/CUDA files under csrc/ that go into `resnas_kernels._C`; csrc/tests/ holds the C++ unit tests of the
    CMake path, which the extension never compiles."""
    csrc = Path(root) / "csrc"
    return sorted(p for p in csrc.rglob("*")
                  if p.is_file() and p.suffix in SOURCE_SUFFIXES and "tests" not in p.relative_to(csrc).parts[:-1])


def library_path(root: Path, ext_suffix: Optional[str] = None) -> Path:
    return Path(root) / "resnas_kernels" / ("_C" + (ext_suffix or sysconfig.get_config_var("EXT_SUFFIX")))


def _sha256(path: Path) -> Optional[str]:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _torch_version() -> Optional[str]:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def build_inputs(root: Path, extras: str, environ: Mapping[str, str] = os.environ, torch_version: Optional[str] = None,
                 ext_suffix: Optional[str] = None) -> dict:
    """What went into a build, in two parts: a change under "clean" invalidates the compiled objects, a change under
    "incremental" only needs the install re-run (ninja then recompiles the changed sources)."""
    root = Path(root)
    return {
        "clean": {
            "torch": torch_version if torch_version is not None else _torch_version(),
            "python_abi": ext_suffix or sysconfig.get_config_var("EXT_SUFFIX"),
            "switches": {name: environ.get(name) for name in BUILD_SWITCHES},
            "nvcc": shutil.which("nvcc", path=environ.get("PATH")),
            "setup.py": _sha256(root / "setup.py"),
        },
        "incremental": {
            "sources": {p.relative_to(root).as_posix(): _sha256(p) for p in extension_sources(root)},
            "pyproject.toml": _sha256(root / "pyproject.toml"),
            "extras": extras,
        },
    }


def _changed(old: dict, new: dict) -> list[str]:
    """Names of the entries that differ, one level deep (a changed source is named by its path)."""
    names = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            names += [f"{key}: {sub}" if key == "switches" else sub for sub in _changed(a, b)] or [key]
        else:
            names.append(key)
    return names


def _summary(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def plan(recorded: Optional[dict], current: dict) -> tuple[str, str]:
    """("clean" | "incremental" | "current", why) from the recorded and the current build inputs alone."""
    if not recorded or set(recorded) != set(current):
        return "clean", "no previous build recorded"
    changed = _changed(recorded["clean"], current["clean"])
    if changed:
        return "clean", f"changed: {_summary(changed)}"
    changed = _changed(recorded["incremental"], current["incremental"])
    if changed:
        return "incremental", f"changed: {_summary(changed)}"
    return "current", "sources, torch version and build switches unchanged"


def stale_sources(root: Path, library: Path) -> list[Path]:
    """Sources modified after `library` was linked (empty when the library does not exist)."""
    try:
        built = library.stat().st_mtime
    except FileNotFoundError:
        return []
    return [p for p in extension_sources(root) if p.stat().st_mtime > built]


def decide(root: Path, recorded: Optional[dict], current: dict, installed: bool,
           ext_suffix: Optional[str] = None) -> tuple[str, str]:
    """`plan`, then the checks that a matching stamp cannot make: the package is installed, the library exists and
    no source was modified after it was linked (a source edited during the last build, or touched since)."""
    action, why = plan(recorded, current)
    if action != "current":
        return action, why
    if not installed:
        return "incremental", "resnas-kernels is not installed (editable) from this checkout"
    if (current["clean"]["switches"]["RESNAS_BUILD_EXT"] or "1").strip() != "0":
        library = library_path(root, ext_suffix)
        if not library.exists():
            return "incremental", f"{library.relative_to(root).as_posix()} is missing"
        stale = stale_sources(root, library)
        if stale:
            return "incremental", f"newer than the built library: {_summary([p.relative_to(root).as_posix() for p in stale])}"
    return action, why


def source_status(root: Path, ext_suffix: Optional[str] = None) -> str:
    """One line for `resnas info`: whether the built library of a source checkout is older than its sources."""
    root = Path(root)
    if not ((root / "setup.py").is_file() and (root / "csrc").is_dir()):
        return "not checked (not an editable install)"
    library = library_path(root, ext_suffix)
    if not library.exists():
        return "not checked (no built library)"
    stale = stale_sources(root, library)
    if not stale:
        return "built library is newer than every csrc/ source"
    names = _summary([p.relative_to(root).as_posix() for p in stale])
    return (f"STALE: {names} modified after {library.relative_to(root).as_posix()} was built; "
            f"rebuild with `{REBUILD_COMMAND}`")


def installed_from(root: Path) -> bool:
    """True when resnas-kernels is installed in editable mode from `root` in the running interpreter's environment."""
    try:
        text = importlib.metadata.distribution("resnas-kernels").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return False
    if not text:
        return False
    info = json.loads(text)
    return bool(info.get("dir_info", {}).get("editable")) and info.get("url") == Path(root).resolve().as_uri()


def load_stamp(build_dir: Path) -> Optional[dict]:
    try:
        return json.loads((Path(build_dir) / STAMP_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def record_stamp(build_dir: Path, inputs: dict) -> None:
    atomic_write_text(str(Path(build_dir) / STAMP_NAME), json.dumps(inputs, indent=1, sort_keys=True) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build stamp of the resnas_kernels extension (used by scripts/setup.sh).")
    parser.add_argument("command", choices=("plan", "record"),
                        help="plan: print 'ACTION<TAB>why' (ACTION: clean, incremental or current); "
                             "record: write the stamp of the current inputs after a successful install")
    parser.add_argument("--build-dir", required=True, help="the persistent build directory (RESNAS_BUILD_DIR)")
    parser.add_argument("--extras", required=True, help="the extras installed, e.g. test,bench,onnx")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    build_dir = root / args.build_dir
    current = build_inputs(root, args.extras)
    if args.command == "record":
        record_stamp(build_dir, current)
        return 0
    action, why = decide(root, load_stamp(build_dir), current, installed_from(root))
    print(f"{action}\t{why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
