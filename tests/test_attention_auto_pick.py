"""The per-shape auto pick between interchangeable GPU forwards (`AutoPicker`, used by ragged_attention's CUDA forward):
the decision logic with fake timers, so no GPU is needed."""
import pytest

from resnas_kernels import config
from resnas_kernels.ops.ragged_attention.auto_pick import AutoPicker


def _picker(times, **kw):
    """An AutoPicker whose timer returns times[name] for runner `name` and counts the calls."""
    calls = {}

    def timer(fn):
        name = fn()
        return times[name]

    def runner(name):
        def run():
            calls[name] = calls.get(name, 0) + 1
            return name
        return run

    picker = AutoPicker("test", ("triton", "cuda"), timer=timer, sync=lambda: None, can_measure=lambda: True, **kw)
    return picker, {n: runner(n) for n in ("triton", "cuda")}, calls


def test_auto_pick_measures_once_and_caches():
    config.set_autotune_cache("")  # no disk cache (conftest resets the switches after each test)
    picker, runners, calls = _picker({"triton": 2e-5, "cuda": 1e-5}, warmup=1, reps=3)
    d = picker.pick(("shape", 1), runners)
    assert (d.winner, d.source) == ("cuda", "measured") and d.times == {"triton": 2e-5, "cuda": 1e-5}
    assert calls == {"triton": 4, "cuda": 4}  # warmup + reps each, once
    d = picker.pick(("shape", 1), runners)
    assert (d.winner, d.source) == ("cuda", "memory") and calls == {"triton": 4, "cuda": 4}  # no re-measurement
    assert picker.pick(("shape", 2), runners).source == "measured"  # another key is measured on its own


def test_auto_pick_keeps_default_within_margin_and_drops_failures():
    config.set_autotune_cache("")  # no disk cache (conftest resets the switches after each test)
    picker, runners, _ = _picker({"triton": 1.00e-5, "cuda": 0.97e-5})  # 3% faster: noise, keep the default
    assert picker.pick("k", runners).winner == "triton"
    picker, runners, _ = _picker({"triton": 1.0e-5, "cuda": 0.5e-5})
    runners["cuda"] = lambda: (_ for _ in ()).throw(RuntimeError("launch failed"))
    d = picker.pick("k", runners)
    assert d.winner == "triton" and "launch failed" in d.why["cuda"]
    picker, runners, _ = _picker({"triton": 1.0e-5, "cuda": 0.5e-5})
    assert picker.pick("k", {"triton": runners["triton"]}).source == "default"  # cuda cannot take this shape


def test_auto_pick_override_and_disk_cache(tmp_path):
    path = tmp_path / "autotune.json"
    config.set_autotune_cache(path)
    choice = {"value": "cuda"}
    picker, runners, calls = _picker({"triton": 1e-5, "cuda": 3e-5}, override=lambda: choice["value"])
    assert picker.pick("k", runners).winner == "cuda" and not calls  # the override wins without measuring
    choice["value"] = "tf32"
    with pytest.raises(ValueError, match="test: the override must be one of auto, triton, cuda"):
        picker.pick("k", runners)
    choice["value"] = "auto"
    assert picker.pick("k", runners).source == "measured" and path.exists()
    fresh, runners2, calls2 = _picker({"triton": 9.0, "cuda": 1e-9})  # another process: reads the disk decision
    d = fresh.pick("k", runners2)
    assert (d.winner, d.source) == ("triton", "disk") and not calls2


def test_auto_pick_does_not_measure_when_it_cannot():
    config.set_autotune_cache("")  # no disk cache (conftest resets the switches after each test)
    picker, runners, calls = _picker({"triton": 1.0, "cuda": 1e-6})
    picker.can_measure = lambda: False  # e.g. during CUDA graph capture
    d = picker.pick("k", runners)
    assert (d.winner, d.source) == ("triton", "default") and not calls and not picker.decisions()
