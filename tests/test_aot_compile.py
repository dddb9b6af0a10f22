"""Every Triton kernel of the package compiles ahead of time for sm_80 and sm_90 without a GPU.

Runs `resnas aot` in a subprocess: this test session sets TRITON_INTERPRET=1, which turns kernels into interpreter
objects at import, so the real compiler must run in a clean process. The registry makes new kernels covered
automatically, and an @triton.jit `*_kernel` with no registered case fails the run.
"""
import os
import subprocess
import sys

import pytest

from resnas_kernels._ext import load_triton


@pytest.mark.skipif(load_triton()[0] is None, reason="triton is not installed on this platform")
def test_every_triton_kernel_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "resnas_kernels.cli", "aot"], env=env, capture_output=True,
                          text=True, timeout=1500)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    summary = [line for line in output.splitlines() if line.startswith("aot:")]
    assert summary and "0 failed, 0 unregistered" in summary[-1], output[-3000:]
    assert "sm_80" in output and "sm_90" in output


def test_unregistered_kernels_are_detected(tmp_path):
    """The registry check itself can fail: a module with an unregistered *_kernel is reported."""
    from resnas_kernels import aot

    code = (
        "import sys, types, triton, triton.language as tl\n"
        "from resnas_kernels import aot\n"
        "mod = types.ModuleType('fake_ops'); sys.modules['fake_ops'] = mod\n"
        "src = '@triton.jit\\ndef lonely_kernel(X):\\n    pass\\n'\n"
        "open(sys.argv[1], 'w').write('import triton\\n' + src)\n"
        "import importlib.util\n"
        "spec = importlib.util.spec_from_file_location('fake_ops', sys.argv[1]); m = importlib.util.module_from_spec(spec)\n"
        "sys.modules['fake_ops'] = m; spec.loader.exec_module(m)\n"
        "print(aot.unregistered_kernels(['fake_ops']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "fake_ops.py")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "fake_ops.lonely_kernel" in proc.stdout
    assert aot.TARGETS == (("sm_80", 80), ("sm_90", 90))
