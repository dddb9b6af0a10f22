"""`resnas train-supernet` on the demo data (generated shapes): exact resume (planned stop and kill -9), checkpoint validation, bad
arguments. Tiny runs: 64 training images, batch 16, 2 architectures per step, 2 epochs (8 steps) with a 1-epoch width
warm-up, so importance sorting and the warm-up schedule both act within the run."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from resnas_kernels.models.vit_resnas.space import DEMO_SPACE
from resnas_kernels.search import trainer
from resnas_kernels.search.commands import train_supernet
from resnas_kernels.search.data import split_batch
from resnas_kernels.search.networks import build_supernet, load_supernet
from resnas_kernels.search.checkpoint import CheckpointError, read_jsonl

TINY = ["--train-subset", "64", "--batch-size", "16", "--archs-per-step", "2", "--epochs", "2",
        "--width-warmup-epochs", "1", "--lr-warmup-epochs", "0.5", "--no-progress", "--no-eval-every-epoch",
        "--seed", "3"]
TOTAL = 8


def _run(out, *extra):
    return train_supernet.main(["--out", str(out), *TINY, *extra])


def _cmd(out, *extra):
    return [sys.executable, "-m", "resnas_kernels.cli", "train-supernet", "--out", str(out), *TINY, *extra]


def _run_subprocess(out, *extra):
    # Runs compared bit for bit all execute as fresh processes: the pytest process itself may pick other kernels
    # (it sets backends per test), which changes the last bits of the float results.
    proc = subprocess.run(_cmd(out, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]


def _state(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)


def _assert_same_run(a, b):
    sa, sb = _state(a), _state(b)
    assert sa["step"] == sb["step"] == TOTAL and sa["finished"] and sb["finished"]
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    for pid, st in sa["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, sb["optimizer"]["state"][pid][k]), (pid, k)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "img_per_s"} for r in rs]  # noqa: E731
    assert strip(read_jsonl(os.path.join(a, "metrics.jsonl"))) == strip(read_jsonl(os.path.join(b, "metrics.jsonl")))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _run_subprocess(out)
    return out


def test_run_learns_something_and_logs(reference_run):
    recs = read_jsonl(os.path.join(reference_run, "metrics.jsonl"))
    assert [r["step"] for r in recs] == list(range(1, TOTAL + 1))
    assert all(r["loss"] > 0 and 0 <= r["acc"] <= 1 and r["lr"] > 0 for r in recs)
    st = _state(reference_run)
    fresh = build_supernet(DEMO_SPACE, 56, st["num_classes"])
    assert st["num_classes"] == 16 and st["model"]["head.weight"].shape == fresh.state_dict()["head.weight"].shape
    # the weights moved away from any init (the cls token starts at trunc-normal 0.02; it gets gradients)
    assert not torch.equal(st["model"]["head.weight"], fresh.state_dict()["head.weight"])


def test_kill_9_mid_run_then_planned_stop_then_resume_is_exact(reference_run, tmp_path):
    proc = subprocess.Popen(_cmd(tmp_path, "--ckpt-every", "1", "--throttle", "1.0"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ckpt = tmp_path / "checkpoint.pt"
    trained = lambda: any("loss" in r for r in read_jsonl(str(tmp_path / "metrics.jsonl")))  # noqa: E731
    try:
        deadline = time.monotonic() + 240
        while not (ckpt.exists() and trained()) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ckpt.exists() and trained(), (proc.stderr.read().decode() if proc.poll() is not None
                                             else "no step in time")
        time.sleep(0.3)   # land somewhere inside a later step or checkpoint write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = _state(tmp_path)["step"]
    assert killed_at < TOTAL - 1, "the kill must interrupt the run (it finished before being killed)"
    _run_subprocess(tmp_path, "--resume", "--stop-at-step", str(killed_at + 1), "--ckpt-every", "3")
    assert _state(tmp_path)["step"] == killed_at + 1 and not _state(tmp_path)["finished"]
    _run_subprocess(tmp_path, "--resume")
    _assert_same_run(reference_run, tmp_path)


def test_resume_refuses_changed_trajectory_args(reference_run, tmp_path, capsys):
    assert _run(tmp_path, "--stop-at-step", "1") == 0
    assert train_supernet.main(["--out", str(tmp_path), *TINY, "--lr", "0.5", "--resume"]) == 2
    assert "--lr" in capsys.readouterr().err


@pytest.mark.parametrize("extra, needle", [
    (["--img-size", "50"], "multiple of 56"),
    (["--archs-per-step", "0"], "--archs-per-step"),
    (["--batch-size", "128"], "--train-subset"),
    (["--space", "huge"], "unknown search space"),
    (["--label-smoothing", "1.5"], "--label-smoothing"),
    (["--amp", "fp16", "--device", "cpu"], "needs a GPU"),
    (["--reprob", "2"], "--reprob"),
    (["--aa", "auto-m9"], "--aa"),
])
def test_bad_arguments_give_clear_errors(tmp_path, capsys, extra, needle):
    assert _run(tmp_path, *extra) == 2
    assert needle in capsys.readouterr().err


def test_existing_run_without_resume_is_refused(reference_run, capsys):
    assert _run(reference_run) == 2
    assert "--resume" in capsys.readouterr().err


def test_corrupted_and_foreign_checkpoints(reference_run, tmp_path, capsys):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(os.urandom(300))
    with pytest.raises(CheckpointError, match="resnas-supernet-train"):
        load_supernet(str(bad))
    assert _run(tmp_path, "--resume") == 2
    assert "corrupted" in capsys.readouterr().err

    good = (reference_run / "checkpoint.pt").read_bytes()
    bad.write_bytes(good[: len(good) // 2])           # truncated
    with pytest.raises(CheckpointError, match="corrupted, truncated"):
        load_supernet(str(bad))

    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 3}, bad)   # someone else's checkpoint
    with pytest.raises(CheckpointError, match="expected a 'resnas-supernet-train' checkpoint"):
        load_supernet(str(bad))

    st = torch.load(reference_run / "checkpoint.pt", weights_only=True)
    st["model"] = {k: v for k, v in st["model"].items() if k != "head.weight"}
    torch.save(st, bad)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_supernet(str(bad))


def test_lr_schedule_and_group_split():
    lrs = [trainer.lr_at(s, 100, 1e-3, 1e-5, 1e-6, 10) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[10] == pytest.approx(1e-3) and lrs[100] == pytest.approx(1e-5)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert split_batch(10, 3) == [4, 3, 3] and sum(split_batch(64, 5)) == 64


def test_augmentation_is_seeded_per_step_so_resume_stays_exact(tmp_path):
    """RandAugment + flip + random erasing + Mixup/CutMix (timm) on: a planned stop and --resume give the weights of
    the uninterrupted run (the augmentation of step t is a pure function of (seed, rank, t))."""
    aug = ["--train-subset", "32", "--batch-size", "16", "--epochs", "1", "--archs-per-step", "2",
           "--width-warmup-epochs", "0", "--no-progress", "--no-eval-every-epoch", "--aa", "rand-m9-mstd0.5-inc1",
           "--hflip", "0.5", "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0"]
    assert train_supernet.main(["--out", str(tmp_path / "a"), *aug]) == 0
    assert train_supernet.main(["--out", str(tmp_path / "b"), *aug, "--stop-at-step", "1"]) == 0
    assert train_supernet.main(["--out", str(tmp_path / "b"), "--resume", "--no-progress"]) == 0
    sa, sb = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert sa["step"] == sb["step"] == 2 and sa["args"]["mixup"] == 0.8
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    assert all(r["loss"] > 0 for r in read_jsonl(os.path.join(tmp_path / "a", "metrics.jsonl")))

