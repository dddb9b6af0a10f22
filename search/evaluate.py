"""The one evaluator of sub-networks: batched candidate scoring for the search (vit_resnas.md 9.2 (h), (i)), many
candidates per forward with the stem cached, and through it the accuracy of one sub-network (`evaluate_arch`: the
training runs' per-epoch evaluation, the demo's report).

* The validation images are decoded once (`data.Split`, uint8 in memory).
* The stem is architecture-independent up to a channel prefix (first-k slicing of the 7x7/s7 projection), so it runs
  ONCE per image at the supernet's maximum width and its output is cached; candidate g reads the first c_g channels.
* Each forward then serves P candidates: the cached stem tokens of b images are tiled P times, candidate g owns the
  g-th contiguous group of b rows, and the ragged supernet runs every group through its own sub-network.

Both steps are the supernet's public API (`ViTResNAS.stem_tokens`, `ViTResNAS.forward_from_stem`); the module-level
functions below are thin wrappers kept for callers that pass the model explicitly. Scoring runs under
`torch.no_grad` rather than `inference_mode`: the supernet caches masks across calls (lru_cache), and an inference
tensor in that cache would break a later training forward in the same process.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from resnas_kernels.models.vit_resnas import Arch, ViTResNAS

from .data import Split, normalize

__all__ = ["stem_tokens", "forward_from_stem", "CandidateScorer", "evaluate_arch", "score_one_model_per_candidate",
           "net_accuracy"]


@torch.no_grad()
def stem_tokens(model: ViTResNAS, x: torch.Tensor) -> torch.Tensor:
    """(B, H/14 * W/14, C1_max): the stem output at the supernet's full width (`ViTResNAS.stem_tokens`)."""
    return model.stem_tokens(x)


@torch.no_grad()
def forward_from_stem(model: ViTResNAS, tokens: torch.Tensor, archs: Sequence[Arch], sizes: Sequence[int]):
    """Eval-mode logits of `model(x, archs, sizes)` given `stem_tokens(model, x)` (`ViTResNAS.forward_from_stem`)."""
    return model.forward_from_stem(tokens, archs, sizes)


class CandidateScorer:
    """Top-1 accuracy of many candidates: `candidates_per_forward` candidates x `images_per_forward` images each."""

    def __init__(self, model: ViTResNAS, val: Split, device=None, candidates_per_forward: int = 8,
                 images_per_forward: int = 128, cache_stem: bool = True):
        if candidates_per_forward < 1 or images_per_forward < 1:
            raise ValueError("candidates_per_forward and images_per_forward must be >= 1")
        self.model = model.eval()
        self.device = device if device is not None else next(model.parameters()).device
        self.val = val
        self.labels = val.labels.to(self.device)
        self.P, self.b = candidates_per_forward, images_per_forward
        self.cache: Optional[torch.Tensor] = None
        if cache_stem:
            parts = [stem_tokens(model, normalize(val.images[i:i + self.b], self.device))
                     for i in range(0, len(val), self.b)]
            self.cache = torch.cat(parts)

    @torch.no_grad()
    def correct(self, archs: Sequence[Arch]) -> List[int]:
        """Number of correctly classified validation images per candidate."""
        out: List[int] = []
        for c in range(0, len(archs), self.P):
            chunk = list(archs[c:c + self.P])
            hits = torch.zeros(len(chunk), dtype=torch.long, device=self.device)
            for i in range(0, len(self.val), self.b):
                y = self.labels[i:i + self.b]
                n = y.shape[0]
                sizes = (n,) * len(chunk)
                if self.cache is not None:
                    tok = self.cache[i:i + n].repeat(len(chunk), 1, 1)
                    logits = forward_from_stem(self.model, tok, chunk, sizes)
                else:
                    x = normalize(self.val.images[i:i + n], self.device).repeat(len(chunk), 1, 1, 1)
                    logits = self.model(x, chunk, sizes)
                hits += (logits.argmax(1).view(len(chunk), n) == y).sum(1)
            out += hits.tolist()
        return out

    def accuracy(self, archs: Sequence[Arch]) -> List[float]:
        return [c / len(self.val) for c in self.correct(archs)]


def evaluate_arch(model: ViTResNAS, arch: Arch, split: Split, device=None, batch_size: int = 256) -> float:
    """Top-1 accuracy of one sub-network of `model` (in eval mode) on `split`; the model's training mode is restored.
    Without the stem cache: one forward per batch needs the stem once anyway."""
    was = model.training
    try:
        return CandidateScorer(model, split, device, candidates_per_forward=1, images_per_forward=batch_size,
                               cache_stem=False).accuracy([arch])[0]
    finally:
        model.train(was)


@torch.no_grad()
def score_one_model_per_candidate(model: ViTResNAS, archs: Sequence[Arch], val: Split, device=None,
                                  images_per_forward: int = 128) -> List[int]:
    """The original search's way (the benchmark peer): build each candidate's standalone network and run it alone."""
    device = device if device is not None else next(model.parameters()).device
    out = []
    for arch in archs:
        net = model.extract(arch).eval()
        hits = 0
        for i in range(0, len(val), images_per_forward):
            x = normalize(val.images[i:i + images_per_forward], device)
            hits += (net(x).argmax(1).cpu() == val.labels[i:i + images_per_forward]).sum().item()
        out.append(hits)
    return out


@torch.no_grad()
def net_accuracy(net: torch.nn.Module, split: Split, device=None, batch_size: int = 256) -> float:
    """Top-1 accuracy of a standalone network (e.g. `export.load_exported`'s) on `split`, in eval mode."""
    device = device if device is not None else next(net.parameters()).device
    net.eval()
    hits = 0
    for i in range(0, len(split), batch_size):
        x = normalize(split.images[i:i + batch_size], device)
        hits += (net(x).argmax(1).cpu() == split.labels[i:i + batch_size]).sum().item()
    return hits / len(split)
