"""resnas_kernels.config: every runtime switch read from the environment once, setters, override(), clear errors."""
import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

from resnas_kernels import _ext, config, cpu_allocator, ragged

# name -> (getter, a valid non-default value, an invalid value). Every switch must be listed (checked below).
SWITCHES = {
    "backend": (config.requested_backend, "reference", "tensorrt"),
    "extension_disabled": (config.extension_disabled, True, "maybe"),
    "attention_fwd": (config.attention_fwd, "cuda", "tf32"),
    "autotune_cache": (config.autotune_cache, "/tmp/resnas-autotune.json", 3),
    "rsr_conv": (config.rsr_conv, "blocked", "onednn"),
    "malloc_tuning": (config.malloc_tuning, False, "2"),
    "validate_metadata": (config.validate_metadata, True, "sometimes"),
}
ROOT = Path(__file__).resolve().parents[1]


def test_every_switch_has_a_getter_a_setter_and_a_test_entry():
    assert set(SWITCHES) == set(config.KNOBS)
    for name in SWITCHES:
        assert callable(getattr(config, f"set_{name}"))


def test_environment_values_are_parsed_and_bad_ones_name_the_variable():
    assert config.read_environment({}) == {name: knob.default for name, knob in config.KNOBS.items()}
    values = config.read_environment({"RESNAS_BACKEND": " CPU ", "RESNAS_DISABLE_EXT": "1",
                                      "RESNAS_ATTENTION_FWD": "triton", "RESNAS_AUTOTUNE_CACHE": "/x/a.json",
                                      "RESNAS_RSR_CONV": "blocked", "RESNAS_MALLOC_TUNING": "0",
                                      "RESNAS_VALIDATE_METADATA": "yes"})
    assert values == {"backend": "cpu", "extension_disabled": True, "attention_fwd": "triton",
                      "autotune_cache": "/x/a.json", "rsr_conv": "blocked", "malloc_tuning": False,
                      "validate_metadata": True}
    assert config.read_environment({"RESNAS_AUTOTUNE_CACHE": ""})["autotune_cache"] is None
    bad = config.read_environment({"RESNAS_RSR_CONV": "onednn", "RESNAS_MALLOC_TUNING": "2"})
    assert re.fullmatch(r"RESNAS_RSR_CONV must be one of \('auto', 'blocked'\), got 'onednn'", str(bad["rsr_conv"]))
    assert str(bad["malloc_tuning"]).startswith("RESNAS_MALLOC_TUNING must be a boolean")


def test_a_malformed_variable_fails_where_it_is_used_not_at_import(monkeypatch):
    """A fresh copy of the module, imported with a bad value in the environment: the import and the other switches
    work; the bad switch's getter raises (every time) until a setter gives it a value."""
    monkeypatch.setenv("RESNAS_RSR_CONV", "onednn")
    monkeypatch.setenv("RESNAS_BACKEND", "reference")
    spec = importlib.util.spec_from_file_location("_fresh_config", Path(config.__file__))
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fresh)  # dataclasses look their module up while it executes
    spec.loader.exec_module(fresh)
    assert fresh.requested_backend() == "reference"
    for _ in range(2):
        with pytest.raises(ValueError, match="RESNAS_RSR_CONV must be one of"):
            fresh.rsr_conv()
    fresh.set_rsr_conv("blocked")
    assert fresh.rsr_conv() == "blocked"


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_setter_wins_over_the_environment_and_none_returns_to_it(name):
    getter, value, invalid = SWITCHES[name]
    setter = getattr(config, f"set_{name}")
    before = getter()
    try:
        setter(value)
        assert getter() == value and getter() != before
        with pytest.raises(ValueError, match=f"^{name} must be"):
            setter(invalid)
        assert getter() == value  # a refused value changes nothing
    finally:
        setter(None)
    assert getter() == before


def test_override_restores_nested_and_on_error():
    from_env = config.read_environment(os.environ)
    cache = config.autotune_cache()
    config.set_rsr_conv("blocked")
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with config.override(rsr_conv="auto", validate_metadata=True):
                assert (config.rsr_conv(), config.validate_metadata()) == ("auto", True)
                with config.override(rsr_conv=None):
                    assert config.rsr_conv() == from_env["rsr_conv"]
                assert config.rsr_conv() == "auto"
                raise RuntimeError("inside")
        assert config.rsr_conv() == "blocked" and config.validate_metadata() is False
    finally:
        config.set_rsr_conv(None)
    with pytest.raises(TypeError, match=r"unknown switch\(es\) \['rsr'\]"):
        with config.override(rsr="blocked"):
            pass
    with pytest.raises(ValueError, match="autotune_cache must be a file path"):
        with config.override(autotune_cache=3):
            pass
    assert config.autotune_cache() == cache


def test_empty_autotune_cache_turns_the_environment_one_off(set_environ):
    set_environ("RESNAS_AUTOTUNE_CACHE", "/tmp/resnas-autotune.json")
    assert config.autotune_cache() == "/tmp/resnas-autotune.json"
    with config.override(autotune_cache=""):
        assert config.autotune_cache() is None
    assert config.autotune_cache() == "/tmp/resnas-autotune.json"


def test_the_package_reads_its_switches_from_config(monkeypatch):
    with config.override(extension_disabled=True):
        module, why = _ext.load_extension.__wrapped__()  # uncached: the real loader is loaded once per process
        assert module is None and "RESNAS_DISABLE_EXT" in why
    assert ragged.validate_metadata is config.validate_metadata
    with config.override(validate_metadata=True):
        assert ragged.validate_metadata()
    monkeypatch.setattr(cpu_allocator, "_state", "default")  # tune_cpu_allocator records its answer here
    with config.override(malloc_tuning=False):
        assert cpu_allocator.tune_cpu_allocator() is False
        assert cpu_allocator.cpu_allocator_state() == "default (RESNAS_MALLOC_TUNING=0)"


def test_reset_overrides_returns_every_switch_to_the_environment():
    from_env = config.read_environment(os.environ)
    config.set_rsr_conv("blocked")
    config.set_validate_metadata(True)
    config.reset_overrides()
    assert (config.rsr_conv(), config.validate_metadata()) == (from_env["rsr_conv"], from_env["validate_metadata"])


# These exercise the environment path on purpose (set_environ, subprocesses, a fresh module copy).
ENVIRONMENT_TESTS = {"resnas_kernels/config.py", "tests/test_config.py", "tests/test_backend.py",
                     "tests/test_cpu_allocator.py", "tests/conftest.py"}


def test_switch_variables_are_read_only_by_config():
    names = "|".join(re.escape(k.env) for k in config.KNOBS.values())
    literal = re.compile(rf"[\"']({names})[\"']")
    found = {}
    for folder in ("resnas_kernels", "models", "search", "bench", "csrc", "tests", "scripts"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".cpp", ".h", ".cu", ".sh") or not path.is_file():
                continue
            rel = path.relative_to(ROOT).as_posix()
            count = len(literal.findall(path.read_text(errors="replace")))
            if count and rel not in ENVIRONMENT_TESTS:
                found[rel] = count
    assert found == {}, (
        "read runtime switches through resnas_kernels.config (its getters) and switch them in tests with "
        "config.override(...), not os.environ / getenv")


def test_readme_lists_every_switch():
    """The README's table of runtime switches is config.markdown_table(), verbatim: a new knob or a changed
    description must reach the README."""
    assert config.markdown_table() in (ROOT / "README.md").read_text()
