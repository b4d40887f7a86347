"""torch.func transforms and forward-mode AD over the modules (fusedrnn/transforms.py).

torch.nn's modules support torch.func.grad / vjp / jacrev / jacfwd / jvp and dual tensors;
fusedrnn's ops cannot take part in them, so backend "auto" runs torch.nn's forward there
(the results are torch.nn's) and a forced backend refuses with a clear error. A plain vmap
still runs the fused backend (torch.nn's LSTM has no batching rule for it).
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vjp, vmap

import fusedrnn
from fusedrnn.backends import TORCH_NN, available_backends

from module_harness import make_pair

CFG = dict(input_size=4, hidden_size=5, num_layers=2, bidirectional=True)
CELL_CLASSES = {"lstm": (nn.LSTMCell, fusedrnn.LSTMCell), "gru": (nn.GRUCell, fusedrnn.GRUCell),
                "rnn": (nn.RNNCell, fusedrnn.RNNCell)}


def _out(o):
    return o[0] if isinstance(o, tuple) else o


def _loss(module):
    def f(params, x):
        return _out(functional_call(module, params, (x,))).square().sum()
    return f


def _params(module):
    return {k: v.detach() for k, v in module.named_parameters()}


def _assert_tree_close(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-10, rtol=1e-10, msg=k)
    else:
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def _pair(cell, backend="auto", seq=True):
    if seq:
        return make_pair(cell, backend, **CFG)
    torch_cls, fused_cls = CELL_CLASSES[cell]
    ref = torch_cls(4, 5).double()
    ours = fused_cls(4, 5, backend=backend).double()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _x(seq):
    return torch.randn(6, 3, 4, dtype=torch.float64) if seq else torch.randn(3, 4, dtype=torch.float64)


@pytest.mark.parametrize("seq", [True, False], ids=["sequence", "cell"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_grad_vjp_jacrev_match_torch_nn(cell, seq):
    ref, ours = _pair(cell, seq=seq)
    x = _x(seq)
    _assert_tree_close(grad(_loss(ours))(_params(ours), x), grad(_loss(ref))(_params(ref), x))
    assert ours.last_backend == TORCH_NN and "torch.func.grad" in ours.last_backend_reason
    _assert_tree_close(jacrev(lambda x: _out(ours(x)))(x), jacrev(lambda x: _out(ref(x)))(x))
    cot = torch.randn_like(_out(ref(x)))
    _assert_tree_close(vjp(lambda x: _out(ours(x)), x)[1](cot)[0], vjp(lambda x: _out(ref(x)), x)[1](cot)[0])
    # Outside the transform the fused backend runs again.
    with torch.no_grad():
        ours(x)
    assert ours.last_backend != TORCH_NN


@pytest.mark.parametrize("seq", [True, False], ids=["sequence", "cell"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_forward_mode_matches_torch_nn(cell, seq):
    ref, ours = _pair(cell, seq=seq)
    x = _x(seq)
    t = torch.randn_like(x)
    want = jvp(lambda x: _out(ref(x)), (x,), (t,))
    got = jvp(lambda x: _out(ours(x)), (x,), (t,))
    _assert_tree_close(got[0], want[0])
    _assert_tree_close(got[1], want[1])
    assert ours.last_backend == TORCH_NN and "torch.func.jvp" in ours.last_backend_reason
    _assert_tree_close(jacfwd(lambda x: _out(ours(x)))(x), jacfwd(lambda x: _out(ref(x)))(x))
    # Dual tensors (torch.autograd.forward_ad), in the input and in a weight.
    w = "weight_hh_l0" if seq else "weight_hh"
    tw = torch.randn_like(getattr(ref, w))
    tangents = []
    for m in (ref, ours):
        with fwAD.dual_level():
            params = dict(_params(m), **{w: fwAD.make_dual(getattr(m, w).detach(), tw)})
            y = _out(functional_call(m, params, (fwAD.make_dual(x, t),)))
            tangents.append(fwAD.unpack_dual(y).tangent)
    _assert_tree_close(tangents[1], tangents[0])
    assert ours.last_backend == TORCH_NN and "forward-mode AD" in ours.last_backend_reason


def test_per_sample_gradients_match_torch_nn():
    """vmap over grad: the per-sample gradients of functorch's tutorial, with an LSTM. (In
    float32: torch.nn's own LSTM fails this in float64 on torch 2.14, a broadcast error.)"""
    ref, ours = make_pair("lstm", "auto", dtype=torch.float32, input_size=4, hidden_size=5, batch_first=True)
    x = torch.randn(3, 1, 6, 4)  # 3 samples of batch 1
    per_sample = [vmap(grad(_loss(m)), in_dims=(None, 0))(_params(m), x) for m in (ref, ours)]
    _assert_tree_close(per_sample[1], per_sample[0])
    assert per_sample[1]["weight_hh_l0"].shape == (3, 20, 5)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_forced_backend_refuses_with_a_clear_error(backend):
    if backend not in available_backends("cpu"):
        pytest.skip(f"backend {backend!r} not built")
    _, ours = make_pair("gru", backend, **CFG)
    _, cell = _pair("lstm", backend, seq=False)
    x = _x(True)
    for fn in (lambda: grad(_loss(ours))(_params(ours), x),
               lambda: jvp(lambda x: ours(x)[0], (x,), (torch.randn_like(x),)),
               lambda: grad(_loss(cell))(_params(cell), x[0])):
        with pytest.raises(RuntimeError, match=f"backend '{backend}' cannot run under torch.func.*backend='auto'"):
            fn()
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
        ours(fwAD.make_dual(x, torch.randn_like(x)))
    # Without a dual tensor in the call, a dual level alone changes nothing.
    with fwAD.dual_level():
        y = ours(x)[0]
    assert ours.last_backend == backend and fwAD.unpack_dual(y).tangent is None


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_plain_vmap_runs_the_fused_backend(cell):
    ref, ours = make_pair(cell, "auto", **CFG)
    xs = torch.randn(4, 6, 3, 4, dtype=torch.float64)
    got = vmap(lambda x: ours(x)[0])(xs)
    assert ours.last_backend not in (TORCH_NN, None)
    with torch.no_grad():
        want = torch.stack([ref(x)[0] for x in xs])
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_vmap_over_stacked_weights_runs_an_ensemble(cell):
    """Model ensembling (torch.func.stack_module_state + vmap over the weights): torch.nn's
    RNNs have no batching rule for it; fusedrnn's ops run once per model."""
    models = [make_pair(cell, "auto", input_size=4, hidden_size=5)[1] for _ in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    base = models[0]
    x = torch.randn(6, 2, 4, dtype=torch.float64)
    got = vmap(lambda p, b: functional_call(base, (p, b), (x,))[0])(params, buffers)
    assert base.last_backend not in (TORCH_NN, None)
    with torch.no_grad():
        want = torch.stack([m(x)[0] for m in models])
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
