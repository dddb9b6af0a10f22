"""ViT-ResNAS architectures and search spaces, as data (vit_resnas.md sections 1, 4 and 6).

An `Arch` fully describes one network: per stage, the embedding width, the head dim and a tuple of block slots, each
either `BlockArch(heads, mlp)` or `None` (a removed block: identity, no parameters, no compute). The same object
describes a sub-network of a supernet (slots aligned with the supernet's, removed slots as None) and a standalone
network (`arch.pruned()` drops the None slots, as the original README tells you to do before retraining).

A `SearchSpace` is the table of choices of vit_resnas.md section 4.2; `TINY_SPACE` and `SMALL_SPACE` are the original
`sr_tiny_mh` and `sr_small_mh`, `DEMO_SPACE` a CPU-sized copy of the first; `SPACES` / `get_space` is the one registry
of named spaces, `space_to_dict` / `space_from_dict` the form checkpoints record them in. Sampling follows the original supernet training: every "layer" (a stage's embedding
width, a block's heads, a block's MLP width, a removable block's keep/drop) draws its choices for the G groups of one
step *without replacement* from the enabled choice list (tiled when G exceeds its length), independently of the other
layers. Mutation and crossover follow the original evolutionary search (`search_utils/gen_utils.py`).

JSON encoding (`Arch.to_json`): {"embed": [176, 352, 704], "head_dim": [32, 48, 64],
"blocks": [[[3, 704], null, ...], [...], [...]]} -- per stage a list of [heads, mlp] or null for a removed block.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

__all__ = ["BlockArch", "StageArch", "Arch", "StageSpace", "SearchSpace", "DEMO_SPACE", "TINY_SPACE", "SMALL_SPACE",
           "SPACES", "get_space", "space_to_dict", "space_from_dict", "enabled_choices"]

PATCH_SIZE = 14          # effective patch of the conv stem (3x3/s2 then 7x7/s7)
STEM_MID_WIDTH = 24      # the conv stem's hard-coded width (type-4 stem)
WARMUP_EPOCHS = 30       # the original's --num-warmup-epochs default (vit_resnas.md 5.5)
RngLike = Union[random.Random, int, None]


def _rng(rng: RngLike) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockArch:
    """One transformer block: `heads` attention heads (of the stage's head dim) and an MLP of `mlp` hidden units."""

    heads: int
    mlp: int

    def __post_init__(self):
        _positive_int(self.heads, "BlockArch.heads")
        _positive_int(self.mlp, "BlockArch.mlp")


@dataclass(frozen=True)
class StageArch:
    """One stage: embedding width, head dim, and block slots (`None` = removed block)."""

    embed: int
    head_dim: int
    blocks: Tuple[Optional[BlockArch], ...]

    def __post_init__(self):
        _positive_int(self.embed, "StageArch.embed")
        _positive_int(self.head_dim, "StageArch.head_dim")
        blocks = tuple(self.blocks)
        for i, b in enumerate(blocks):
            if b is not None and not isinstance(b, BlockArch):
                raise TypeError(f"StageArch.blocks[{i}] must be a BlockArch or None, got {type(b).__name__}")
        object.__setattr__(self, "blocks", blocks)

    @property
    def depth(self) -> int:
        """Number of blocks that exist (removed slots excluded)."""
        return sum(b is not None for b in self.blocks)


@dataclass(frozen=True)
class Arch:
    """A whole ViT-ResNAS network (immutable and hashable: it keys caches and dedups search populations)."""

    stages: Tuple[StageArch, ...]

    def __post_init__(self):
        stages = tuple(self.stages)
        if not stages:
            raise ValueError("Arch.stages must hold at least one stage")
        for s, st in enumerate(stages):
            if not isinstance(st, StageArch):
                raise TypeError(f"Arch.stages[{s}] must be a StageArch, got {type(st).__name__}")
        for s in range(1, len(stages)):
            # The RSR shortcut zero-pads C_in to C_out, so widths never shrink (asserted by the original code).
            if stages[s].embed < stages[s - 1].embed:
                raise ValueError(f"stage {s} embed width {stages[s].embed} is smaller than stage {s - 1}'s "
                                 f"{stages[s - 1].embed}: a residual spatial reduction needs C_out >= C_in")
        object.__setattr__(self, "stages", stages)

    # -- views --------------------------------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def embeds(self) -> Tuple[int, ...]:
        return tuple(st.embed for st in self.stages)

    @property
    def head_dims(self) -> Tuple[int, ...]:
        return tuple(st.head_dim for st in self.stages)

    @property
    def depths(self) -> Tuple[int, ...]:
        return tuple(st.depth for st in self.stages)

    @property
    def num_slots(self) -> Tuple[int, ...]:
        return tuple(len(st.blocks) for st in self.stages)

    def pruned(self) -> "Arch":
        """The same network with removed slots dropped: the standalone, directly trainable definition."""
        return Arch(tuple(StageArch(st.embed, st.head_dim, tuple(b for b in st.blocks if b is not None))
                          for st in self.stages))

    def fits_in(self, other: "Arch") -> Optional[str]:
        """None if this arch is a first-k slice of `other` (same stages, slots and head dims, nothing wider);
        otherwise the reason, naming the field."""
        if self.num_stages != other.num_stages:
            return f"arch has {self.num_stages} stages, expected {other.num_stages}"
        for s, (a, m) in enumerate(zip(self.stages, other.stages)):
            if a.head_dim != m.head_dim:
                return f"stage {s} head_dim is {a.head_dim}, expected {m.head_dim}"
            if a.embed > m.embed:
                return f"stage {s} embed {a.embed} exceeds the maximum {m.embed}"
            if len(a.blocks) != len(m.blocks):
                return f"stage {s} has {len(a.blocks)} block slots, expected {len(m.blocks)}"
            for i, (b, mb) in enumerate(zip(a.blocks, m.blocks)):
                if b is None:
                    continue
                if mb is None:
                    return f"stage {s} block {i} exists but the maximum arch has no block there"
                if b.heads > mb.heads:
                    return f"stage {s} block {i} heads {b.heads} exceeds the maximum {mb.heads}"
                if b.mlp > mb.mlp:
                    return f"stage {s} block {i} mlp {b.mlp} exceeds the maximum {mb.mlp}"
        return None

    # -- encodings ----------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"embed": list(self.embeds), "head_dim": list(self.head_dims),
                "blocks": [[None if b is None else [b.heads, b.mlp] for b in st.blocks] for st in self.stages]}

    def to_json(self) -> str:
        """Compact JSON (one line, no spaces): see the module docstring."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict) -> "Arch":
        if not isinstance(d, dict) or set(d) != {"embed", "head_dim", "blocks"}:
            raise ValueError(f"an arch dict needs exactly the keys 'embed', 'head_dim', 'blocks', got "
                             f"{sorted(d) if isinstance(d, dict) else type(d).__name__}")
        embed, head_dim, blocks = d["embed"], d["head_dim"], d["blocks"]
        if not (isinstance(embed, list) and isinstance(head_dim, list) and isinstance(blocks, list)
                and len(embed) == len(head_dim) == len(blocks)):
            raise ValueError("'embed', 'head_dim' and 'blocks' must be lists with one entry per stage")
        stages = []
        for s, (e, hd, bl) in enumerate(zip(embed, head_dim, blocks)):
            if not isinstance(bl, list):
                raise ValueError(f"blocks[{s}] must be a list of [heads, mlp] or null, got {bl!r}")
            slots = []
            for i, b in enumerate(bl):
                if b is None:
                    slots.append(None)
                elif isinstance(b, list) and len(b) == 2:
                    slots.append(BlockArch(b[0], b[1]))
                else:
                    raise ValueError(f"blocks[{s}][{i}] must be [heads, mlp] or null, got {b!r}")
            stages.append(StageArch(e, hd, tuple(slots)))
        return cls(tuple(stages))

    @classmethod
    def from_json(cls, text: str) -> "Arch":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON arch: {exc}") from None
        return cls.from_dict(d)

    def to_network_def(self, num_classes: int = 1000) -> tuple:
        """The original code's `network_def` tuple (conv stem type 4). A removed slot becomes an exists=0 block; it
        carries no genes here, so heads and MLP are written as 1 (the original ignores them)."""
        out: List[tuple] = [(4, self.stages[0].embed)]
        for s, st in enumerate(self.stages):
            if s > 0:
                out.append((3, self.stages[s - 1].embed, st.embed))
            for b in st.blocks:
                heads, mlp, exists = (1, 1, 0) if b is None else (b.heads, b.mlp, 1)
                out.append((1, (st.embed, heads, st.head_dim), (st.embed, mlp), exists))
        out.append((2, self.stages[-1].embed, num_classes))
        return tuple(out)

    @classmethod
    def from_network_def(cls, network_def: Sequence) -> "Arch":
        """Parse the original `network_def` (conv stem types 4 or 5 only; type-0 patch embedding is not a
        ViT-ResNAS model). exists=0 blocks become removed slots."""
        nd = list(network_def)
        if not nd or nd[0][0] not in (4, 5) or (nd[0][0] == 5 and nd[0][2] != STEM_MID_WIDTH):
            raise ValueError(f"network_def must start with a conv stem (4, C) or (5, C, {STEM_MID_WIDTH}) (the final "
                             f"models' stem width), got {nd[0] if nd else None!r}")
        if nd[-1][0] != 2:
            raise ValueError(f"network_def must end with the head (2, C, num_classes), got {nd[-1]!r}")
        stages: List[StageArch] = []
        embed, head_dim, slots = nd[0][1], None, []

        def close():  # a stage without blocks has no head dim in the def; 64 is a placeholder then
            stages.append(StageArch(embed, head_dim if head_dim is not None else 64, tuple(slots)))

        for i, entry in enumerate(nd[1:-1], start=1):
            kind = entry[0]
            if kind == 1:
                (_, (c_attn, heads, hd), (c_mlp, mlp), exists) = entry
                if c_attn != embed or c_mlp != embed:
                    raise ValueError(f"network_def[{i}]: block width {c_attn}/{c_mlp} != stage width {embed}")
                if head_dim is not None and hd != head_dim:
                    raise ValueError(f"network_def[{i}]: head_dim {hd} differs from the stage's {head_dim}")
                head_dim = hd
                slots.append(BlockArch(heads, mlp) if exists else None)
            elif kind == 3:
                if entry[1] != embed:
                    raise ValueError(f"network_def[{i}]: RSR input {entry[1]} != stage width {embed}")
                close()
                embed, head_dim, slots = entry[2], None, []
            else:
                raise ValueError(f"network_def[{i}]: unsupported block type {kind} (expected 1 or 3)")
        close()
        return cls(tuple(stages))

    def __str__(self) -> str:
        parts = []
        for st in self.stages:
            blocks = ",".join("-" if b is None else f"{b.heads}/{b.mlp}" for b in st.blocks)
            parts.append(f"C={st.embed} d={st.head_dim} [{blocks}]")
        return " | ".join(parts)


# ---------------------------------------------------------------------------------------------------------------------
# Search spaces
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageSpace:
    """Choices of one stage (each tuple largest first, as the original sorts them)."""

    embed: Tuple[int, ...]
    head_dim: int
    heads: Tuple[int, ...]
    mlp: Tuple[int, ...]
    depth: int                      # block slots
    removable: Tuple[int, ...]      # 0-based slots whose block may be removed

    def __post_init__(self):
        for name in ("embed", "heads", "mlp"):
            values = tuple(sorted(set(getattr(self, name)), reverse=True))
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
                raise ValueError(f"StageSpace.{name} must be non-empty positive ints, got {getattr(self, name)!r}")
            object.__setattr__(self, name, values)
        if any(not 0 <= i < self.depth for i in self.removable):
            raise ValueError(f"StageSpace.removable {self.removable} must index slots in [0, {self.depth})")


# The layer "keep" choice list of a removable block: the original's [C, C, 0, 0] (keep with probability 1/2, and under
# the width warm-up blocks start being dropped only once half of the list is enabled).
LAYER_CHOICES = (True, True, False, False)


def enabled_choices(choices: Sequence, epoch: Optional[float], warmup_epochs: int = WARMUP_EPOCHS) -> tuple:
    """The original progressive warm-up: at `epoch`, the first min(1 + floor(epoch (L-1) / warmup), L) choices
    (largest first) are enabled. `epoch=None` (or warmup 0) enables all of them."""
    n = len(choices)
    if epoch is None or warmup_epochs == 0:
        return tuple(choices)
    return tuple(choices[:max(1, min(1 + math.floor(epoch * (n - 1) / warmup_epochs), n))])


def _draw_without_replacement(choices: Sequence, n: int, rng: random.Random) -> list:
    """n draws from `choices` without replacement, the list tiled when n exceeds it (the original's randperm over
    ceil(n / L) copies of the mask table)."""
    pool = list(choices) * max(1, math.ceil(n / len(choices)))
    rng.shuffle(pool)
    return pool[:n]


@dataclass(frozen=True)
class SearchSpace:
    """A ViT-ResNAS search space: per-stage choices (vit_resnas.md 4.2). Heads and MLP are chosen per block, the
    embedding width per stage."""

    name: str
    stages: Tuple[StageSpace, ...]

    # -- the space's extremes and membership ----------------------------------------------------------------------
    def max_arch(self) -> Arch:
        """The supernet itself: every block present at its widest."""
        return Arch(tuple(StageArch(st.embed[0], st.head_dim, (BlockArch(st.heads[0], st.mlp[0]),) * st.depth)
                          for st in self.stages))

    def min_arch(self) -> Arch:
        return Arch(tuple(StageArch(st.embed[-1], st.head_dim, tuple(
            None if i in st.removable else BlockArch(st.heads[-1], st.mlp[-1]) for i in range(st.depth)))
            for st in self.stages))

    def check(self, arch: Arch, what: str = "arch") -> None:
        """Raise a ValueError naming the first field of `arch` that lies outside this space."""
        if not isinstance(arch, Arch):
            raise TypeError(f"{what} must be an Arch, got {type(arch).__name__}")
        if arch.num_stages != len(self.stages):
            raise ValueError(f"{what} has {arch.num_stages} stages; the {self.name} space has {len(self.stages)}")
        for s, (st, sp) in enumerate(zip(arch.stages, self.stages)):
            where = f"{what} stage {s}"
            if st.embed not in sp.embed:
                raise ValueError(f"{where}: embed {st.embed} is not a choice of the {self.name} space {sp.embed}")
            if st.head_dim != sp.head_dim:
                raise ValueError(f"{where}: head_dim {st.head_dim} must be {sp.head_dim} in the {self.name} space")
            if len(st.blocks) != sp.depth:
                raise ValueError(f"{where}: {len(st.blocks)} block slots, the {self.name} space has {sp.depth} "
                                 f"(removed blocks are None slots)")
            for i, b in enumerate(st.blocks):
                if b is None:
                    if i not in sp.removable:
                        raise ValueError(f"{where} block {i} is removed but is not removable (removable slots: "
                                         f"{sp.removable})")
                    continue
                if b.heads not in sp.heads:
                    raise ValueError(f"{where} block {i}: heads {b.heads} is not a choice {sp.heads}")
                if b.mlp not in sp.mlp:
                    raise ValueError(f"{where} block {i}: mlp {b.mlp} is not a choice {sp.mlp}")

    def contains(self, arch: Arch) -> bool:
        try:
            self.check(arch)
        except (ValueError, TypeError):
            return False
        return True

    def size(self) -> int:
        """Number of distinct architectures."""
        total = 1
        for sp in self.stages:
            per_block = len(sp.heads) * len(sp.mlp)
            total *= len(sp.embed) * per_block ** (sp.depth - len(sp.removable)) * (per_block + 1) ** len(sp.removable)
        return total

    # -- sampling ---------------------------------------------------------------------------------------------------
    def sample_groups(self, num_groups: int, rng: RngLike = None, epoch: Optional[float] = None,
                      warmup_epochs: int = WARMUP_EPOCHS) -> List[Arch]:
        """Architectures for the `num_groups` groups of one supernet step, drawn as the original does: each layer
        draws its choices for all groups without replacement from its enabled choices (see `enabled_choices`)."""
        _positive_int(num_groups, "num_groups")
        rng = _rng(rng)
        draw = lambda choices: _draw_without_replacement(enabled_choices(choices, epoch, warmup_epochs),  # noqa: E731
                                                         num_groups, rng)
        per_group: List[List[StageArch]] = [[] for _ in range(num_groups)]
        for sp in self.stages:
            embeds = draw(sp.embed)
            slots: List[List[Optional[BlockArch]]] = [[] for _ in range(num_groups)]
            for i in range(sp.depth):
                heads, mlps = draw(sp.heads), draw(sp.mlp)
                keeps = draw(LAYER_CHOICES) if i in sp.removable else [True] * num_groups
                for g in range(num_groups):
                    slots[g].append(BlockArch(heads[g], mlps[g]) if keeps[g] else None)
            for g in range(num_groups):
                per_group[g].append(StageArch(embeds[g], sp.head_dim, tuple(slots[g])))
        return [Arch(tuple(stages)) for stages in per_group]

    def sample(self, rng: RngLike = None) -> Arch:
        """One architecture, every choice uniform (removable blocks kept with probability 1/2)."""
        return self.sample_groups(1, rng)[0]

    # -- evolution (search_utils/gen_utils.py) -----------------------------------------------------------------------
    def mutate(self, arch: Arch, rng: RngLike = None, prob: float = 0.3,
               accept: Optional[Callable[[Arch], bool]] = None, max_tries: int = 1000) -> Arch:
        """Each gene independently with probability `prob`: re-sample a stage's embed width, a block's heads, its
        MLP width; toggle a removable block. A block toggled back on gets uniform heads and MLP (a removed block
        carries no genes here). With `accept` (e.g. a MAC band), re-draw until it accepts the child."""
        self.check(arch)
        rng = _rng(rng)

        def once() -> Arch:
            stages = []
            for st, sp in zip(arch.stages, self.stages):
                embed = rng.choice(sp.embed) if rng.random() < prob else st.embed
                slots = []
                for i, b in enumerate(st.blocks):
                    if b is not None:
                        heads = rng.choice(sp.heads) if rng.random() < prob else b.heads
                        mlp = rng.choice(sp.mlp) if rng.random() < prob else b.mlp
                        b = BlockArch(heads, mlp)
                    if i in sp.removable and rng.random() < prob:
                        b = None if b is not None else BlockArch(rng.choice(sp.heads), rng.choice(sp.mlp))
                    slots.append(b)
                stages.append(StageArch(embed, st.head_dim, tuple(slots)))
            return Arch(tuple(stages))

        return _until(once, accept, max_tries, "mutate")

    def crossover(self, a: Arch, b: Arch, rng: RngLike = None, prob: float = 0.5,
                  accept: Optional[Callable[[Arch], bool]] = None, max_tries: int = 1000) -> Arch:
        """Start from parent `a`; take each gene (stage embed, block heads, block MLP, block existence) from parent
        `b` with probability `prob`. Taking existence from `b` when only `b` has the block takes `b`'s block."""
        self.check(a, "a")
        self.check(b, "b")
        rng = _rng(rng)

        def once() -> Arch:
            stages = []
            for sa, sb in zip(a.stages, b.stages):
                embed = sb.embed if rng.random() < prob else sa.embed
                slots = []
                for ba, bb in zip(sa.blocks, sb.blocks):
                    child = ba
                    if ba is not None and bb is not None:
                        heads = bb.heads if rng.random() < prob else ba.heads
                        mlp = bb.mlp if rng.random() < prob else ba.mlp
                        child = BlockArch(heads, mlp)
                    if rng.random() < prob:
                        child = None if bb is None else (child if child is not None else bb)
                    slots.append(child)
                stages.append(StageArch(embed, sa.head_dim, tuple(slots)))
            return Arch(tuple(stages))

        return _until(once, accept, max_tries, "crossover")


def _until(make: Callable[[], Arch], accept: Optional[Callable[[Arch], bool]], max_tries: int, what: str) -> Arch:
    for _ in range(max(1, max_tries)):
        child = make()
        if accept is None or accept(child):
            return child
    raise RuntimeError(f"{what}: no child accepted in {max_tries} tries; widen the constraint band")


def _mlp_choices(largest: int, step: int) -> Tuple[int, ...]:
    """7 evenly spaced MLP widths from 3C down to 1.5C (vit_resnas.md 4.2)."""
    return tuple(largest - i * step for i in range(7))


# sr_tiny_mh: C 256/512/1024, 6 slots per stage, #2/#4/#6 removable (supernet_config/sr_tiny_mh.py).
TINY_SPACE = SearchSpace("tiny", (
    StageSpace(embed=(256, 224, 192, 176, 160), head_dim=32, heads=(6, 5, 4, 3), mlp=_mlp_choices(768, 64),
               depth=6, removable=(1, 3, 5)),
    StageSpace(embed=(512, 448, 384, 352, 320), head_dim=48, heads=(12, 10, 8, 6), mlp=_mlp_choices(1536, 128),
               depth=6, removable=(1, 3, 5)),
    StageSpace(embed=(1024, 896, 768, 704, 640), head_dim=64, heads=(12, 10, 8, 6), mlp=_mlp_choices(3072, 256),
               depth=6, removable=(1, 3, 5)),
))

# sr_small_mh: C 320/640/1280, 7 slots per stage, #2/#4/#6 removable (supernet_config/sr_small_mh.py).
SMALL_SPACE = SearchSpace("small", (
    StageSpace(embed=(320, 280, 240, 220, 200), head_dim=32, heads=(8, 7, 6, 5), mlp=_mlp_choices(960, 80),
               depth=7, removable=(1, 3, 5)),
    StageSpace(embed=(640, 560, 480, 440, 400), head_dim=48, heads=(16, 14, 12, 10), mlp=_mlp_choices(1920, 160),
               depth=7, removable=(1, 3, 5)),
    StageSpace(embed=(1280, 1120, 960, 880, 800), head_dim=64, heads=(16, 14, 12, 10), mlp=_mlp_choices(3840, 320),
               depth=7, removable=(1, 3, 5)),
))

# The demo space: sr_tiny_mh scaled down so that the whole pipeline (train, search, export) runs on a CPU in minutes
# at 56 px (the smallest ViT-ResNAS input: 4x4 / 2x2 / 1x1 token grids). Same structure: 5 embed choices per stage
# (ratios {1, 7/8, 3/4, 11/16, 5/8} of 32/64/128), 3 head choices, 7 MLP widths from 3C to 1.5C, but 2 slots per stage
# with the second removable.
DEMO_SPACE = SearchSpace("demo", (
    StageSpace(embed=(32, 28, 24, 22, 20), head_dim=8, heads=(4, 3, 2), mlp=_mlp_choices(96, 8), depth=2,
               removable=(1,)),
    StageSpace(embed=(64, 56, 48, 44, 40), head_dim=8, heads=(8, 6, 4), mlp=_mlp_choices(192, 16), depth=2,
               removable=(1,)),
    StageSpace(embed=(128, 112, 96, 88, 80), head_dim=16, heads=(8, 6, 4), mlp=_mlp_choices(384, 32), depth=2,
               removable=(1,)),
))

# Every named space: `--space NAME`, `ViTResNAS(space=NAME)` and a checkpoint's recorded space name resolve here.
SPACES = {space.name: space for space in (DEMO_SPACE, TINY_SPACE, SMALL_SPACE)}


def get_space(name: str) -> SearchSpace:
    if name not in SPACES:
        raise ValueError(f"unknown search space {name!r}; expected one of "
                         f"{', '.join(repr(n) for n in SPACES)}")
    return SPACES[name]


def space_to_dict(space: SearchSpace) -> dict:
    """Plain data (checkpoint- and JSON-safe), so a checkpoint carries the exact space it was trained on."""
    return {"name": space.name, "stages": [
        {"embed": list(s.embed), "head_dim": s.head_dim, "heads": list(s.heads), "mlp": list(s.mlp),
         "depth": s.depth, "removable": list(s.removable)} for s in space.stages]}


def space_from_dict(d: dict) -> SearchSpace:
    """The space `space_to_dict` recorded (its choices as recorded, whatever its name)."""
    try:
        return SearchSpace(str(d["name"]), tuple(
            StageSpace(embed=tuple(s["embed"]), head_dim=int(s["head_dim"]), heads=tuple(s["heads"]),
                       mlp=tuple(s["mlp"]), depth=int(s["depth"]), removable=tuple(s["removable"]))
            for s in d["stages"]))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a search-space record (expected name and stages with embed, head_dim, heads, mlp, "
                         f"depth, removable): {exc!r}") from None
