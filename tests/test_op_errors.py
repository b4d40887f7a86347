"""Bad arguments to the public recurrence ops (torch.ops.fusedrnn.*) raise a clear error on
every backend: never a crash, an out-of-bounds read or a silently wrong result."""
import pytest
import torch

from op_harness import make_inputs

from fusedrnn.backends import Call, registry

BACKENDS = ["reference", "cpu", "emulated", "triton"]
L_IDX = {"lstm": 5, "gru": 4, "rnn": 3}   # position of lengths in the forward schema
W_IDX = {"lstm": 3, "gru": 2, "rnn": 2}   # position of w_hh


def _bad_variants(cell):
    base = list(make_inputs(cell, 4, 3, 5, lengths=True))
    L, W = L_IDX[cell], W_IDX[cell]

    def with_(i, value):
        args = list(base)
        args[i] = value
        return args

    yield "gx 2-D", with_(0, base[0][0]), "3-D"
    yield "h0 batch", with_(1, base[1][:2]), "h0"
    yield "h0 width", with_(1, base[1][:, :4]), "h0"
    yield "h0 dtype", with_(1, base[1].double()), "dtype"
    yield "w_hh columns", with_(W, base[W][:, :4]), "w_hh"
    yield "w_hh rows", with_(W, base[W][:-1]), "w_hh"
    yield "lengths size", with_(L, base[L][:2]), "lengths"
    yield "lengths > T", with_(L, torch.tensor([9, 4, 4])), "lengths"
    yield "lengths < 0", with_(L, torch.tensor([-1, 4, 4])), "lengths"
    yield "lengths int32", with_(L, base[L].int()), "lengths"
    if cell == "lstm":
        yield "c0 batch", with_(2, base[2][:2]), "c0"
    if cell == "gru":
        yield "b_hh size", with_(3, torch.randn(7)), "b_hh"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_bad_forward_arguments_raise(backend, cell):
    be = registry().get(backend)
    why = be.refuses(Call(cell, torch.device("cpu"), torch.float32, 5)) if be else "not built"
    if why:
        pytest.skip(f"{backend}: {why}")
    fwd = be.op(cell, "forward")
    for what, args, word in _bad_variants(cell):
        with pytest.raises((RuntimeError, ValueError), match=word) as info:
            fwd(*args)
        assert "fusedrnn" in str(info.value), f"{backend} {what}: the error should name the op: {info.value}"
