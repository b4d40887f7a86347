"""fusedrnn.LSTM/GRU/RNN(..., backend="triton") against torch.nn under the Triton interpreter
(CPU tensors, fp32), forward and backward through the whole module (input projection,
layers, directions, packing). The GPU counterpart is tests/test_gpu_modules.py."""
import pytest
import torch

import fusedrnn
from module_harness import compare_modules

# fp32 on both sides: the differences are fp32 summation order only
ATOL, RTOL = 2e-5, 1e-4

CFGS = {
    "lstm": dict(input_size=7, hidden_size=20, num_layers=2, bidirectional=True, batch_first=True),
    "lstm-proj": dict(input_size=7, hidden_size=20, proj_size=9, num_layers=2, bidirectional=True),
    "gru": dict(input_size=7, hidden_size=20, bidirectional=True, bias=False),
    "gru-2layer": dict(input_size=5, hidden_size=18, num_layers=2),
    "rnn-relu": dict(input_size=7, hidden_size=20, nonlinearity="relu", bidirectional=True),
    "rnn-tanh": dict(input_size=7, hidden_size=20, num_layers=2, batch_first=True),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("name", list(CFGS))
@pytest.mark.parametrize("input_kind,hx", [("batched", True), ("packed_unsorted", False), ("unbatched", True)])
def test_module_matches_torch_nn(name, input_kind, hx):
    cell = name.split("-")[0]
    compare_modules(cell, "triton", CFGS[name], input_kind, hx, dtype=torch.float32, atol=ATOL, rtol=RTOL,
                    T=5, B=3, init_range=None)


@pytest.mark.interpreter
def test_module_reports_triton_ran():
    m = fusedrnn.GRU(4, 16, backend="triton")
    m(torch.randn(3, 2, 4))
    assert m.last_backend == "triton"


@pytest.mark.interpreter
def test_forced_triton_float64_errors_clearly():
    m = fusedrnn.GRU(4, 16, backend="triton").double()
    with pytest.raises(RuntimeError, match="float64"):
        m(torch.randn(3, 2, 4, dtype=torch.float64))


def test_auto_on_cpu_never_picks_triton():
    m = fusedrnn.LSTM(4, 16)
    m(torch.randn(3, 2, 4))
    assert m.last_backend != "triton"
