"""The op-layer benchmark cases (dispatch.*, supernet_overhead.train, LeViT's ONNX Runtime peer) and lazy cases.

Smoke profile, CPU. The cases are built and their providers run once; what is asserted is that they compute the same
thing as their stock peers and report what they claim (call counts, skipped peers), and that listing builds nothing.
Nothing here times anything.
"""
import importlib
import re
import types

import pytest
import torch

from resnas_kernels.bench import runner
from resnas_kernels.bench.cases import discover
from resnas_kernels.bench.harness import Case, Context, LazyCase
from resnas_kernels.bench.op_count import count_op_calls

# One intra-op thread: tiny ops and the Tiny supernet step run several times faster on the shared 2-core box.
pytestmark = pytest.mark.usefixtures("one_thread")
CPU_SMOKE = Context(device=torch.device("cpu"), quick=True, smoke=True)


def _case(name="demo.fwd", **fields):
    base = dict(name=name, shape="s", dtype="float32", flops=1, bytes=4, providers={"ours": lambda: None})
    base.update(fields)
    return Case(**base)


def test_lazy_case_builds_once_on_first_use_and_delegates():
    built = []

    def build():
        built.append(1)
        return _case(flops=7, providers={"ours": lambda: "ran", "peer": lambda: None})

    lazy = LazyCase("demo.fwd", "s", "float32", ("ours", "peer"), build)
    assert (lazy.name, lazy.mode, lazy.provider_names) == ("demo.fwd", "fwd", ("ours", "peer")) and built == []
    assert lazy.flops == 7 and lazy.providers["ours"]() == "ran" and built == [1]
    lazy.validate()
    assert lazy.case() is lazy.case() and built == [1]
    with pytest.raises(ValueError, match="must return a Case named 'other.fwd'"):
        LazyCase("other.fwd", "s", "float32", ("ours",), _case).case()


@pytest.mark.parametrize("profile", [dict(smoke=True, quick=True), dict(quick=True), dict()])
def test_every_case_file_declares_lazy_cases(profile):
    """What makes `resnas bench --list` and `--case` filtering cheap: on CPU no case file builds anything (no model,
    no large tensor, no torch.compile) until a case is measured."""
    modules, errors = discover()
    assert errors == []
    ctx = Context(device=torch.device("cpu"), **profile)
    for module in modules:
        declared = module.cases(ctx)
        assert declared, module.__name__
        for case in declared:
            assert isinstance(case, LazyCase) and not case.built, (module.__name__, case)


def test_list_builds_no_case(monkeypatch, tmp_path, capsys):
    def refuse(self):
        raise AssertionError(f"--list built {self.name}")

    monkeypatch.setattr(LazyCase, "case", refuse)
    assert runner.main(["--list", "--quick", "--device", "cpu", "--out", str(tmp_path), "--strict"]) == 0
    out = capsys.readouterr().out
    for name in ("dispatch.ragged_layer_norm.fwd+bwd", "dispatch.residual_spatial_reduction.fwd",
                 "supernet_overhead.train", "levit_128s.infer"):
        assert name in out
    assert not (tmp_path / "cpu.csv").exists()


def test_runner_builds_lazy_cases_when_measured_and_reports_build_failures(monkeypatch, tmp_path, capsys):
    def broken():
        raise RuntimeError("set-up exploded")

    module = types.ModuleType("lazy_cases")
    module.cases = lambda ctx: [
        LazyCase("good.fwd", "s", "float32", ("ours", "peer"),
                 lambda: _case("good.fwd", providers={"ours": lambda: None, "peer": lambda: None},
                               skipped={"absent": "not installed here"})),
        LazyCase("bad.fwd", "s", "float32", ("ours",), broken),
        LazyCase("filtered_out.fwd", "s", "float32", ("ours",), broken)]
    monkeypatch.setattr("resnas_kernels.bench.cases.discover", lambda only=None: ([module], []))
    argv = ["--smoke", "--device", "cpu", "--threads", "1", "--out", str(tmp_path), "--no-plots",
            "--case", "good", "--case", "bad"]
    assert runner.main(argv) == 0
    captured = capsys.readouterr()
    assert "set-up exploded" in captured.err and "filtered_out" not in captured.err + captured.out
    assert "absent     skipped: not installed here" in captured.out
    rows = (tmp_path / "cpu.csv").read_text()
    assert "good.fwd" in rows and "absent skipped: not installed here" in rows and "bad.fwd" not in rows
    assert runner.main(argv + ["--strict"]) == 3


@pytest.fixture(scope="module")
def dispatch_cases():
    module = importlib.import_module("resnas_kernels.bench.cases.dispatch")
    return {case.name: case.case() for case in module.cases(CPU_SMOKE)}


def test_dispatch_cases_cover_every_public_op_with_and_without_grad(dispatch_cases):
    ops = ("ragged_layer_norm", "ragged_linear", "ragged_attention", "residual_spatial_reduction")
    assert set(dispatch_cases) == {f"dispatch.{op}.{mode}" for op in ops for mode in ("fwd", "fwd+bwd")}
    for case in dispatch_cases.values():
        case.validate()
        assert set(case.providers) == {"ours", "stock"} and case.op in ops


@pytest.mark.parametrize("op", ["ragged_layer_norm", "ragged_linear", "ragged_attention",
                                "residual_spatial_reduction"])
def test_dispatch_ours_matches_the_stock_op(dispatch_cases, op):
    """Forward (checked again here, not only at build) and every input's and parameter's gradient."""
    fwd = dispatch_cases[f"dispatch.{op}.fwd"].providers
    ours, stock = fwd["ours"](), fwd["stock"]()
    torch.testing.assert_close(ours, stock.reshape(ours.shape), rtol=1e-4, atol=1e-5)
    bwd = dispatch_cases[f"dispatch.{op}.fwd+bwd"].providers
    ours, stock = bwd["ours"](), bwd["stock"]()
    assert len(ours) == len(stock) >= 3
    for g_ours, g_stock in zip(ours, stock):
        torch.testing.assert_close(g_ours, g_stock, rtol=1e-4, atol=1e-4)


def test_count_op_calls_counts_nested_aten_and_resnas_calls():
    import resnas_kernels as rk

    x = torch.randn(2, 3, 8)
    plain = count_op_calls(lambda: torch.nn.functional.linear(x, torch.ones(8, 8)))
    assert plain.resnas == 0 and plain.aten >= 2  # linear and what it calls (ones, matmul / addmm, ...)
    assert dict(plain.top_aten)["aten::linear"] == 1
    ours = count_op_calls(lambda: rk.ragged_layer_norm(x, torch.ones(8), torch.zeros(8), rk.Ragged((1, 1), (8, 5))))
    assert ours.resnas >= 1 and ours.total == ours.aten + ours.resnas
    assert ours.summary().startswith(f"calls/step {ours.total} = aten {ours.aten} + resnas {ours.resnas} (")


@pytest.mark.slow
def test_supernet_overhead_case_reports_calls_per_step():
    """Tiny space, 4 groups x 1 image, 56 px in every profile; its notes carry each provider's calls per step."""
    module = importlib.import_module("resnas_kernels.bench.cases.vit_resnas")
    lazy = next(c for c in module.cases(CPU_SMOKE) if c.name == "supernet_overhead.train")
    assert lazy.shape == "tiny space, G=4x1, 56px" and lazy.provider_names == ("ours", "masked", "loop")
    case = lazy.case()
    case.validate()
    assert case.items == 4
    counts = {provider: tuple(map(int, numbers)) for provider, *numbers in
              re.findall(r"(\w+) calls/step (\d+) = aten (\d+) \+ resnas (\d+)", case.notes)}
    assert set(counts) == {"ours", "masked", "loop"}
    assert all(total == aten + resnas and aten > 0 for total, aten, resnas in counts.values())
    assert counts["ours"][2] > 0 and counts["masked"][2] == 0 and counts["loop"][2] == 0
    case.providers["ours"]()


def test_levit_onnxruntime_peer_is_declared_only_when_installed(monkeypatch):
    levit = importlib.import_module("resnas_kernels.bench.cases.levit")
    monkeypatch.setattr(levit, "onnxruntime_missing", lambda: "onnxruntime not installed (pip install ...)")
    assert "onnxruntime" not in levit.cases(CPU_SMOKE)[0].provider_names
    monkeypatch.setattr(levit, "onnxruntime_missing", lambda: None)
    cpu = [c.provider_names for c in levit.cases(Context(device=torch.device("cpu"), quick=True))]
    assert cpu and all("onnxruntime" in names and "timm_compiled" in names for names in cpu)
    shapes = [c.shape for c in levit.cases(Context(device=torch.device("cpu"), quick=True))]
    assert shapes == ["B=1,224", "B=16,224"]


@pytest.mark.slow
def test_levit_onnxruntime_peer_agrees_with_timm():
    """The exported timm model under ONNX Runtime computes timm's logits (checked at build, and here again)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    levit = importlib.import_module("resnas_kernels.bench.cases.levit")
    case = levit.cases(CPU_SMOKE)[0].case()
    case.validate()
    assert set(case.providers) == {"ours", "timm", "onnxruntime"} and case.skipped == {}
    ref = case.providers["timm"]()
    torch.testing.assert_close(case.providers["onnxruntime"](), ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())
