"""Test tiers: the default run is CPU-only (reference, C++ CPU, Triton under the interpreter at small shapes);
`gpu` tests run only with CUDA; `bench` is excluded unless asked for (`-m bench`)."""
import os
import zlib

# Must precede any `import triton` (including torch's lazy ones): kernels are turned into interpreter objects at
# decoration time. On a CUDA machine the GPU tiers need real kernels, so interpretation stays off there.
if os.environ.get("RESNAS_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from _backends import model_backend  # noqa: E402
from _backends import require_backend as require_backend_now  # noqa: E402

def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return
    why = ("no CUDA device" if not torch.cuda.is_available()
           else "TRITON_INTERPRET=1 is set; run GPU tests with RESNAS_TEST_GPU=1")
    skip_gpu = pytest.mark.skip(reason=f"gpu test: {why}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_settings(request):
    """Every test starts from the default runtime switches (the environment's, no setter in force: a test may call
    `config.set_*` freely) and its own fixed seed: crc32 of the test's id, plus RESNAS_TEST_SEED (default 0). Inputs
    are still fresh random draws, different per test, but a failure reproduces exactly; set RESNAS_TEST_SEED to
    another integer to draw another sample of inputs for every test."""
    from resnas_kernels import config

    offset = int(os.environ.get("RESNAS_TEST_SEED", "0"))
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) + offset) % (2 ** 63))
    config.reset_overrides()
    yield
    config.reset_overrides()


@pytest.fixture
def set_environ(monkeypatch):
    """`set_environ(name, value_or_None)` sets (None: removes) an environment variable and makes
    `resnas_kernels.config` read the environment again; both are restored after the test. For tests of the
    environment variables themselves: other tests switch knobs with `config.override(...)`."""
    from resnas_kernels import config

    def set_(name: str, value) -> None:
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        config.reload_from_environment()

    yield set_
    monkeypatch.undo()
    config.reload_from_environment()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (`pytestmark = pytest.mark.usefixtures("one_thread")`): on the shared
    2-core CI box, waking a thread team per tiny op, or OpenMP threads spinning against other processes, cost far
    more than the ops themselves (gradcheck ran 6x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def require_backend():
    """`require_backend(backend, ext_ops=())` at the start of a test that forces `backend`: the C++ backends (cpu,
    cuda) need the extension, and the ops named in `ext_ops`; the other backends need nothing. Session-scoped (it
    holds no state), so hypothesis tests may use it too."""
    return require_backend_now


@pytest.fixture(scope="session")
def cpu_backend() -> str:
    """The backend a CPU test of a whole model forces: the C++ kernels, or the reference where the extension was
    deliberately not built (RESNAS_EXPECT_EXT=0)."""
    return model_backend()
