"""resnas_kernels.cpu_allocator: the `resnas` commands keep freed CPU memory in the process.

Each check runs in a fresh interpreter: the tuning is process-wide and permanent, so it must not leak into the test
process (the other tests measure nothing, but they should run under the allocator users get by default).
"""
import os
import platform
import subprocess
import sys
import textwrap
import types

import pytest

glibc_linux = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                 reason="the tuning applies to glibc only (the CI and dev machines are glibc Linux)")

# Allocates, touches and frees a 64 MB tensor and counts the minor page faults of four rounds after four warm-up
# rounds: with glibc's defaults every round maps fresh pages (64 MB / 4 KB = 16384 faults a round); tuned, the freed
# block is reused and faults no more.
_PROBE = textwrap.dedent("""
    import resource, sys, torch
    from resnas_kernels.cpu_allocator import cpu_allocator_state, tune_cpu_allocator
    if sys.argv[1] == "tune":
        tune_cpu_allocator()
    def round_():
        t = torch.empty(16 * 1024 * 1024)  # 64 MB
        t.fill_(1.0)
        del t
    for _ in range(4):  # warm-up: the freed block comes back one allocation later, so two blocks alternate
        round_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        round_()
    print(cpu_allocator_state())
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")
FRESH_PAGES = 4 * 16384


def _probe(mode: str, **env):
    proc = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    state, faults = proc.stdout.strip().splitlines()[-2:]
    return state, int(faults)


@glibc_linux
def test_tuned_allocator_reuses_freed_memory():
    state, faults = _probe("tune")
    assert state == "glibc-tuned"
    assert faults < FRESH_PAGES // 16, f"{faults} minor page faults in 4 rounds of a 64 MB tensor: not reused"


@glibc_linux
def test_default_allocator_refaults_and_the_opt_out_keeps_it():
    # The control: without the tuning the same rounds page-fault (else the test above would prove nothing).
    state, faults = _probe("plain")
    assert state == "default" and faults > FRESH_PAGES // 2
    state, faults = _probe("tune", RESNAS_MALLOC_TUNING="0")
    assert state == "default (RESNAS_MALLOC_TUNING=0)" and faults > FRESH_PAGES // 2


@pytest.mark.parametrize("command,tuned", [("bench", True), ("train-supernet", True), ("search", True),
                                           ("train-subnet", True), ("info", False), ("export", False)])
def test_long_running_commands_tune_before_they_start(command, tuned, monkeypatch):
    import resnas_kernels_cli as cli   # the console script's module (resnas_kernels.cli re-exports its main)
    calls = []
    monkeypatch.setattr(cli, "tune_cpu_allocator", lambda: calls.append("tune"))
    monkeypatch.setattr(cli.importlib, "import_module",
                        lambda name: types.SimpleNamespace(main=lambda argv: calls.append(name) or 0))
    assert cli.main([command]) == 0
    assert calls == (["tune"] if tuned else []) + [cli.SUBCOMMANDS[command][0]]


def test_importing_the_library_does_not_tune():
    from resnas_kernels.cpu_allocator import cpu_allocator_state
    assert cpu_allocator_state().startswith("default")
