"""The process group of a `torchrun` launch, for supernet training and the search (one process: every call is a no-op
or the identity).

Training wraps the model in DistributedDataParallel and reduces its metrics (`wrap`, `all_reduce_sum`,
`ranks_in_sync`); the search splits each chunk of candidates across the ranks and gathers the results (`shard`).
Only rank 0 writes files; every rank computes the same decisions from the same reduced or gathered numbers.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, List, Sequence

import torch
import torch.distributed as dist

__all__ = ["Distributed"]


class Distributed:
    """World size and ranks from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK; 1, 0, 0 without it)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1

    def init(self, backend: str) -> None:
        """Join the process group ('nccl' for GPU tensors, 'gloo' for CPU tensors and Python objects)."""
        if self.enabled and self.rank != 0:
            warnings.simplefilter("ignore")   # every rank hits the same warnings: rank 0 reports them once
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The module a training step calls: DDP across the ranks, else the model. The sampled sub-networks change
        the autograd graph every step and can leave whole tensors unused, so DDP runs with
        `find_unused_parameters=True` (a rank reduces a zero for a tensor it did not use); `static_graph` would be
        wrong, the set of used tensors differs between steps."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=True, broadcast_buffers=True)

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

    def shard(self, fn: Callable[[list], list], items: Sequence) -> list:
        """`fn(items)` computed in parts: rank r takes items r, r + world, ...; the results are all-gathered (as
        Python objects: needs the 'gloo' group), so every rank returns the whole list in the order of `items`."""
        if not self.enabled:
            return list(fn(list(items)))
        part = list(items[self.rank::self.world])
        mine = list(fn(part)) if part else []
        every: List[list] = [[] for _ in range(self.world)]
        dist.all_gather_object(every, mine)
        out = [None] * len(items)
        for r, results in enumerate(every):
            out[r::self.world] = results
        return out
