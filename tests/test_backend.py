"""Backend selection: set_backend / RESNAS_BACKEND / auto resolution / clear errors for forced backends."""
import pytest
import torch

import resnas_kernels as rk
from resnas_kernels import _ext, config
from resnas_kernels.backend import BackendUnavailableError, resolve_backend


def test_set_backend_validates_the_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        rk.set_backend("tensorrt")


def test_env_var_is_read_and_validated(set_environ):
    set_environ("RESNAS_BACKEND", "reference")
    assert rk.get_backend() == "reference"
    assert resolve_backend("ragged_layer_norm", torch.device("cpu")) == "reference"
    set_environ("RESNAS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="RESNAS_BACKEND must be one of"):
        rk.get_backend()
    set_environ("RESNAS_BACKEND", None)
    assert rk.get_backend() == "auto"


def test_set_backend_overrides_env_and_use_backend_restores(set_environ):
    set_environ("RESNAS_BACKEND", "reference")
    rk.set_backend("auto")
    assert rk.get_backend() == "auto"
    with rk.use_backend("reference"):
        assert rk.get_backend() == "reference"
    assert rk.get_backend() == "auto"
    with rk.use_backend(None):
        assert rk.get_backend() == "reference"  # None: the environment's value
    rk.set_backend(None)
    assert rk.get_backend() == "reference"


def test_auto_on_cpu_uses_the_cpp_kernels_when_built_else_the_reference():
    expected = "cpu" if _ext.extension_available() else "reference"
    assert resolve_backend("ragged_layer_norm", torch.device("cpu")) == expected


def test_forcing_cuda_on_cpu_tensors_is_a_clear_error():
    rk.set_backend("cuda")
    x = torch.zeros(2, 3, 8)
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' was requested for ragged_layer_norm on cpu"):
        rk.ragged_layer_norm(x, torch.ones(8), torch.zeros(8))


def test_forcing_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    rk.set_backend("triton")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        resolve_backend("ragged_layer_norm", torch.device("cpu"))


def test_missing_extension_is_reported_not_fatal(monkeypatch):
    monkeypatch.setattr(_ext, "load_extension", lambda: (None, "resnas_kernels._C not importable (test)"))
    assert resolve_backend("ragged_layer_norm", torch.device("cpu")) == "reference"
    rk.set_backend("cpu")
    with pytest.raises(BackendUnavailableError, match="not importable"):
        resolve_backend("ragged_layer_norm", torch.device("cpu"))
