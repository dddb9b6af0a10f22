"""`torchrun --nproc_per_node=2` (gloo, CPU): supernet training (each rank samples its own architectures, gradients
are averaged so the ranks' weights stay identical, the checkpoint records the world size) and the search sharded
across the ranks (same candidates and scores as one process)."""
import os
import random
import subprocess
import sys

import pytest
import torch

from resnas_kernels.models.vit_resnas.space import DEMO_SPACE
from resnas_kernels.search import trainer
from resnas_kernels.search.commands import search, train_supernet
from resnas_kernels.search.checkpoint import read_jsonl


def test_ranks_draw_different_architectures_from_seeded_generators():
    for step in range(3):
        r0 = DEMO_SPACE.sample_groups(2, rng=trainer._arch_rng(0, 0, step))
        r1 = DEMO_SPACE.sample_groups(2, rng=trainer._arch_rng(0, 1, step))
        assert r0 != r1
        assert r0 == DEMO_SPACE.sample_groups(2, rng=trainer._arch_rng(0, 0, step))   # reproducible
    assert trainer._torch_seed(0, 0, 5) != trainer._torch_seed(0, 1, 5)


def _torchrun(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "resnas_kernels.cli", *args]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, proc.stdout.decode()[-4000:]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _torchrun("train-supernet", "--out", str(out), "--train-subset", "64", "--batch-size", "16", "--epochs", "1",
              "--no-progress", "--no-eval-every-epoch", "--device", "cpu")
    return out


def test_torchrun_two_ranks_gloo(ddp_run, capsys):
    tmp_path = ddp_run
    recs = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    assert recs[-1] == {"step": 4, "world_size": 2, "ranks_in_sync": True}
    ckpt = torch.load(os.path.join(tmp_path, "checkpoint.pt"), weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["finished"]
    # a 2-rank run resumes only with 2 ranks
    assert train_supernet.main(["--out", str(tmp_path), "--resume", "--no-progress"]) == 2
    assert "same number of ranks" in capsys.readouterr().err


def test_search_sharded_over_two_ranks_matches_one_process(ddp_run, tmp_path):
    ckpt = str(ddp_run / "checkpoint.pt")
    common = ["--generations", "1", "--population", "5", "--val-subset", "24", "--candidates-per-forward", "2",
              "--images-per-forward", "24", "--no-progress", "--no-plot", "--seed", "2"]
    _torchrun("search", "--supernet", ckpt, "--out", str(tmp_path / "two"), *common)
    assert search.main(["--supernet", ckpt, "--out", str(tmp_path / "one"), *common]) == 0
    two = read_jsonl(os.path.join(tmp_path, "two", "history.jsonl"))
    one = read_jsonl(os.path.join(tmp_path, "one", "history.jsonl"))
    assert len(two) == 5
    assert [(r["arch"], r["macs"], r["correct"]) for r in two] == [(r["arch"], r["macs"], r["correct"]) for r in one]
