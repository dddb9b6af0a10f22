"""The CMake path: configure CMakeLists.txt against the installed torch, build the CPU op library `resnas_ops` and the C++
unit tests (csrc/tests/test_*.cpp), and run them with ctest.

It checks what setup.py never exercises: the op sources compile without Python headers, the library registers the
`resnas` ops when loaded by a plain C++ program, and the C++ tests (the CPU kernels against at::native_layer_norm and a
loop reference, forward and backward, on awkward shapes) pass. CPU only, in a temporary build tree; it takes a few
minutes (it compiles every csrc/cpu/*.cpp), hence `slow`.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd, cwd, timeout):
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return proc.returncode, proc.stdout


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "build"
    configure = ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", "-DRESNAS_WITH_CUDA=OFF"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    rc, out = _run(configure, ROOT, timeout=300)
    if rc != 0 and "uses CUDA but I cannot find the CUDA" in out:
        # A CUDA build of libtorch makes find_package(Torch) require the CUDA toolkit, even for our CPU-only build.
        pytest.skip("torch is a CUDA build and its CMake config cannot find a CUDA toolkit (set CUDA_HOME)")
    assert rc == 0, f"cmake configure failed:\n{out[-6000:]}"

    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    rc, out = _run(["cmake", "--build", str(build), "-j", jobs], ROOT, timeout=1500)
    assert rc == 0, f"cmake build failed:\n{out[-6000:]}"
    assert (build / "test_ragged_layer_norm").exists(), "the C++ test executable was not built"

    rc, out = _run(["ctest", "--output-on-failure"], build, timeout=900)
    assert rc == 0, f"ctest failed:\n{out[-8000:]}"
    assert "test_ragged_layer_norm" in out and "100% tests passed" in out, out[-4000:]
