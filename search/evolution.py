"""The search of `resnas search` (commands/search.py parses its arguments): evolutionary search over a trained
supernet (vit_resnas.md section 6), candidates scored many per forward with a cached stem (`evaluate.CandidateScorer`).

The paper's loop: iteration 0 is a random population (embeds and block keep/drop uniform with heads and MLP at
their maximum, redrawn until MACs >= 0.975 C, then shrunk one random step at a time until MACs <= C); each later
iteration takes the top `--parents` of ALL evaluated architectures and makes `--mutations` children (each gene
re-drawn with p = `--mutate-prob`) and `--crossovers` children (each gene from the second parent with
p = `--crossover-prob`), every child inside the MAC band [0.975 C, C] and new (never evaluated; crossover gives up
deduplication after 100 failures, as the original, and such a duplicate is dropped rather than re-scored).

Deterministic for a seed: all choices come from one `random.Random(seed)` whose state is saved with the search.
Resumable: the children of a generation are drawn and saved before being scored, and the state (history, pending
candidates, RNG) is written atomically after every scored chunk, so a kill loses at most one chunk of work.

Optional latency constraint (`--latency-budget MS`, not in the paper): a candidate must also have a predicted latency
<= the budget on the current device, predicted from a per-layer lookup table measured with this library's kernels
(`latency.LatencyTable`, cached in `--latency-lut`, default <out>/latency_lut.json; reuse one file across searches on
the same device). Candidates over the budget are rejected exactly like those outside the MAC band, records carry
`latency_ms`, and pareto.png gains an accuracy-vs-latency panel. `--latency-lut` alone records latencies without
constraining.

Under `torchrun`, every scoring chunk is sharded across the ranks (gloo; all-gathered results), and rank 0 writes.

Protocol (vit_resnas.md 6: the paper scores on 25 images per class held out of ImageNet's training set): candidates
are scored on the supernet's held-out split (`data.load_splits`: the training images the supernet never trained on,
`--holdout-per-class` of `resnas train-supernet`), and only the networks the search returns (the best and the Pareto
fronts) are then evaluated once on the untouched validation split. A supernet trained before held-out splits existed
saw every training image: it is scored on the same carve (with a warning that those accuracies are optimistic).
Supernets trained on the demo data get demo-sized defaults (`DEMO_SEARCH_DEFAULTS`) for the arguments not given.

Outputs in --out: state.pt, history.jsonl (one line per evaluated architecture; `acc` is its held-out accuracy),
pareto.json (held-out accuracy vs MACs non-dominated set), best.json (the best architecture: slot-aligned `arch` for
`resnas export`, `pruned`, the directly trainable definition), pareto.png (the MAC band shaded), summary.txt (best per
generation, the best and the front with both numbers; also printed). best.json and pareto*.json carry both
accuracies named by split: `holdout_acc` (what selected them) and `val_acc` (the report).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from typing import Callable, Collection, Dict, List, Optional, Sequence, Set

import torch

from resnas_kernels._atomic import atomic_write, sweep_stale_temporaries
from resnas_kernels.models.vit_resnas import Arch, BlockArch, SearchSpace, StageArch, count_macs
from resnas_kernels.models.vit_resnas.space import space_from_dict, space_to_dict

from . import data as data_mod
from .checkpoint import (SEARCH_FORMAT, VERSION, append_jsonl, read_checkpoint, save_checkpoint, write_json_atomic,
                         write_text_atomic)
from .distributed import Distributed
from .evaluate import CandidateScorer
from .networks import load_supernet

__all__ = ["run", "parse_macs", "random_population", "make_children", "pareto_front", "report_indices",
           "SEARCH_ARGS", "DEMO_SEARCH_DEFAULTS"]

# Arguments that define the search: on --resume they must match the saved ones (--generations may grow: a finished
# search resumed with more generations goes on evolving).
SEARCH_ARGS = ("supernet", "data", "macs", "band", "population", "parents", "mutations", "crossovers",
               "mutate_prob", "crossover_prob", "seed", "val_subset", "candidates_per_forward", "images_per_forward",
               "latency_budget", "latency_batch")
SEARCH_DEFAULTS = {"latency_budget": None, "latency_batch": 1}   # for states saved before these arguments existed
# Saved too, and taken back on --resume unless given again: they may change without changing what was scored
# (--generations given again extends or ends the search; the table keeps the latencies already predicted).
RESUMED_ARGS = ("generations", "latency_lut", "latency_repeats")
# A demo supernet (trained without --data) is searched with these unless they are given: a few minutes on two CPU
# cores (~550 candidates) instead of the recipe's ~3,350, and a band wide enough for the accuracy-vs-MACs trade-off
# to show (the demo space's MACs are mostly its fixed stem).
DEMO_SEARCH_DEFAULTS = {"generations": 10, "population": 100, "parents": 25, "mutations": 25, "crossovers": 25,
                        "band": 0.9}
# Path arguments compare as paths on --resume.
PATH_ARGS = ("supernet", "data", "latency_lut")


def parse_macs(text: str) -> int:
    """'1.8G', '10.5M', '2500000' -> MACs."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMgG]?)\s*", str(text))
    if not m:
        raise ValueError(f"--macs must be a number with an optional K/M/G suffix (e.g. 1.8G), got {text!r}")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"--macs must be > 0, got {text!r}")
    return int(round(value))


def _check_args(a: argparse.Namespace) -> None:
    for name in ("generations", "population", "parents", "candidates_per_forward", "images_per_forward"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    for name in ("mutations", "crossovers"):
        if getattr(a, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(a, name)}")
    for name in ("mutate_prob", "crossover_prob"):
        if not 0 <= getattr(a, name) <= 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(a, name)}")
    if not 0 < a.band <= 1:
        raise ValueError(f"--band must be in (0, 1], got {a.band}")
    if a.latency_budget is not None and not a.latency_budget > 0:
        raise ValueError(f"--latency-budget must be > 0 milliseconds, got {a.latency_budget}")
    if a.latency_batch < 1 or a.latency_repeats < 1:
        raise ValueError(f"--latency-batch and --latency-repeats must be >= 1, got {a.latency_batch}, "
                         f"{a.latency_repeats}")
    if a.val_subset is not None and a.val_subset < 1:
        raise ValueError(f"--val-subset must be >= 1, got {a.val_subset}")
    if a.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {a.device!r}")


# ---------------------------------------------------------------------------------------------------------------------
# The evolutionary operators (pure functions of an RNG: deterministic for a seed)
# ---------------------------------------------------------------------------------------------------------------------
def _shrink_once(arch: Arch, space: SearchSpace, rng: random.Random, structural: bool) -> Arch:
    """One random step down: a block's heads or MLP; with `structural`, also a stage's embed or a removable block."""
    stages = [list(st.blocks) for st in arch.stages]
    embeds = list(arch.embeds)
    s = rng.randrange(len(stages))
    sp = space.stages[s]
    kinds = ["heads", "mlp"] + (["embed", "drop"] if structural else [])
    kind = rng.choice(kinds)
    if kind == "embed":
        i = sp.embed.index(embeds[s])
        if i + 1 < len(sp.embed) and (s == 0 or sp.embed[i + 1] >= embeds[s - 1]):
            embeds[s] = sp.embed[i + 1]
    else:
        slot = rng.randrange(len(stages[s]))
        b = stages[s][slot]
        if b is not None:
            if kind == "drop":
                if slot in sp.removable:
                    stages[s][slot] = None
            else:
                choices = sp.heads if kind == "heads" else sp.mlp
                value = b.heads if kind == "heads" else b.mlp
                i = choices.index(value)
                if i + 1 < len(choices):
                    stages[s][slot] = (BlockArch(choices[i + 1], b.mlp) if kind == "heads"
                                       else BlockArch(b.heads, choices[i + 1]))
    return Arch(tuple(StageArch(e, st.head_dim, tuple(bl)) for e, st, bl in zip(embeds, arch.stages, stages)))


def _random_candidate(space: SearchSpace, rng: random.Random, macs: Callable[[Arch], int], lo: int, hi: int,
                      max_restarts: int = 1000) -> Arch:
    for _ in range(max_restarts):
        while True:
            embeds = sorted(rng.choice(sp.embed) for sp in space.stages)   # RSR needs non-decreasing widths
            arch = Arch(tuple(StageArch(e, sp.head_dim, tuple(
                None if i in sp.removable and rng.random() < 0.5 else BlockArch(sp.heads[0], sp.mlp[0])
                for i in range(sp.depth))) for e, sp in zip(embeds, space.stages)))
            if macs(arch) >= lo:
                break
        steps = 0
        while macs(arch) > hi and steps < 10000:
            arch = _shrink_once(arch, space, rng, structural=steps >= 100)
            steps += 1
        if lo <= macs(arch) <= hi:
            return arch
    raise ValueError(f"no random architecture with MACs in [{lo:,}, {hi:,}] after {max_restarts} restarts; widen "
                     f"the --band or move --macs inside the space")


def random_population(space: SearchSpace, n: int, rng: random.Random, macs: Callable[[Arch], int], lo: int, hi: int,
                      seen: Set[Arch], accept: Optional[Callable[[Arch], bool]] = None) -> List[Arch]:
    """n new architectures in the MAC band (and passing `accept`, e.g. the latency budget)."""
    out: List[Arch] = []
    misses = 0
    while len(out) < n:
        a = _random_candidate(space, rng, macs, lo, hi)
        if a in seen or (accept is not None and not accept(a)):
            misses += 1
            if misses > 100 * n:
                break   # the band holds fewer distinct architectures than asked for
            continue
        seen.add(a)
        out.append(a)
    return out


def make_children(space: SearchSpace, parents: Sequence[Arch], n_mut: int, n_cross: int, p_mut: float,
                  p_cross: float, rng: random.Random, macs: Callable[[Arch], int], lo: int, hi: int,
                  seen: Set[Arch], accept: Optional[Callable[[Arch], bool]] = None) -> List[tuple]:
    """[(child, origin)]: mutations then crossovers, all in the band (and passing `accept`) and new."""
    in_band = lambda a: lo <= macs(a) <= hi and (accept is None or accept(a))   # noqa: E731
    out = []
    for _ in range(n_mut):
        try:
            child = space.mutate(rng.choice(parents), rng, p_mut, accept=lambda a: in_band(a) and a not in seen)
        except (RuntimeError, ValueError):
            continue
        seen.add(child)
        out.append((child, "mutation"))
    if len(parents) >= 2:
        for _ in range(n_cross):
            a, b = rng.sample(list(parents), 2)
            try:
                child = space.crossover(a, b, rng, p_cross, accept=lambda c: in_band(c) and c not in seen,
                                        max_tries=100)
            except (RuntimeError, ValueError):
                try:   # the original then gives up deduplication
                    child = space.crossover(a, b, rng, p_cross, accept=in_band)
                except (RuntimeError, ValueError):
                    continue
            if child in seen:
                continue   # a duplicate is not scored again
            seen.add(child)
            out.append((child, "crossover"))
    return out


def pareto_front(records: Sequence[dict]) -> List[dict]:
    """Records not dominated in (fewer MACs, higher accuracy), sorted by MACs."""
    front, best = [], -1.0
    for r in sorted(records, key=lambda r: (r["macs"], -r["acc"])):
        if r["acc"] > best:
            front.append(r)
            best = r["acc"]
    return front


def _rank(records: Sequence[dict]) -> List[dict]:
    return sorted(records, key=lambda r: (-r["acc"], r["macs"], r["index"]))


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------
def _named(r: dict, val_acc: Dict[int, float]) -> dict:
    """A history record as pareto*.json and best.json carry it: the accuracies named by split."""
    out = {k: v for k, v in r.items() if k not in ("acc", "correct")}
    out["holdout_acc"], out["val_acc"] = r["acc"], val_acc.get(r["index"])
    return out


def report_indices(history: Sequence[dict]) -> List[int]:
    """History indices of the networks reported on validation: the best, the accuracy-vs-MACs front and, when
    latencies were predicted, the accuracy-vs-latency front."""
    keep = {_rank(history)[0]["index"]} | {r["index"] for r in pareto_front(history)}
    if all("latency_ms" in r for r in history):
        keep |= {r["index"] for r in pareto_front([{**r, "macs": r["latency_ms"]} for r in history])}
    return sorted(keep)


def _outputs(out: str, history: List[dict], generations_done: int, cfg: dict, plot: bool,
             val_acc: Dict[int, float]) -> dict:
    """best.json, pareto.json (+ pareto_latency.json), summary.txt and pareto.png. `val_acc`: validation accuracy by
    history index of the `report_indices` networks (selection used only the held-out accuracy)."""
    best = _rank(history)[0]
    arch = Arch.from_dict(best["arch"])
    best_doc = {"arch": best["arch"], "pruned": arch.pruned().to_dict(), "selected_on": "holdout",
                "holdout_acc": best["acc"], "val_acc": val_acc.get(best["index"]), "macs": best["macs"],
                "generation": best["generation"], "supernet": cfg["supernet"], "space": cfg["space"]["name"],
                "img_size": cfg["img_size"], "num_classes": cfg["num_classes"],
                "holdout_images": cfg["holdout_images"], "holdout_per_class": cfg["holdout_per_class"],
                "val_images": cfg["val_images"], "constraint_macs": cfg["macs"], "band": cfg["band"]}
    front = pareto_front(history)
    write_json_atomic(os.path.join(out, "pareto.json"), [_named(r, val_acc) for r in front])
    with_latency = all("latency_ms" in r for r in history)
    lat_front = []
    if with_latency:
        best_doc["latency_ms"], best_doc["latency_budget_ms"] = best["latency_ms"], cfg.get("latency_budget")
        lat_front = pareto_front([{**r, "macs": r["latency_ms"], "_macs": r["macs"]} for r in history])
        lat_front = [{**{k: v for k, v in r.items() if k != "_macs"}, "macs": r["_macs"]} for r in lat_front]
        write_json_atomic(os.path.join(out, "pareto_latency.json"), [_named(r, val_acc) for r in lat_front])
    write_json_atomic(os.path.join(out, "best.json"), best_doc)
    lat = with_latency
    lines = [f"{'gen':>3} {'evaluated':>9} {'best holdout acc':>16} {'MACs':>12}"
             + (f" {'ms (pred.)':>10}" if lat else "") + "  best architecture (slot-aligned, '-' removed)"]
    for g in range(generations_done):
        upto = [r for r in history if r["generation"] <= g]
        if not upto:
            continue
        b = _rank(upto)[0]
        lines.append(f"{g:>3} {len(upto):>9} {b['acc']:>16.4f} {b['macs']:>12,}"
                     + (f" {b['latency_ms']:>10.3f}" if lat else "") + f"  {Arch.from_dict(b['arch'])}")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"   # noqa: E731
    lines += ["", f"selected on the held-out split ({cfg['holdout_images']} training images never trained on), "
                  f"reported on the untouched validation split ({cfg['val_images']} images):",
              f"best: holdout acc {fmt(best['acc'])}, val acc {fmt(val_acc.get(best['index']))}, "
              f"{best['macs']:,} MACs",
              f"pareto front ({len(front)} architectures, MAC band [{cfg['band'][0]:,}, {cfg['band'][1]:,}]):",
              f"{'MACs':>12} {'holdout acc':>11} {'val acc':>8}  architecture"]
    lines += [f"{r['macs']:>12,} {fmt(r['acc']):>11} {fmt(val_acc.get(r['index'])):>8}  {Arch.from_dict(r['arch'])}"
              for r in front]
    table = "\n".join(lines) + "\n"
    write_text_atomic(os.path.join(out, "summary.txt"), table)
    if plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        axes_for = [("macs", 1e-6, "MMACs", front)]
        if with_latency:
            axes_for.append(("latency_ms", 1.0, "predicted latency (ms)", lat_front))
        fig, axes = plt.subplots(1, len(axes_for), figsize=(6.5 * len(axes_for), 4.5), squeeze=False)
        for ax, (key, scale, label, fr) in zip(axes[0], axes_for):
            if key == "macs":
                ax.axvspan(cfg["band"][0] * scale, cfg["band"][1] * scale, color="0.92", zorder=0,
                           label=f"MAC band [{cfg['band'][0] * scale:.3g}, {cfg['band'][1] * scale:.3g}]")
            ax.scatter([r[key] * scale for r in history], [r["acc"] for r in history], s=8, alpha=0.4,
                       label="evaluated (holdout)")
            ax.plot([r[key] * scale for r in fr], [r["acc"] for r in fr], "r.-", label="pareto front (holdout)")
            with_val = [r for r in fr if val_acc.get(r["index"]) is not None]
            ax.plot([r[key] * scale for r in with_val], [val_acc[r["index"]] for r in with_val], "g^--", ms=4,
                    label="same networks on val")
            ax.scatter([best[key] * scale], [best["acc"]], marker="*", s=120, c="k", label="best (holdout)")
            if val_acc.get(best["index"]) is not None:
                ax.scatter([best[key] * scale], [val_acc[best["index"]]], marker="*", s=120, c="g",
                           label="best: its val acc")
            ax.set_xlabel(label)
            ax.set_ylabel("top-1")
            if key == "latency_ms":   # the measurement setting: device, threads, batch, dtype
                ax.set_title(str(cfg.get("latency_setting", "")), fontsize=8)
                if cfg.get("latency_budget"):
                    ax.axvline(cfg["latency_budget"], color="gray", ls="--", lw=1, label="budget")
            else:
                ax.set_title(f"selected on {cfg['holdout_images']} held-out training images, reported on "
                             f"{cfg['val_images']} val images", fontsize=8)
            ax.legend(fontsize=7)
        fig.tight_layout()
        atomic_write(os.path.join(out, "pareto.png"), lambda f: fig.savefig(f, format="png", dpi=100), suffix=".png")
        plt.close(fig)
    return {"best": best_doc, "table": table}


def _same(name: str, a, b) -> bool:
    if name in PATH_ARGS and isinstance(a, str) and isinstance(b, str):
        return a == b or os.path.abspath(a) == os.path.abspath(b)
    return a == b


def run(args: argparse.Namespace, given: Optional[Collection[str]] = None) -> int:
    """Search as `args` (the parsed command line) says. `given`: the arguments the command line named; on --resume
    the others come from the saved search (without it, every search argument must equal the saved one), and a demo
    supernet's defaults replace only those not given."""
    if given is None:
        given = set(SEARCH_ARGS)
    _check_args(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    state_path = os.path.join(args.out, "state.pt")
    history_path = os.path.join(args.out, "history.jsonl")
    saved = None
    if args.resume:
        saved = read_checkpoint(state_path, SEARCH_FORMAT, ("config", "generation", "pending", "history", "rng"))
        was = {**SEARCH_DEFAULTS, **saved["config"]["args"]}
        differ = [f"--{k.replace('_', '-')} {getattr(args, k)!r} (saved: {was[k]!r})"
                  for k in SEARCH_ARGS if k in given and not _same(k, getattr(args, k), was[k])]
        if differ:
            raise ValueError("--resume continues the saved search; these arguments differ from it: "
                             + "; ".join(differ))
        if "generations" not in was and "generations" not in given:
            raise ValueError(f"{state_path} predates saved --generations: give the search's --generations again")
        for k in SEARCH_ARGS + RESUMED_ARGS:
            if k not in given and k in was:
                setattr(args, k, was[k])
        _check_args(args)
    elif os.path.exists(state_path):
        raise ValueError(f"{state_path} exists: pass --resume to continue that search, or choose another --out")
    if args.supernet is None:
        raise ValueError("--supernet is required (the checkpoint.pt of `resnas train-supernet`)")
    shard = Distributed()
    shard.init("gloo")   # after the checks above: its rendezvous means no rank has written anything yet

    if saved is not None and "holdout_images" not in saved["config"]:
        raise ValueError(f"{state_path} is a search that scored candidates on the validation split (before held-out "
                         f"selection); it cannot be continued on the held-out split: start a new search")
    model, ckpt = load_supernet(args.supernet, device)
    space = space_from_dict(ckpt["space"])
    img_size, num_classes = ckpt["args"]["img_size"], ckpt["num_classes"]
    run_args = {**data_mod.LEGACY_RUN_ARGS, **ckpt["args"]}
    data_path = args.data if args.data is not None else run_args.get("data")
    if data_path is None and saved is None:      # a demo supernet: demo-sized defaults for what was not given
        for k, v in DEMO_SEARCH_DEFAULTS.items():
            if k not in given:
                setattr(args, k, v)
    holdout_per_class = run_args["holdout_per_class"]
    if holdout_per_class == 0:
        holdout_per_class = data_mod.default_holdout(data_path, run_args["demo_data"])
        print(f"resnas search: warning: {args.supernet} was trained on every training image (no held-out split); "
              f"candidates are scored on {holdout_per_class} training images per class it has seen, so their "
              f"accuracies are optimistic (the validation numbers are not)", file=sys.stderr)
    splits = data_mod.load_splits(data_path, img_size, holdout_per_class, run_args["demo_data"])
    for name, split in (("held-out", splits.holdout), ("validation", splits.val)):
        if split.num_classes != num_classes:
            raise ValueError(f"the {name} data has {split.num_classes} classes, the supernet {num_classes}")
    holdout, val = splits.holdout.subset(args.val_subset), splits.val
    macs = lambda a: count_macs(a, img_size, num_classes)   # noqa: E731
    lo_space, hi_space = macs(space.min_arch()), macs(space.max_arch())
    constraint = parse_macs(args.macs) if args.macs is not None else (lo_space + hi_space) // 2
    lo, hi = int(args.band * constraint), constraint
    if hi < lo_space or lo > hi_space:
        raise ValueError(f"the MAC band [{lo:,}, {hi:,}] lies outside the space ({lo_space:,} .. {hi_space:,} MACs)")
    if saved is None:   # before anything is written: a band that holds no architecture leaves no half-made search
        _random_candidate(space, random.Random(args.seed), macs, lo, hi)
    lut, accept = None, None
    if args.latency_budget is not None or args.latency_lut is not None:
        from .latency import LatencyTable
        lut_path = args.latency_lut or os.path.join(args.out, "latency_lut.json")
        lut = LatencyTable(lut_path, device, img_size, num_classes, batch=args.latency_batch,
                           repeats=args.latency_repeats)
        if shard.rank == 0:      # one process measures (others would disturb the timings), the rest read its file
            lut.ensure_space(space, progress=not args.no_progress)
        shard.barrier()
        lut.reload()
        if args.latency_budget is not None:
            fastest = lut.latency(space.min_arch())
            if fastest > args.latency_budget:
                raise ValueError(f"--latency-budget {args.latency_budget} ms is below the predicted latency of the "
                                 f"space's smallest network ({fastest:.3f} ms on {lut.setting})")
            accept = lambda a: lut.latency(a) <= args.latency_budget   # noqa: E731
    cfg = {"args": {k: getattr(args, k) for k in SEARCH_ARGS + RESUMED_ARGS},
           "supernet": os.path.abspath(args.supernet),
           "space": space_to_dict(space), "img_size": img_size, "num_classes": num_classes,
           "holdout_images": len(holdout), "holdout_per_class": holdout_per_class,
           "holdout_seen_in_training": run_args["holdout_per_class"] == 0, "val_images": len(val),
           "macs": constraint, "band": [lo, hi], "latency_budget": args.latency_budget,
           "latency_setting": lut.setting if lut is not None else None,
           "latency_lut": os.path.abspath(lut.path) if lut is not None else None}

    if shard.rank == 0:
        sweep_stale_temporaries(args.out)   # left by a search killed while writing a file
    if saved is not None:
        generation, pending, history = saved["generation"], list(saved["pending"]), list(saved["history"])
        rng = random.Random()
        rng.setstate(saved["rng"])
        if shard.rank == 0:
            write_text_atomic(history_path, "".join(_line(r) for r in history))   # drop a torn last line
    else:
        generation, pending, history, rng = 0, [], [], random.Random(args.seed)
        if shard.rank == 0:
            os.makedirs(args.out, exist_ok=True)
            write_json_atomic(os.path.join(args.out, "config.json"), cfg)
            write_text_atomic(history_path, "")
    seen: Set[Arch] = {Arch.from_dict(r["arch"]) for r in history} | {Arch.from_dict(p[0]) for p in pending}

    def save() -> None:
        save_checkpoint({"format": SEARCH_FORMAT, "version": VERSION, "config": cfg, "generation": generation,
                         "pending": pending, "history": history, "rng": rng.getstate()}, state_path)

    scorer = CandidateScorer(model, holdout, device, args.candidates_per_forward, args.images_per_forward)
    if shard.rank != 0:          # only rank 0 writes; every rank draws the same children from the same RNG
        save = lambda: None      # noqa: E731
    def expected_total() -> int:
        """Candidates of the whole search as far as known: a generation can make fewer children than asked for."""
        later = args.generations - generation - (1 if pending else 0)
        return (len(history) + len(pending) + (args.population if generation == 0 and not pending else 0)
                + max(0, later - (1 if generation == 0 and not pending else 0)) * (args.mutations + args.crossovers))

    bar = None
    if not args.no_progress and shard.rank == 0:
        from tqdm import tqdm
        bar = tqdm(desc="search", unit="cand", dynamic_ncols=True, initial=len(history), total=expected_total())
    while generation < args.generations:
        if not pending:
            if generation == 0:
                children = [(a, "random") for a in random_population(space, args.population, rng, macs, lo, hi, seen,
                                                                     accept)]
            else:
                parents = [Arch.from_dict(r["arch"]) for r in _rank(history)[:args.parents]]
                children = make_children(space, parents, args.mutations, args.crossovers, args.mutate_prob,
                                         args.crossover_prob, rng, macs, lo, hi, seen, accept)
            pending = [(a.to_dict(), origin) for a, origin in children]
            save()
            if bar is not None:
                bar.total = expected_total()
                bar.refresh()
        while pending:
            chunk = pending[:args.candidates_per_forward * shard.world]   # one forward's worth per rank
            archs = [Arch.from_dict(p[0]) for p in chunk]
            hits = shard.shard(scorer.correct, archs)
            recs = [{"index": len(history) + i, "generation": generation, "origin": origin, "arch": d,
                     "macs": macs(a), "acc": h / len(holdout), "correct": h,
                     **({"latency_ms": lut.latency(a)} if lut is not None else {})}
                    for i, ((d, origin), a, h) in enumerate(zip(chunk, archs, hits))]
            history += recs
            pending = pending[len(chunk):]
            if shard.rank == 0:
                append_jsonl(history_path, recs)
            save()
            if bar is not None:
                bar.update(len(chunk))
                bar.set_postfix(gen=generation, best=f"{_rank(history)[0]['acc']:.4f}")
        generation += 1
        save()
    if bar is not None:
        bar.close()
    shard.barrier()
    shard.close()
    if not history:
        raise ValueError("the search evaluated no architecture" + (
            f" (no architecture in the MAC band met --latency-budget {args.latency_budget} ms)"
            if args.latency_budget is not None else ""))
    if shard.rank != 0:
        return 0
    # The validation split, untouched by training and selection, reports the networks the search returns.
    reported = report_indices(history)
    val_hits = CandidateScorer(model, val, device, args.candidates_per_forward, args.images_per_forward).correct(
        [Arch.from_dict(history[i]["arch"]) for i in reported])
    result = _outputs(args.out, history, generation, cfg, not args.no_plot,
                      {i: h / len(val) for i, h in zip(reported, val_hits)})
    print(result["table"], end="")
    best = result["best"]
    print(f"search: {len(history)} architectures evaluated; best: holdout acc {best['holdout_acc']:.4f}, val acc "
          f"{best['val_acc']:.4f} at {best['macs']:,} MACs -> {os.path.join(args.out, 'best.json')}")
    return 0


def _line(r: dict) -> str:
    return json.dumps(r, separators=(",", ":")) + "\n"
