"""`resnas demo` end to end at a tiny setting (a few steps, a few candidates): every step runs, the report and the
plots are written, the supernet never trains on the held-out images, and the reported numbers are the ones the
result files carry, named by split."""
import json
import os

import torch

from resnas_kernels.search.commands import demo
from resnas_kernels.search.networks import load_supernet
from resnas_kernels.search.checkpoint import read_jsonl

TINY = ["--epochs", "1", "--train-subset", "32", "--batch-size", "16", "--generations", "2", "--population", "4",
        "--parents", "2", "--mutations", "2", "--crossovers", "2", "--val-subset", "32", "--no-progress"]


def test_demo_runs_the_pipeline_and_reports_both_splits(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    for name in ("report.md", "training.png", "net.pt", "search/pareto.png", "search/best.json", "search/summary.txt",
                 "supernet/checkpoint.pt"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert report in printed
    best = json.load(open(out / "search" / "best.json"))
    assert best["selected_on"] == "holdout" and best["holdout_images"] == 32 and best["val_images"] == 800
    assert f"val acc {best['val_acc']:.4f}" in report and "held-out 800" in report and "validation 800" in report
    pareto = json.load(open(out / "search" / "pareto.json"))
    assert pareto and all({"holdout_acc", "val_acc", "macs"} <= set(r) for r in pareto)
    # the supernet's checkpoint records the carve, and trained on sub-train only (2 steps of the 32 first images)
    ckpt = torch.load(out / "supernet" / "checkpoint.pt", weights_only=True)
    assert ckpt["args"]["holdout_per_class"] == 50 and ckpt["args"]["demo_data"] == "shapes"
    assert ckpt["step"] == 2
    evals = [r for r in read_jsonl(str(out / "supernet" / "metrics.jsonl")) if r.get("eval")]
    assert evals and all(r["split"] == "holdout" for r in evals)
    assert os.path.getsize(out / "training.png") > 1000
    # --resume reuses the finished steps and writes the same report numbers
    assert demo.main(["--out", str(out), "--resume", "--no-progress"]) == 0
    assert json.load(open(out / "search" / "best.json")) == best
    model, _ = load_supernet(str(out / "supernet" / "checkpoint.pt"))
    assert model.space.name == "demo"
