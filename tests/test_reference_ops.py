"""The reference op itself: gradcheck (its hand-written backward against numerical
derivatives of its forward) and opcheck (schema, fake kernel, autograd registration)."""
import pytest
import torch

from op_harness import gradcheck_backend, make_inputs, opcheck_backend

from fusedrnn.backends import Call

CASES = [("lstm", 0, False), ("lstm", 3, False), ("gru", 0, False), ("gru", 0, True), ("rnn", 0, False),
         ("rnn", 0, True)]


@pytest.mark.parametrize("cell,P,flag", CASES)
@pytest.mark.parametrize("lengths", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck(cell, P, flag, lengths, reverse):
    kw = {"relu": flag} if cell == "rnn" else {"bias": not flag} if cell == "gru" else {}
    args = make_inputs(cell, 5, 3, 4, P=P, dtype=torch.float64, lengths=lengths, reverse=reverse, **kw)
    assert gradcheck_backend("reference", cell, args)


@pytest.mark.parametrize("cell,P", [("lstm", 0), ("lstm", 2), ("gru", 0), ("rnn", 0)])
def test_opcheck(cell, P):
    args = make_inputs(cell, 4, 3, 5, P=P, dtype=torch.float32, lengths=True, reverse=True)
    opcheck_backend("reference", cell, args)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_zero_length_sequences_keep_initial_state(cell):
    args = list(make_inputs(cell, 4, 3, 5, dtype=torch.float64, lengths=True))
    L_idx = 5 if cell == "lstm" else 4 if cell == "gru" else 3
    args[L_idx] = torch.tensor([0, 4, 2])
    from fusedrnn.backends import registry
    outs = registry()["reference"].op(cell, "forward")(*args)
    assert torch.equal(outs[1][0], args[1][0]), "h_n of a length-0 sequence must be h0"
    assert (outs[0][:, 0] == 0).all(), "outputs of a length-0 sequence must be 0"
    assert (outs[0][2:, 2] == 0).all() and (outs[0][:2, 2] != 0).all()


@pytest.mark.parametrize("backend", ["reference", "cpu", "emulated", "triton"])
@pytest.mark.parametrize("cell,P", [("lstm", 0), ("lstm", 2), ("gru", 0), ("rnn", 0)])
def test_empty_sequence_returns_initial_state(backend, cell, P):
    """T = 0 at the op level (the modules refuse it, like torch.nn): h_n = h0, empty y,
    and gradients flow straight from h_n (and c_n) to h0 (and c0)."""
    from fusedrnn.backends import registry
    be = registry().get(backend)
    why = be.refuses(Call(cell, torch.device("cpu"), torch.float32, 5, P, 3)) if be else "not built"
    if why:
        pytest.skip(f"{backend}: {why}")
    args = [a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in make_inputs(cell, 0, 3, 5, P=P)]
    outs = be.op(cell, "forward")(*args)
    assert outs[0].shape == (0, 3, P or 5)
    assert torch.equal(outs[1], args[1])
    g_h = torch.randn_like(outs[1])
    loss = (outs[1] * g_h).sum()
    if cell == "lstm":
        g_c = torch.randn_like(outs[2])
        assert torch.equal(outs[2], args[2])
        loss = loss + (outs[2] * g_c).sum()
    loss.backward()
    assert torch.equal(args[1].grad, g_h)
    if cell == "lstm":
        assert torch.equal(args[2].grad, g_c)
    w_hh = args[3] if cell == "lstm" else args[2]
    assert w_hh.grad is None or (w_hh.grad == 0).all()
