"""The trainer of `resnas train-supernet` and `resnas train-subnet` (commands/train_supernet.py parses their
arguments): supernet training with multi-architectural sampling (vit_resnas.md section 5).

Every step draws K architectures (`SearchSpace.sample_groups`: each layer's choices drawn without replacement across
the K groups, from the choices the progressive width warm-up has enabled), splits the batch into K contiguous groups
and runs ONE ragged forward-backward (`ViTResNAS.forward(x, archs, group_sizes)`). Around it: AdamW (no decay on
biases, norms and the cls token), cosine LR with linear warm-up, label smoothing, drop-path, importance sorting at
the start of every epoch during the width warm-up (AdamW moments permuted with the weights), autocast on GPU.

Exact resume. Nothing random is carried from step to step: step t's batch is `data.batch_indices(t)`, its
architectures come from `random.Random(f"{seed}/{rank}/{t}")` and its torch RNG (drop-path) is seeded from
(seed, rank, t). A checkpoint therefore needs only the model, optimizer, grad-scaler and step (the LR is a function
of the step), and a run killed at any moment and resumed with `--resume` ends with the same weights as an
uninterrupted one (tests/test_train_supernet.py checks it bit for bit, including a kill -9).

Distributed: under `torchrun` each rank takes its contiguous share of the global batch, samples its own K
architectures (the rank is in its seeds), and the model is wrapped in `torch.nn.parallel.DistributedDataParallel`
(gloo on CPU, NCCL on GPU), which averages gradients in buckets overlapped with the backward and broadcasts the stem's
BatchNorm statistics from rank 0 before each forward. The sampled sub-networks change the autograd graph every step
and can leave whole tensors unused (the patch head, a block no group of this rank keeps at width > 0), so DDP runs
with `find_unused_parameters=True`: it walks the graph after each forward and reduces a zero for a tensor this rank
did not use, so every rank applies the same averaged gradient. `static_graph` would be wrong here: the set of used
tensors differs between steps. A tensor no rank used keeps `grad=None` and AdamW skips it, as in one process. The
same code runs single-process (no wrapper).

`resnas train-subnet --arch best.json [--init net.pt] --out DIR` is the same trainer on one
fixed architecture (the searched network): the model is `ViTResNAS(arch.pruned())` (the one-architecture supernet,
same state-dict names as the standalone net), every step runs the whole batch through it, there is no width warm-up
or importance sorting. `--init` starts from an exported network (`resnas export`, fine-tuning) or slices a supernet
training checkpoint; without it the net trains from scratch (the paper's retraining). At the end it also writes
net.pt, a `resnas export` checkpoint that `timm.create_model` loads.

Outputs in --out: checkpoint.pt (atomic, at step 0, every --ckpt-every steps, at the end and when Ctrl-C / SIGTERM
stops the run after its current step), metrics.jsonl (one record per step, plus "eval" records at the end of each
epoch: largest and smallest sub-network accuracy on the held-out split, or the one network's `acc` on validation for
train-subnet; the record's `split` names it), config.json. A NaN or
infinite loss stops the run (`TrainingDiverged`) before anything of that step is saved.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import random
import signal
import threading
import time
from typing import Collection, List, Optional, Sequence

import torch
import torch.nn.functional as F

from resnas_kernels._atomic import sweep_stale_temporaries
from resnas_kernels.models.vit_resnas import Arch, ViTResNAS
from resnas_kernels.models.vit_resnas.space import SPACES, get_space, space_from_dict, space_to_dict

from . import data as data_mod
from .augment import Augment, AugmentConfig
from .checkpoint import (TRAIN_FORMAT, VERSION, CheckpointError, append_jsonl, read_checkpoint, read_jsonl,
                         save_checkpoint, write_json_atomic, write_text_atomic)
from .data import split_batch
from .distributed import Distributed
from .evaluate import evaluate_arch
from .networks import EXPORT_FORMAT, build_supernet, load_init, read_arch, read_init, write_exported

__all__ = ["run", "lr_at", "TrainingStopped", "TrainingDiverged", "TRAJECTORY_ARGS", "WARMUP_RUN_FRACTION"]

# Arguments a resumed run takes from the checkpoint unless given again (they may change: they do not alter the weights).
RESUMED_DEFAULTS = ("ckpt_every",)
# The LR warm-up's default is at most this fraction (1/N) of the run.
WARMUP_RUN_FRACTION = 10
# Arguments that define the training trajectory: on --resume they come from the checkpoint.
TRAJECTORY_ARGS = ("data", "space", "img_size", "epochs", "batch_size", "archs_per_step", "lr", "min_lr", "warmup_lr",
                   "lr_warmup_epochs", "weight_decay", "label_smoothing", "drop_path", "width_warmup_epochs",
                   "sort_importance", "amp", "seed", "train_subset", "arch", "init", "aa", "hflip", "reprob", "mixup",
                   "cutmix", "mixup_prob", "demo_data", "holdout_per_class")


def _resolve_defaults(a: argparse.Namespace) -> argparse.Namespace:
    demo = a.data is None
    if a.demo_data is None:
        a.demo_data = "shapes"
    if a.holdout_per_class is None:    # the final network (train-subnet) trains on the whole training set
        a.holdout_per_class = 0 if a.arch is not None else data_mod.default_holdout(a.data, a.demo_data)
    if a.space is None:
        a.space = "demo" if demo else "tiny"
    get_space(a.space)  # validate the name early
    a.img_size = a.img_size if a.img_size is not None else (56 if a.space == "demo" else 224)
    a.epochs = a.epochs if a.epochs is not None else (15 if demo else 120)
    a.batch_size = a.batch_size if a.batch_size is not None else (64 if demo else 1024)
    a.lr = a.lr if a.lr is not None else (1e-3 if demo else 5e-4 * a.batch_size / 512)
    # The recipe's end and start LRs are 1/100 and 1/1000 of its peak: kept as ratios, so a small batch's small
    # peak LR still decays (a fixed 1e-5 floor would sit above a batch-8 peak).
    a.min_lr = a.min_lr if a.min_lr is not None else a.lr / 100
    a.warmup_lr = a.warmup_lr if a.warmup_lr is not None else a.lr / 1000
    # Warm-ups are the recipe's epochs, capped to a fraction of a shorter run (5 warm-up epochs would never reach the
    # peak LR in a 4-epoch run, 30 width warm-up epochs would never train the full space).
    if a.lr_warmup_epochs is None:
        a.lr_warmup_epochs = min(1.0 if demo else 5.0, a.epochs / WARMUP_RUN_FRACTION)
    a.drop_path = a.drop_path if a.drop_path is not None else {"tiny": 0.2, "small": 0.3}.get(a.space, 0.1)
    if a.aa is None:
        a.aa = "none" if demo else "rand-m9-mstd0.5-inc1"
    a.hflip = a.hflip if a.hflip is not None else (0.0 if demo else 0.5)
    a.reprob = a.reprob if a.reprob is not None else (0.0 if demo else 0.25)
    a.width_warmup_epochs = (a.width_warmup_epochs if a.width_warmup_epochs is not None
                             else (a.epochs // 4 if demo else min(30, a.epochs // 4)))
    a.ckpt_every = a.ckpt_every if a.ckpt_every is not None else 100
    return a


def _check_args(a: argparse.Namespace, world: int) -> None:
    def positive(name, value):
        if value is None or value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")

    for name in ("epochs", "batch_size", "lr", "ckpt_every", "img_size"):
        positive(name, getattr(a, name))
    if a.img_size % 56:
        raise ValueError(f"--img-size must be a multiple of 56 (patch 14, two reductions by 2), got {a.img_size}")
    if a.batch_size % world:
        raise ValueError(f"--batch-size {a.batch_size} must be divisible by the {world} ranks")
    local = a.batch_size // world
    if a.archs_per_step is None:
        a.archs_per_step = 2 if a.data is None else max(1, local // 64)
    if not 1 <= a.archs_per_step <= local:
        raise ValueError(f"--archs-per-step must be between 1 and the per-rank batch {local}, got {a.archs_per_step}")
    for name in ("min_lr", "warmup_lr", "lr_warmup_epochs", "weight_decay", "throttle"):
        if getattr(a, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    if not 0 <= a.label_smoothing < 1:
        raise ValueError(f"--label-smoothing must be in [0, 1), got {a.label_smoothing}")
    if not 0 <= a.drop_path < 1:
        raise ValueError(f"--drop-path must be in [0, 1), got {a.drop_path}")
    if a.width_warmup_epochs < 0:
        raise ValueError(f"--width-warmup-epochs must be >= 0, got {a.width_warmup_epochs}")
    if a.stop_at_step is not None and a.stop_at_step <= 0:
        raise ValueError(f"--stop-at-step must be > 0, got {a.stop_at_step}")
    _augment_config(a).check()
    if a.train_subset is not None and a.train_subset < a.batch_size:
        raise ValueError(f"--train-subset {a.train_subset} is smaller than --batch-size {a.batch_size}")


# ---------------------------------------------------------------------------------------------------------------------
# Pieces of a training step
# ---------------------------------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, lr: float, min_lr: float, warmup_lr: float, warmup_steps: int) -> float:
    """Linear warm-up from warmup_lr to lr over warmup_steps, then cosine from lr down to min_lr at `total`."""
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    t = (step - warmup_steps) / max(1, total - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def _param_groups(model: torch.nn.Module, weight_decay: float):
    skip = set(model.no_weight_decay())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _augment_config(a: argparse.Namespace) -> AugmentConfig:
    return AugmentConfig(auto_augment=None if a.aa in (None, "none") else a.aa, hflip=a.hflip, reprob=a.reprob,
                         mixup=a.mixup, cutmix=a.cutmix, mixup_prob=a.mixup_prob)


def _aug_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 2_000_003 + rank * 15_485_863 + step * 32_452_843 + 777) % (2 ** 63)


def _arch_rng(seed: int, rank: int, step: int) -> random.Random:
    return random.Random(f"{seed}/{rank}/{step}")   # str seeds hash with SHA-512: stable across runs and platforms


def _torch_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7919 + step * 104_729 + 12345) % (2 ** 63)


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------
def _device(name: str, d: Distributed) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    if name != "cpu":
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device("cpu")


def _amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp == "none":
        return None
    if device.type != "cuda":
        raise ValueError(f"--amp {amp} needs a GPU (autocast on the CPU is not supported here); use --amp none")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _restore_args(args: argparse.Namespace, saved: dict, given: Sequence[str]) -> List[str]:
    """Take the trajectory-defining arguments from the checkpoint; return the ones the user gave differently."""
    differ = []
    for name in TRAJECTORY_ARGS:
        if name in saved:
            if name in given and getattr(args, name) != saved[name]:
                differ.append(f"--{name.replace('_', '-')} {getattr(args, name)!r} (checkpoint: {saved[name]!r})")
            setattr(args, name, saved[name])
    return differ


def run(args: argparse.Namespace, given: Collection[str]) -> int:
    """Train as `args` (the parsed command line) says; `given`: the arguments the command line named, which a
    --resume must not contradict."""
    d = Distributed()
    device = _device(args.device, d)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    ckpt = None
    if args.resume:
        ckpt = read_checkpoint(ckpt_path, TRAIN_FORMAT, ("model", "optimizer", "step", "args", "space"))
        differ = _restore_args(args, {**data_mod.LEGACY_RUN_ARGS, **ckpt["args"]}, given)
        if differ:
            raise ValueError("--resume continues the checkpoint's run; these arguments differ from it: "
                             + "; ".join(differ))
        if ckpt.get("world_size", 1) != d.world:
            raise ValueError(f"{ckpt_path} was written by a {ckpt.get('world_size', 1)}-rank run; resume it with the "
                             f"same number of ranks (now {d.world})")
        for name in RESUMED_DEFAULTS:   # not part of the trajectory, but a resumed run should not lose them
            if name not in given and ckpt["args"].get(name) is not None:
                setattr(args, name, ckpt["args"][name])
    elif os.path.exists(ckpt_path):
        raise ValueError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    if args.arch is not None:
        _subnet_defaults(args, ckpt)
    _resolve_defaults(args)
    _check_args(args, d.world)
    amp_dtype = _amp_dtype(args.amp, device)
    d.init("nccl" if device.type == "cuda" else "gloo")
    if d.rank == 0:
        sweep_stale_temporaries(args.out)   # left by a run killed while writing a file
    try:
        with _StopOnSignal() as stop:
            return _train(args, d, device, amp_dtype, ckpt, ckpt_path, metrics_path, stop)
    finally:
        d.close()


class TrainingStopped(Exception):
    """Ctrl-C or SIGTERM: the run finished its step, wrote a checkpoint and stopped; --resume continues it."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the checkpoint on disk is the last good state."""


class _StopOnSignal:
    """SIGINT (Ctrl-C) and SIGTERM while training: finish the current step, checkpoint, stop (`TrainingStopped`).
    Before the first step (data loading, model building) or on a second signal: stop at once (KeyboardInterrupt;
    the checkpoint on disk stays the last complete one)."""

    def __init__(self):
        self.requested, self.armed, self._previous = False, False, {}

    def _handle(self, signum, frame):
        if self.requested or not self.armed:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():   # signal handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _subnet_defaults(args: argparse.Namespace, ckpt: Optional[dict]) -> None:
    """train-subnet: the architecture (from the checkpoint on --resume), and img_size / space name for the defaults
    from --init or best.json."""
    args.init_checkpoint = None  # --init's contents, read once below; load_init checks and loads them
    if ckpt is not None:      # --resume: everything else came back with the checkpoint's arguments
        args.subnet_arch = Arch.from_dict(ckpt["subnet_arch"])
        return
    args.subnet_arch = read_arch(args.arch)
    hints = {}
    try:
        with open(args.arch) as f:
            doc = json.load(f)
        hints = doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        pass
    if args.init is not None:
        init = args.init_checkpoint = read_init(args.init)
        if isinstance(init, dict) and init.get("format") == EXPORT_FORMAT:
            hints = {"img_size": init.get("img_size"), "space": init.get("space")}
        elif isinstance(init, dict) and isinstance(init.get("args"), dict):
            hints = {"img_size": init["args"].get("img_size"), "space": init.get("space", {}).get("name")}
    if args.img_size is None and isinstance(hints.get("img_size"), int):
        args.img_size = hints["img_size"]
    space = hints.get("space")
    args.space = space if space in SPACES else ("demo" if args.data is None else "tiny")


def _train(args, d: Distributed, device, amp_dtype, ckpt, ckpt_path, metrics_path, stop: "_StopOnSignal") -> int:
    subnet = getattr(args, "subnet_arch", None)     # train-subnet: one fixed architecture
    space = get_space(args.space) if ckpt is None else space_from_dict(ckpt["space"])
    train, holdout, val = data_mod.load_splits(args.data, args.img_size, args.holdout_per_class, args.demo_data)
    train = train.subset(args.train_subset)
    # The supernet is monitored on the held-out split (validation stays untouched until the search's networks are
    # reported); a final net (train-subnet, nothing held out) on validation.
    monitor, monitor_name = (holdout, "holdout") if len(holdout) else (val, "val")
    per_epoch = len(train) // args.batch_size
    if per_epoch == 0:
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {len(train)} training images"
                         + (f" (after holding out {args.holdout_per_class} per class)" if len(holdout) else ""))
    total = per_epoch * args.epochs
    warmup_steps = int(round(args.lr_warmup_epochs * per_epoch))
    local = args.batch_size // d.world
    augment = Augment(_augment_config(args), args.img_size, train.num_classes, args.label_smoothing, device)

    torch.manual_seed(args.seed)  # the initial weights: identical on every rank
    if subnet is None:
        model = build_supernet(space, args.img_size, train.num_classes, args.drop_path).to(device)
    else:
        model = ViTResNAS(subnet.pruned(), img_size=args.img_size, num_classes=train.num_classes,
                          drop_path_rate=args.drop_path)
        if ckpt is None and args.init is not None:
            load_init(model, subnet, args.init, args.init_checkpoint, args.img_size, train.num_classes)
        model = model.to(device)
    opt = torch.optim.AdamW(_param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    step = 0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{ckpt_path}: its weights do not fit the network it declares: "
                                  f"{str(exc).strip().splitlines()[0]}") from None
        if "scaler" in ckpt and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt["step"])
        # Drop metric records of steps after the checkpoint (the killed run's lost work): they will be redone.
        kept = [r for r in read_jsonl(metrics_path) if r.get("step", 0) <= step]
        if d.rank == 0:
            write_text_atomic(metrics_path, "".join(_json_line(r) for r in kept))
    elif d.rank == 0:
        os.makedirs(args.out, exist_ok=True)
        write_json_atomic(os.path.join(args.out, "config.json"), {**_plain_args(args), "world_size": d.world,
                                                                   "space": space_to_dict(space)})
        write_text_atomic(metrics_path, "")

    saved_step = step

    def save(finished: bool) -> None:
        nonlocal saved_step
        saved_step = step
        if d.rank == 0:
            save_checkpoint({"format": TRAIN_FORMAT, "version": VERSION, "step": step, "finished": finished,
                             "model": model.state_dict(), "optimizer": opt.state_dict(),
                             "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                             "scheduler": {"step": step, "total": total, "warmup_steps": warmup_steps},
                             "args": _plain_args(args), "space": space_to_dict(space),
                             "num_classes": train.num_classes, "world_size": d.world,
                             "subnet_arch": subnet.to_dict() if subnet is not None else None}, ckpt_path)
        d.barrier()

    if ckpt is None:
        save(finished=False)   # step 0: a run killed before its first periodic checkpoint still resumes
    command = "train-supernet" if subnet is None else "train-subnet"
    end = total if args.stop_at_step is None else min(total, args.stop_at_step)
    if d.rank == 0:
        print(f"{command}: {total} steps ({args.epochs} epoch{'s' if args.epochs > 1 else ''} of {per_epoch}), batch "
              f"{args.batch_size}, lr "
              f"{args.lr:.3g} (warm-up {args.lr_warmup_epochs:g} epochs from {args.warmup_lr:.3g}, cosine to "
              f"{args.min_lr:.3g})" + (f", width warm-up {args.width_warmup_epochs} epochs" if subnet is None else ""),
              flush=True)
    bar = None
    if d.rank == 0 and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, desc=command, unit="step", dynamic_ncols=True)
    model.train()
    net = d.wrap(model, device)   # after loading the checkpoint: DDP's constructor broadcasts rank 0's weights
    stop.armed = True
    while step < end:
        t_step = time.perf_counter()   # img_per_s counts the step only, not evaluations, checkpoints or --throttle
        epoch = step // per_epoch
        if step % per_epoch == 0 and args.sort_importance and epoch <= args.width_warmup_epochs \
                and args.width_warmup_epochs > 0:
            model.sort_by_importance(opt)   # identical weights on every rank -> identical permutations
        lr = lr_at(step, total, args.lr, args.min_lr, args.warmup_lr, warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = data_mod.batch_indices(len(train), args.batch_size, step, args.seed)[d.rank * local:(d.rank + 1) * local]
        x, target, soft = augment(train.images[idx], train.labels[idx], _aug_seed(args.seed, d.rank, step))
        y = train.labels[idx].to(device)
        if subnet is None:
            archs = space.sample_groups(args.archs_per_step, rng=_arch_rng(args.seed, d.rank, step),
                                        epoch=epoch if args.width_warmup_epochs > 0 else None,
                                        warmup_epochs=max(1, args.width_warmup_epochs))
        else:
            archs = [model.arch] * args.archs_per_step
        sizes = split_batch(local, args.archs_per_step)
        torch.manual_seed(_torch_seed(args.seed, d.rank, step))   # drop-path draws
        autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            logits = net(x, archs, sizes)
            loss = (F.cross_entropy(logits.float(), target) if soft   # mixup targets include the smoothing
                    else F.cross_entropy(logits.float(), target, label_smoothing=args.label_smoothing))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()   # under DDP the gradients arrive averaged over the ranks
        scaler.step(opt)
        scaler.update()
        correct = (logits.argmax(1) == y).sum().item()
        # The stop request is reduced with the metrics: every rank stops after the same step.
        loss_sum, correct_sum, stops = d.all_reduce_sum([loss.item() * local, correct, float(stop.requested)])
        if not math.isfinite(loss_sum):
            if bar is not None:
                bar.close()
            raise TrainingDiverged(f"the training loss is {loss_sum / args.batch_size} at step {step + 1} (epoch "
                                   f"{epoch}, lr {lr:.3g}); stopped. {ckpt_path} keeps the last good state (step "
                                   f"{saved_step}); train again with a lower --lr, or check the data")
        step += 1
        rec = {"step": step, "epoch": epoch, "lr": lr, "loss": loss_sum / args.batch_size,
               "acc": correct_sum / args.batch_size,
               "img_per_s": args.batch_size / max(time.perf_counter() - t_step, 1e-9)}
        if d.rank == 0:
            append_jsonl(metrics_path, [rec])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}", img_s=f"{rec['img_per_s']:.0f}")
        if args.eval_every_epoch and (step % per_epoch == 0 or step == total) and d.rank == 0:
            ev = {"step": step, "epoch": epoch, "eval": True, "split": monitor_name}
            if subnet is None:
                ev["acc_max"] = evaluate_arch(model, space.max_arch(), monitor, device)
                ev["acc_min"] = evaluate_arch(model, space.min_arch(), monitor, device)
                line = f"largest {ev['acc_max']:.3f}, smallest {ev['acc_min']:.3f}"
            else:
                ev["acc"] = evaluate_arch(model, model.arch, monitor, device)
                line = f"{ev['acc']:.3f}"
            model.train()
            append_jsonl(metrics_path, [ev])
            (bar.write if bar is not None else functools.partial(print, flush=True))(
                f"epoch {epoch}: {monitor_name} acc {line}")
        stopping = stops > 0
        if step % args.ckpt_every == 0 or step == end or stopping:
            save(finished=step == total)
        if stopping and step < end:
            if bar is not None:
                bar.close()
            raise TrainingStopped(f"stopped at step {step}/{total} by a signal; {ckpt_path} holds it: continue "
                                  f"with --resume")
        if args.throttle:
            time.sleep(args.throttle)
    if bar is not None:
        bar.close()
    in_sync = d.ranks_in_sync(model)
    if d.rank == 0 and d.enabled:
        append_jsonl(metrics_path, [{"step": step, "world_size": d.world, "ranks_in_sync": in_sync}])
    if not in_sync:
        raise RuntimeError("the ranks' weights diverged: gradients were not averaged identically")
    if step == end and end == total and ckpt is not None and ckpt.get("finished") and d.rank == 0:
        print(f"{ckpt_path}: the run had already finished ({total} steps)")
    if subnet is not None and step == total and d.rank == 0:
        net_path = os.path.join(args.out, "net.pt")
        write_exported(model, net_path, img_size=args.img_size, num_classes=train.num_classes, space=space.name,
                       source={"trained_by": "resnas train-subnet", "run": os.path.abspath(args.out),
                               "init": os.path.abspath(args.init) if args.init else None, "step": step})
        print(f"train-subnet: wrote {net_path} (val acc {evaluate_arch(model, model.arch, val, device):.4f})")
    if d.rank == 0:
        print(f"{command}: step {step}/{total}, checkpoint {ckpt_path}")
    return 0


def _plain_args(args: argparse.Namespace) -> dict:
    """The arguments as plain data (checkpoint- and JSON-safe): the parsed Arch is saved separately."""
    return {k: v for k, v in vars(args).items() if k not in ("subnet_arch", "init_checkpoint")}


def _json_line(r: dict) -> str:
    return json.dumps(r, separators=(",", ":")) + "\n"
