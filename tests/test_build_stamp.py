"""The build stamp behind `scripts/setup.sh` re-runs and the staleness line of `resnas info`, on a fake source tree:
which changes force a clean build, which an incremental one, and which none."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from resnas_kernels import _build_stamp as bs

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = "test,bench,onnx"
SUFFIX = ".cpython-test.so"
ENV = {"PATH": "/nonexistent", "RESNAS_CPU_NATIVE": "1"}

FILES = {
    "setup.py": "setup()\n",
    "pyproject.toml": "[project]\nname = 'x'\n",
    "README.md": "# readme\n",
    "tests/test_x.py": "def test_x(): pass\n",
    "resnas_kernels/ops.py": "x = 1\n",
    "csrc/extension.cpp": "int a;\n",
    "csrc/ragged.h": "#pragma once\n",
    "csrc/cpu/kernel.cpp": "int b;\n",
    "csrc/cuda/kernel.cu": "int c;\n",
    "csrc/tests/test_kernel.cpp": "int main() {}\n",
}


@pytest.fixture
def tree(tmp_path):
    for name, text in FILES.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def _inputs(root, extras=EXTRAS, environ=ENV, torch_version="2.14.1+cu130", ext_suffix=SUFFIX):
    return bs.build_inputs(root, extras, environ=environ, torch_version=torch_version, ext_suffix=ext_suffix)


def _append(root, name):
    with open(root / name, "a") as f:
        f.write("// edited\n")


def test_no_stamp_means_a_clean_build(tree):
    assert bs.plan(None, _inputs(tree))[0] == "clean"
    assert bs.plan({"an": "older stamp format"}, _inputs(tree))[0] == "clean"


def test_nothing_changed_means_current(tree):
    assert bs.plan(_inputs(tree), _inputs(tree))[0] == "current"


@pytest.mark.parametrize("name", ["README.md", "tests/test_x.py", "resnas_kernels/ops.py", "csrc/tests/test_kernel.cpp"])
def test_files_outside_the_extension_build_change_nothing(tree, name):
    before = _inputs(tree)
    _append(tree, name)
    assert bs.plan(before, _inputs(tree)) == bs.plan(before, before)
    assert bs.plan(before, _inputs(tree))[0] == "current"


@pytest.mark.parametrize("name", ["csrc/extension.cpp", "csrc/ragged.h", "csrc/cpu/kernel.cpp", "csrc/cuda/kernel.cu"])
def test_a_source_change_rebuilds_incrementally_and_is_named(tree, name):
    before = _inputs(tree)
    _append(tree, name)
    action, why = bs.plan(before, _inputs(tree))
    assert action == "incremental" and name in why


def test_added_or_removed_source_rebuilds_incrementally(tree):
    before = _inputs(tree)
    (tree / "csrc/cpu/new_op.cpp").write_text("int d;\n")
    assert bs.plan(before, _inputs(tree)) == ("incremental", "changed: csrc/cpu/new_op.cpp")
    before = _inputs(tree)
    (tree / "csrc/cpu/kernel.cpp").unlink()
    assert bs.plan(before, _inputs(tree)) == ("incremental", "changed: csrc/cpu/kernel.cpp")


def test_pyproject_or_extras_change_reinstalls_incrementally(tree):
    before = _inputs(tree)
    _append(tree, "pyproject.toml")
    assert bs.plan(before, _inputs(tree))[0] == "incremental"
    assert bs.plan(before, _inputs(tree, extras="test"))[0] == "incremental"


def test_setup_py_change_forces_a_clean_build(tree):
    before = _inputs(tree)
    _append(tree, "setup.py")
    assert bs.plan(before, _inputs(tree)) == ("clean", "changed: setup.py")


def test_torch_version_or_python_abi_change_forces_a_clean_build(tree):
    before = _inputs(tree)
    assert bs.plan(before, _inputs(tree, torch_version="2.13.0+cpu")) == ("clean", "changed: torch")
    assert bs.plan(before, _inputs(tree, ext_suffix=".cpython-312-x86_64-linux-gnu.so"))[0] == "clean"


@pytest.mark.parametrize("switch", bs.BUILD_SWITCHES)
def test_a_build_switch_change_forces_a_clean_build(tree, switch):
    before = _inputs(tree)
    action, why = bs.plan(before, _inputs(tree, environ={**ENV, switch: "0"}))
    assert action == "clean" and switch in why


def test_nvcc_appearing_on_path_forces_a_clean_build(tree, tmp_path_factory):
    bin_dir = tmp_path_factory.mktemp("bin")
    nvcc = bin_dir / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    before = _inputs(tree)
    assert bs.plan(before, _inputs(tree, environ={**ENV, "PATH": str(bin_dir)})) == ("clean", "changed: nvcc")


def test_stamp_round_trip(tree):
    build_dir = tree / "build" / "ext"
    assert bs.load_stamp(build_dir) is None
    bs.record_stamp(build_dir, _inputs(tree))
    assert bs.plan(bs.load_stamp(build_dir), _inputs(tree))[0] == "current"
    (build_dir / bs.STAMP_NAME).write_text("{truncated")
    assert bs.load_stamp(build_dir) is None


def _build_library(root, suffix=SUFFIX):
    """A stand-in library, linked 10 s after the sources were written."""
    library = bs.library_path(root, suffix)
    library.parent.mkdir(parents=True, exist_ok=True)
    library.write_bytes(b"\x7fELF")
    t = (root / "csrc/extension.cpp").stat().st_mtime + 10
    os.utime(library, (t, t))
    return library


def test_decide_checks_install_library_and_timestamps(tree):
    stamp = _inputs(tree)
    library = _build_library(tree)
    assert bs.decide(tree, stamp, _inputs(tree), installed=True, ext_suffix=SUFFIX)[0] == "current"
    action, why = bs.decide(tree, stamp, _inputs(tree), installed=False, ext_suffix=SUFFIX)
    assert action == "incremental" and "not installed" in why
    # same content, but touched after the library was linked: ninja must look at it again
    t = library.stat().st_mtime + 5
    os.utime(tree / "csrc/cpu/kernel.cpp", (t, t))
    action, why = bs.decide(tree, stamp, _inputs(tree), installed=True, ext_suffix=SUFFIX)
    assert action == "incremental" and "csrc/cpu/kernel.cpp" in why
    library.unlink()
    action, why = bs.decide(tree, stamp, _inputs(tree), installed=True, ext_suffix=SUFFIX)
    assert action == "incremental" and "missing" in why
    no_ext = _inputs(tree, environ={**ENV, "RESNAS_BUILD_EXT": "0"})
    assert bs.decide(tree, no_ext, no_ext, installed=True, ext_suffix=SUFFIX)[0] == "current"


def test_source_status_names_stale_sources_and_the_rebuild_command(tree):
    assert "not checked" in bs.source_status(tree, SUFFIX)            # no library built yet
    library = _build_library(tree)
    assert not bs.source_status(tree, SUFFIX).startswith("STALE")
    t = library.stat().st_mtime + 5
    os.utime(tree / "csrc/cuda/kernel.cu", (t, t))
    os.utime(tree / "csrc/tests/test_kernel.cpp", (t, t))              # not part of the extension
    status = bs.source_status(tree, SUFFIX)
    assert status.startswith("STALE") and "csrc/cuda/kernel.cu" in status and "test_kernel" not in status
    assert bs.REBUILD_COMMAND in status
    shutil.rmtree(tree / "csrc")
    assert "not an editable install" in bs.source_status(tree, SUFFIX)


def test_resnas_info_reports_a_stale_extension(tree, monkeypatch, capsys):
    from resnas_kernels import info

    library = _build_library(tree, suffix=None)                         # the running interpreter's suffix
    t = library.stat().st_mtime + 5
    os.utime(tree / "csrc/ragged.h", (t, t))
    monkeypatch.setattr(info, "_source_root", lambda: tree)
    assert info.main([]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "extension_sources" in line)
    assert "STALE" in line and "csrc/ragged.h" in line and "bash scripts/setup.sh" in line
    assert info.main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["extension_sources"].startswith("STALE")


def test_setup_sh_entry_point_runs_without_the_package(tree):
    """setup.sh runs the module as a script before the package is installed: it must not import resnas_kernels."""
    for name in ("_build_stamp.py", "_atomic.py"):
        shutil.copy(ROOT / "resnas_kernels" / name, tree / "resnas_kernels" / name)
    script = [sys.executable, str(tree / "resnas_kernels/_build_stamp.py")]
    args = ["--build-dir", "build/ext", "--extras", EXTRAS]

    def run(command):
        proc = subprocess.run(script + [command] + args, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert run("plan").startswith("clean\t")
    run("record")
    assert (tree / "build/ext" / bs.STAMP_NAME).is_file()
    # recorded, but this tree is not pip-installed: re-run the install, keep the objects
    assert run("plan").startswith("incremental\t")
    _append(tree, "setup.py")
    assert run("plan") == "clean\tchanged: setup.py\n"
