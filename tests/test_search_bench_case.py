"""The supernet benchmark case file builds valid cases whose providers run (smoke profile, CPU)."""
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


def test_supernet_train_case_runs_in_bf16(monkeypatch):
    """The bf16 training case (on CUDA: Tiny space, 4 x 64 images) at a CPU-sized shape: every provider runs a step in
    bf16 and leaves finite bf16 gradients."""
    module = importlib.import_module("resnas_kernels.bench.cases.supernet_train")
    from resnas_kernels.models.vit_resnas.space import DEMO_SPACE

    built = []
    real_build = module.build_supernet

    def build_and_keep(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(module, "build_supernet", build_and_keep)
    case = module._train_case(DEMO_SPACE, 56, 8, 4, torch.device("cpu"), "demo", torch.bfloat16)
    case.validate()
    assert case.dtype == "bfloat16" and len(built) == 1
    for name in ("ours", "masked", "loop"):
        case.providers[name]()
        grads = [p.grad for p in built[0].parameters() if p.grad is not None]
        assert grads, f"{name}: no gradients"
        assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads), name
