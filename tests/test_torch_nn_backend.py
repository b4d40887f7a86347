"""backend="torch.nn": the module runs torch.nn's own forward (fusedrnn's modules are
torch.nn modules), for computations fusedrnn's ops do not support, such as a double
backward through a layer traced by torch.jit.trace on a backend with Python autograd; the
double-backward error points to it."""
import pytest
import torch
from torch import nn

import fusedrnn

KINDS = [("LSTM", {"num_layers": 2, "proj_size": 3}), ("GRU", {"bidirectional": True}), ("RNN", {}),
         ("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {})]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _pair(kind, kw, backend):
    torch.manual_seed(0)
    ours = getattr(fusedrnn, kind)(4, 6, backend=backend, **kw).double()
    ref = getattr(nn, kind)(4, 6, **kw).double()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _gradient_penalty(module, x):
    """d/dW of |d(sum y^2)/dx|^2: a gradient of a gradient through the RNN."""
    y = _first(module(x))
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    return torch.autograd.grad(gx.square().sum(), list(module.parameters()))


@pytest.mark.parametrize("kind,kw", KINDS, ids=[k for k, _ in KINDS])
def test_torch_nn_backend_is_torch_nn_exactly_double_backward_included(kind, kw):
    ours, ref = _pair(kind, kw, "torch.nn")
    assert "backend='torch.nn'" in repr(ours)
    shape = (3, 4) if kind.endswith("Cell") else (5, 3, 4)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(_first(ours(x)), _first(ref(x)), rtol=0, atol=0)
    assert ours.last_backend == "torch.nn" and "forced" in ours.last_backend_reason
    for a, b in zip(_gradient_penalty(ours, x), _gradient_penalty(ref, x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _traced_gradient_penalty(module, x):
    """_gradient_penalty through torch.jit.trace(module) (the traced graph shares the
    module's parameters)."""
    return _gradient_penalty(torch.jit.trace(module, (x,), check_trace=False), x)


@pytest.mark.parametrize("kind,kw", KINDS[:2] + KINDS[4:5], ids=["LSTM", "GRU", "GRUCell"])
def test_double_backward_error_points_to_the_torch_nn_backend(kind, kw):
    """Where double backward is not supported (here the reference backend under
    torch.jit.trace, whose input projection leaves no inputs to recompute gx from;
    elsewhere it is: tests/test_double_backward.py), the error says what to do."""
    ours, ref = _pair(kind, kw, "reference")
    shape = (3, 4) if kind.endswith("Cell") else (5, 3, 4)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward.*backend to 'torch.nn'"):
        _traced_gradient_penalty(ours, x)
    ours.backend = "torch.nn"  # as the message says
    for a, b in zip(_traced_gradient_penalty(ours, x), _traced_gradient_penalty(ref, x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_convert_with_the_torch_nn_backend_and_what_it_allows():
    model = nn.Sequential(nn.Linear(4, 4), nn.GRU(4, 6))
    fusedrnn.convert(model, backend="torch.nn")
    assert isinstance(model[1], fusedrnn.GRU) and model[1].backend == "torch.nn"
    x = torch.randn(5, 3, 4)
    # torch.func and scripting run as with torch.nn (a forced fusedrnn backend refuses them)
    params = dict(model[1].named_parameters())
    grads = torch.func.grad(lambda p: torch.func.functional_call(model[1], p, (x,))[0].sum())(params)
    assert set(grads) == set(params)

    class Wrap(nn.Module):
        def __init__(self, rnn):
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            return self.rnn(x)[0]
    scripted = torch.jit.script(Wrap(model[1]))
    torch.testing.assert_close(scripted(x), model[1](x)[0], rtol=0, atol=0)


def test_unknown_backend_lists_torch_nn():
    with pytest.raises(ValueError, match="'torch.nn'"):
        fusedrnn.LSTM(4, 6, backend="torch")
