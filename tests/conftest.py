import os
import zlib

import pytest
import torch

# With no GPU, Triton kernels run under the interpreter, which must be switched
# on before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Backends fill the outputs they allocate with NaN first (fusedrnn._debug), so a
# kernel that forgets to write an element fails the comparison.
os.environ["FUSEDRNN_POISON"] = "1"


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_interp = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 (set before triton is imported)")
    no_emulation = None
    if any(item.get_closest_marker("emulated") for item in items):
        from fusedrnn.backends import registry
        why = registry()["emulated"].unavailable()
        no_emulation = pytest.mark.skip(reason=f"emulated backend: {why}") if why else None
    for item in items:
        if no_emulation is not None and item.get_closest_marker("emulated"):
            item.add_marker(no_emulation)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "interpreter" in item.keywords and os.environ.get("TRITON_INTERPRET") != "1":
            item.add_marker(no_interp)


# Random inputs per test, reproducible per test id: a CRC of the id (Python's hash() of a
# str is salted per process, so a failure it drew could not be drawn again), mixed with
# FUSEDRNN_TEST_SEED (default 0) to draw another set, e.g. in a loop of soak runs.
TEST_SEED = int(os.environ.get("FUSEDRNN_TEST_SEED", "0"))


def pytest_report_header(config):
    return f"fusedrnn: FUSEDRNN_TEST_SEED={TEST_SEED} (inputs drawn per test id and this seed)"


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) ^ TEST_SEED * 0x9E3779B1) % (2**31))


@pytest.fixture
def cpu_options():
    """Set the cpu kernels' tuning knobs (fusedrnn._C._set_options) for one test, restored after."""
    from fusedrnn import _C
    old = _C._set_options(-1, 0)
    threads = torch.get_num_threads()
    yield _C._set_options
    _C._set_options(*old)
    torch.set_num_threads(threads)


@pytest.fixture
def no_cpu_backend(monkeypatch):
    """As on an install without the compiled extension: only the reference runs CPU calls."""
    from fusedrnn import backends
    monkeypatch.setattr(backends.registry()["cpu"], "_state", "not built (test)")
    monkeypatch.setattr(backends, "_CHOICES", {})
