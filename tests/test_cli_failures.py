"""The command line's failure paths: each misuse or accident ends in a one-line error (or a clean stop) and leaves a
state that `--resume` continues; outputs get the usual permissions and no temporaries. Tiny runs on the demo digits
(32 training images, batch 16, 2 steps per epoch)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from resnas_kernels import _atomic
from resnas_kernels.models.vit_resnas import count_macs
from resnas_kernels.models.vit_resnas.space import DEMO_SPACE
from resnas_kernels.search import data, trainer
from resnas_kernels.search.commands import export, search, train_subnet, train_supernet
from resnas_kernels.search.checkpoint import CheckpointError, read_checkpoint, read_jsonl

TINY = ["--demo-data", "digits", "--train-subset", "32", "--batch-size", "16", "--width-warmup-epochs", "0",
        "--no-progress", "--no-eval-every-epoch", "--seed", "1"]
SEARCH = ["--population", "3", "--parents", "2", "--mutations", "2", "--crossovers", "1", "--val-subset", "16",
          "--candidates-per-forward", "3", "--images-per-forward", "16", "--no-progress", "--no-plot", "--seed", "2"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Foreign:
    """A pickled object of a class: what weights-only loading refuses."""


def _ckpt(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)


@pytest.fixture(scope="module")
def supernet(tmp_path_factory):
    out = tmp_path_factory.mktemp("supernet")
    assert train_supernet.main(["--out", str(out), *TINY, "--epochs", "1"]) == 0
    return str(out / "checkpoint.pt")


def test_help_does_not_import_the_package():
    # `resnas --help` must not pay for torch / timm / the package (seconds): only the launcher module loads.
    code = ("import sys, resnas_kernels_cli as m; rc = m.main(['--help']); "
            "heavy = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'timm', 'triton', 'resnas_kernels'));"
            "print(rc, heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("0 []"), proc.stdout
    assert "train-supernet" in proc.stdout and "search" in proc.stdout


def test_batch_larger_than_the_training_set_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_supernet.main(["--out", str(out), "--demo-data", "digits", "--batch-size", "4096",
                                "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 4096 exceeds the" in err and "training images" in err
    assert not (out / "checkpoint.pt").exists()


def _image_folder(root, split_classes):
    from PIL import Image
    for split, classes in split_classes.items():
        os.makedirs(root / split, exist_ok=True)
        for c, n in classes.items():
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / split / c / f"{i}.png")


def test_image_folder_class_mismatch_and_empty_folders(tmp_path, capsys):
    mismatch = tmp_path / "mismatch"
    _image_folder(mismatch, {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "eel": 1}})
    with pytest.raises(ValueError, match=r"same class folders as train/; only in train/: dog; only in val/: eel"):
        data.load_image_folder(str(mismatch), 56)
    no_classes = tmp_path / "no_classes"
    os.makedirs(no_classes / "train")
    os.makedirs(no_classes / "val")
    with pytest.raises(ValueError, match="train/ holds no class folders"):
        data.load_image_folder(str(no_classes), 56)
    no_images = tmp_path / "no_images"
    _image_folder(no_images, {"train": {"cat": 2, "dog": 0}, "val": {"cat": 1, "dog": 1}})
    with pytest.raises(ValueError, match="not a usable ImageFolder split"):
        data.load_image_folder(str(no_images), 56)
    # through the command: one line on stderr, exit 2
    assert train_supernet.main(["--out", str(tmp_path / "run"), "--data", str(mismatch), "--img-size", "56"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only in val/: eel" in err


def test_bad_values_give_one_line_errors(supernet, tmp_path, capsys):
    for size in ("0", "-56"):
        assert train_supernet.main(["--out", str(tmp_path / "a"), *TINY, "--img-size", size]) == 2
        assert "--img-size must be > 0" in capsys.readouterr().err
    assert search.main(["--supernet", supernet, "--out", str(tmp_path / "s"), "--device", "tpu"]) == 2
    assert "--device must be auto, cpu or cuda" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for main, args in ((train_supernet.main, ["--out", str(blocker / "run"), *TINY, "--epochs", "1"]),
                       (search.main, ["--supernet", supernet, "--out", str(blocker / "s"), *SEARCH]),
                       (export.main, ["--arch", str(tmp_path / "arch.json"), "--supernet", supernet,
                                      "--out", str(blocker / "net.pt")])):
        if main is export.main:
            (tmp_path / "arch.json").write_text(DEMO_SPACE.min_arch().to_json())
        assert main(args) == 1
        err = capsys.readouterr().err
        assert "error: " + str(blocker) in err and err.count("\n") == 1, err   # the path and the OS's reason


def test_checkpoints_that_do_not_fit_and_foreign_pickles(supernet, tmp_path, capsys):
    ckpt = torch.load(supernet, weights_only=True)
    name = next(k for k in ckpt["model"] if k.endswith("weight") and ckpt["model"][k].ndim == 2)
    ckpt["model"][name] = torch.zeros(3, 3)
    bad = tmp_path / "bad"
    os.makedirs(bad)
    torch.save(ckpt, bad / "checkpoint.pt")
    assert train_supernet.main(["--out", str(bad), "--resume", "--no-progress"]) == 2
    assert "do not fit" in capsys.readouterr().err
    assert search.main(["--supernet", str(bad / "checkpoint.pt"), "--out", str(tmp_path / "s"), *SEARCH]) == 2
    assert "do not fit" in capsys.readouterr().err

    torch.save({"format": "resnas-supernet-train", "x": Foreign()}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(str(tmp_path / "foreign.pt"), "resnas-supernet-train")
    assert "weights-only loading refuses" in str(info.value) and "weights_only=False" not in str(info.value)
    assert "\n" not in str(info.value)


def test_empty_mac_band_leaves_nothing_behind(supernet, tmp_path, capsys):
    lo, hi = (count_macs(a, 56, 10) for a in (DEMO_SPACE.min_arch(), DEMO_SPACE.max_arch()))
    out = tmp_path / "s"
    assert search.main(["--supernet", supernet, "--out", str(out), *SEARCH, "--band", "1",
                           "--macs", str((lo + hi) // 2)]) == 2
    assert "no random architecture with MACs in" in capsys.readouterr().err
    assert not out.exists()


def test_search_resume_takes_its_saved_arguments(supernet, tmp_path, capsys):
    out = str(tmp_path / "s")
    assert search.main(["--supernet", supernet, "--out", out, *SEARCH, "--generations", "1"]) == 0
    one = read_jsonl(os.path.join(out, "history.jsonl"))
    # Nothing retyped: the saved flags (one generation included) come back, nothing more is scored.
    assert search.main(["--out", out, "--resume", "--no-progress", "--no-plot"]) == 0
    assert read_jsonl(os.path.join(out, "history.jsonl")) == one
    # A flag given with another value is refused, naming it; --generations extends the search.
    assert search.main(["--out", out, "--resume", "--seed", "9"]) == 2
    assert "--seed 9 (saved: 2)" in capsys.readouterr().err
    assert search.main(["--out", out, "--resume", "--generations", "2", "--no-progress", "--no-plot"]) == 0
    two = read_jsonl(os.path.join(out, "history.jsonl"))
    assert two[:len(one)] == one and {r["generation"] for r in two} == {0, 1}
    assert search.main(["--out", str(tmp_path / "none")]) == 2
    assert "--supernet is required" in capsys.readouterr().err


def test_search_progress_bar_has_a_total(supernet, tmp_path, capsys):
    args = [a for a in SEARCH if a != "--no-progress"]
    assert search.main(["--supernet", supernet, "--out", str(tmp_path / "s"), *args, "--generations", "2"]) == 0
    n = len(read_jsonl(str(tmp_path / "s" / "history.jsonl")))
    assert f"{n}/{n} [" in capsys.readouterr().err   # tqdm: done/total [elapsed<remaining, ...]


def test_killed_before_the_first_checkpoint_resumes_and_keeps_ckpt_every(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_lr_at = trainer.lr_at

    def interrupted(*a, **k):
        raise KeyboardInterrupt   # as a Ctrl-C inside the first step would
    monkeypatch.setattr(trainer, "lr_at", interrupted)
    assert train_supernet.main(["--out", str(out), *TINY, "--epochs", "2", "--ckpt-every", "3"]) == 130
    monkeypatch.setattr(trainer, "lr_at", real_lr_at)
    assert _ckpt(out)["step"] == 0                      # written before the first step
    mode = 0o666 & ~_umask()
    assert {name: os.stat(out / name).st_mode & 0o777 for name in os.listdir(out)} == \
        {"checkpoint.pt": mode, "config.json": mode, "metrics.jsonl": mode}
    stale = out / f".tmp-checkpoint.pt.{2 ** 22 + 7}.0123456789abcdef.pt"    # as a kill -9 mid-write leaves it
    stale.write_bytes(b"partial")
    assert train_supernet.main(["--out", str(out), "--resume", "--no-progress", "--stop-at-step", "1"]) == 0
    assert not stale.exists()
    assert _ckpt(out)["args"]["ckpt_every"] == 3        # kept, not reset to the default


def test_nan_loss_stops_with_an_error_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = trainer.F.cross_entropy

    def diverging(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] >= 3 else loss
    monkeypatch.setattr(trainer.F, "cross_entropy", diverging)
    out = tmp_path / "run"
    assert train_supernet.main(["--out", str(out), *TINY, "--epochs", "2", "--ckpt-every", "1"]) == 1
    err = capsys.readouterr().err
    assert "the training loss is nan at step 3" in err and "last good state (step 2)" in err
    assert _ckpt(out)["step"] == 2
    assert [r["step"] for r in read_jsonl(str(out / "metrics.jsonl"))] == [1, 2]


def test_warm_ups_and_lr_scale_with_the_run():
    def resolved(*argv):
        return trainer._resolve_defaults(train_supernet.build_parser().parse_args(["--out", "x", *argv]))
    short = resolved("--data", "d", "--epochs", "4", "--batch-size", "12")
    assert short.lr == pytest.approx(5e-4 * 12 / 512)       # the recipe's linear scaling
    assert short.min_lr == pytest.approx(short.lr / 100) and short.warmup_lr == pytest.approx(short.lr / 1000)
    assert short.lr_warmup_epochs == pytest.approx(0.4) and short.width_warmup_epochs == 1
    recipe = resolved("--data", "d")
    assert (recipe.lr, recipe.min_lr, recipe.lr_warmup_epochs, recipe.width_warmup_epochs) == \
        (pytest.approx(1e-3), pytest.approx(1e-5), 5.0, 30)
    assert resolved("--data", "d", "--epochs", "300").lr_warmup_epochs == 5.0
    assert resolved("--data", "d", "--epochs", "4", "--lr-warmup-epochs", "2").lr_warmup_epochs == 2.0


def test_train_subnet_labels_and_evaluation_lines_without_progress_bar(tmp_path, capsys, monkeypatch):
    arch = tmp_path / "arch.json"
    arch.write_text(DEMO_SPACE.min_arch().to_json())
    # A fake clock: evaluations and --throttle take "hours", a training step a few ticks.
    clock = {"t": 0.0}

    def perf_counter():
        clock["t"] += 0.001
        return clock["t"]

    def sleep(s):
        clock["t"] += 3600.0
    monkeypatch.setattr(trainer, "time", type("FakeTime", (), {"perf_counter": staticmethod(perf_counter),
                                                             "sleep": staticmethod(sleep)}))
    real_eval = trainer.evaluate_arch

    def slow_eval(*a, **k):
        clock["t"] += 3600.0
        return real_eval(*a, **k)
    monkeypatch.setattr(trainer, "evaluate_arch", slow_eval)
    args = ["--arch", str(arch), "--out", str(tmp_path / "ft"), "--demo-data", "digits", "--train-subset", "32",
            "--batch-size", "16", "--epochs", "2", "--eval-every-epoch", "--throttle", "0.01", "--seed", "1"]
    assert train_subnet.main(args) == 0
    captured = capsys.readouterr()
    assert "train-subnet" in captured.err and "train-supernet" not in captured.err     # the progress bar
    assert "epoch 0: val acc " in captured.out and "largest" not in captured.out
    records = read_jsonl(str(tmp_path / "ft" / "metrics.jsonl"))
    assert [r["step"] for r in records if "img_per_s" in r] == [1, 2, 3, 4]
    assert all(r["img_per_s"] > 16 / 60 for r in records if "img_per_s" in r)   # no "hour" counted in a step
    # --no-progress still reports each epoch's accuracy
    args[args.index("--epochs") + 1] = "1"
    assert train_subnet.main(["--out", str(tmp_path / "ft2"), "--no-progress", *args[:2], *args[4:]]) == 0
    assert "epoch 0: val acc " in capsys.readouterr().out


def test_sigint_stops_at_a_step_boundary_and_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "resnas_kernels.cli", "train-supernet", "--out", str(out), *TINY, "--epochs", "2",
           "--ckpt-every", "100", "--throttle", "0.3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if any("step" in r and "loss" in r for r in read_jsonl(str(out / "metrics.jsonl"))):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "continue with --resume" in err
    state = _ckpt(out)
    assert 1 <= state["step"] < 4 and not state["finished"]
    assert [r["step"] for r in read_jsonl(str(out / "metrics.jsonl"))] == list(range(1, state["step"] + 1))
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert train_supernet.main(["--out", str(out), "--resume", "--no-progress", "--throttle", "0"]) == 0
    assert _ckpt(out)["step"] == 4


def test_atomic_write_permissions_and_sweep(tmp_path):
    target = tmp_path / "x.json"
    _atomic.atomic_write_text(str(target), "{}")
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~_umask()
    with pytest.raises(RuntimeError):
        _atomic.atomic_write(str(tmp_path / "y.bin"), lambda f: (_ for _ in ()).throw(RuntimeError("disk full")))
    assert sorted(os.listdir(tmp_path)) == ["x.json"]          # the failed write left nothing
    dead = tmp_path / f".tmp-y.bin.{2 ** 22 + 7}.0123456789abcdef"
    live = tmp_path / f".tmp-y.bin.{os.getpid()}.0123456789abcdef"
    foreign = tmp_path / ".tmp-someone-else"
    for p in (dead, live, foreign):
        p.write_text("")
    assert _atomic.sweep_stale_temporaries(str(tmp_path)) == [str(dead)]
    assert live.exists() and foreign.exists() and not dead.exists()
    json.loads(target.read_text())
