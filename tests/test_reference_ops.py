"""The reference op itself: gradcheck (its hand-written backward against numerical
derivatives of its forward) and opcheck (schema, fake kernel, autograd registration)."""
import pytest
import torch

from op_harness import gradcheck_backend, make_inputs, opcheck_backend

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


def test_double_backward_raises_instead_of_silently_wrong():
    import fusedrnn
    m = fusedrnn.GRU(3, 4, backend="reference").double()
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(m(x)[0].pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()
