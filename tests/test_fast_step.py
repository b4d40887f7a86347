"""The one-step fast path of the sequence modules (fusedrnn/modules.py, _FusedRNNBase._fast_step):
an inference call like the last one-step call that ran the cpu cell ops skips the long way's
checks and backend choice. It must give the long way's results, and leave everything it does
not cover (errors, other shapes, autograd, transforms, another backend) to the long way.
(The cells' fast step: tests/test_cells.py.)"""
import pytest
import torch
from torch import nn

import fusedrnn
from fusedrnn import validation
from fusedrnn.backends import registry

CLASSES = {"lstm": (nn.LSTM, fusedrnn.LSTM, {}), "gru": (nn.GRU, fusedrnn.GRU, {}),
           "rnn_tanh": (nn.RNN, fusedrnn.RNN, {}), "rnn_relu": (nn.RNN, fusedrnn.RNN, {"nonlinearity": "relu"})}


@pytest.fixture(autouse=True)
def _cpu_backend():
    if "cpu" not in registry():
        pytest.skip("cpu backend not built")


def pair(kind, dtype=torch.float32, **kw):
    torch_cls, fused_cls, extra = CLASSES[kind]
    ref = torch_cls(5, 6, **extra, **kw).to(dtype)
    ours = fused_cls(5, 6, **extra, **kw).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def states(kind, module, B, dtype=torch.float32):
    shape = (module.num_layers * (2 if module.bidirectional else 1), B, 6)
    h = torch.randn(*shape, dtype=dtype)
    return (h, torch.randn(*shape, dtype=dtype)) if kind == "lstm" else h


def step_input(module, B, dtype=torch.float32, T=1):
    return torch.randn(B, T, 5, dtype=dtype) if module.batch_first else torch.randn(T, B, 5, dtype=dtype)


def same_tangent_or_error(ours, theirs):
    """ours() gives theirs()'s tangent (the long way under forward-mode AD runs torch.nn's
    forward), or raises what theirs() raises: torch.nn's LSTM on the CPU (oneDNN's) has no
    forward-mode AD and raises NotImplementedError."""
    try:
        want = theirs()
    except NotImplementedError:
        with pytest.raises(NotImplementedError):
            ours()
        return
    got = ours()
    assert got is not None
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


def flat(out):
    y, s = out
    return [y, *(s if isinstance(s, tuple) else (s,))]


@pytest.mark.parametrize("kind", list(CLASSES))
@pytest.mark.parametrize("layers,bidirectional,batch_first", [(1, False, False), (2, True, False), (2, False, True)],
                         ids=["1", "2-bidir", "2-batch_first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hx_given", [True, False])
def test_fast_step_gives_the_long_ways_results(kind, layers, bidirectional, batch_first, dtype, hx_given,
                                               monkeypatch):
    ref, ours = pair(kind, dtype, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
    long_way = pair(kind, dtype, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)[1]
    long_way.load_state_dict(ref.state_dict())
    with torch.no_grad():
        ours(step_input(ours, 3, dtype), states(kind, ours, 3, dtype) if hx_given else None)
        assert ours.__dict__.get("_fused_fast") is not None and ours.last_backend == "cpu"
        x = step_input(ours, 3, dtype)
        hx = states(kind, ours, 3, dtype) if hx_given else None
        expected = long_way(x, hx)  # (its first call: the long way)
        monkeypatch.setattr(validation, "check_input_dim", lambda *a, **k: pytest.fail("took the long way"))
        got, theirs = ours(x, hx), ref(x, hx)
    for a, b, c in zip(flat(got), flat(expected), flat(theirs)):
        assert torch.equal(a, b)
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(a, c, atol=tol, rtol=tol)
    assert ours.last_backend == "cpu" and ours.last_backend_reason == long_way.last_backend_reason


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_fast_step_leaves_the_rest_to_the_long_way(kind, monkeypatch):
    ref, ours = pair(kind, num_layers=2)
    fresh = pair(kind, num_layers=2)[1]
    fresh.load_state_dict(ref.state_dict())
    x, hx = step_input(ours, 3), states(kind, ours, 3)

    def cache():
        with torch.no_grad():
            ours(x, hx)
        assert ours.__dict__.get("_fused_fast") is not None

    cache()
    with torch.no_grad():
        # the long way's errors (those of a module that has not run yet)
        bad_calls = [(torch.randn(1, 3, 4), hx), (x, states(kind, ours, 2)), (x, states(kind, ours, 3, torch.float64)),
                     (x, states(kind, pair(kind, num_layers=1)[1], 3)),
                     (x.double(), states(kind, ours, 3, torch.float64)),  # (input and states not the weights' dtype)
                     (x.to("meta"), None)]  # (nor their device)
        for bad in bad_calls:
            with pytest.raises((RuntimeError, ValueError)) as ours_err:
                ours(*bad)
            with pytest.raises((RuntimeError, ValueError)) as fresh_err:
                fresh(*bad)
            assert type(ours_err.value) is type(fresh_err.value) and str(ours_err.value) == str(fresh_err.value)
        # two steps, another batch size, unbatched input
        for args in ((step_input(ours, 3, T=2), hx), (step_input(ours, 7), states(kind, ours, 7)),
                     (torch.randn(1, 5),)):
            for a, b in zip(flat(ours(*args)), flat(ref(*args))):
                torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)
        # other backend settings (and their reasons)
        cache()
        ours.backend = "reference"
        ours(x, hx)
        assert ours.last_backend == "reference"
        ours.backend = "cpu"
        ours(x, hx)
        assert ours.last_backend == "cpu" and ours.last_backend_reason.startswith("forced")
        ours.backend = "auto"
    # autograd right after a fast step
    cache()
    xg = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    flat(ours(xg, hx))[0].sum().backward()
    flat(ref(xr, hx))[0].sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, atol=2e-6, rtol=2e-6)
    # forward-mode AD under no_grad right after a fast step: torch.func.jvp, and a dual tensor
    import torch.autograd.forward_ad as fwAD
    tangent = torch.randn_like(x)

    def dual_tangent(module):
        with fwAD.dual_level():
            return fwAD.unpack_dual(module(fwAD.make_dual(x, tangent), hx)[0]).tangent

    for tangent_of in (lambda m: torch.func.jvp(lambda xi: m(xi, hx)[0], (x,), (tangent,))[1], dual_tangent):
        cache()
        with torch.no_grad():
            same_tangent_or_error(lambda: tangent_of(ours), lambda: tangent_of(ref))
    # dropout between layers in training mode (no_grad): torch.nn's masks under the same seed
    ref_d, ours_d = pair(kind, num_layers=2, dropout=0.5)
    with torch.no_grad():
        ours_d.eval()
        ours_d(x, hx)
        ours_d.train()
        ref_d.train()
        torch.manual_seed(7)
        got = ours_d(x, hx)
        torch.manual_seed(7)
        want = ref_d(x, hx)
    for a, b in zip(flat(got), flat(want)):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)
    # select's answer changing (the cpu backend no longer usable): the next step runs another
    cache()
    from fusedrnn import backends
    monkeypatch.setattr(backends.registry()["cpu"], "_state", "not built (test)")
    monkeypatch.setattr(backends, "_CHOICES", {})
    with torch.no_grad():
        out = ours(x, hx)
    assert ours.last_backend != "cpu"
    for a, b in zip(flat(out), flat(ref(x, hx))):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("kind", ["lstm", "gru_cell"])
def test_a_module_after_a_fast_step_saves_and_copies(kind):
    """The fast step's cache (the backend and its ops) is not part of the module's state:
    torch.save / torch.load and copy.deepcopy work after a fast step, and the copies run."""
    import copy
    import io
    if kind == "lstm":
        ref, ours = pair("lstm", num_layers=2)
        args = (step_input(ours, 3), states("lstm", ours, 3))
    else:
        ref, ours = nn.GRUCell(5, 6), fusedrnn.GRUCell(5, 6)
        ours.load_state_dict(ref.state_dict())
        args = (torch.randn(3, 5), torch.randn(3, 6))
    with torch.no_grad():
        ours(*args)
        ours(*args)
    assert ours.__dict__.get("_fused_fast") is not None
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(ours)):
        assert "_fused_fast" not in other.__dict__
        with torch.no_grad():
            out, want = other(*args), ref(*args)
        outs = out if isinstance(out, tuple) else (out,)
        wants = want if isinstance(want, tuple) else (want,)
        for a, b in zip(flat(outs) if kind == "lstm" else outs, flat(wants) if kind == "lstm" else wants):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("kind", ["gru", "lstm_cell", "rnn_cell"])
@pytest.mark.parametrize("to", [torch.bfloat16, "meta"])
def test_a_fast_step_then_another_dtype_or_device_goes_the_long_way(kind, to):
    """After a float32 fast step on the CPU the module is converted to bfloat16 (which the cpu
    backend computes in float32, or auto gives to torch.nn) or moved to the meta device (shape
    inference: torch.nn's forward): its next call must do what a module that never ran does,
    not run the cached step's op or ask select about a device no backend runs on."""
    if kind == "gru":
        ours, fresh = (fusedrnn.GRU(5, 6, num_layers=2) for _ in range(2))
        args = (torch.randn(1, 3, 5), torch.randn(2, 3, 6))
    else:
        cls = fusedrnn.LSTMCell if kind == "lstm_cell" else fusedrnn.RNNCell
        ours, fresh = cls(5, 6), cls(5, 6)
        h = torch.randn(3, 6)
        args = (torch.randn(3, 5), (h, torch.randn(3, 6)) if kind == "lstm_cell" else h)
    fresh.load_state_dict(ours.state_dict())
    with torch.no_grad():
        ours(*args)
        ours(*args)
        assert ours.__dict__.get("_fused_fast") is not None
        ours.to(to)
        fresh.to(to)
        moved = tuple(tuple(t.to(to) for t in a) if isinstance(a, tuple) else a.to(to) for a in args)
        got, want = ours(*moved), fresh(*moved)
    gots = got if isinstance(got, tuple) else (got,)
    wants = want if isinstance(want, tuple) else (want,)
    for a, b in zip(flat(gots) if kind == "gru" else gots, flat(wants) if kind == "gru" else wants):
        assert (a.dtype, a.device, a.shape) == (b.dtype, b.device, b.shape)
        assert to == "meta" or torch.equal(a, b)
    assert (ours.last_backend, ours.last_backend_reason) == (fresh.last_backend, fresh.last_backend_reason)


def test_a_fast_step_then_a_weight_on_another_device_raises_the_long_ways_error():
    """The long way checks w_hh_l0's device against the input's (torch.nn's check): after a
    fast step, a module whose w_hh_l0 was moved alone must raise that error, as a module that
    never ran does."""
    ours, fresh = fusedrnn.GRU(5, 6), fusedrnn.GRU(5, 6)
    x = torch.randn(1, 3, 5)
    with torch.no_grad():
        ours(x)
        ours(x)
        assert ours.__dict__.get("_fused_fast") is not None
        errors = []
        for m in (ours, fresh):
            m.weight_hh_l0 = nn.Parameter(m.weight_hh_l0.detach().to("meta"))
            with pytest.raises(RuntimeError) as err:
                m(x)
            errors.append(str(err.value))
    assert errors[0] == errors[1] and "parameters are on meta" in errors[0]
