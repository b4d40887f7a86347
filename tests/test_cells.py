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


# ----------------------------------------------------------------------------- the fast step
# An inference call like the last one that ran the cpu cell op takes _fast_step
# (fusedrnn/cells.py): fewer checks in Python, the same op. It must give the same results,
# and anything it does not cover must go the long way (torch.nn's errors, other backends,
# autograd, transforms).
def _fast_pair(torch_cls, fused_cls, kw, dtype=torch.float32):
    ref = torch_cls(5, 6, **kw).to(dtype)
    ours = fused_cls(5, 6, **kw).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _hx(cls, B, dtype=torch.float32):
    h = torch.randn(B, 6, dtype=dtype)
    return (h, torch.randn(B, 6, dtype=dtype)) if cls is nn.LSTMCell else h


@pytest.mark.parametrize("torch_cls,fused_cls,kw", PAIRS, ids=["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hx_given", [True, False])
def test_fast_step_gives_the_long_ways_results(torch_cls, fused_cls, kw, dtype, hx_given, monkeypatch):
    if "cpu" not in registry():
        pytest.skip("cpu backend not built")
    ref, ours = _fast_pair(torch_cls, fused_cls, kw, dtype)
    x = torch.randn(3, 5, dtype=dtype)
    hx = _hx(torch_cls, 3, dtype) if hx_given else None
    with torch.no_grad():
        first = ours(x, hx)
        assert ours.__dict__.get("_fused_fast") is not None and ours.last_backend == "cpu"
        # the next call must not need the long way's checks
        from fusedrnn import validation
        monkeypatch.setattr(validation, "check_cell_input", lambda *a, **k: pytest.fail("took the long way"))
        x2 = torch.randn(3, 5, dtype=dtype)
        hx2 = _hx(torch_cls, 3, dtype) if hx_given else None
        second, expected = ours(x2, hx2), ref(x2, hx2)
        again = ours(x, hx)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (second, expected))):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (again, first))):
        assert torch.equal(a, b)  # (the same op on the same inputs)
    assert ours.last_backend == "cpu"


@pytest.mark.parametrize("torch_cls,fused_cls,kw", PAIRS[:3], ids=["lstm", "gru", "rnn"])
def test_fast_step_leaves_the_rest_to_the_long_way(torch_cls, fused_cls, kw):
    if "cpu" not in registry():
        pytest.skip("cpu backend not built")
    ref, ours = _fast_pair(torch_cls, fused_cls, kw)
    x = torch.randn(3, 5)
    with torch.no_grad():
        ours(x, _hx(torch_cls, 3))
        assert ours.__dict__.get("_fused_fast") is not None
        # the long way's errors (those of a module that has not run yet): a wrong input size,
        # a state of another batch or dtype
        fresh = fused_cls(5, 6, **kw)
        fresh.load_state_dict(ref.state_dict())
        for bad_x, bad_hx in ((torch.randn(3, 4), _hx(torch_cls, 3)), (x, _hx(torch_cls, 2)),
                              (x, _hx(torch_cls, 3, torch.float64)),
                              (x.double(), _hx(torch_cls, 3, torch.float64)),  # (not the weights' dtype)
                              (x.to("meta"), None)):  # (nor their device)
            with pytest.raises((RuntimeError, ValueError)) as ours_err:
                ours(bad_x, bad_hx)
            with pytest.raises((RuntimeError, ValueError)) as fresh_err:
                fresh(bad_x, bad_hx)
            assert type(ours_err.value) is type(fresh_err.value) and str(ours_err.value) == str(fresh_err.value)
        # another batch size, unbatched input, another backend setting
        for args in ((torch.randn(7, 5), _hx(torch_cls, 7)), (torch.randn(5),)):
            out, exp = ours(*args), ref(*args)
            for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (out, exp))):
                torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)
        ours.backend = "reference"
        ours(x, _hx(torch_cls, 3))
        assert ours.last_backend == "reference"
        ours.backend = "auto"
        ours(x, _hx(torch_cls, 3))
        assert ours.last_backend == "cpu" and ours.last_backend_reason.startswith("auto")
        ours.backend = "cpu"  # (the same kernels, another reason)
        ours(x, _hx(torch_cls, 3))
        assert ours.last_backend == "cpu" and ours.last_backend_reason.startswith("forced")
        ours.backend = "auto"
    # autograd right after a fast step (grad enabled: the long way, which records the op's
    # backward)
    hx = _hx(torch_cls, 3)
    with torch.no_grad():
        ours(x, hx)
        ours(x, hx)
    xg = torch.randn(3, 5, requires_grad=True)
    xr = xg.detach().clone().requires_grad_(True)
    (ours(xg, hx)[0] if torch_cls is nn.LSTMCell else ours(xg, hx)).sum().backward()
    (ref(xr, hx)[0] if torch_cls is nn.LSTMCell else ref(xr, hx)).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, atol=2e-6, rtol=2e-6)
    # forward-mode AD and vmap after a fast step (under no_grad: the long way all the same)
    import torch.autograd.forward_ad as fwAD
    with torch.no_grad():
        ours(x, hx)
        batched = torch.func.vmap(lambda xi: ours(xi, None))(x[:, None])
        rows = [ref(x[i:i + 1]) for i in range(3)]  # (torch.nn's LSTMCell has no batching rule)
        expected = (tuple(torch.stack([r[k] for r in rows]) for k in range(2)) if isinstance(rows[0], tuple)
                    else torch.stack(rows))
    for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (batched, expected))):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)
    tangent = torch.randn(3, 5)
    with torch.no_grad():
        ours(x, hx)
        _, t_func = torch.func.jvp(lambda xi: ours(xi, hx), (x,), (tangent,))
        _, t_func_ref = torch.func.jvp(lambda xi: ref(xi, hx), (x,), (tangent,))
    for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (t_func, t_func_ref))):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)
    with torch.no_grad(), fwAD.dual_level():
        out = ours(fwAD.make_dual(x, tangent), hx)
        t_ours = fwAD.unpack_dual(out[0] if isinstance(out, tuple) else out).tangent
        out = ref(fwAD.make_dual(x, tangent), hx)
        t_ref = fwAD.unpack_dual(out[0] if isinstance(out, tuple) else out).tangent
    assert t_ours is not None
    torch.testing.assert_close(t_ours, t_ref, atol=2e-6, rtol=2e-6)


def test_fast_step_asks_select_again(monkeypatch):
    """A fast step checks that `select` still picks the backend it ran (here the cpu backend
    stops being usable after a step, as in the no_cpu_backend fixture: the next step runs the
    reference)."""
    from fusedrnn import backends
    if "cpu" not in registry():
        pytest.skip("cpu backend not built")
    ref, ours = _fast_pair(nn.GRUCell, fusedrnn.GRUCell, {})
    x, h = torch.randn(3, 5), torch.randn(3, 6)
    with torch.no_grad():
        ours(x, h)
        assert ours.last_backend == "cpu" and ours.__dict__.get("_fused_fast") is not None
        monkeypatch.setattr(backends.registry()["cpu"], "_state", "not built (test)")
        monkeypatch.setattr(backends, "_CHOICES", {})
        out = ours(x, h)
    assert ours.last_backend != "cpu"
    torch.testing.assert_close(out, ref(x, h), atol=2e-6, rtol=2e-6)
