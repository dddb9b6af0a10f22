"""Capture a whole supernet training step once, replay it for every sampled architecture (CUDA graphs).

A supernet step is hundreds of small kernel launches; on a GPU their host cost, not the math, bounds the step. The
ragged path reads no architecture value on the host (`ViTResNAS.encode_archs`: the architectures are one int32
tensor), so one CUDA graph of forward + backward + optimizer step serves every architecture set with the same group
sizes and image size: each step writes the new architecture tensor and the batch into the graph's static input
buffers and replays it (the pattern vLLM uses for its per-batch-size graphs).

    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)
    step = CapturedTrainStep(model, opt, lambda logits, y: F.cross_entropy(logits, y))
    for images, labels in loader:
        archs = space.sample_groups(4, rng)
        loss = step(images, labels, archs, group_sizes=(16, 16, 16, 16))   # captured on first use of (sizes, size)

Rules of a captured step (checked where it costs nothing):
- the optimizer is Adam or AdamW with `capturable=True` (its step counters live on the device);
- a learning rate given as a float is baked into the graph: a schedule must use a CUDA tensor lr (change it in place,
  `group["lr"].fill_(v)`); a float lr that changed since capture is an error, not a silently stale update;
- the returned loss and the parameters' `.grad` are the graph's static buffers, overwritten by the next replay of the
  same graph (clone what you keep). Gradients are assigned, not accumulated, every step.
The first step of a key runs a few warm-up iterations (they allocate the optimizer state and the ops' cached tables,
which cannot be created during capture) and then restores parameters, buffers, optimizer state and RNG state, so
the warm-up leaves no trace: the step sequence equals the eager one.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["CapturedTrainStep"]

StepKey = Tuple[Tuple[int, ...], Tuple[int, ...], torch.dtype, Tuple[int, ...], torch.dtype]


@dataclass
class _Graph:
    """One captured step: its static inputs, and what replaying it gives back."""
    images: torch.Tensor
    targets: torch.Tensor
    arch: torch.Tensor
    replay: Callable[[], torch.Tensor] = None        # runs the step, returns the (static) loss
    grads: List[Optional[torch.Tensor]] = field(default_factory=list)
    float_lrs: Dict[int, float] = field(default_factory=dict)   # param group index -> lr baked in at capture


class CapturedTrainStep:
    """A supernet training step (forward, loss, backward, optimizer step) captured as one CUDA graph per key
    (group sizes, per-sample image shape and dtype, per-sample target shape and dtype) and replayed for new
    architectures by writing the architecture tensor and the batch into the graph's static buffers.

    Args:
        model: a `ViTResNAS` on a CUDA device, in the mode the step should run in (usually train()).
        optimizer: `torch.optim.Adam` / `AdamW` over the model's parameters, built with `capturable=True`.
        loss_fn: `loss_fn(model_output, targets) -> scalar tensor`, with no host synchronisation.
        autocast_dtype: run the forward under `torch.autocast("cuda", dtype)` (e.g. torch.bfloat16), or None.
        warmup_iters: warm-up iterations before each capture (undone afterwards: see the module docstring).
        max_graphs: captured graphs kept (least recently used dropped first; each holds its own memory pool).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[..., torch.Tensor], *, autocast_dtype: Optional[torch.dtype] = None,
                 warmup_iters: int = 2, max_graphs: int = 8):
        if not hasattr(model, "encode_archs"):
            raise TypeError(f"model must be a ViTResNAS supernet (with encode_archs), got {type(model).__name__}")
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise TypeError(f"optimizer must be torch.optim.Adam or AdamW (capturable=True), got "
                            f"{type(optimizer).__name__}")
        if not all(group.get("capturable", False) for group in optimizer.param_groups):
            raise ValueError("optimizer must be built with capturable=True: its step counters must live on the "
                             "device to be updated inside a CUDA graph")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        for name, value, low in (("warmup_iters", warmup_iters, 1), ("max_graphs", max_graphs, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.autocast_dtype = autocast_dtype
        self.warmup_iters, self.max_graphs = warmup_iters, max_graphs
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        self._graphs: "OrderedDict[StepKey, _Graph]" = OrderedDict()

    # -- public ---------------------------------------------------------------------------------------------------
    def __call__(self, images: torch.Tensor, targets: torch.Tensor, archs=None, *,
                 group_sizes: Sequence[int], arch_tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One training step for `archs` (G architectures) or `arch_tensor` (`model.encode_archs(archs)`, on any
        device), group g owning samples [sum(sizes[:g]), sum(sizes[:g+1])) of `images`. Returns the loss (a static
        buffer: overwritten by the next step with the same key)."""
        sizes = self._check_sizes(group_sizes, images, targets)
        if (archs is None) == (arch_tensor is None):
            raise ValueError("give exactly one of archs and arch_tensor")
        if arch_tensor is None:
            arch_tensor = self.model.encode_archs(archs)
        key = self.key(images, targets, sizes)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._new_graph(images, targets, sizes, arch_tensor)  # writes the inputs too
        else:
            self._write(graph, images, targets, arch_tensor)
        self._graphs.move_to_end(key)
        self._check_float_lrs(graph)
        loss = graph.replay()
        for p, g in zip(self._params, graph.grads):
            p.grad = g
        return loss

    @staticmethod
    def key(images: torch.Tensor, targets: torch.Tensor, group_sizes: Sequence[int]) -> StepKey:
        """What one graph serves: the group sizes (they fix every shape), per-sample image and target shapes and
        dtypes. Anything else about the architectures is the architecture tensor's values."""
        return (tuple(int(s) for s in group_sizes), tuple(images.shape[1:]), images.dtype, tuple(targets.shape[1:]),
                targets.dtype)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every captured graph (and its memory pool); the next step of a key captures again."""
        self._graphs.clear()
        for p in self._params:
            p.grad = None

    # -- checks and static buffers -------------------------------------------------------------------------------------
    def _check_sizes(self, group_sizes, images, targets) -> Tuple[int, ...]:
        if not isinstance(images, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise TypeError("images and targets must be tensors")
        sizes = tuple(group_sizes)
        for g, s in enumerate(sizes):
            if isinstance(s, bool) or not hasattr(s, "__index__") or int(s) < 0:
                raise ValueError(f"group_sizes[{g}] must be an int >= 0, got {s!r}")
        sizes = tuple(int(s) for s in sizes)
        if not sizes or sum(sizes) != images.shape[0]:
            raise ValueError(f"group_sizes {sizes} must sum to the batch size of images ({images.shape[0]})")
        if targets.shape[:1] != images.shape[:1]:
            raise ValueError(f"targets must have one entry per image: images has {images.shape[0]}, targets has "
                             f"shape {tuple(targets.shape)}")
        return sizes

    def _write(self, graph: _Graph, images, targets, arch_tensor) -> None:
        if not isinstance(arch_tensor, torch.Tensor) or arch_tensor.dtype != torch.int32 \
                or arch_tensor.shape != graph.arch.shape:
            got = (f"{arch_tensor.dtype} {tuple(arch_tensor.shape)}" if isinstance(arch_tensor, torch.Tensor)
                   else type(arch_tensor).__name__)
            raise ValueError(f"arch_tensor must be an int32 tensor of shape {tuple(graph.arch.shape)} "
                             f"(model.encode_archs of {graph.arch.shape[1]} archs), got {got}")
        graph.images.copy_(images, non_blocking=True)
        graph.targets.copy_(targets, non_blocking=True)
        graph.arch.copy_(arch_tensor, non_blocking=True)

    def _check_float_lrs(self, graph: _Graph) -> None:
        for i, lr in graph.float_lrs.items():
            now = self.optimizer.param_groups[i]["lr"]
            if now != lr:
                raise ValueError(f"param group {i}'s lr changed from {lr} to {now} since this step was captured; a "
                                 f"float lr is baked into the graph: build the optimizer with a CUDA tensor lr and "
                                 f"change it in place (group['lr'].fill_(value))")

    # -- capture -------------------------------------------------------------------------------------------------------
    def _new_graph(self, images, targets, sizes, arch_tensor) -> _Graph:
        device = next(self.model.parameters()).device
        graph = _Graph(images=torch.empty_like(images, device=device), targets=torch.empty_like(targets, device=device),
                       arch=torch.empty(tuple(arch_tensor.shape), dtype=torch.int32, device=device))
        self._write(graph, images, targets, arch_tensor)
        float_lrs = {i: g["lr"] for i, g in enumerate(self.optimizer.param_groups)
                     if not isinstance(g["lr"], torch.Tensor)}

        def run() -> torch.Tensor:
            # PyTorch's rule for autocast in graph capture: no cast cache (cached casts would outlive the capture).
            autocast = torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None,
                                      cache_enabled=False)
            with autocast:
                out = self.model(graph.images, group_sizes=sizes, arch_tensor=graph.arch)
                loss = self.loss_fn(out, graph.targets)
            loss.backward()
            self.optimizer.step()
            return loss

        graph.replay = self._capture(run)
        graph.grads = [p.grad for p in self._params]
        graph.float_lrs = float_lrs
        self._graphs[self.key(images, targets, sizes)] = graph
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return graph

    def _warm_up(self, run: Callable[[], torch.Tensor]) -> None:
        """Run the step `warmup_iters` times (allocating the optimizer state and every cached device table), then
        restore parameters, buffers, optimizer state and RNG state as they were."""
        params = self._params
        buffers = [b for b in self.model.buffers()]
        fresh = [p for p in params if not self.optimizer.state.get(p)]
        saved_params = [p.detach().clone() for p in params]
        saved_buffers = [b.detach().clone() for b in buffers]
        saved_state = {p: {k: v.clone() for k, v in self.optimizer.state[p].items() if isinstance(v, torch.Tensor)}
                       for p in params if self.optimizer.state.get(p)}
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        for _ in range(self.warmup_iters):
            self.optimizer.zero_grad(set_to_none=True)
            run()
        with torch.no_grad():
            for p, saved in zip(params, saved_params):
                p.copy_(saved)
            for b, saved in zip(buffers, saved_buffers):
                b.copy_(saved)
            for p in fresh:  # Adam's initial state is all zeros (step counter included)
                for v in self.optimizer.state[p].values():
                    if isinstance(v, torch.Tensor):
                        v.zero_()
            for p, state in saved_state.items():
                for k, v in state.items():
                    self.optimizer.state[p][k].copy_(v)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        self.optimizer.zero_grad(set_to_none=True)  # the capture allocates the graph's own gradient buffers

    def _capture(self, run: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Warm up on a side stream, capture one step, return its replay."""
        device = next(self.model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CapturedTrainStep needs the model on a CUDA device (CUDA graphs), got {device}; on "
                             f"the CPU compile the step instead (torch.compile of forward(arch_tensor=...))")
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._warm_up(run)
        torch.cuda.current_stream(device).wait_stream(side)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            static_loss = run()

        def replay() -> torch.Tensor:
            cuda_graph.replay()
            return static_loss
        return replay
