"""`resnas demo --out runs/demo`: the whole pipeline on the built-in demo task, for a first look at what the library
is for. About two minutes on two idle CPU cores with the defaults (most of it supernet training).

1. `resnas train-supernet` on the generated shapes task (search/shapes.py) with the demo space: the supernet trains
   on the sub-train split only (the held-out images are carved from the training set and never trained on);
2. `resnas search` with the demo defaults: every candidate scored on the held-out split, the best and the Pareto front
   then evaluated once on the untouched validation split;
3. `resnas export` of the best network, reloaded through `timm.create_model` and evaluated on both splits;
4. report.md (and the same text on stdout): the split sizes, the largest and smallest sub-networks' accuracies, the
   search's front, the exported network's accuracy, the time of each step, and the plots training.png and
   search/pareto.png.

Each step is the real command, called with the arguments the report lists, so the report doubles as a recipe;
`--resume` continues an interrupted demo (each step resumes or, when finished, is reused).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resnas demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join("runs", "demo"), help="demo directory")
    p.add_argument("--epochs", type=int, default=None, help="supernet epochs (default: train-supernet's demo default)")
    p.add_argument("--train-subset", type=int, default=None, help="train the supernet on the first N sub-train "
                                                                  "images (default: all)")
    p.add_argument("--batch-size", type=int, default=None, help="supernet batch (default: train-supernet's)")
    p.add_argument("--generations", type=int, default=None, help="search generations (default: search's demo "
                                                                 "default)")
    p.add_argument("--population", type=int, default=None, help="search's random initial population")
    p.add_argument("--parents", type=int, default=None)
    p.add_argument("--mutations", type=int, default=None)
    p.add_argument("--crossovers", type=int, default=None)
    p.add_argument("--val-subset", type=int, default=None, help="score candidates on the first N held-out images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _flags(args: argparse.Namespace, names: Sequence[str]) -> List[str]:
    out: List[str] = []
    for name in names:
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def _training_plot(metrics: List[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from resnas_kernels._atomic import atomic_write

    steps = [r for r in metrics if "loss" in r]
    evals = [r for r in metrics if r.get("eval")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    k = max(1, len(steps) // 50)                                   # a running mean over ~2 % of the run
    loss = [sum(r["loss"] for r in steps[max(0, i - k + 1):i + 1]) / len(steps[max(0, i - k + 1):i + 1])
            for i in range(len(steps))]
    a.plot([r["step"] for r in steps], loss)
    a.set_xlabel("step")
    a.set_ylabel("training loss (running mean)")
    split = evals[0].get("split", "val") if evals else "holdout"
    b.plot([r["epoch"] + 1 for r in evals], [r["acc_max"] for r in evals], "o-", label="largest sub-network")
    b.plot([r["epoch"] + 1 for r in evals], [r["acc_min"] for r in evals], "s-", label="smallest sub-network")
    b.set_xlabel("epoch")
    b.set_ylabel(f"top-1 on the {split} split")
    b.legend()
    fig.suptitle("supernet training")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), suffix=".png")
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from resnas_kernels.models.vit_resnas import Arch, count_macs

    from .. import data as data_mod
    from ..checkpoint import read_jsonl, write_text_atomic
    from ..evaluate import evaluate_arch, net_accuracy
    from ..networks import load_exported, load_supernet
    from . import export, search, train_supernet

    sn_dir, search_dir = os.path.join(args.out, "supernet"), os.path.join(args.out, "search")
    ckpt_path, net_path = os.path.join(sn_dir, "checkpoint.pt"), os.path.join(args.out, "net.pt")
    progress = ["--no-progress"] if args.no_progress else []
    times = {}

    train_argv = ["--out", sn_dir, "--seed", str(args.seed), "--device", args.device,
                  *_flags(args, ("epochs", "train_subset", "batch_size")), *progress]
    if args.resume and os.path.exists(ckpt_path):
        train_argv = ["--out", sn_dir, "--device", args.device, "--resume", *progress]
    search_argv = ["--supernet", ckpt_path, "--out", search_dir, "--seed", str(args.seed), "--device", args.device,
                   *_flags(args, ("generations", "population", "parents", "mutations", "crossovers", "val_subset")),
                   *progress]
    if args.resume and os.path.exists(os.path.join(search_dir, "state.pt")):
        search_argv = ["--out", search_dir, "--device", args.device, "--resume", *progress]
    export_argv = ["--arch", os.path.join(search_dir, "best.json"), "--supernet", ckpt_path, "--out", net_path]

    for name, main, argv in (("train-supernet", train_supernet.main, train_argv), ("search", search.main, search_argv),
                             ("export", export.main, export_argv)):
        print(f"resnas demo: resnas {name} {' '.join(argv)}", flush=True)
        start = time.perf_counter()
        rc = main(argv)
        times[name] = time.perf_counter() - start
        if rc:
            print(f"resnas demo: `resnas {name}` failed (exit {rc}); fix the error above and rerun, with --resume to "
                  f"keep what is done", file=sys.stderr)
            return rc

    start = time.perf_counter()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model, ckpt = load_supernet(ckpt_path, device)
    run_args = {**data_mod.LEGACY_RUN_ARGS, **ckpt["args"]}
    splits = data_mod.load_splits(run_args["data"], run_args["img_size"], run_args["holdout_per_class"],
                                  run_args["demo_data"])
    space, img, classes = model.space, run_args["img_size"], ckpt["num_classes"]
    extremes = {}
    for label, arch in (("largest", space.max_arch()), ("smallest", space.min_arch())):
        extremes[label] = {"macs": count_macs(arch, img, classes),
                           "holdout": evaluate_arch(model, arch, splits.holdout, device),
                           "val": evaluate_arch(model, arch, splits.val, device)}
    best = json.load(open(os.path.join(search_dir, "best.json")))
    pareto = json.load(open(os.path.join(search_dir, "pareto.json")))
    net = load_exported(net_path, device)
    scored = splits.holdout.subset(best["holdout_images"])        # the held-out images the search scored on
    exported = {"holdout": net_accuracy(net, scored, device), "val": net_accuracy(net, splits.val, device)}
    metrics = read_jsonl(os.path.join(sn_dir, "metrics.jsonl"))
    _training_plot(metrics, os.path.join(args.out, "training.png"))
    times["evaluation"] = time.perf_counter() - start

    history = read_jsonl(os.path.join(search_dir, "history.jsonl"))
    front_macs = [r["macs"] for r in pareto]
    lo, hi = best["band"]
    steps = [r for r in metrics if "loss" in r]
    lines = [
        "# resnas demo", "",
        f"Data: the generated `{run_args['demo_data']}` task ({classes} classes, {img} px). Splits: sub-train "
        f"{len(splits.train):,} images (supernet training), held-out {len(splits.holdout):,} "
        f"({run_args['holdout_per_class']} per class carved from the training set, never trained on: the search's "
        f"fitness), validation {len(splits.val):,} (untouched until the report).", "",
        f"## 1. Supernet training ({times['train-supernet']:.0f} s)", "",
        f"{steps[-1]['step'] if steps else 0} steps ({run_args['epochs']} epoch(s), batch {run_args['batch_size']}, "
        f"{run_args['archs_per_step']} sub-networks per step), final training loss "
        f"{steps[-1]['loss'] if steps else float('nan'):.3f}.", "",
        "| sub-network | MACs | held-out acc | val acc |", "|---|---:|---:|---:|",
        *[f"| {k} | {v['macs']:,} | {v['holdout']:.4f} | {v['val']:.4f} |" for k, v in extremes.items()], "",
        f"The largest sub-network is {100 * (extremes['largest']['val'] - extremes['smallest']['val']):+.1f} points "
        f"ahead of the smallest on val.", "", "![training](training.png)", "",
        f"## 2. Search ({times['search']:.0f} s)", "",
        f"{len(history)} architectures scored on the held-out split in {1 + max(r['generation'] for r in history)} "
        f"generation(s), MAC band [{lo:,}, {hi:,}]. Pareto front: {len(pareto)} architecture(s) from "
        f"{min(front_macs):,} to {max(front_macs):,} MACs ({100 * (max(front_macs) - min(front_macs)) / (hi - lo):.0f} % "
        f"of the band).", "",
        "| MACs | held-out acc | val acc | architecture |", "|---:|---:|---:|---|",
        *[f"| {r['macs']:,} | {r['holdout_acc']:.4f} | {r['val_acc']:.4f} | `{Arch.from_dict(r['arch'])}` |"
          for r in pareto], "",
        "![pareto](search/pareto.png)", "",
        f"## 3. Export and evaluation ({times['export'] + times['evaluation']:.0f} s)", "",
        f"Best architecture (selected on held-out accuracy): `{Arch.from_dict(best['pruned'])}`, {best['macs']:,} MACs. "
        f"Exported to `{net_path}` and reloaded through `timm.create_model`: held-out acc "
        f"{exported['holdout']:.4f} on the {len(scored):,} images the search scored (it recorded "
        f"{best['holdout_acc']:.4f} with the supernet's weights), **val acc {exported['val']:.4f}** "
        f"(the number to quote: neither training nor selection saw these images).", "",
        "## The same steps by hand", "",
        *[f"    resnas {name} {' '.join(argv)}" for name, argv in (("train-supernet", train_argv),
                                                                    ("search", search_argv),
                                                                    ("export", export_argv))], "",
        f"Total: {sum(times.values()):.0f} s.", ""]
    report = "\n".join(lines)
    write_text_atomic(os.path.join(args.out, "report.md"), report)
    print(report)
    print(f"resnas demo: wrote {os.path.join(args.out, 'report.md')}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
