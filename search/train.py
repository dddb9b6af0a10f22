"""`resnas train-supernet`: supernet training with multi-architectural sampling (vit_resnas.md section 5).

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
architectures (the rank is in its seeds) and gradients are averaged with one all-reduce per step (gloo on CPU, NCCL on
GPU); the same code runs single-process.

Outputs in --out: checkpoint.pt (atomic, every --ckpt-every steps and at the end), metrics.jsonl (one record per
step, plus "eval" records: largest and smallest sub-network accuracy at the end of each epoch), config.json.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import sys
import time
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from resnas_kernels.models.vit_resnas import Arch, SearchSpace, ViTResNAS

from . import data as data_mod
from .checkpoint import (TRAIN_FORMAT, VERSION, CheckpointError, append_jsonl, read_checkpoint, read_jsonl,
                         save_checkpoint, write_json_atomic, write_text_atomic)

__all__ = ["main", "build_parser", "lr_at", "split_batch", "build_supernet", "load_supernet", "evaluate_arch"]

# Arguments that define the training trajectory: on --resume they come from the checkpoint.
TRAJECTORY_ARGS = ("data", "space", "img_size", "epochs", "batch_size", "archs_per_step", "lr", "min_lr", "warmup_lr",
                   "lr_warmup_epochs", "weight_decay", "label_smoothing", "drop_path", "width_warmup_epochs",
                   "sort_importance", "amp", "seed", "train_subset")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resnas train-supernet", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="run directory (checkpoint.pt, metrics.jsonl, config.json)")
    p.add_argument("--data", default=None, help="ImageFolder tree with train/ and val/; default: the demo digits")
    p.add_argument("--space", default=None, help="search space: demo | tiny | small (default: demo without --data, "
                                                 "tiny with it)")
    p.add_argument("--img-size", type=int, default=None, help="input side, a multiple of 56 (default 56 demo, 224)")
    p.add_argument("--epochs", type=int, default=None, help="default 120 (recipe), 15 for the demo")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default 1024 recipe, 64 demo)")
    p.add_argument("--archs-per-step", type=int, default=None,
                   help="K architectures per rank and step, each on a contiguous group (default: batch / 64 per "
                        "rank as the recipe, 2 for the demo)")
    p.add_argument("--lr", type=float, default=None, help="peak LR (default 5e-4 * batch / 512; demo 1e-3)")
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--warmup-lr", type=float, default=1e-6)
    p.add_argument("--lr-warmup-epochs", type=float, default=None, help="default 5 (recipe), 1 for the demo")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--drop-path", type=float, default=None, help="default 0.2 tiny, 0.3 small, 0.1 demo")
    p.add_argument("--width-warmup-epochs", type=int, default=None,
                   help="progressive width warm-up and importance sorting (default 30 recipe, epochs // 4 demo; "
                        "0 disables both)")
    p.add_argument("--no-sort-importance", dest="sort_importance", action="store_false",
                   help="no importance sorting during the width warm-up")
    p.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="autocast on GPU (auto: bf16 on GPU, none on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt (exactly)")
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="checkpoint and stop after this many steps (a planned interruption; --resume continues)")
    p.add_argument("--eval-every-epoch", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the largest and smallest sub-networks on val at each epoch end")
    p.add_argument("--throttle", type=float, default=0.0, help="sleep this many seconds after each step (testing, "
                                                               "or sharing a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _resolve_defaults(a: argparse.Namespace) -> argparse.Namespace:
    demo = a.data is None
    if a.space is None:
        a.space = "demo" if demo else "tiny"
    data_mod.resolve_space(a.space)  # validate the name early
    a.img_size = a.img_size if a.img_size is not None else (56 if a.space == "demo" else 224)
    a.epochs = a.epochs if a.epochs is not None else (15 if demo else 120)
    a.batch_size = a.batch_size if a.batch_size is not None else (64 if demo else 1024)
    a.lr = a.lr if a.lr is not None else (1e-3 if demo else 5e-4 * a.batch_size / 512)
    a.lr_warmup_epochs = a.lr_warmup_epochs if a.lr_warmup_epochs is not None else (1.0 if demo else 5.0)
    a.drop_path = a.drop_path if a.drop_path is not None else {"tiny": 0.2, "small": 0.3}.get(a.space, 0.1)
    a.width_warmup_epochs = (a.width_warmup_epochs if a.width_warmup_epochs is not None
                             else (a.epochs // 4 if demo else 30))
    return a


def _check_args(a: argparse.Namespace, world: int) -> None:
    def positive(name, value):
        if value is None or value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")

    for name in ("epochs", "batch_size", "lr", "ckpt_every"):
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
    if a.train_subset is not None and a.train_subset < a.batch_size:
        raise ValueError(f"--train-subset {a.train_subset} is smaller than --batch-size {a.batch_size}")


# ---------------------------------------------------------------------------------------------------------------------
# Pieces (importable: the search and the benchmarks use them)
# ---------------------------------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, lr: float, min_lr: float, warmup_lr: float, warmup_steps: int) -> float:
    """Linear warm-up from warmup_lr to lr over warmup_steps, then cosine from lr down to min_lr at `total`."""
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    t = (step - warmup_steps) / max(1, total - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def split_batch(batch: int, groups: int) -> List[int]:
    """Contiguous group sizes as equal as possible (the first groups get the remainder)."""
    base, extra = divmod(batch, groups)
    return [base + (g < extra) for g in range(groups)]


def build_supernet(space: SearchSpace, img_size: int, num_classes: int, drop_path: float = 0.0) -> ViTResNAS:
    return ViTResNAS(space=space, img_size=img_size, num_classes=num_classes, drop_path_rate=drop_path)


def load_supernet(path: str, device="cpu"):
    """(supernet in eval mode, the training checkpoint dict) from a `resnas train-supernet` checkpoint."""
    ckpt = read_checkpoint(path, TRAIN_FORMAT, ("model", "space", "args", "num_classes", "step"))
    space = data_mod.space_from_dict(ckpt["space"])
    model = build_supernet(space, ckpt["args"]["img_size"], ckpt["num_classes"], 0.0)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the {space.name} supernet it declares: "
                              f"{str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), ckpt


@torch.no_grad()
def evaluate_arch(model: ViTResNAS, arch: Arch, split: data_mod.Split, device, batch_size: int = 256) -> float:
    """Top-1 accuracy of one sub-network (eval mode) on `split`."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(split), batch_size):
        x = data_mod.normalize(split.images[i:i + batch_size], device)
        correct += (model(x, arch).argmax(1).cpu() == split.labels[i:i + batch_size]).sum().item()
    model.train(was)
    return correct / len(split)


def _param_groups(model: torch.nn.Module, weight_decay: float):
    skip = set(model.no_weight_decay())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _arch_rng(seed: int, rank: int, step: int) -> random.Random:
    return random.Random(f"{seed}/{rank}/{step}")   # str seeds hash with SHA-512: stable across runs and platforms


def _torch_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7919 + step * 104_729 + 12345) % (2 ** 63)


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------
class _Dist:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1

    def init(self, device: torch.device) -> None:
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def all_reduce_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Average gradients over ranks: one flat all-reduce (a parameter no group used counts as zero)."""
        if not self.enabled:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(self.world)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """BatchNorm running statistics from rank 0 (what DDP's broadcast_buffers does before each forward)."""
        if self.enabled:
            for b in model.buffers():
                dist.broadcast(b, 0)

    def all_reduce_sum(self, values: Sequence[float]) -> List[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def ranks_in_sync(self, model: torch.nn.Module) -> bool:
        """Whether every rank holds the same weights (sum and sum of squares of all parameters, in float64)."""
        if not self.enabled:
            return True
        with torch.no_grad():
            mine = torch.stack([sum(p.double().sum() for p in model.parameters()),
                                sum(p.double().square().sum() for p in model.parameters())]).cpu()
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        return all(torch.equal(every[0], e) for e in every[1:])

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _device(name: str, d: _Dist) -> torch.device:
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


def _given_args(argv: Sequence[str]) -> List[str]:
    return [a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")]


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    d = _Dist()
    device = _device(args.device, d)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    ckpt = None
    if args.resume:
        ckpt = read_checkpoint(ckpt_path, TRAIN_FORMAT, ("model", "optimizer", "step", "args", "space"))
        differ = _restore_args(args, ckpt["args"], _given_args(argv))
        if differ:
            raise ValueError("--resume continues the checkpoint's run; these arguments differ from it: "
                             + "; ".join(differ))
        if ckpt.get("world_size", 1) != d.world:
            raise ValueError(f"{ckpt_path} was written by a {ckpt.get('world_size', 1)}-rank run; resume it with the "
                             f"same number of ranks (now {d.world})")
    elif os.path.exists(ckpt_path):
        raise ValueError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    _resolve_defaults(args)
    _check_args(args, d.world)
    amp_dtype = _amp_dtype(args.amp, device)
    d.init(device)
    try:
        return _train(args, d, device, amp_dtype, ckpt, ckpt_path, metrics_path)
    finally:
        d.close()


def _train(args, d: _Dist, device, amp_dtype, ckpt, ckpt_path, metrics_path) -> int:
    space = data_mod.resolve_space(args.space) if ckpt is None else data_mod.space_from_dict(ckpt["space"])
    train, val = data_mod.load_data(args.data, args.img_size)
    train = train.subset(args.train_subset)
    per_epoch = len(train) // args.batch_size
    total = per_epoch * args.epochs
    warmup_steps = int(round(args.lr_warmup_epochs * per_epoch))
    local = args.batch_size // d.world

    torch.manual_seed(args.seed)  # the initial weights: identical on every rank
    model = build_supernet(space, args.img_size, train.num_classes, args.drop_path).to(device)
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(_param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt["step"])
        # Drop metric records of steps after the checkpoint (the killed run's lost work): they will be redone.
        kept = [r for r in read_jsonl(metrics_path) if r.get("step", 0) <= step]
        if d.rank == 0:
            write_text_atomic(metrics_path, "".join(_json_line(r) for r in kept))
    elif d.rank == 0:
        os.makedirs(args.out, exist_ok=True)
        write_json_atomic(os.path.join(args.out, "config.json"), {**vars(args), "world_size": d.world,
                                                                   "space": data_mod.space_to_dict(space)})
        write_text_atomic(metrics_path, "")

    def save(finished: bool) -> None:
        if d.rank == 0:
            save_checkpoint({"format": TRAIN_FORMAT, "version": VERSION, "step": step, "finished": finished,
                             "model": model.state_dict(), "optimizer": opt.state_dict(),
                             "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                             "scheduler": {"step": step, "total": total, "warmup_steps": warmup_steps},
                             "args": {k: v for k, v in vars(args).items()}, "space": data_mod.space_to_dict(space),
                             "num_classes": train.num_classes, "world_size": d.world}, ckpt_path)
        d.barrier()

    end = total if args.stop_at_step is None else min(total, args.stop_at_step)
    bar = None
    if d.rank == 0 and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, desc="train-supernet", unit="step", dynamic_ncols=True)
    model.train()
    t_last, imgs_since = time.perf_counter(), 0
    while step < end:
        epoch = step // per_epoch
        if step % per_epoch == 0 and args.sort_importance and epoch <= args.width_warmup_epochs \
                and args.width_warmup_epochs > 0:
            model.sort_by_importance(opt)   # identical weights on every rank -> identical permutations
        lr = lr_at(step, total, args.lr, args.min_lr, args.warmup_lr, warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = data_mod.batch_indices(len(train), args.batch_size, step, args.seed)[d.rank * local:(d.rank + 1) * local]
        x = data_mod.normalize(train.images[idx], device)
        y = train.labels[idx].to(device)
        archs = space.sample_groups(args.archs_per_step, rng=_arch_rng(args.seed, d.rank, step),
                                    epoch=epoch if args.width_warmup_epochs > 0 else None,
                                    warmup_epochs=max(1, args.width_warmup_epochs))
        sizes = split_batch(local, args.archs_per_step)
        torch.manual_seed(_torch_seed(args.seed, d.rank, step))   # drop-path draws
        autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                    else contextlib.nullcontext())
        d.broadcast_buffers(model)
        with autocast:
            logits = model(x, archs, sizes)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        d.all_reduce_grads(params)
        scaler.step(opt)
        scaler.update()
        correct = (logits.argmax(1) == y).sum().item()
        loss_sum, correct_sum = d.all_reduce_sum([loss.item() * local, correct])
        step += 1
        imgs_since += args.batch_size
        now = time.perf_counter()
        rec = {"step": step, "epoch": epoch, "lr": lr, "loss": loss_sum / args.batch_size,
               "acc": correct_sum / args.batch_size, "img_per_s": args.batch_size / max(now - t_last, 1e-9)}
        if d.rank == 0:
            append_jsonl(metrics_path, [rec])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}", img_s=f"{rec['img_per_s']:.0f}")
        t_last = now
        if args.eval_every_epoch and (step % per_epoch == 0 or step == total) and d.rank == 0:
            ev = {"step": step, "epoch": epoch, "eval": True,
                  "acc_max": evaluate_arch(model, space.max_arch(), val, device),
                  "acc_min": evaluate_arch(model, space.min_arch(), val, device)}
            model.train()
            append_jsonl(metrics_path, [ev])
            if bar is not None:
                bar.write(f"epoch {epoch}: val acc largest {ev['acc_max']:.3f}, smallest {ev['acc_min']:.3f}")
        if step % args.ckpt_every == 0 or step == end:
            save(finished=step == total)
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
    if d.rank == 0:
        print(f"train-supernet: step {step}/{total}, checkpoint {ckpt_path}")
    return 0


def _json_line(r: dict) -> str:
    import json
    return json.dumps(r, separators=(",", ":")) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args, argv)
    except (ValueError, CheckpointError) as exc:
        print(f"resnas train-supernet: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
