"""fusedrnn cells against torch.nn cells: shared weights, float64, forward and backward."""
import pytest
import torch
from torch import nn

import fusedrnn
from fusedrnn.backends import Call, registry

PAIRS = [(nn.LSTMCell, fusedrnn.LSTMCell, {}), (nn.GRUCell, fusedrnn.GRUCell, {}),
         (nn.RNNCell, fusedrnn.RNNCell, {"nonlinearity": "tanh"}), (nn.RNNCell, fusedrnn.RNNCell, {"nonlinearity": "relu"})]


def cell_dtype(name: str, cell: str) -> torch.dtype:
    """float64 if backend `name` runs it for a CPU step of `cell`, else float32 (the emulated
    CUDA kernels); a pytest skip if it runs neither."""
    be = registry().get(name)
    for dtype in (torch.float64, torch.float32):
        why = be.refuses(Call(cell, torch.device("cpu"), dtype, 6)) if be else "not built"
        if not why:
            return dtype
    pytest.skip(f"{name}: {why}")


# cpu: the cell ops (fusedrnn/cell_ops.py); the others: input projection + the sequence op, T = 1.
@pytest.mark.parametrize("backend", ["cpu", "reference", pytest.param("emulated", marks=pytest.mark.emulated)])
@pytest.mark.parametrize("torch_cls,fused_cls,kw", PAIRS, ids=["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("hx_given", [True, False])
def test_cell_matches_torch_nn(backend, torch_cls, fused_cls, kw, bias, batched, hx_given):
    cell = {nn.LSTMCell: "lstm", nn.GRUCell: "gru", nn.RNNCell: "rnn"}[torch_cls]
    dtype = cell_dtype(backend, cell)
    tol = 1e-12 if dtype == torch.float64 else 2e-6  # (one step, small sizes: float32 rounding)
    ref = torch_cls(5, 6, bias=bias, **kw).to(dtype)
    ours = fused_cls(5, 6, bias=bias, backend=backend, **kw).to(dtype)
    ours.load_state_dict(ref.state_dict())
    lead = (3,) if batched else ()
    x = torch.randn(*lead, 5, dtype=dtype, requires_grad=True)
    hx = None
    if hx_given:
        hx = torch.randn(*lead, 6, dtype=dtype, requires_grad=True)
        if torch_cls is nn.LSTMCell:
            hx = (hx, torch.randn(*lead, 6, dtype=dtype, requires_grad=True))
    # several steps, feeding the state back, as in decoding
    outs_ref, outs_ours = [], []
    h_ref, h_ours = hx, hx
    for _ in range(3):
        h_ref, h_ours = ref(x, h_ref), ours(x, h_ours)
        outs_ref += list(h_ref) if isinstance(h_ref, tuple) else [h_ref]
        outs_ours += list(h_ours) if isinstance(h_ours, tuple) else [h_ours]
    for a, b in zip(outs_ours, outs_ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    assert ours.last_backend == backend
    leaves = [x] + ([] if hx is None else list(hx) if isinstance(hx, tuple) else [hx])
    seeds = [torch.randn_like(o) for o in outs_ref]
    g_ref = torch.autograd.grad(outs_ref, leaves + list(ref.parameters()), seeds)
    g_ours = torch.autograd.grad(outs_ours, leaves + list(ours.parameters()), seeds)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=10 * tol, rtol=10 * tol)


@pytest.mark.parametrize("torch_cls,fused_cls", [(nn.LSTMCell, fusedrnn.LSTMCell), (nn.GRUCell, fusedrnn.GRUCell),
                                                 (nn.RNNCell, fusedrnn.RNNCell)], ids=["lstm", "gru", "rnn"])
@pytest.mark.parametrize("bias", [True, False])
def test_cell_parametrized_and_functional_weights_are_used(torch_cls, fused_cls, bias):
    """Weights that are not plain parameters reach the kernels: torch.func.functional_call with
    replacement tensors, and weight_norm (a parametrization) on weight_hh."""
    ref = torch_cls(3, 4, bias=bias).double()
    ours = fused_cls(3, 4, bias=bias).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, dtype=torch.float64)
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    replaced = {n: torch.randn_like(p) for n, p in ref.named_parameters()}
    want = first(torch.func.functional_call(ref, replaced, (x,)))
    got = first(torch.func.functional_call(ours, replaced, (x,)))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, first(ours(x))), "functional_call's tensors were ignored"
    for m in (ref, ours):
        nn.utils.parametrizations.weight_norm(m, "weight_hh")
        with torch.no_grad():
            m.parametrizations.weight_hh.original0.mul_(2.0)  # the norm: the weight doubles
    h = torch.randn(5, 4, dtype=torch.float64)
    hx = (h, h) if torch_cls is nn.LSTMCell else h
    torch.testing.assert_close(first(ours(x, hx)), first(ref(x, hx)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fused_cls", [fusedrnn.LSTMCell, fusedrnn.GRUCell, fusedrnn.RNNCell], ids=["lstm", "gru", "rnn"])
@pytest.mark.parametrize("no_grad", [False, True])
def test_cell_under_torch_compile(fused_cls, no_grad):
    """torch.compile(fullgraph=True) traces a cell step (on the cpu backend: the cell op through
    its fake kernel and C++ autograd) once the backends are loaded; results and gradients
    equal eager's."""
    m = fused_cls(4, 6)
    x = torch.randn(3, 4)
    m(x)
    torch._dynamo.reset()
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    with torch.set_grad_enabled(not no_grad):
        got, want = first(torch.compile(m, backend="aot_eager", fullgraph=True)(x)), first(m(x))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        if not no_grad:
            (g1,) = torch.autograd.grad(got.pow(2).sum(), m.weight_hh)
            (g2,) = torch.autograd.grad(want.pow(2).sum(), m.weight_hh)
            torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_constructor_signature_is_torch_nns(kind):
    """The same parameters as torch.nn's cell (plus keyword-only backend), so code that
    inspects them works alike: torch.nn.utils.skip_init needs `device` (before, fusedrnn's
    *args, **kwargs made it raise where torch.nn's cells work)."""
    import inspect
    ours = inspect.signature(getattr(fusedrnn, kind)).parameters
    theirs = inspect.signature(getattr(nn, kind)).parameters
    assert list(ours) == list(theirs) + ["backend"]
    assert all(ours[k].default == theirs[k].default for k in theirs)
    m = nn.utils.skip_init(getattr(fusedrnn, kind), 4, 6)
    assert type(m) is getattr(fusedrnn, kind) and m.weight_hh.shape[1] == 6
    # positional arguments as torch.nn's, device included
    args = (4, 6, False, "relu", "cpu", torch.float64) if kind == "RNNCell" else (4, 6, False, "cpu", torch.float64)
    m, r = getattr(fusedrnn, kind)(*args), getattr(nn, kind)(*args)
    assert [(n, p.shape, p.dtype) for n, p in m.named_parameters()] == [(n, p.shape, p.dtype) for n, p in r.named_parameters()]
