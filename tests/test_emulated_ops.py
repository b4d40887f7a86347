"""The CUDA kernels (csrc/cuda/kernels/) run by the CPU emulation of the CUDA execution
model, against the reference op: forward outputs and every gradient, for each cell and
dtype, with lengths, reverse, batch 1, T 1, hidden sizes that are not multiples of the
tile (32 units x 4 batch rows) and grids of several blocks."""
import pytest
import torch

from op_harness import check_against_reference, make_inputs
from fusedrnn.backends import registry

pytestmark = pytest.mark.emulated


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (T, B, H, P): several blocks in both grid dimensions, sizes off the tile, batch 1, T 1
SHAPES = [(5, 6, 40, 0), (1, 1, 7, 0), (4, 1, 33, 0), (3, 9, 20, 0)]
LSTM_PROJ = [(4, 5, 36, 5), (3, 2, 9, 40)]  # P < H, and P > H spanning two column blocks
VARIANTS = [dict(), dict(lengths=True), dict(reverse=True), dict(lengths=True, reverse=True)]


def check_kernel(backend, cell, args):
    """Forward outputs and every gradient of `backend` against the reference (half inputs:
    gradients against the reference at the same dtype, see op_harness)."""
    check_against_reference(backend, cell, args)


def _vid(v):
    return "+".join(k for k in v) or "plain"


def _cases(cell):
    shapes = SHAPES + (LSTM_PROJ if cell == "lstm" else [])
    return [(s, v) for s in shapes for v in VARIANTS]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,variant", _cases("rnn"), ids=lambda x: _vid(x) if isinstance(x, dict) else str(x))
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
def test_rnn(shape, variant, relu, dtype):
    T, B, H, _ = shape
    check_kernel("emulated", "rnn", make_inputs("rnn", T, B, H, dtype=dtype, relu=relu, **variant))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,variant", _cases("lstm"), ids=lambda x: _vid(x) if isinstance(x, dict) else str(x))
def test_lstm(shape, variant, dtype):
    T, B, H, P = shape
    check_kernel("emulated", "lstm", make_inputs("lstm", T, B, H, P=P, dtype=dtype, **variant))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,variant", _cases("gru"), ids=lambda x: _vid(x) if isinstance(x, dict) else str(x))
@pytest.mark.parametrize("bias", [True, False], ids=["b_hh", "no_b_hh"])
def test_gru(shape, variant, bias, dtype):
    T, B, H, _ = shape
    check_kernel("emulated", "gru", make_inputs("gru", T, B, H, dtype=dtype, bias=bias, **variant))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_zero_length_sequences_and_T0(cell):
    """lengths containing 0 (the state passes through untouched), and T == 0."""
    args = list(make_inputs(cell, 4, 3, 10, lengths=True, reverse=True))
    L_idx = 5 if cell == "lstm" else 4 if cell == "gru" else 3
    args[L_idx] = torch.tensor([0, 4, 2])
    check_against_reference("emulated", cell, tuple(args))
    # T == 0 (the reference cannot stack zero steps): the state passes through, both ways.
    args = [a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in make_inputs(cell, 0, 2, 5)]
    outs = registry()["emulated"].op(cell, "forward")(*args)
    assert outs[0].shape == (0, 2, 5) and torch.equal(outs[1], args[1])
    g = torch.randn_like(outs[1])
    assert torch.equal(torch.autograd.grad(outs[1], args[1], g)[0], g)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_every_schedule_gives_the_same_bits(cell):
    """The kernels have no data race the emulator's schedules could expose: reversed,
    forward and random thread orders give bit-identical results."""
    E = pytest.importorskip("fusedrnn._emulated")
    args = make_inputs(cell, 3, 5, 35, lengths=True)
    op = registry()["emulated"].op(cell, "forward")
    saved = E.get_schedule()
    try:
        outs = []
        for mode, seed in [(1, 0), (2, 0), (3, 1), (3, 2)]:
            E.set_schedule(mode, seed)
            outs.append(op(*args))
    finally:
        E.set_schedule(*saved)
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b)


def test_opcheck_and_auto_never_picks_emulated():
    from op_harness import opcheck_backend
    from fusedrnn.backends import AUTO_ORDER
    opcheck_backend("emulated", "lstm", make_inputs("lstm", 3, 2, 6, P=3, lengths=True, reverse=True))
    assert "emulated" not in AUTO_ORDER["cpu"]
