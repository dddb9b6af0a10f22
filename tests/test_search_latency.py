"""The search's optional latency constraint: the per-layer latency table (measured on the current device with the
library's ops, keyed by device / batch / dtype, stored as JSON and reused). The search's use of it
(`--latency-budget`) is tested in test_search_pipeline.py, which has a trained supernet."""
import json

import pytest

from resnas_kernels.models.vit_resnas import Arch, BlockArch, SearchSpace, StageArch, StageSpace
from resnas_kernels.search import latency

# Two choices per dimension: 2 stems + (4 attn + 4 mlp) per stage + RSR pairs with co >= ci (4, then 3) + 2 heads.
TINY = SearchSpace("lat-tiny", (
    StageSpace(embed=(16, 8), head_dim=8, heads=(2, 1), mlp=(32, 16), depth=2, removable=(1,)),
    StageSpace(embed=(32, 16), head_dim=8, heads=(2, 1), mlp=(64, 32), depth=1, removable=()),
    StageSpace(embed=(32, 16), head_dim=8, heads=(2, 1), mlp=(64, 32), depth=1, removable=()),
))


def test_table_is_built_once_reused_and_sums_layers(tmp_path):
    path = str(tmp_path / "lut.json")
    lut = latency.LatencyTable(path, "cpu", 56, 10, warmup=0, repeats=1)
    n = lut.ensure_space(TINY)
    assert n == len(lut.entries) == 2 + 3 * 8 + 4 + 3 + 2 and lut.measured == n
    assert all(v > 0 for v in lut.entries.values())
    doc = json.load(open(path))
    assert doc["format"] == latency.LUT_FORMAT and list(doc["tables"]) == [lut.setting]
    assert lut.setting.startswith("cpu:") and "batch=1" in lut.setting and "float32" in lut.setting

    again = latency.LatencyTable(path, "cpu", 56, 10, warmup=0, repeats=1)
    assert again.ensure_space(TINY) == 0 and again.measured == 0          # loaded, nothing re-measured
    big = TINY.max_arch()
    small = Arch((StageArch(16, 8, (BlockArch(2, 32), None)),) + big.stages[1:])
    keys = latency.layer_keys(big, 56, 10)
    assert again.latency(big) == pytest.approx(sum(lut.entries[k] for k in keys))
    # a removed block costs nothing; the pruned definition predicts the same latency as the slot-aligned one
    assert again.latency(small) == pytest.approx(again.latency(big) - lut.entries["attn/n17/c16/h2/d8"]
                                                 - lut.entries["mlp/n17/c16/m32"])
    assert again.latency(small.pruned()) == again.latency(small)

    other = latency.LatencyTable(path, "cpu", 56, 10, batch=2, warmup=0, repeats=1)   # another setting: new table
    assert other.entries == {}
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a 'resnas-latency-lut'"):
        latency.LatencyTable(str(tmp_path / "bad.json"), "cpu", 56, 10)
