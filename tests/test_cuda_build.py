"""The CUDA build on GPUs it has no kernel code for: the cuda backend refuses their calls with
the reason (fusedrnn/backends/native.py, _cuda_refuses; csrc/cuda/rnn.cu,
kernel_image_missing), so that auto goes on to the next backend instead of failing at the
first launch. (A GPU without tensor cores' mma.m16n8k16: test_emulated_persistent.py.)"""
import sys
import types

import pytest
import torch

from fusedrnn.backends import Call, native, registry


@pytest.fixture
def fake_build(monkeypatch):
    """fusedrnn._C_cuda replaced by a stub that has code for device 0 only; counts its calls."""
    asked = []

    def kernel_image_missing(device):
        asked.append(device)
        return "" if device == 0 else f"no kernel code for this GPU (device {device})"

    monkeypatch.setitem(sys.modules, "fusedrnn._C_cuda", types.SimpleNamespace(kernel_image_missing=kernel_image_missing))
    monkeypatch.setattr(native, "_KERNEL_IMAGE", {})
    return asked


def _call(index):
    return Call(cell="lstm", device=torch.device("cuda", index), dtype=torch.float32, hidden_size=8)


def test_refuses_a_gpu_without_kernel_code_and_asks_once_per_device(fake_build):
    assert native._cuda_refuses(_call(0)) is None
    assert native._cuda_refuses(_call(1)) == "no kernel code for this GPU (device 1)"
    for _ in range(3):
        native._cuda_refuses(_call(0)), native._cuda_refuses(_call(1))
    assert fake_build == [0, 1]  # (select's cache aside, a device is asked once)


def test_the_refusal_is_the_backends_limit(fake_build):
    assert registry()["cuda"].limits is native._cuda_refuses


def test_kernel_image_missing_says_why_without_a_device():
    """The real build's check on this machine (no GPU): a reason, not a crash."""
    C = pytest.importorskip("fusedrnn._C_cuda", reason="fusedrnn._C_cuda is not built")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: test_cuda_ops.py runs the kernels")
    why = C.kernel_image_missing(0)
    assert isinstance(why, str) and "CUDA device 0" in why
