"""`scripts/gpu_check.sh --dry-run` passes here: the prepared GPU run's preconditions hold (commands, step budgets
under 8 minutes, bench modules that yield cases, collectable gpu tests) and its sanitizer workload runs on CPU tensors
with the C++ CPU backend. About 10 s of CPU: one Python process does the checks."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "dry run: ok" in summary
    assert "sanitize_kernels: 0 failed on cpu" in (tmp_path / "out" / "log.txt").read_text()
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(tmp_path / "out").parts) <= 3 for p in files)
