"""Every Triton kernel of the package compiles ahead of time for sm_80 and sm_90 without a GPU.

Runs `resnas aot --resources` in a subprocess: this test session sets TRITON_INTERPRET=1, which turns kernels into
interpreter objects at import, so the real compiler must run in a clean process. The registry makes new kernels covered
automatically, and an @triton.jit `*_kernel` with no registered case fails the run. The same run checks static
resources (one compile for both checks): no kernel configuration, Triton or CUDA C++, may spill or need more shared
memory than its target allows.
"""
import os
import subprocess
import sys

import pytest

from resnas_kernels._ext import load_triton
from resnas_kernels.aot_resources import (ZERO_SPILL_TRITON, KernelResources, check_against_known, find_tool,
                                          load_known_spills)


@pytest.mark.skipif(load_triton()[0] is None, reason="triton is not installed on this platform")
def test_every_triton_kernel_compiles_for_sm80_and_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "resnas_kernels.cli", "aot", "--resources"], env=env,
                          capture_output=True, text=True, timeout=1500)
    output = proc.stdout + proc.stderr
    failures = "\n".join(line for line in output.splitlines() if line.startswith("FAIL"))
    assert proc.returncode == 0, (failures or output[-6000:])[-6000:]
    summary = [line for line in output.splitlines() if line.startswith("aot:")]
    assert summary and "0 failed, 0 unregistered" in summary[-1], output[-3000:]
    assert "sm_80" in output and "sm_90" in output
    resources = [line for line in output.splitlines() if line.startswith("resources:")]
    assert resources and resources[-1].endswith(", 0 failing the check"), output[-3000:]
    assert "| triton |" in output
    if find_tool("nvcc") is not None:  # the CUDA C++ kernels are checked wherever a toolkit is installed
        assert "| cuda |" in output and "CUDA C++ kernels skipped" not in output, output[-3000:]


def test_resource_check_flags_spills_and_shared_memory_overflow():
    """The check itself can fail: a spill, shared memory above the target's per-block maximum, and the occupancy
    arithmetic (64K registers and 228 / 164 KB of shared memory per SM, 1 KB reserved per block)."""
    ok = KernelResources("triton", "k", "c", 90, regs=128, stack=0, spill=0, smem=48 * 1024, threads=256)
    assert ok.problems() == []
    assert ok.blocks_by_regs() == 2           # 128 regs x 256 threads = 32K registers
    assert ok.blocks_by_smem() == 228 // 49   # (48 + 1) KB per block
    assert KernelResources("cuda", "k", "c", 80, 32, 0, 0, 0, 64).blocks_by_regs() == 32  # capped at 32 blocks
    assert "spills 8 bytes" in KernelResources("triton", "k", "c", 90, 255, 24, 8, 0, 128).problems()[0]
    over_80 = KernelResources("triton", "k", "c", 80, 64, 0, 0, 164 * 1024, 128)
    assert "above sm_80's" in over_80.problems()[0]
    assert KernelResources("triton", "k", "c", 90, 64, 0, 0, 164 * 1024, 128).problems() == []


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


def test_known_spills_are_a_ratchet():
    """A recorded spill passes only at exactly its recorded size; new, grown, shrunk or vanished spills all fail (so
    the record can only be emptied, by fixing kernels and removing entries), and shared memory is checked regardless."""
    def row(spill, smem=0, config="c"):
        return KernelResources("triton", "k", config, 90, 255, spill, spill, smem, 128)

    key = "triton sm_90 k [c]"
    assert check_against_known([row(100)], {key: 100}) == ([], [row(100)])
    for spill, known, why in ((100, {}, "a new spill"), (120, {key: 100}, "more than the recorded"),
                              (80, {key: 100}, "re-record"), (0, {key: 100}, "no longer spills")):
        failing, _ = check_against_known([row(spill)], known)
        assert len(failing) == 1 and why in failing[0][1], (spill, known, failing)
    failing, _ = check_against_known([row(100, smem=300 * 1024)], {key: 100})
    assert len(failing) == 1 and "shared memory" in failing[0][1]
    # the committed record parses and names only spilling configurations; the Triton release CI installs has none
    assert all(v > 0 for v in load_known_spills().values())
    assert load_known_spills(triton_version=ZERO_SPILL_TRITON) == {}
