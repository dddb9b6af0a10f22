"""The `resnas` console script."""
import json
import subprocess
import sys

from resnas_kernels import cli


def _run(*args):
    return subprocess.run([sys.executable, "-m", "resnas_kernels.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_info_lists_versions_and_the_backend_of_every_op():
    proc = _run("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["torch"] and "ragged_layer_norm" in info["ops"]
    entry = info["ops"]["ragged_layer_norm"]["cpu"]
    assert entry["uses"] in ("cpu", "reference")
    # every unavailable backend comes with its reason
    assert all(isinstance(why, str) and why for why in entry["unavailable"].values())


def test_info_table():
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr
    assert "ragged_layer_norm" in proc.stdout and "torch" in proc.stdout


def test_unknown_subcommand_is_rejected():
    proc = _run("frobnicate")
    assert proc.returncode != 0 and "invalid choice" in proc.stderr


def test_help_lists_subcommands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "info" in out and "bench" in out and "aot" in out
