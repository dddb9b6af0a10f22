"""ViT-ResNAS search spaces as data (vit_resnas.md 4.2), the Arch encodings, sampling, mutation and crossover."""
import collections
import json
import random

import pytest

from resnas_kernels.models.vit_resnas import (MEDIUM_ARCH, SMALL_SPACE, TINY_ARCH, TINY_SPACE, Arch, BlockArch,
                                              StageArch, enabled_choices, get_space)


def test_tables_match_the_spec():
    # vit_resnas.md 4.2, row by row: embed choices, head dim, heads, MLP range and step, depth, removable #2/#4/#6.
    tiny = [((256, 224, 192, 176, 160), 32, (6, 5, 4, 3), 768, 64),
            ((512, 448, 384, 352, 320), 48, (12, 10, 8, 6), 1536, 128),
            ((1024, 896, 768, 704, 640), 64, (12, 10, 8, 6), 3072, 256)]
    small = [((320, 280, 240, 220, 200), 32, (8, 7, 6, 5), 960, 80),
             ((640, 560, 480, 440, 400), 48, (16, 14, 12, 10), 1920, 160),
             ((1280, 1120, 960, 880, 800), 64, (16, 14, 12, 10), 3840, 320)]
    for space, rows, depth in ((TINY_SPACE, tiny, 6), (SMALL_SPACE, small, 7)):
        for st, (embed, head_dim, heads, mlp_max, step) in zip(space.stages, rows):
            assert st.embed == embed and st.head_dim == head_dim and st.heads == heads
            assert st.mlp == tuple(range(mlp_max, mlp_max // 2 - 1, -step)) and len(st.mlp) == 7
            assert st.mlp[-1] * 2 == st.mlp[0] == 3 * st.embed[0]  # 3C down to 1.5C
            assert st.depth == depth and st.removable == (1, 3, 5)
    # Space sizes (upper bounds quoted in the spec): ~1.9e28 and ~4.2e32.
    assert f"{TINY_SPACE.size():.1e}" == "1.9e+28"
    assert f"{SMALL_SPACE.size():.1e}" == "4.2e+32"
    assert get_space("tiny") is TINY_SPACE
    with pytest.raises(ValueError, match="unknown search space 'huge'"):
        get_space("huge")


@pytest.mark.parametrize("space", [TINY_SPACE, SMALL_SPACE], ids=lambda s: s.name)
def test_json_and_network_def_round_trips(space):
    rng = random.Random(0)
    for _ in range(20):
        arch = space.sample(rng)
        text = arch.to_json()
        assert " " not in text and Arch.from_json(text) == arch
        assert json.loads(text)["embed"] == list(arch.embeds)
        assert Arch.from_network_def(arch.to_network_def()) == arch
    assert len({space.sample(rng) for _ in range(50)}) == 50  # hashable and varied


def test_network_def_of_a_searched_net():
    # The --network-def of scripts/vit-sr-nas/searched_net/tiny.sh, stage 1 and the head (abridged to one stage).
    nd = ((4, 176), (1, (176, 3, 32), (176, 704), 1), (1, (176, 3, 32), (176, 576), 0), (2, 176, 1000))
    arch = Arch.from_network_def(nd)
    assert arch == Arch((StageArch(176, 32, (BlockArch(3, 704), None)),))
    assert arch.pruned().num_slots == (1,)
    with pytest.raises(ValueError, match="must start with a conv stem"):
        Arch.from_network_def(((0, 192),) + nd[1:])


def test_arch_validation_errors_name_the_field():
    with pytest.raises(ValueError, match="StageArch.embed must be a positive int"):
        StageArch(0, 32, ())
    with pytest.raises(ValueError, match="BlockArch.heads must be a positive int"):
        BlockArch(0, 64)
    with pytest.raises(ValueError, match="stage 1 embed width 128 is smaller than stage 0's 256"):
        Arch((StageArch(256, 32, ()), StageArch(128, 32, ())))
    with pytest.raises(ValueError, match=r"blocks\[0\]\[0\] must be \[heads, mlp\] or null"):
        Arch.from_dict({"embed": [8], "head_dim": [8], "blocks": [[[1, 2, 3]]]})
    with pytest.raises(ValueError, match="not a JSON arch"):
        Arch.from_json("{")
    with pytest.raises(ValueError, match="exactly the keys"):
        Arch.from_dict({"embed": [8]})


def test_space_check_errors():
    arch = TINY_SPACE.max_arch()
    d = arch.to_dict()
    cases = [
        ({**d, "embed": [250, 512, 1024]}, "stage 0: embed 250 is not a choice"),
        ({**d, "head_dim": [32, 64, 64]}, "stage 1: head_dim 64 must be 48"),
        ({**d, "blocks": [d["blocks"][0][:5]] + d["blocks"][1:]}, "stage 0: 5 block slots, the tiny space has 6"),
        ({**d, "blocks": [[None] + d["blocks"][0][1:]] + d["blocks"][1:]}, "block 0 is removed but is not removable"),
        ({**d, "blocks": [[[7, 768]] + d["blocks"][0][1:]] + d["blocks"][1:]}, "block 0: heads 7 is not a choice"),
        ({**d, "blocks": [[[6, 700]] + d["blocks"][0][1:]] + d["blocks"][1:]}, "block 0: mlp 700 is not a choice"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            TINY_SPACE.check(Arch.from_dict(bad))
    assert TINY_SPACE.contains(TINY_SPACE.min_arch()) and not TINY_SPACE.contains(TINY_ARCH)
    assert SMALL_SPACE.contains(SMALL_SPACE.max_arch()) and not SMALL_SPACE.contains(MEDIUM_ARCH)


def test_groups_draw_without_replacement_per_layer():
    rng = random.Random(1)
    # n <= L: all groups differ in every layer (embed has 5 choices, heads 4, MLP 7).
    for _ in range(20):
        archs = TINY_SPACE.sample_groups(4, rng)
        for s in range(3):
            assert len({a.stages[s].embed for a in archs}) == 4
            for i in (0, 2, 4):  # fixed slots: heads and MLP always drawn
                assert len({a.stages[s].blocks[i].heads for a in archs}) == 4
                assert len({a.stages[s].blocks[i].mlp for a in archs}) == 4
            for i in (1, 3, 5):  # layer choices [keep, keep, drop, drop]: exactly two of four groups keep
                assert sum(a.stages[s].blocks[i] is not None for a in archs) == 2
    # n > L: the list is tiled, so each of the 5 embed choices appears twice among 10 groups.
    archs = TINY_SPACE.sample_groups(10, rng)
    assert collections.Counter(a.stages[0].embed for a in archs) == {c: 2 for c in TINY_SPACE.stages[0].embed}
    for a in archs:
        TINY_SPACE.check(a)


def test_single_sample_is_uniform():
    rng = random.Random(2)
    draws = [TINY_SPACE.sample(rng) for _ in range(4000)]
    embed = collections.Counter(a.stages[1].embed for a in draws)
    assert set(embed) == set(TINY_SPACE.stages[1].embed)
    assert all(abs(n / 4000 - 0.2) < 0.03 for n in embed.values())  # 3 sigma of a binomial(4000, 0.2) is 0.019
    kept = sum(a.stages[0].blocks[1] is not None for a in draws) / 4000
    assert abs(kept - 0.5) < 0.03


def test_warmup_schedule():
    embed = TINY_SPACE.stages[0].embed
    # Embed (5 choices): only the max until epoch 8, +1 at 8, 15, 23, 30 (vit_resnas.md 5.5).
    counts = [len(enabled_choices(embed, e)) for e in range(32)]
    assert [e for e in range(1, 32) if counts[e] > counts[e - 1]] == [8, 15, 23, 30]
    # Removable blocks start being dropped at epoch 20 (half of [keep, keep, drop, drop] enabled).
    rng = random.Random(3)
    for epoch, can_drop in ((0, False), (19, False), (20, True)):
        archs = [a for _ in range(30) for a in TINY_SPACE.sample_groups(2, rng, epoch=epoch)]
        assert any(b is None for a in archs for st in a.stages for b in st.blocks) == can_drop
    assert all(a == TINY_SPACE.max_arch() for a in TINY_SPACE.sample_groups(3, rng, epoch=0))


def test_mutation_and_crossover():
    rng = random.Random(4)
    parent = TINY_SPACE.sample(rng)
    assert TINY_SPACE.mutate(parent, rng, prob=0.0) == parent
    flipped = TINY_SPACE.mutate(parent, rng, prob=1.0)
    for s in range(3):  # with prob 1 every removable block is toggled
        for i in TINY_SPACE.stages[s].removable:
            assert (flipped.stages[s].blocks[i] is None) != (parent.stages[s].blocks[i] is None)
    children = [TINY_SPACE.mutate(parent, rng, prob=0.3) for _ in range(50)]
    assert all(TINY_SPACE.contains(c) for c in children) and len(set(children)) > 40
    other = TINY_SPACE.sample(rng)
    assert TINY_SPACE.crossover(parent, other, rng, prob=0.0) == parent
    assert TINY_SPACE.crossover(parent, other, rng, prob=1.0) == other
    mixed = TINY_SPACE.crossover(parent, other, rng)
    assert TINY_SPACE.contains(mixed)
    # accept: e.g. a MAC band; impossible predicates fail loudly.
    assert TINY_SPACE.mutate(parent, rng, accept=lambda a: a.stages[0].embed == 256).stages[0].embed == 256
    with pytest.raises(RuntimeError, match="no child accepted in 5 tries"):
        TINY_SPACE.mutate(parent, rng, accept=lambda a: False, max_tries=5)
    with pytest.raises(ValueError, match="5 block slots, the tiny space has 6"):
        TINY_SPACE.mutate(TINY_ARCH, rng)  # the searched Tiny net is pruned: not an arch of the supernet space
