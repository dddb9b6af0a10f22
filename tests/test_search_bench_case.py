"""The issue-9 benchmark case file builds valid cases whose providers run (smoke profile, CPU)."""
import importlib

import torch

from resnas_kernels.bench.harness import Context


def test_supernet_train_cases_build_and_run():
    module = importlib.import_module("resnas_kernels.bench.cases.supernet_train")
    cases = module.cases(Context(device=torch.device("cpu"), quick=True, smoke=True))
    assert {c.name for c in cases} == {"supernet_train.train", "search_score.infer"}
    for case in cases:
        case.validate()
        assert case.flops > 0 and case.items > 0
    train = next(c for c in cases if c.name == "supernet_train.train")
    train.providers["ours"]()
    score = next(c for c in cases if c.name == "search_score.infer")
    assert score.providers["ours"]() == score.providers["one_model_per_candidate"]()
