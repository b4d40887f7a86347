"""The real CUDA kernels (fusedrnn._C_cuda) on a CUDA device: against the reference op
(forward and every gradient, each cell and dtype, lengths, reverse, odd sizes, several
blocks), and through the modules against torch.nn (cuDNN). Skipped without a GPU; the same
kernel sources run in CI under the CPU emulation (test_emulated_ops.py)."""
import pytest
import torch

from op_harness import TOL, make_inputs
from test_emulated_ops import check_kernel
from module_harness import compare_modules
from fusedrnn.backends import registry

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda_backend():
    why = registry()["cuda"].unavailable()
    if why:
        pytest.skip(f"cuda backend unavailable: {why}")


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(6, 7, 70, 0), (1, 1, 7, 0), (9, 1, 33, 0), (5, 37, 129, 0)]
VARIANTS = [dict(), dict(lengths=True), dict(reverse=True), dict(lengths=True, reverse=True)]


def _check(cell, args):
    check_kernel("cuda", cell, args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "+".join(v) or "plain")
@pytest.mark.parametrize("shape", SHAPES + [(4, 5, 36, 5), (3, 2, 9, 40)], ids=str)
def test_lstm(shape, variant, dtype):
    T, B, H, P = shape
    _check("lstm", make_inputs("lstm", T, B, H, P=P, dtype=dtype, device="cuda", **variant))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "+".join(v) or "plain")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_gru(shape, variant, bias, dtype):
    T, B, H, _ = shape
    _check("gru", make_inputs("gru", T, B, H, dtype=dtype, device="cuda", bias=bias, **variant))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "+".join(v) or "plain")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_rnn(shape, variant, relu, dtype):
    T, B, H, _ = shape
    _check("rnn", make_inputs("rnn", T, B, H, dtype=dtype, device="cuda", relu=relu, **variant))


def test_runs_on_the_current_stream_without_host_sync():
    """Forward and backward enqueue on the current (non-default) stream and never
    synchronize the host (a sync would raise under the 'error' sync debug mode)."""
    args = make_inputs("lstm", 8, 4, 64, dtype=torch.float32, device="cuda", lengths=True)
    args = tuple(a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    op = registry()["cuda"].op("lstm", "forward")
    s = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda.set_sync_debug_mode("error")
        try:
            y, h, c, _, _ = op(*args)
            torch.autograd.grad((y.sum() + h.sum() + c.sum()), [args[0], args[3]])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    s.synchronize()


@pytest.mark.parametrize("cell,extra", [("lstm", {}), ("lstm", {"proj_size": 7}), ("gru", {}),
                                        ("rnn", {"nonlinearity": "tanh"}), ("rnn", {"nonlinearity": "relu"})])
@pytest.mark.parametrize("input_kind", ["batched", "packed_unsorted"])
def test_modules_match_torch_nn_cudnn(cell, extra, input_kind):
    """fusedrnn modules on the cuda backend against torch.nn (cuDNN), fp32, 2 layers,
    bidirectional; cuDNN may use TF32, hence the tf32 tolerance."""
    cfg = dict(input_size=19, hidden_size=45, num_layers=2, bidirectional=True, **extra)
    atol, rtol = TOL["tf32"]
    compare_modules(cell, "cuda", cfg, input_kind, True, dtype=torch.float32, device="cuda", atol=atol, rtol=rtol,
                    T=11, B=6, init_range=None)
