"""The `resnas` console script."""
import json
import os
import subprocess
import sys
import types

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


def _fake_bench(monkeypatch, calls, rc=0):
    import resnas_kernels_cli as script

    def main(argv):
        calls.append(list(argv))
        print("cpu: 1 case(s)")
        print("a failure line", file=sys.stderr)
        return rc
    monkeypatch.setattr(script.importlib, "import_module", lambda name: types.SimpleNamespace(main=main))
    monkeypatch.setattr(script, "tune_cpu_allocator", lambda: calls.append("tune"))
    return script


def test_bench_list_is_kept_until_a_source_changes(monkeypatch, tmp_path, capsys):
    calls = []
    script = _fake_bench(monkeypatch, calls)
    source = tmp_path / "pkg" / "case.py"
    source.parent.mkdir()
    source.write_text("")
    monkeypatch.setattr(script, "BENCH_LIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(script, "_package_dirs", lambda: [str(source.parent)])
    for _ in range(2):
        assert script.main(["bench", "--list", "--quick"]) == 0
        captured = capsys.readouterr()
        assert captured.out == "cpu: 1 case(s)\n" and captured.err == "a failure line\n"
    assert calls == [["--list", "--quick"]]          # the second answer came from the cache, no allocator tuning
    assert script.main(["bench", "--list"]) == 0       # other arguments: listed again
    assert len(calls) == 2
    os.utime(source, ns=(1, 1))                       # an edited case file: listed again
    assert script.main(["bench", "--list", "--quick"]) == 0
    assert len(calls) == 3


def test_failed_bench_list_is_not_kept(monkeypatch, tmp_path, capsys):
    calls = []
    script = _fake_bench(monkeypatch, calls, rc=2)
    monkeypatch.setattr(script, "BENCH_LIST_CACHE", str(tmp_path / "cache"))
    assert script.main(["bench", "--list"]) == 2 and script.main(["bench", "--list"]) == 2
    assert len(calls) == 2


def test_help_of_a_long_command_does_not_tune_the_allocator(monkeypatch):
    calls = []
    script = _fake_bench(monkeypatch, calls)
    assert script.main(["train-supernet", "--help"]) == 0 and script.main(["train-supernet"]) == 0
    assert calls == [["--help"], "tune", []]


def test_cached_bench_list_imports_nothing_heavy(tmp_path):
    # a repeated `resnas bench --list` answers from the cache without loading torch, timm or the package
    code = ("import json, os, sys, resnas_kernels_cli as m; m.BENCH_LIST_CACHE = sys.argv[1]; "
            "os.makedirs(sys.argv[1]); argv = ['--list', '--device', 'cpu']; "
            "json.dump({'stdout': 'cached list\\n', 'stderr': '', 'rc': 0}, "
            "open(os.path.join(sys.argv[1], m.bench_list_key(argv) + '.json'), 'w')); "
            "rc = m.main(['bench', *argv]); "
            "print(rc, sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'timm', 'triton', 'resnas_kernels')))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "cached list\n0 []\n"
