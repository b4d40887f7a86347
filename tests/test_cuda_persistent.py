"""The persistent CUDA kernels (csrc/cuda/kernels/persistent.cuh) on a real GPU: forced with
set_cuda_algo('persistent') against the reference (forward and every gradient, each cell and
dtype, lengths, reverse, the hidden sizes of the ptxas report), and the auto choice on this
device. Skipped without a GPU; in CI the same sources run under the CPU emulation
(test_emulated_persistent.py)."""
import pytest
import torch

from op_harness import make_inputs
from test_emulated_ops import check_kernel
from fusedrnn.backends import registry
from fusedrnn.backends.native import last_cuda_algo, set_cuda_algo

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _persistent():
    why = registry()["cuda"].unavailable()
    if why:
        pytest.skip(f"cuda backend unavailable: {why}")
    prev = set_cuda_algo("persistent")
    yield
    set_cuda_algo(prev)


VARIANTS = [dict(), dict(lengths=True, reverse=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("H", [7, 129, 256, 512, 1024])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "+".join(v) or "plain")
def test_against_reference(cell, H, dtype, variant):
    B = 16
    if cell == "lstm" and H == 1024 and dtype == torch.float32:
        torch.cuda.empty_cache()
    args = make_inputs(cell, 12, B, H, dtype=dtype, device="cuda", **variant)
    try:
        check_kernel("cuda", cell, args)
    except RuntimeError as e:  # too big for this device's shared memory: must say so
        assert "cannot run persistent" in str(e)
        pytest.skip(str(e))
    assert last_cuda_algo().startswith(f"{cell} backward: persistent"), last_cuda_algo()


def test_auto_uses_persistent_for_a_small_batch_and_says_why():
    set_cuda_algo("auto")
    args = make_inputs("lstm", 8, 16, 256, dtype=torch.bfloat16, device="cuda")
    registry()["cuda"].op("lstm", "forward")(*args)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert last_cuda_algo().startswith("lstm forward: persistent (auto:"), last_cuda_algo()
    assert f"<= {sms} SMs" in last_cuda_algo()


def test_auto_falls_back_when_the_weights_do_not_fit():
    set_cuda_algo("auto")
    args = make_inputs("lstm", 2, 2, 2048, dtype=torch.float32, device="cuda")
    registry()["cuda"].op("lstm", "forward")(*args)
    assert last_cuda_algo().startswith("lstm forward: per_step (auto:"), last_cuda_algo()
