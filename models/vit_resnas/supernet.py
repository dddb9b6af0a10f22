"""The ViT-ResNAS supernet: one forward serves G sub-networks, each on a contiguous group of the batch.

`ViTResNAS(arch)` holds the weights of its (maximum) architecture in the module tree of `ViTResNASNet` (same state-dict
names). `forward(x, archs, group_sizes)` runs group g through the first-k slice of every weight chosen by archs[g]:

    mode="ragged" (default)  the ragged ops: every op reads only the active slices, so the cost is that of the sampled
                             sub-networks. A group whose block is removed does no GEMM, norm or attention work in
                             that block (its rows are only copied through the residual epilogue).
    mode="masked"            the original code's formulation (vit_resnas.md section 5): everything at full width
                             for every sample, then masks; MaskedLayerNorm statistics over the active channels.
                             The parity oracle and the benchmark peer.
    mode="loop"              one stock sub-network per group in turn (`torch.func.functional_call` on sliced views of
                             the shared weights, so gradients reach them): the AutoFormer / OFA approach, the other
                             benchmark peer.

All three give the same outputs and the same gradients of the shared weights (tests/test_vit_resnas_parity.py), except
that BatchNorm in the stem uses the statistics of whatever batch it sees (the whole batch in ragged / masked mode, as
the original; one group in loop mode), so compare the loop in eval mode.

Layer code is thin: LayerNorm, linears (qkv as 3 segments, GELU and residual + drop-path epilogues), attention and the
residual spatial reduction are the library's ragged ops. The stem trunk (three 3x3 convs) does not depend on the
architecture, so it runs once for the whole batch with stock modules (channels-last); only the 7x7/s7 projection's
output width varies, and it runs as a ragged linear over im2col'd patches (kernel = stride, so im2col is a pure
reshape-copy of the trunk output with K = 24 * 49 = 1176). A conv at maximum width followed by a mask would waste
(C_max - c_g) / C_max of that GEMM and break "work proportional to the sub-networks"; the im2col copy costs one pass
over the trunk output.

The architecture is data. In ragged mode the sampled architectures reach the ops as ONE int32 tensor (rows x G,
`encode_archs`; the row layout, `arch_layout`, is fixed by the model's maximum architecture): every op's per-group
widths are a row view of it (device metadata, see resnas_kernels/ragged.py), and the removed blocks' row scales and
the cls / pos-embed masks are gathered from it on the device. Only the group sizes are host ints. Nothing reads the
tensor's values on the host, so `torch.compile` of a step taking `forward(x, group_sizes=..., arch_tensor=...)`
compiles once per group sizes, and a captured CUDA graph replays for any architecture written into the tensor
(`resnas_kernels.cuda_graph`). `forward(x, archs, group_sizes)` takes the same path through a cached tensor per
(archs, device). The masked and loop modes keep host metadata (they are the oracle and the peers).

Removed blocks: the group's LayerNorm, qkv, attention and fc1 widths are 0 (the ops skip it); proj and fc2 get input
width 0 and output width c_g with the residual epilogue and a row scale of 0 for the group's samples, so the op
writes out = residual + 0 * act(bias) = x on exactly the group's c_g columns. (Output width 0 would not do: the
contract makes columns beyond n_g zero even with a residual, which would erase the group's activations.)

Autocast: under torch.autocast (e.g. "cpu", bfloat16) the stem's convs return the autocast dtype and the ragged path
keeps its activations in it end to end (the residual stream too: the fused residual epilogues take one dtype); the
fp32 master weights of the ragged GEMMs are cast per forward (`_cast`), LayerNorm statistics and all accumulations
stay fp32 inside the ops, and parameter gradients come back fp32. The masked and loop paths use stock ops, which
autocast casts itself (their residual stream stays fp32).

Also here: `extract(arch)` (a standalone stock network with copied slices), `sliced_state_dict(arch)` (differentiable
slices; q, k, v sliced separately), `sort_by_importance(optimizer)` (rewiring, with the AdamW state permuted), and
`stem_tokens(x)` / `forward_from_stem(tokens, archs, sizes)` (a search caches the full-width stem once per image).
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from resnas_kernels import ops as rk
from resnas_kernels.ragged import Ragged
from resnas_kernels.ragged import _is_fake, sample_group_index, validate_metadata
from resnas_kernels.reference import (masked_attention, masked_layer_norm, masked_linear,
                                      masked_residual_spatial_reduction)

from .space import Arch, SearchSpace, get_space
from .subnet import LN_EPS, ViTResNASNet

__all__ = ["ViTResNAS", "MODES"]

MODES = ("ragged", "masked", "loop")
_LOOP_CACHE = 64  # sub-network skeletons kept for mode="loop" (parameter-less, on the meta device)


# ---------------------------------------------------------------------------------------------------------------------
# The architecture as data: one int32 tensor (rows x G) of every op's per-group widths
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _BlockRows:
    """Row indices of one block slot in the architecture tensor."""
    keep: int                  # 1 where the block exists, 0 where removed
    active: int                # c_g, or 0 where removed: LN1/LN2, qkv and fc1 inputs
    heads: int                 # h_g (0 where removed): attention
    attn: int                  # h_g * d: qkv output per segment, proj input
    hidden: int                # m_g (0 where removed): fc1 output, fc2 input


@dataclass(frozen=True)
class ArchLayout:
    """Where each op's widths live in the architecture tensor, and the static bound of every row.

    Only host facts of the model (its maximum architecture, the stem's im2col width, the classifier width) fix the
    layout; the sampled architectures are the tensor's values. Row r of the tensor holds one op's per-group widths, so
    `arch_tensor[r]` is a contiguous (G,) int32 view that an op takes as its widths. The two constant rows (the stem
    projection's input width and the classifier's output width) keep every op on device metadata."""
    stem_in: int
    head_out: int
    embed: Tuple[int, ...]                          # per stage: c_g
    blocks: Tuple[Tuple[_BlockRows, ...], ...]      # per stage, per block slot
    bounds: Tuple[int, ...]                         # per row: the largest valid value (0 <= value <= bound)

    @property
    def num_rows(self) -> int:
        return len(self.bounds)


def _arch_layout(arch: Arch, stem_in: int, num_classes: int) -> ArchLayout:
    bounds = [stem_in, num_classes]

    def row(bound: int) -> int:
        bounds.append(bound)
        return len(bounds) - 1

    embed, blocks = [], []
    for st in arch.stages:
        embed.append(row(st.embed))
        blocks.append(tuple(_BlockRows(keep=row(1), active=row(st.embed), heads=row(b.heads),
                                       attn=row(b.heads * st.head_dim), hidden=row(b.mlp)) for b in st.blocks))
    return ArchLayout(0, 1, tuple(embed), tuple(blocks), tuple(bounds))


def _encode(layout: ArchLayout, archs: Tuple[Arch, ...]) -> List[List[int]]:
    """The architecture tensor's values (rows x G) as host ints; archs are already checked against the model."""
    rows = [[0] * len(archs) for _ in layout.bounds]
    for g, a in enumerate(archs):
        rows[layout.stem_in][g] = layout.bounds[layout.stem_in]
        rows[layout.head_out][g] = layout.bounds[layout.head_out]
        for s, st in enumerate(a.stages):
            rows[layout.embed[s]][g] = st.embed
            for r, blk in zip(layout.blocks[s], st.blocks):
                if blk is not None:  # a removed block keeps 0 everywhere (the ops skip it)
                    rows[r.keep][g], rows[r.active][g] = 1, st.embed
                    rows[r.heads][g], rows[r.attn][g], rows[r.hidden][g] = blk.heads, blk.heads * st.head_dim, blk.mlp
    return rows


@dataclass(frozen=True)
class _BlockPlan:
    index: int                 # the block's row in _ArchPlan.keep (blocks numbered over all stages)
    active: Ragged
    heads: Ragged
    attn: Ragged
    hidden: Ragged
    out: Ragged                # c_g for every group: proj / fc2 output (removed groups carry their residual)


@dataclass(frozen=True)
class _StagePlan:
    embed: Ragged              # c_g of the stage
    blocks: Tuple[_BlockPlan, ...]


@dataclass(frozen=True)
class _ArchPlan:
    """Every op's metadata for one forward: Ragged views of the architecture tensor's rows (device metadata)."""
    sizes: Tuple[int, ...]
    stem_in: Ragged
    head_out: Ragged
    stages: Tuple[_StagePlan, ...]
    keep: torch.Tensor         # (blocks, B) fp32: 1 where the sample's block exists (the residual branches' scale)


def _arch_plan(layout: ArchLayout, arch_tensor: torch.Tensor, sizes: Tuple[int, ...]) -> _ArchPlan:
    """Ragged views of the tensor's rows: no value is read, so this traces into a compiled graph as views of the
    tensor input, and a captured graph sees whatever is written into the tensor before its replay."""
    def rows(r: int) -> Ragged:
        return Ragged(sizes, arch_tensor[r])

    stages, keep_rows = [], []
    for s, block_rows in enumerate(layout.blocks):
        embed = rows(layout.embed[s])
        blocks = []
        for r in block_rows:
            blocks.append(_BlockPlan(index=len(keep_rows), active=rows(r.active), heads=rows(r.heads),
                                     attn=rows(r.attn), hidden=rows(r.hidden), out=embed))
            keep_rows.append(r.keep)
        stages.append(_StagePlan(embed, tuple(blocks)))
    # Every block's presence spread over the batch in one gather (cached with the plan on the eager path).
    keep = arch_tensor[keep_rows][:, sample_group_index(sizes, arch_tensor.device)].float()
    return _ArchPlan(sizes, rows(layout.stem_in), rows(layout.head_out), tuple(stages), keep)


@functools.lru_cache(maxsize=256)
def _cached_arch_plan(layout: ArchLayout, archs: Tuple[Arch, ...], sizes: Tuple[int, ...], device: str) -> _ArchPlan:
    """The eager `forward(x, archs, group_sizes)` path: one architecture tensor per distinct (archs, device), copied
    once, so steady-state eager steps copy nothing to the device."""
    return _arch_plan(layout, _cached_arch_tensor(layout, archs, device), sizes)


@functools.lru_cache(maxsize=256)
def _cached_arch_tensor(layout: ArchLayout, archs: Tuple[Arch, ...], device: str) -> torch.Tensor:
    return torch.tensor(_encode(layout, archs), dtype=torch.int32).to(device)


# ---------------------------------------------------------------------------------------------------------------------
# Host metadata of the masked path (the original code's formulation keeps host masks)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _HostBlockPlan:
    keep: Tuple[bool, ...]     # per group: does the block exist
    active: Ragged             # c_g, or 0 where removed: LN1/LN2, qkv and fc1 inputs
    heads: Ragged              # h_g (0 where removed): attention
    attn: Ragged               # h_g * d: qkv output per segment, proj input
    hidden: Ragged             # m_g: fc1 output, fc2 input
    out: Tuple[int, ...]       # c_g for every group: proj / fc2 output (removed groups carry their residual)


@dataclass(frozen=True)
class _HostStagePlan:
    embed: Ragged              # c_g of the stage
    blocks: Tuple[_HostBlockPlan, ...]


@dataclass(frozen=True)
class _Plan:
    archs: Tuple[Arch, ...]
    sizes: Tuple[int, ...]
    stages: Tuple[_HostStagePlan, ...]


@functools.lru_cache(maxsize=256)
def _plan(archs: Tuple[Arch, ...], sizes: Tuple[int, ...]) -> _Plan:
    stages = []
    for s in range(archs[0].num_stages):
        st = [a.stages[s] for a in archs]
        embed = Ragged(sizes, tuple(x.embed for x in st))
        blocks = []
        for i in range(len(st[0].blocks)):
            b = [x.blocks[i] for x in st]
            keep = tuple(x is not None for x in b)
            width = lambda f: Ragged(sizes, tuple(f(x, blk) if blk is not None else 0  # noqa: E731
                                                  for x, blk in zip(st, b)))
            blocks.append(_HostBlockPlan(
                keep=keep, active=width(lambda x, blk: x.embed), heads=width(lambda x, blk: blk.heads),
                attn=width(lambda x, blk: blk.heads * x.head_dim), hidden=width(lambda x, blk: blk.mlp),
                out=embed.widths))
        stages.append(_HostStagePlan(embed, tuple(blocks)))
    return _Plan(tuple(archs), sizes, tuple(stages))


@functools.lru_cache(maxsize=512)
def _group_rows(sizes: Tuple[int, ...], rows: Tuple[Tuple[float, ...], ...], device: str,
                dtype: torch.dtype) -> torch.Tensor:
    """(len(rows), B) tensor with rows[r][g] on group g's samples, cached so steady-state forwards copy nothing to
    the device."""
    return torch.tensor([[v for s, v in zip(sizes, row) for _ in range(s)] for row in rows], dtype=dtype).to(device)


@functools.lru_cache(maxsize=512)
def _mask(groups: Ragged, width: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, width) 0/1 mask of the first w_g columns (the original ChannelDrop mask), cached."""
    return groups.mask(width, device=device, dtype=dtype)[:, None, :]


def _cast(layer: nn.Module, dtype: torch.dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight, bias) of a linear / conv in the activations' dtype. The ragged GEMMs want x's dtype, so under autocast
    (bf16 activations from the stem's convs) the fp32 master weights are cast per forward, as autocast casts them
    for F.linear; the cast is differentiable, so gradients reach the fp32 parameters. A no-op without autocast."""
    weight, bias = layer.weight, layer.bias
    # Tensor.to returns the same tensor for the same dtype, but through a dispatcher call: skip it (hot path).
    if weight.dtype != dtype:
        weight = weight.to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    return weight, bias


def _keep_probs(rates: Tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(blocks, 1, 1) keep probabilities 1 - rate of every block's stochastic depth, in fp32 (fp64 for fp64 models),
    so low-precision activations do not round the probability. Cached on the eager path (no host-to-device copy
    per step); traced as a graph constant under torch.compile."""
    dtype = torch.promote_types(dtype, torch.float32)
    if torch.compiler.is_compiling():
        return _keep_probs_tensor(rates, str(device), dtype)
    return _cached_keep_probs(rates, str(device), dtype)


def _keep_probs_tensor(rates: Tuple[float, ...], device: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([1.0 - r for r in rates], dtype=dtype).view(-1, 1, 1).to(device)


_cached_keep_probs = functools.lru_cache(maxsize=64)(_keep_probs_tensor)


def _branch_scales(keep: torch.Tensor, rates: Tuple[float, ...], training: bool
                   ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per block, the per-sample row scales of its two residual branches (attention, MLP): the block's 0/1 presence
    (keep, (blocks, B): 0 on removed groups' samples), times the stochastic-depth scale (keep mask / keep prob, as
    timm's DropPath) in training. Every branch's mask is drawn in one call for the whole forward, not one per
    branch: a small supernet step is bound by such host calls. The ragged and masked paths both draw here, so they
    see the same masks for the same seed."""
    if not (training and any(rate > 0 for rate in rates)):
        return [(row, row) for row in keep.unbind(0)]
    blocks, batch = keep.shape
    keep_prob = _keep_probs(rates, keep.device, keep.dtype)
    scales = keep.new_empty((blocks, 2, batch)).bernoulli_(keep_prob).div_(keep_prob).mul_(keep.unsqueeze(1))
    rows = scales.view(2 * blocks, batch).unbind(0)
    return list(zip(rows[0::2], rows[1::2]))


# ---------------------------------------------------------------------------------------------------------------------
# The supernet
# ---------------------------------------------------------------------------------------------------------------------
class ViTResNAS(ViTResNASNet):
    """ViT-ResNAS supernet (or a single searched network, which is the one-architecture case) on the ragged ops.

    Args:
        arch: the maximum architecture, whose weights the model holds (every slot present). Default: space.max_arch().
        space: optional `SearchSpace` (or its name, "tiny" / "small"); when given, `forward` accepts only its archs.
        Other arguments as `ViTResNASNet`.
    """

    def __init__(self, arch: Optional[Arch] = None, space: Union[SearchSpace, str, None] = None, **kwargs):
        if isinstance(space, str):
            space = get_space(space)
        if arch is None:
            if space is None:
                raise ValueError("give arch (the maximum architecture) or space (a SearchSpace or its name)")
            arch = space.max_arch()
        if not isinstance(arch, Arch):
            raise TypeError(f"arch must be an Arch, got {type(arch).__name__}")
        if any(b is None for st in arch.stages for b in st.blocks):
            raise ValueError("the supernet's arch must have every block slot present (it holds the weights of all "
                             "of them); pass arch.pruned() for a standalone network")
        if space is not None:
            why = space.max_arch().fits_in(arch)
            if why is not None:
                raise ValueError(f"arch cannot hold every architecture of the {space.name} space: {why}")
        super().__init__(arch, **kwargs)
        self.space = space
        self._loop_nets: "OrderedDict[Arch, ViTResNASNet]" = OrderedDict()  # LRU of meta skeletons for mode="loop"
        self._arch_layout_cache = None
        self._refresh_arch_layout()  # here, so a compiled forward only reads it (setting it while tracing recompiles)

    # -- arguments ----------------------------------------------------------------------------------------------------
    def _resolve(self, x: torch.Tensor, archs, group_sizes) -> Tuple[Tuple[Arch, ...], Tuple[int, ...]]:
        self.check_input(x)
        return self._resolve_groups(x.shape[0], archs, group_sizes)

    def _resolve_groups(self, batch: int, archs, group_sizes) -> Tuple[Tuple[Arch, ...], Tuple[int, ...]]:
        if batch == 0:
            raise ValueError("x must hold at least one sample")
        if archs is None:
            archs = (self.arch,)
        elif isinstance(archs, Arch):
            archs = (archs,)
        archs = tuple(archs)
        if not archs:
            raise ValueError("archs must name at least one architecture")
        if group_sizes is None:
            if len(archs) != 1:
                raise ValueError(f"group_sizes is required with {len(archs)} archs (one contiguous group of the batch "
                                 f"per arch)")
            group_sizes = (batch,)
        sizes = tuple(group_sizes)
        for g, size in enumerate(sizes):
            if isinstance(size, bool) or not hasattr(size, "__index__") or int(size) < 0:
                raise ValueError(f"group_sizes[{g}] must be an int >= 0, got {size!r}")
        sizes = tuple(int(size) for size in sizes)
        if len(sizes) != len(archs):
            raise ValueError(f"group_sizes has {len(sizes)} entries but archs has {len(archs)}; give one group size "
                             f"per arch")
        if sum(sizes) != batch:
            raise ValueError(f"group_sizes {sizes} sum to {sum(sizes)}, but x holds {batch} samples")
        self._check_archs(archs)
        return archs, sizes

    def _check_archs(self, archs: Tuple[Arch, ...]) -> None:
        for g, arch in enumerate(archs):
            if not isinstance(arch, Arch):
                raise TypeError(f"archs[{g}] must be an Arch, got {type(arch).__name__}")
            if self.space is not None:
                self.space.check(arch, f"archs[{g}]")
            why = arch.fits_in(self.arch)
            if why is not None:
                raise ValueError(f"archs[{g}] is not a sub-network of this model: {why}")

    # -- the architecture as a tensor ---------------------------------------------------------------------------------
    @property
    def arch_layout(self) -> ArchLayout:
        """Row layout of this model's architecture tensors (fixed by the maximum architecture and the classifier)."""
        return self._refresh_arch_layout()

    def _refresh_arch_layout(self) -> ArchLayout:
        num_classes = self.head.out_features if isinstance(self.head, nn.Linear) else 0
        stem_in = self.stem.proj.in_channels * self.stem.proj.kernel_size[0] * self.stem.proj.kernel_size[1]
        key = (stem_in, num_classes)
        if self._arch_layout_cache is None or self._arch_layout_cache[0] != key:  # reset_classifier changes it
            self._arch_layout_cache = (key, _arch_layout(self.arch, stem_in, num_classes))
        return self._arch_layout_cache[1]

    def encode_archs(self, archs: Union[Arch, Sequence[Arch]], device=None) -> torch.Tensor:
        """The sampled architectures as ONE int32 tensor of shape (arch_layout.num_rows, G): row r holds one op's
        per-group widths (embedding widths, 0/1 block presence, widths of removed blocks' ops 0, head counts,
        attention and MLP widths), column g describes archs[g]. Pass it as `forward(x, group_sizes=...,
        arch_tensor=...)`: the ragged path then derives every op's metadata, the row scales of removed blocks and the
        masks from the tensor with device ops, so a compiled or captured step serves any architecture by a new tensor
        value (same G). Group sizes stay host ints (they fix shapes). A new tensor (on `device`, default CPU) per call."""
        if isinstance(archs, Arch):
            archs = (archs,)
        archs = tuple(archs)
        if not archs:
            raise ValueError("archs must name at least one architecture")
        self._check_archs(archs)
        return torch.tensor(_encode(self.arch_layout, archs), dtype=torch.int32, device=device)

    def check_arch_tensor(self, arch_tensor: torch.Tensor, num_groups: int, device: torch.device) -> None:
        """Dtype, shape and device of an architecture tensor; its values against the layout's bounds when that costs
        no device sync (a CPU tensor, outside tracing) or with `resnas_kernels.set_validate_metadata(True)`. The ops
        clamp every width to its static bound anyway, so no value reaches memory outside the tensors."""
        layout = self.arch_layout
        if not isinstance(arch_tensor, torch.Tensor):
            raise TypeError(f"arch_tensor must be a torch.Tensor (from encode_archs), got {type(arch_tensor).__name__}")
        if arch_tensor.dtype != torch.int32:
            raise TypeError(f"arch_tensor must be an int32 tensor (from encode_archs), got dtype {arch_tensor.dtype}")
        if tuple(arch_tensor.shape) != (layout.num_rows, num_groups):
            raise ValueError(f"arch_tensor must have shape ({layout.num_rows}, {num_groups}) (rows of this model's "
                             f"arch_layout x one column per group), got {tuple(arch_tensor.shape)}")
        if arch_tensor.device != torch.device(device):
            raise ValueError(f"arch_tensor must be on the device of x ({device}), got {arch_tensor.device}")
        if not arch_tensor.is_contiguous():
            raise ValueError("arch_tensor must be contiguous (each row is an op's widths view)")
        if torch.compiler.is_compiling() or _is_fake(arch_tensor):
            return
        if arch_tensor.device.type == "cpu" or validate_metadata():
            bounds = torch.tensor(layout.bounds, dtype=torch.int32, device=arch_tensor.device)[:, None]
            bad = ((arch_tensor < 0) | (arch_tensor > bounds)).nonzero()
            if bad.numel():
                r, g = bad[0].tolist()
                raise ValueError(f"arch_tensor[{r}, {g}]={arch_tensor[r, g].item()} must lie in [0, "
                                 f"{layout.bounds[r]}] (the bound of row {r} of arch_layout)")

    def _ragged_plan(self, batch: int, device: torch.device, archs, group_sizes,
                     arch_tensor: Optional[torch.Tensor]) -> _ArchPlan:
        """The per-forward metadata: from `arch_tensor` (views, nothing read), else from `archs` through a cached
        architecture tensor."""
        if arch_tensor is None:
            archs, sizes = self._resolve_groups(batch, archs, group_sizes)
            return _cached_arch_plan(self.arch_layout, archs, sizes, str(device))
        if archs is not None:
            raise ValueError("give either archs or arch_tensor, not both")
        if batch == 0:
            raise ValueError("x must hold at least one sample")
        num_groups = arch_tensor.shape[1] if isinstance(arch_tensor, torch.Tensor) and arch_tensor.dim() == 2 else 1
        if group_sizes is None:
            if num_groups != 1:
                raise ValueError(f"group_sizes is required with an arch_tensor of {num_groups} groups")
            group_sizes = (batch,)
        sizes = tuple(group_sizes)
        for g, size in enumerate(sizes):
            if isinstance(size, bool) or not hasattr(size, "__index__") or int(size) < 0:
                raise ValueError(f"group_sizes[{g}] must be an int >= 0, got {size!r}")
        sizes = tuple(int(size) for size in sizes)
        if sum(sizes) != batch:
            raise ValueError(f"group_sizes {sizes} sum to {sum(sizes)}, but x holds {batch} samples")
        self.check_arch_tensor(arch_tensor, len(sizes), device)
        return _arch_plan(self.arch_layout, arch_tensor, sizes)

    # -- ragged path ---------------------------------------------------------------------------------------------------
    def _block_drop_path_rates(self) -> Tuple[float, ...]:
        return tuple(block.drop_path_rate for stage in self.stages for block in stage.blocks)

    def _ragged_block(self, block: nn.Module, p: _BlockPlan, attn_scale: torch.Tensor, mlp_scale: torch.Tensor,
                      x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        attn, mlp = block.attn, block.mlp
        dt = x.dtype  # LN weights stay fp32 (the op takes them as they are; statistics are fp32 anyway)
        u = rk.ragged_layer_norm(x, block.norm1.weight, block.norm1.bias, p.active, LN_EPS)
        qkv = rk.ragged_linear(u, *_cast(attn.qkv, dt), p.active, p.attn, segments=3)
        q, k, v = qkv.view(b, n, 3, attn.num_heads, attn.head_dim).unbind(2)  # strided views, no copy
        a = rk.ragged_attention(q, k, v, p.heads, scale=attn.head_dim ** -0.5)
        x = rk.ragged_linear(a, *_cast(attn.proj, dt), p.attn, p.out, residual=x, row_scale=attn_scale)
        u = rk.ragged_layer_norm(x, block.norm2.weight, block.norm2.bias, p.active, LN_EPS)
        h = rk.ragged_linear(u, *_cast(mlp.fc1, dt), p.active, p.hidden, activation="gelu")
        return rk.ragged_linear(h, *_cast(mlp.fc2, dt), p.hidden, p.out, residual=x, row_scale=mlp_scale)

    def _ragged_stem(self, x: torch.Tensor, patch_groups: Ragged, embed: Ragged) -> torch.Tensor:
        """Image -> patch tokens (B, HW, C1_max), group g's zero beyond c1_g. `patch_groups` has the im2col width
        (the projection's input) for every group."""
        patches = self.stem.patches(self.stem.trunk(x))                     # shared trunk, then im2col
        proj = self.stem.proj
        w, bias = _cast(proj, patches.dtype)  # under autocast the trunk's convs already returned its dtype
        return rk.ragged_linear(patches, self.stem.proj_matrix(w), bias, patch_groups, embed)

    def _ragged_stages(self, tokens: torch.Tensor, plan: _ArchPlan) -> torch.Tensor:
        """Stem patch tokens -> stage-3 tokens (B, 1 + HW, C_max) before the final norm."""
        return self._ragged_stage_outputs(tokens, plan, len(self.stages))[-1]

    def _ragged_stage_outputs(self, tokens: torch.Tensor, plan: _ArchPlan, num_stages: int) -> List[torch.Tensor]:
        """Stem patch tokens -> the tokens after each of the first `num_stages` stages (group g zero beyond c_g)."""
        embed = plan.stages[0].embed
        # cls token and pos-embed, masked to each group's width (the ragged contract: zeros beyond c_g).
        start = torch.cat([self.cls_token + self.pos_embed[:, :1], self.pos_embed[:, 1:]], dim=1).to(tokens.dtype)
        x = torch.addcmul(F.pad(tokens, (0, 0, 1, 0)), start,
                          embed.mask(tokens.shape[-1], tokens.device, tokens.dtype)[:, None, :])
        keep = plan.keep if plan.keep.dtype == tokens.dtype else plan.keep.to(tokens.dtype)  # (blocks, B)
        scales = _branch_scales(keep, self._block_drop_path_rates(), self.training)
        outs = []
        for s, stage in enumerate(self.stages[:num_stages]):
            sp = plan.stages[s]
            if stage.reduce is not None:
                r = stage.reduce
                x = rk.residual_spatial_reduction(
                    x, plan.stages[s - 1].embed, sp.embed, r.norm.weight, r.norm.bias, r.conv.weight,
                    r.conv.bias, r.pos_embed, r.cls_proj.weight, r.cls_proj.bias,
                    grid=(self.grids[s - 1], self.grids[s - 1]), eps=LN_EPS)
            for block, bp in zip(stage.blocks, sp.blocks):
                x = self._run_block(functools.partial(self._ragged_block, block, bp, *scales[bp.index]), x)
            outs.append(x)
        return outs

    def _stage_outputs(self, x: torch.Tensor, num_stages: int, archs: Union[Arch, Sequence[Arch], None] = None,
                       group_sizes: Optional[Sequence[int]] = None, arch_tensor: Optional[torch.Tensor] = None
                       ) -> Tuple[List[torch.Tensor], Callable]:
        """The ragged path's per-stage tokens (for forward_intermediates), for archs / group_sizes as in forward."""
        self.check_input(x)
        plan = self._ragged_plan(x.shape[0], x.device, archs, group_sizes, arch_tensor)
        outs = self._ragged_stage_outputs(self._ragged_stem(x, plan.stem_in, plan.stages[0].embed), plan, num_stages)
        groups = plan.stages[len(self.stages) - 1].embed

        def final_norm(t: torch.Tensor) -> torch.Tensor:
            if isinstance(self.norm, nn.Identity):  # pruned by timm's feature extraction
                return t
            return rk.ragged_layer_norm(t, self.norm.weight, self.norm.bias, groups, LN_EPS)
        return outs, final_norm

    def _ragged_tokens(self, x: torch.Tensor, plan: Union[_ArchPlan, _Plan]) -> torch.Tensor:
        if isinstance(plan, _Plan):  # host metadata (tests, the masked path's plan): its cached tensor form
            plan = _cached_arch_plan(self.arch_layout, plan.archs, plan.sizes, str(x.device))
        return self._ragged_stages(self._ragged_stem(x, plan.stem_in, plan.stages[0].embed), plan)

    def _ragged_output(self, tokens: torch.Tensor, plan: _ArchPlan):
        """Stage-3 tokens -> what `forward` returns (final LN on the cls token only, unless all tokens are needed)."""
        last = plan.stages[-1].embed
        if self.training and self.patch_head is not None:
            feats = rk.ragged_layer_norm(tokens, self.norm.weight, self.norm.bias, last, LN_EPS)
            return (self._ragged_head(feats[:, 0].contiguous(), plan, self.head),
                    self._ragged_head(feats[:, 1:].contiguous(), plan, self.patch_head))
        if self.global_pool != "token":  # unpooled features (reset_classifier(0, ''))
            return self.forward_head(rk.ragged_layer_norm(tokens, self.norm.weight, self.norm.bias, last, LN_EPS))
        cls = rk.ragged_layer_norm(tokens[:, :1].contiguous(), self.norm.weight, self.norm.bias, last, LN_EPS)
        if self.num_classes == 0:
            return cls[:, 0]
        return self._ragged_head(cls[:, 0].contiguous(), plan, self.head)

    def _ragged_head(self, feats: torch.Tensor, plan: _ArchPlan, head: nn.Linear) -> torch.Tensor:
        return rk.ragged_linear(feats, *_cast(head, feats.dtype), plan.stages[-1].embed, plan.head_out)

    # -- masked path (the original code's semantics) ----------------------------------------------------------------
    def _masked_block(self, block: nn.Module, p: _HostBlockPlan, em: torch.Tensor, attn_scale: torch.Tensor,
                      mlp_scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        attn, mlp = block.attn, block.mlp
        dev, dt = str(x.device), x.dtype
        attn_mask = _mask(p.attn, attn.qkv.out_features // 3, dev, dt)
        head_mask = _mask(p.heads, attn.num_heads, dev, dt)[:, 0]
        hidden_mask = _mask(p.hidden, mlp.fc1.out_features, dev, dt)
        u = masked_layer_norm(x, block.norm1.weight, block.norm1.bias, em, LN_EPS)
        q, k, v = F.linear(u, attn.qkv.weight, attn.qkv.bias).view(b, n, 3, attn.num_heads, attn.head_dim).unbind(2)
        a = masked_attention(q, k, v, head_mask, scale=attn.head_dim ** -0.5)
        x = masked_linear(a, attn.proj.weight, attn.proj.bias, attn_mask, em, residual=x, row_scale=attn_scale)
        u = masked_layer_norm(x, block.norm2.weight, block.norm2.bias, em, LN_EPS)
        h = masked_linear(u, mlp.fc1.weight, mlp.fc1.bias, em, hidden_mask, activation="gelu")
        return masked_linear(h, mlp.fc2.weight, mlp.fc2.bias, hidden_mask, em, residual=x, row_scale=mlp_scale)

    def _masked_tokens(self, x: torch.Tensor, plan: _Plan) -> Tuple[torch.Tensor, torch.Tensor]:
        dev, dt = str(x.device), x.dtype
        em = _mask(plan.stages[0].embed, self.arch.stages[0].embed, dev, dt)
        tokens = self.stem(x)                                                  # full-width projection
        x = (torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embed) * em
        # The original zeroes a removed block's branches with its layer mask (AND the embed mask): row scale 0.
        keep = _group_rows(plan.sizes, tuple(tuple(float(k) for k in bp.keep) for sp in plan.stages
                                             for bp in sp.blocks), dev, dt)
        scales = iter(_branch_scales(keep, self._block_drop_path_rates(), self.training))
        for s, stage in enumerate(self.stages):
            sp = plan.stages[s]
            if stage.reduce is not None:
                r = stage.reduce
                new_em = _mask(sp.embed, self.arch.stages[s].embed, dev, dt)
                x = masked_residual_spatial_reduction(
                    x, em, new_em, r.norm.weight, r.norm.bias, r.conv.weight, r.conv.bias, r.pos_embed,
                    r.cls_proj.weight, r.cls_proj.bias, grid=(self.grids[s - 1], self.grids[s - 1]), eps=LN_EPS)
                em = new_em
            for block, bp in zip(stage.blocks, sp.blocks):
                x = self._run_block(functools.partial(self._masked_block, block, bp, em, *next(scales)), x)
        return x, em

    # -- loop path (one stock sub-network per group) -----------------------------------------------------------------
    def _loop_net(self, arch: Arch) -> ViTResNASNet:
        """A parameter-less skeleton (meta device) of `arch`'s stock network, run with `functional_call`."""
        net = self._loop_nets.pop(arch, None)
        if net is None:
            with torch.device("meta"):
                net = self._subnet_shell(arch)
        self._loop_nets[arch] = net
        while len(self._loop_nets) > _LOOP_CACHE:
            self._loop_nets.popitem(last=False)
        net.train(self.training)
        net.set_grad_checkpointing(self.grad_checkpointing)
        return net

    def _forward_loop(self, x: torch.Tensor, archs: Tuple[Arch, ...], sizes: Tuple[int, ...]):
        outs, start = [], 0
        for arch, size in zip(archs, sizes):
            if size:
                outs.append(torch.func.functional_call(self._loop_net(arch), self.sliced_state_dict(arch),
                                                       (x[start:start + size],), strict=True))
            start += size
        if isinstance(outs[0], tuple):  # (logits, patch logits) in patch-output training
            return tuple(torch.cat(parts, dim=0) for parts in zip(*outs))
        return torch.cat(outs, dim=0)

    # -- public forward -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, archs: Union[Arch, Sequence[Arch], None] = None,
                group_sizes: Optional[Sequence[int]] = None, *, mode: str = "ragged",
                arch_tensor: Optional[torch.Tensor] = None):
        """Logits (B, num_classes); in training with patch_output, (logits, patch logits (B, HW, num_classes)).

        Args:
            x: (B, in_chans, img_size, img_size).
            archs: G architectures (each a first-k slice of this model's; in its space when it has one). None: the
                model's own architecture. A single Arch: the whole batch.
            group_sizes: G sizes summing to B; group g is samples [sum(sizes[:g]), sum(sizes[:g+1])). Sizes may be 0.
            mode: "ragged" | "masked" | "loop" (see the module docstring).
            arch_tensor: instead of archs (ragged mode only): `encode_archs(archs, x.device)`, the architectures as
                data. The forward reads none of its values on the host, so `torch.compile` of a step taking it as an
                input compiles once per group sizes, and a CUDA graph captured with it replays for any architecture
                written into it (`resnas_kernels.cuda_graph`). `forward(x, archs, ...)` runs the same path through a
                cached tensor per archs.
        """
        self.check_input(x)
        if arch_tensor is not None:
            if mode != "ragged":
                raise ValueError(f"arch_tensor needs mode='ragged' (the {mode!r} path takes archs), got mode={mode!r}")
            plan = self._ragged_plan(x.shape[0], x.device, archs, group_sizes, arch_tensor)
            return self._ragged_output(self._ragged_tokens(x, plan), plan)
        archs, sizes = self._resolve_groups(x.shape[0], archs, group_sizes)
        if mode == "loop":
            return self._forward_loop(x, archs, sizes)
        if mode == "ragged":
            plan = _cached_arch_plan(self.arch_layout, archs, sizes, str(x.device))
            return self._ragged_output(self._ragged_tokens(x, plan), plan)
        if mode == "masked":
            tokens, em = self._masked_tokens(x, _plan(archs, sizes))
            if self.training and self.patch_head is not None:
                feats = masked_layer_norm(tokens, self.norm.weight, self.norm.bias, em, LN_EPS)
                return self.head(feats[:, 0]), self.patch_head(feats[:, 1:])
            cls = masked_layer_norm(tokens[:, :1], self.norm.weight, self.norm.bias, em, LN_EPS)
            return self.head(cls[:, 0])
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def forward_features(self, x: torch.Tensor, archs: Union[Arch, Sequence[Arch], None] = None,
                         group_sizes: Optional[Sequence[int]] = None, *,
                         arch_tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Normalised stage-3 tokens (B, 1 + HW, C_max), zeros beyond each group's width (ragged path)."""
        self.check_input(x)
        plan = self._ragged_plan(x.shape[0], x.device, archs, group_sizes, arch_tensor)
        return rk.ragged_layer_norm(self._ragged_tokens(x, plan), self.norm.weight, self.norm.bias,
                                    plan.stages[-1].embed, LN_EPS)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self._ragged_tokens(x, self._ragged_plan(x.shape[0], x.device, None, None, None))

    def stem_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The stem's patch tokens at this model's full width (B, HW, C1_max). Every sub-network's stem output is the
        first c1 columns of it (first-k slicing), so a search can compute it once per image and reuse it for every
        candidate with `forward_from_stem` (vit_resnas.md 9.2 (h))."""
        self.check_input(x)
        plan = self._ragged_plan(x.shape[0], x.device, None, None, None)  # the model's own (widest) architecture
        return self._ragged_stem(x, plan.stem_in, plan.stages[0].embed)

    def forward_from_stem(self, tokens: torch.Tensor, archs: Union[Arch, Sequence[Arch], None] = None,
                          group_sizes: Optional[Sequence[int]] = None, *,
                          arch_tensor: Optional[torch.Tensor] = None):
        """`forward(x, archs, group_sizes)` (ragged mode) from `stem_tokens(x)`: each group keeps its first c1_g
        stem channels; the result equals the full forward up to the rounding of the stem GEMM."""
        expected = (self.grids[0] ** 2, self.arch.stages[0].embed)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tuple(tokens.shape[1:]) != expected:
            raise ValueError(f"tokens must be stem_tokens(x) of shape (B, {expected[0]}, {expected[1]}), got "
                             f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
        plan = self._ragged_plan(tokens.shape[0], tokens.device, archs, group_sizes, arch_tensor)
        embed = plan.stages[0].embed
        tokens = tokens * embed.mask(tokens.shape[-1], tokens.device, tokens.dtype)[:, None, :]
        return self._ragged_output(self._ragged_stages(tokens, plan), plan)

    # -- sub-networks ----------------------------------------------------------------------------------------------
    def _subnet_shell(self, arch: Arch) -> ViTResNASNet:
        """A stock network of `arch` (pruned), with this model's settings and the drop-path rates of its slots."""
        rates = [[blk.drop_path_rate for blk in stage.blocks] for stage in self.stages]
        kept_rates = [[r for r, b in zip(rates[s], st.blocks) if b is not None] for s, st in enumerate(arch.stages)]
        return ViTResNASNet(arch.pruned(), img_size=self.img_size, num_classes=self.num_classes,
                            in_chans=self.stem.conv1.conv.in_channels, drop_path_rates=kept_rates,
                            patch_output=self.patch_head is not None, global_pool=self.global_pool)

    def sliced_state_dict(self, arch: Arch) -> Dict[str, torch.Tensor]:
        """The state dict of `arch`'s standalone network (names as `ViTResNASNet(arch.pruned())`), as first-k slices
        of this model's tensors. Slices are views where possible and stay attached to autograd, so a forward through
        them (`functional_call`) sends gradients to the shared weights. q, k and v are sliced separately."""
        why = arch.fits_in(self.arch)
        if why is not None:
            raise ValueError(f"arch is not a sub-network of this model: {why}")
        own = dict(self.named_parameters())
        own.update(self.named_buffers())
        out: Dict[str, torch.Tensor] = {}
        c1 = arch.stages[0].embed
        for name, t in own.items():
            if name.startswith("stem.proj."):
                out[name] = t[:c1]
            elif name.startswith("stem."):
                out[name] = t
        out["cls_token"] = own["cls_token"][..., :c1]
        out["pos_embed"] = own["pos_embed"][..., :c1]
        for s, st in enumerate(arch.stages):
            c = st.embed
            if s > 0:
                ci, src = arch.stages[s - 1].embed, f"stages.{s}.reduce."
                for name, index in (("norm.weight", (slice(ci),)), ("norm.bias", (slice(ci),)),
                                    ("conv.weight", (slice(c), slice(ci))), ("conv.bias", (slice(c),)),
                                    ("cls_proj.weight", (slice(c), slice(ci))), ("cls_proj.bias", (slice(c),)),
                                    ("pos_embed", (Ellipsis, slice(c)))):
                    out[src + name] = own[src + name][index]
            k = 0
            for i, b in enumerate(st.blocks):
                if b is None:
                    continue
                src, dst = f"stages.{s}.blocks.{i}.", f"stages.{s}.blocks.{k}."
                k += 1
                hd, m = b.heads * st.head_dim, b.mlp
                heads_max = self.arch.stages[s].blocks[i].heads
                qkv_w = own[src + "attn.qkv.weight"].view(3, heads_max * st.head_dim, -1)
                qkv_b = own[src + "attn.qkv.bias"].view(3, heads_max * st.head_dim)
                for norm in ("norm1", "norm2"):
                    out[dst + norm + ".weight"] = own[src + norm + ".weight"][:c]
                    out[dst + norm + ".bias"] = own[src + norm + ".bias"][:c]
                out[dst + "attn.qkv.weight"] = qkv_w[:, :hd, :c].reshape(3 * hd, c)
                out[dst + "attn.qkv.bias"] = qkv_b[:, :hd].reshape(3 * hd)
                out[dst + "attn.proj.weight"] = own[src + "attn.proj.weight"][:c, :hd]
                out[dst + "attn.proj.bias"] = own[src + "attn.proj.bias"][:c]
                out[dst + "mlp.fc1.weight"] = own[src + "mlp.fc1.weight"][:m, :c]
                out[dst + "mlp.fc1.bias"] = own[src + "mlp.fc1.bias"][:m]
                out[dst + "mlp.fc2.weight"] = own[src + "mlp.fc2.weight"][:c, :m]
                out[dst + "mlp.fc2.bias"] = own[src + "mlp.fc2.bias"][:c]
        c_last = arch.stages[-1].embed
        out["norm.weight"], out["norm.bias"] = own["norm.weight"][:c_last], own["norm.bias"][:c_last]
        for head in ("head", "patch_head"):
            if head + ".weight" in own:
                out[head + ".weight"] = own[head + ".weight"][:, :c_last]
                out[head + ".bias"] = own[head + ".bias"]
        return out

    def extract(self, arch: Arch) -> ViTResNASNet:
        """A standalone stock network of `arch` (removed blocks dropped) holding copies of its weight slices; its
        output equals this model's output for `arch`. Same device, dtype and train/eval mode as this model."""
        if self.space is not None:
            self.space.check(arch)
        with torch.device("meta"):
            net = self._subnet_shell(arch)
        state = {k: v.detach().clone() for k, v in self.sliced_state_dict(arch).items()}
        net.load_state_dict(state, strict=True, assign=True)
        return net.train(self.training)

    # -- importance sorting ("rewiring", vit_resnas.md 4.4) -----------------------------------------------------------
    @torch.no_grad()
    def sort_by_importance(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Re-order every block's heads and MLP hidden units by descending L1 importance, so that first-k slices keep
        the most important ones. The full network's function is unchanged (a permutation of heads / hidden units).

        Head importance: L1 of its q, k and v rows of the qkv weight + L1 of those bias entries + L1 of its proj
        columns. Hidden-unit importance: L1 of its fc1 row + |fc1 bias| + L1 of its fc2 column. Embedding channels
        are never sorted. Unlike the original, `optimizer`'s per-parameter state (AdamW's exp_avg, exp_avg_sq, ...:
        every state tensor shaped like its parameter) and any accumulated .grad are permuted with the weights, so
        the moments stay attached to the units they were measured on.
        """
        for stage in self.stages:
            for block in stage.blocks:
                attn, mlp = block.attn, block.mlp
                h, d = attn.num_heads, attn.head_dim
                score = (attn.qkv.weight.abs().sum(1).view(3, h, d).sum((0, 2))
                         + attn.qkv.bias.abs().view(3, h, d).sum((0, 2))
                         + attn.proj.weight.abs().sum(0).view(h, d).sum(1))
                order = torch.sort(score, descending=True, stable=True).indices
                rows = (order[None, :, None] * d + torch.arange(d, device=order.device)[None, None, :]
                        + torch.arange(3, device=order.device)[:, None, None] * h * d).reshape(-1)
                cols = (order[:, None] * d + torch.arange(d, device=order.device)[None, :]).reshape(-1)
                _permute(attn.qkv.weight, 0, rows, optimizer)
                _permute(attn.qkv.bias, 0, rows, optimizer)
                _permute(attn.proj.weight, 1, cols, optimizer)

                score = mlp.fc1.weight.abs().sum(1) + mlp.fc1.bias.abs() + mlp.fc2.weight.abs().sum(0)
                order = torch.sort(score, descending=True, stable=True).indices
                _permute(mlp.fc1.weight, 0, order, optimizer)
                _permute(mlp.fc1.bias, 0, order, optimizer)
                _permute(mlp.fc2.weight, 1, order, optimizer)


def _permute(param: nn.Parameter, dim: int, index: torch.Tensor, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """param[...] = param.index_select(dim, index) in place (the optimizer keys on the Parameter object), and the same
    for its gradient and for every optimizer state tensor of the parameter's shape."""
    tensors = [param.data]
    if param.grad is not None:
        tensors.append(param.grad)
    if optimizer is not None:
        state = optimizer.state.get(param, {})
        tensors += [t for t in state.values() if isinstance(t, torch.Tensor) and t.shape == param.shape]
    for t in tensors:
        t.copy_(t.index_select(dim, index.to(t.device)))
