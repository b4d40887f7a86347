"""Drop-in behaviour: state_dict both ways, convert(), dropout, backend choice and reporting."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import fusedrnn
from fusedrnn.backends import available_backends


@pytest.mark.parametrize("torch_cls,fused_cls,kw", [
    (nn.LSTM, fusedrnn.LSTM, {"proj_size": 3}), (nn.GRU, fusedrnn.GRU, {}),
    (nn.RNN, fusedrnn.RNN, {"nonlinearity": "relu"})])
def test_parameters_and_state_dict_identical(torch_cls, fused_cls, kw):
    args = dict(input_size=4, hidden_size=5, num_layers=2, bidirectional=True, **kw)
    torch.manual_seed(1)
    ref = torch_cls(**args)
    torch.manual_seed(1)
    ours = fused_cls(**args)
    assert isinstance(ours, torch_cls)
    assert [(n, p.shape) for n, p in ref.named_parameters()] == [(n, p.shape) for n, p in ours.named_parameters()]
    for (n, a), (_, b) in zip(ref.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), f"{n}: same seed must give the same initialisation"
    # loads both ways
    fresh = fused_cls(**args)
    fresh.load_state_dict(ref.state_dict())
    back = torch_cls(**args)
    back.load_state_dict(fresh.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ref.state_dict().values()))


class _Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 6), nn.LSTM(6, 5, num_layers=2, batch_first=True))
        self.dec = nn.ModuleDict({"gru": nn.GRU(5, 5, bidirectional=True), "cell": nn.RNNCell(10, 3)})

    def forward(self, x):
        y, _ = self.enc[1](self.enc[0](x))
        z, h = self.dec["gru"](y.transpose(0, 1))
        return z, h, self.dec["cell"](z[-1])


def test_convert_nested_model():
    model = _Nested().double().train()
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    want = model.eval()(x)
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    converted = fusedrnn.convert(model.train())
    assert isinstance(converted.enc[1], fusedrnn.LSTM) and isinstance(converted.dec["gru"], fusedrnn.GRU)
    assert isinstance(converted.dec["cell"], fusedrnn.RNNCell)
    assert converted.training and converted.enc[1].training
    assert list(converted.state_dict()) == keys
    assert all(p is params[n] for n, p in converted.named_parameters()), "parameters must be shared, not copied"
    got = converted.eval()(x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert converted.enc[1].last_backend in available_backends("cpu")


def test_revert_gives_back_torch_nn_modules_that_save_without_fusedrnn(tmp_path):
    """revert() undoes convert(): torch.nn's exact classes, the same Parameter objects and
    training mode, the same outputs; the saved model names no fusedrnn class, so it loads
    in a process that cannot import fusedrnn."""
    model = _Nested().double()
    params = {n: p for n, p in model.named_parameters()}
    fusedrnn.convert(model)
    model.eval()
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    want = model(x)
    assert fusedrnn.revert(model) is model
    assert type(model.enc[1]) is nn.LSTM and type(model.dec["gru"]) is nn.GRU and type(model.dec["cell"]) is nn.RNNCell
    assert all(p is params[n] for n, p in model.named_parameters()) and not model.training
    for a, b in zip(model(x), want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # (its torch.nn containers: _Nested itself lives in this file, which imports fusedrnn)
    torch.save(nn.ModuleList([model.enc, model.dec]), tmp_path / "model.pt")
    script = ("import sys, torch; sys.modules['fusedrnn'] = None\n"  # importing fusedrnn now fails
              "m = torch.load(sys.argv[1], weights_only=False)\n"
              "print(type(m[0][1]).__module__)")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "torch.nn.modules.rnn", proc.stderr[-2000:]
    single = fusedrnn.revert(fusedrnn.GRUCell(3, 4, backend="reference"))
    assert type(single) is nn.GRUCell


def test_convert_and_revert_keep_hooks_and_their_handles():
    """Hooks registered on torch.nn's module fire on fusedrnn's after convert (and back after
    revert), and their handles still remove them; before, convert dropped them silently."""
    seen = []
    gru = nn.GRU(4, 5)
    handles = [gru.register_forward_pre_hook(lambda m, a: seen.append("pre")),
               gru.register_forward_hook(lambda m, a, kw, out: seen.append(("fwd", sorted(kw))), with_kwargs=True),
               gru.register_full_backward_hook(lambda m, gi, go: seen.append("bwd"))]
    model = nn.Sequential(gru)
    fusedrnn.convert(model)
    assert isinstance(model[0], fusedrnn.GRU)
    model[0](torch.randn(3, 2, 4, requires_grad=True))[0].sum().backward()
    assert seen == ["pre", ("fwd", []), "bwd"]
    fusedrnn.revert(model)
    assert type(model[0]) is nn.GRU
    seen.clear()
    model[0](torch.randn(3, 2, 4))
    assert seen == ["pre", ("fwd", [])]
    fusedrnn.convert(model)
    for h in handles:
        h.remove()
    seen.clear()
    model[0](torch.randn(3, 2, 4, requires_grad=True))[0].sum().backward()
    assert seen == []


def test_convert_top_level_and_keeps_dtype():
    m = nn.GRU(3, 4).double()
    c = fusedrnn.convert(m, backend="reference")
    assert isinstance(c, fusedrnn.GRU) and c.backend == "reference" and c.weight_hh_l0.dtype == torch.float64


DROPOUT_INPUTS = ["batched", "packed_sorted", "packed_unsorted", "packed_full"]


@pytest.mark.parametrize("backend", ["cpu", "reference", pytest.param("emulated", marks=pytest.mark.emulated)])
@pytest.mark.parametrize("input_kind", DROPOUT_INPUTS)
@pytest.mark.parametrize("cell,kw", [("lstm", {"proj_size": 3}), ("gru", {"batch_first": True}), ("rnn", {})])
def test_dropout_same_seed_same_mask_as_torch_nn(cell, kw, input_kind, backend):
    """Training with dropout between layers: under the same seed fusedrnn draws torch.nn's
    masks (the same tensor dropped out: the layer's output, or a PackedSequence's rows), so
    outputs and every gradient match torch.nn's, not only their distribution."""
    from module_harness import make_input, make_pair
    from op_harness import backend_or_skip
    from torch.nn.utils.rnn import pack_padded_sequence
    backend_or_skip(backend, cell)
    dtype = torch.float32 if backend == "emulated" else torch.float64
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    cfg = dict(input_size=3, hidden_size=5, num_layers=3, bidirectional=True, dropout=0.5, **kw)
    ref, ours = make_pair(cell, backend, dtype=dtype, **cfg)
    ref.train(), ours.train()
    if input_kind == "packed_full":
        bf = cfg.get("batch_first", False)
        x = torch.randn(*((4, 6) if bf else (6, 4)), 3, dtype=dtype, requires_grad=True)
        inp = pack_padded_sequence(x, torch.full((4,), 6), batch_first=bf)
    else:
        inp, x, _ = make_input(input_kind, cfg, T=7, B=5, dtype=dtype)
    outs = []
    for m in (ref, ours):
        torch.manual_seed(1234)
        y, _ = m(inp)
        y = y.data if isinstance(y, nn.utils.rnn.PackedSequence) else y
        outs.append([y] + list(torch.autograd.grad(y.sin().sum(), [x, *m.parameters()], retain_graph=True)))
    torch.manual_seed(4321)
    y = ours(inp)[0]
    assert not torch.allclose(y.data if isinstance(y, nn.utils.rnn.PackedSequence) else y, outs[1][0])  # masks matter
    for i, (want, got) in enumerate(zip(*outs)):
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"tensor {i} (0: output, 1: dx, then weights): {m}")


@pytest.mark.parametrize("torch_cls,fused_cls", [(nn.LSTM, fusedrnn.LSTM), (nn.GRU, fusedrnn.GRU), (nn.RNN, fusedrnn.RNN)])
def test_dropout_p1_is_deterministic_and_matches(torch_cls, fused_cls):
    # p = 1 drops every activation between layers: both must then agree exactly, in training.
    ref = torch_cls(3, 4, num_layers=2, dropout=1.0).double().train()
    ours = fused_cls(3, 4, num_layers=2, dropout=1.0).double().train()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], atol=1e-12, rtol=1e-12)


def test_dropout_training_statistics_and_eval():
    ref = nn.LSTM(3, 8, num_layers=2, dropout=0.5).double()
    ours = fusedrnn.LSTM(3, 8, num_layers=2, dropout=0.5).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    # eval: dropout exactly off
    torch.testing.assert_close(ours.eval()(x)[0], ref.eval()(x)[0], atol=1e-12, rtol=1e-12)
    ours.train()
    ref.train()
    a = torch.stack([ours(x)[0] for _ in range(300)])
    b = torch.stack([ref(x)[0] for _ in range(300)])
    assert not torch.allclose(a[0], a[1]), "training outputs must vary with the dropout mask"
    # same distribution: mean and spread per element agree within sampling error
    se = (a.std(0) ** 2 / 300 + b.std(0) ** 2 / 300).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() <= 5 * se + 1e-6).float().mean() > 0.97
    torch.testing.assert_close(a.std(0).mean(), b.std(0).mean(), rtol=0.15, atol=1e-3)


def test_backend_reporting_and_forcing():
    m = fusedrnn.GRU(3, 4, backend="reference")
    m(torch.randn(2, 1, 3))
    assert m.last_backend == "reference" and "forced" in m.last_backend_reason
    a = fusedrnn.GRU(3, 4)
    a(torch.randn(2, 1, 3))
    assert a.last_backend == available_backends("cpu")[0] and a.last_backend_reason.startswith("auto")
    assert "backend='reference'" in repr(m)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):  # when built, as torch.nn's bad arguments
        fusedrnn.LSTM(3, 4, backend="nope")
    with pytest.raises(ValueError, match="unknown backend 'CPU'"):
        fusedrnn.GRUCell(3, 4, backend="CPU")
    renamed = fusedrnn.LSTM(3, 4)
    renamed.backend = "nope"  # (an attribute set later: the forward refuses it)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        renamed(torch.randn(2, 1, 3))
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run this LSTM call.*cpu"):
        fusedrnn.LSTM(3, 4, backend="cuda")(torch.randn(2, 1, 3))
    with pytest.raises(TypeError, match="backend must be a string"):
        fusedrnn.LSTM(3, 4, backend=1)
    assert "reference" in available_backends("cpu")


@pytest.mark.parametrize("torch_cls,fused_cls", [(nn.LSTM, fusedrnn.LSTM), (nn.GRU, fusedrnn.GRU),
                                                 (nn.RNN, fusedrnn.RNN)])
def test_parametrized_and_functional_weights_are_used(torch_cls, fused_cls):
    """Weights that are not plain parameters: weight_norm on weight_hh_l0 (a parametrization),
    and torch.func.functional_call with replacement tensors; both must reach the kernels."""
    ref = torch_cls(3, 4, num_layers=2).double()
    ours = fused_cls(3, 4, num_layers=2).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    replaced = {n: torch.randn_like(p) for n, p in ref.named_parameters()}
    want = torch.func.functional_call(ref, replaced, (x,))[0]
    got = torch.func.functional_call(ours, replaced, (x,))[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, ours(x)[0]), "functional_call's tensors were ignored"
    for m in (ref, ours):
        nn.utils.parametrizations.weight_norm(m, "weight_hh_l1")
        with torch.no_grad():
            m.parametrizations.weight_hh_l1.original0.mul_(2.0)  # the norm: the weight doubles
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("no_grad", [False, True])
def test_torch_compile_traces_the_module(no_grad):
    """torch.compile(fullgraph=True) traces the whole forward (ops through their fake kernels),
    the first call included: the modules load their backends when constructed (Dynamo cannot
    trace the imports and op registrations of loading). Dynamo treats torch.nn RNN
    subclasses as opaque unless allow_rnn is set."""
    backend = "cpu" if "cpu" in available_backends("cpu") else "reference"
    m = fusedrnn.LSTM(4, 6, num_layers=2, backend=backend)
    x = torch.randn(5, 2, 4)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True), torch.set_grad_enabled(not no_grad):
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
        got, want = compiled(x)[0], m(x)[0]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        if not no_grad:
            (g1,) = torch.autograd.grad(got.pow(2).sum(), m.weight_hh_l1)
            (g2,) = torch.autograd.grad(want.pow(2).sum(), m.weight_hh_l1)
            torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


_COMPILE_FIRST_CALL = """
import torch, fusedrnn
torch._dynamo.config.allow_rnn = True
# (then float16 and bfloat16, and an LSTM shape where eager auto runs torch.nn's oneDNN
# LSTM, which torch 2.14 fails to compile with grad enabled: compiled, auto runs ours; the
# CPU feature checks behind auto's choices must be answered before Dynamo traces a forward;
# the last: 9 steps of bfloat16, the bfloat16 kernels where the CPU has them)
for cls, shape, dtype in ((fusedrnn.LSTM, (5, 3, 8), torch.float32), (fusedrnn.GRUCell, (3, 8), torch.float32),
                          (fusedrnn.GRU, (5, 3, 8), torch.float16), (fusedrnn.LSTM, (5, 3, 8), torch.bfloat16),
                          (fusedrnn.LSTM, (32, 32, 8), torch.float32), (fusedrnn.GRU, (9, 3, 8), torch.bfloat16)):
    m = cls(8, 16).to(dtype).eval()
    x = torch.randn(*shape, dtype=dtype)
    y = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    y, want = (y[0], m(x)[0]) if isinstance(y, tuple) else (y, m(x))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y, want, rtol=tol, atol=tol)
    print(cls.__name__, m.last_backend)
"""


def test_torch_compile_first_call_in_a_fresh_process():
    """The first forward of a new process, compiled (auto: no backend loaded before the
    module was built). Before the modules loaded their backends when constructed, Dynamo
    failed here ("Attempted to call function marked as skipped": the backend imports)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FIRST_CALL], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    backend = available_backends("cpu")[0]
    assert proc.stdout.split()[:4] == ["LSTM", backend, "GRUCell", backend]
    assert len(proc.stdout.split()) == 12


@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN"])
def test_torch_jit_trace(cls):
    """torch.jit.trace, as for torch.nn's modules: the trace passes trace's own check (which
    re-runs the module under another grad mode) and the traced module matches the module on
    an input of another length and batch size, forward with and without grad, and backward."""
    backend = "cpu" if "cpu" in available_backends("cpu") else "reference"
    torch.manual_seed(0)
    m = getattr(fusedrnn, cls)(4, 6, num_layers=2, bidirectional=True, batch_first=True, backend=backend)
    with warnings.catch_warnings():  # (trace is deprecated; TracerWarnings about Python values)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(m, torch.randn(2, 3, 4))
    x = torch.randn(3, 5, 4, requires_grad=True)
    got, want = traced(x)[0], m(x)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, [x, *m.parameters()], g),
                    torch.autograd.grad(want, [x, *m.parameters()], g)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(traced(x)[0], m(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell", "RNNCell"])
def test_torch_jit_trace_cells(cls):
    """The cells trace too (their ops take the same train flag)."""
    backend = "cpu" if "cpu" in available_backends("cpu") else "reference"
    m = getattr(fusedrnn, cls)(4, 6, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(m, (torch.randn(2, 4),))
    x = torch.randn(3, 4, requires_grad=True)
    got, want = (r[0] if isinstance(r, tuple) else r for r in (traced(x), m(x)))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0],
                               rtol=0, atol=0)


@pytest.mark.parametrize("cls", ["LSTM", "GRU", "RNN"])
def test_torch_export(cls):
    """torch.export (static shapes): the exported program matches the module on fresh input."""
    backend = "cpu" if "cpu" in available_backends("cpu") else "reference"
    m = getattr(fusedrnn, cls)(4, 6, num_layers=2, bidirectional=True, batch_first=True, backend=backend)
    program = torch.export.export(m, (torch.randn(2, 3, 4),))
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(program.module()(x)[0], m(x)[0], rtol=0, atol=0)


def test_deepcopy_and_save_load_round_trip(tmp_path):
    """copy.deepcopy and torch.save / torch.load of a whole model (after a forward, so any
    per-module caches exist) give an independent module with the same outputs and backend."""
    import copy
    m = fusedrnn.LSTM(3, 4, num_layers=2, bidirectional=True, backend="reference")
    x = torch.randn(5, 2, 3)
    want = m(x)[0]
    clone = copy.deepcopy(m)
    torch.save(m, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    for other in (clone, loaded):
        assert type(other) is fusedrnn.LSTM and other.backend == "reference"
        torch.testing.assert_close(other(x)[0], want, rtol=0, atol=0)
    with torch.no_grad():
        clone.weight_hh_l0.add_(1.0)
    assert not torch.allclose(clone(x)[0], want) and torch.equal(m(x)[0], want)


NONFINITE_CELLS = [(nn.LSTM, fusedrnn.LSTM, {}), (nn.GRU, fusedrnn.GRU, {}), (nn.RNN, fusedrnn.RNN, {}),
                   (nn.RNN, fusedrnn.RNN, {"nonlinearity": "relu"})]


def _check_nonfinite_propagation(torch_cls, fused_cls, kw, dtype, T, bad, backend="auto"):
    torch.manual_seed(T)
    ref = torch_cls(16, 24, **kw).to(dtype)
    ours = fused_cls(16, 24, backend=backend, **kw).to(dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, 4, 16, dtype=dtype)
    x[2, 1, 3] = bad
    with torch.no_grad():
        want, got = ref(x)[0], ours(x)[0]
    if bad != bad:  # NaN: torch.nn's output has NaN elements, so the comparison below can fail
        assert torch.isnan(want).any()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{ours.last_backend}: NaN elements differ"
    torch.testing.assert_close(torch.nan_to_num(got), torch.nan_to_num(want), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("torch_cls,fused_cls,kw", NONFINITE_CELLS, ids=["lstm", "gru", "rnn", "rnn-relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", [3, 10])  # cpu float32: T >= 8 takes the packed-panel path and its inline tanh/sigmoid
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_inputs_propagate_like_torch_nn(torch_cls, fused_cls, kw, dtype, T, bad):
    """A NaN or infinity in the input reaches the outputs as in torch.nn: the same elements
    are NaN, the rest agree. (Clamping inside tanh/sigmoid must not turn NaN into a number,
    nor may relu: torch.relu keeps NaN.)"""
    _check_nonfinite_propagation(torch_cls, fused_cls, kw, dtype, T, bad)


@pytest.mark.parametrize("torch_cls,fused_cls,kw", NONFINITE_CELLS, ids=["lstm", "gru", "rnn", "rnn-relu"])
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter), "emulated"])
def test_nonfinite_inputs_propagate_like_torch_nn_on_every_backend(torch_cls, fused_cls, kw, backend):
    """The same for the other backends that run on the CPU (float32, NaN): their pointwise
    code is their own (Triton's cells.py; the CUDA kernels, emulated, share the C++ units)."""
    if backend not in available_backends() and backend != "triton":
        pytest.skip(f"backend {backend} not built")
    _check_nonfinite_propagation(torch_cls, fused_cls, kw, torch.float32, 10, float("nan"), backend)


@pytest.fixture
def onednn_avx512(monkeypatch):
    """Pretend (or deny) that torch.nn's LSTM runs oneDNN's AVX-512 kernels on this CPU, and
    that the cpu kernels run 16-float vectors (zmm, default: not)."""
    from fusedrnn import backends

    def set_(yes: bool, zmm: bool = False):
        monkeypatch.setattr(backends, "_AVX512", yes)
        monkeypatch.setattr(backends, "CPU_ZMM", zmm)
    return set_


def _lstm_pair(input_size, hidden_size, **kw):
    ref = nn.LSTM(input_size, hidden_size, **kw)
    ours = fusedrnn.LSTM(input_size, hidden_size, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_auto_runs_torch_nn_where_it_is_faster(onednn_avx512):
    """auto hands LSTM float32 inference at batch 32-64, seq_len >= 32, hidden 256-512 and
    input_size >= hidden to torch.nn's own forward on AVX-512 CPUs (backends.TORCH_NN), also
    in eval mode with grad enabled (the backward is torch.nn's then): torch.nn's results
    exactly. Training, and everything outside those bounds, stays with fusedrnn's backends
    (same results to float32 rounding)."""
    from fusedrnn.backends import TORCH_NN, TORCH_NN_MAX_BATCH, TORCH_NN_MAX_HIDDEN, \
        TORCH_NN_MIN_BATCH as B, TORCH_NN_MIN_HIDDEN as H, TORCH_NN_MIN_STEPS as T
    onednn_avx512(True)
    first = available_backends("cpu")[0]
    ref, ours = _lstm_pair(H, H, batch_first=True)
    ref2, ours2 = _lstm_pair(H, H, num_layers=2, batch_first=True)
    x = torch.randn(B, T, H)
    with torch.no_grad():
        for r, m in ((ref, ours), (ref2, ours2)):  # inference, 1 and 2 layers
            torch.testing.assert_close(m(x)[0], r(x)[0], rtol=0, atol=0)
            assert m.last_backend == TORCH_NN and "inference" in m.last_backend_reason, m.last_backend_reason
    # eval mode with grad enabled counts as inference: forward and backward are torch.nn's
    ref.eval(), ours.eval()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    (y1, (h1, c1)), (y2, (h2, c2)) = ref(x1), ours(x2)
    assert ours.last_backend == TORCH_NN, ours.last_backend_reason
    for a, b in ((y1, y2), (h1, h2), (c1, c2)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    (y1.square().sum() + c1.sum()).backward()
    (y2.square().sum() + c2.sum()).backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=0)
    for (n, p), q in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=n)
    ref.train(), ours.train()
    # Training stays ours: one layer with an input that needs a gradient or not, 2 layers.
    for r, m, inp in ((ref, ours, x1), (ref, ours, x), (ref2, ours2, x2)):
        r.zero_grad(set_to_none=True)
        m.zero_grad(set_to_none=True)
        got, want = m(inp)[0], r(inp)[0]
        assert m.last_backend == first, m.last_backend_reason
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        got.square().sum().backward()
        want.square().sum().backward()
        for (n, p), q in zip(r.named_parameters(), m.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4 + 1e-5 * p.grad.abs().max().item(),
                                       msg=n)
    not_delegated = [  # (under no_grad, where torch.nn would run the module above)
        (ours, torch.randn(B - 1, T, H)),                                               # smaller batch
        (ours, torch.randn(TORCH_NN_MAX_BATCH + 1, T, H)),                              # larger batch
        (ours, torch.randn(B, T - 1, H)),                                               # shorter sequence
        (fusedrnn.LSTM(H, H - 8, batch_first=True), x),                                 # hidden < 256
        (fusedrnn.LSTM(H + 264, TORCH_NN_MAX_HIDDEN + 8, batch_first=True),
         torch.randn(B, T, H + 264)),                                                   # hidden > 512
        (fusedrnn.LSTM(H - 8, H, batch_first=True), x[..., 8:]),                        # input_size < hidden
        (fusedrnn.LSTM(H, H, batch_first=True).double(), x.double()),                   # float64
        (fusedrnn.GRU(H, H, batch_first=True), x),                                      # GRU
        (fusedrnn.LSTM(H, H, proj_size=4, batch_first=True), x),                        # projection
        (fusedrnn.LSTM(H, H, batch_first=True, backend=first), x),                      # forced
    ]
    for m, inp in not_delegated:
        with torch.no_grad():
            m(inp)
        assert m.last_backend == first, (m, inp.shape, m.last_backend_reason)
    m = fusedrnn.LSTM(H, H, batch_first=True)
    with torch.no_grad():
        m(nn.utils.rnn.pack_padded_sequence(x, [T] * B, batch_first=True))
        assert m.last_backend == first
        with torch.backends.mkldnn.flags(enabled=False):
            m(x)
            assert m.last_backend == first
        m(x)
        assert m.last_backend == TORCH_NN  # (the same module and input: the two above were the reason)
        onednn_avx512(True, zmm=True)  # (the cpu kernels on 16-float vectors: ours there too)
        m(x)
        assert m.last_backend == first
        onednn_avx512(False)
        m(x)
        assert m.last_backend == first


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_auto_prefers_torch_nn_to_the_reference(kind, no_cpu_backend):
    """Where no fused backend runs a call (here bfloat16 on the CPU without the cpu backend),
    auto runs torch.nn's own forward rather than the reference: torch.nn's results exactly,
    forward and backward; a forced backend="reference" still runs the reference."""
    ref = getattr(nn, kind)(6, 8).bfloat16()
    ours = getattr(fusedrnn, kind)(6, 8).bfloat16()
    ours.load_state_dict(ref.state_dict())
    shape = (3, 6) if kind.endswith("Cell") else (5, 3, 6)
    x = torch.randn(*shape, dtype=torch.bfloat16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ref(x1), ours(x2)
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    assert ours.last_backend == "torch.nn" and "instead of the reference" in ours.last_backend_reason
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    a.float().square().sum().backward()
    b.float().square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=0)
    forced = getattr(fusedrnn, kind)(6, 8, backend="reference").bfloat16()
    forced.load_state_dict(ref.state_dict())
    got = forced(x)
    assert forced.last_backend == "reference"
    torch.testing.assert_close((got[0] if isinstance(got, tuple) else got).float(), a.float(), rtol=3e-2, atol=3e-2)


def test_auto_falls_back_to_the_reference_where_torch_nn_fails(monkeypatch, no_cpu_backend):
    """If torch.nn's forward raises where auto would have run the reference (e.g. a CPU
    without low-precision kernels), the reference runs, and later calls go straight to it."""
    from fusedrnn import backends
    monkeypatch.setattr(backends, "_TORCH_NN_CANNOT", set())
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        raise RuntimeError("no bfloat16 kernel here")
    monkeypatch.setattr(nn.GRU, "forward", failing)
    ref = nn.GRU(6, 8).bfloat16()
    ours = fusedrnn.GRU(6, 8).bfloat16()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 6, dtype=torch.bfloat16)
    for _ in range(2):
        y, h = ours(x)
        assert ours.last_backend == "reference", ours.last_backend_reason
    assert len(calls) == 1
    monkeypatch.undo()
    torch.testing.assert_close(y.float(), ref(x)[0].float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("kind,kw", [("LSTM", {"proj_size": 3, "num_layers": 2}), ("GRU", {"batch_first": True}),
                                     ("RNN", {"bidirectional": True}), ("LSTMCell", {}), ("GRUCell", {}),
                                     ("RNNCell", {})])
def test_auto_runs_torch_nn_on_devices_without_a_backend(kind, kw):
    """On a device no fusedrnn backend runs on (here meta tensors, as used for shape
    inference; also mps, xpu), auto runs torch.nn's own forward, which runs there: the same
    output shapes, dtypes and devices as torch.nn's. A forced backend refuses, saying so."""
    ref = getattr(nn, kind)(6, 8, device="meta", **kw)
    ours = getattr(fusedrnn, kind)(6, 8, device="meta", **kw)
    x = torch.randn((3, 6) if kind.endswith("Cell") else (5, 3, 6), device="meta")
    flat = lambda o: [t for t in (o if isinstance(o, tuple) else (o,)) for t in (t if isinstance(t, tuple) else (t,))]
    want, got = flat(ref(x)), flat(ours(x))
    assert [(t.shape, t.dtype, t.device) for t in got] == [(t.shape, t.dtype, t.device) for t in want]
    assert ours.last_backend == "torch.nn" and "meta tensors" in ours.last_backend_reason
    forced = getattr(fusedrnn, kind)(6, 8, device="meta", backend="cpu", **kw)
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run .*runs on cpu tensors, not meta"):
        forced(x)
    # Validation is still fusedrnn's (torch.nn's messages) before the device is looked at.
    with pytest.raises((RuntimeError, ValueError), match="input"):
        ours(torch.randn((3, 7) if kind.endswith("Cell") else (5, 3, 7), device="meta"))


def test_convert_leaves_dynamically_quantized_rnns_alone():
    """quantize_dynamic first, then convert (as the README says): the quantized LSTM (not an
    nn.LSTM) is kept, the float GRU next to it is converted, and the outputs are unchanged."""
    from torch.ao.quantization import quantize_dynamic
    model = nn.ModuleDict({"lstm": nn.LSTM(6, 8), "gru": nn.GRU(8, 5)})
    q = quantize_dynamic(model, {nn.LSTM}, dtype=torch.qint8)
    qlstm = q["lstm"]
    x = torch.randn(4, 2, 6)
    want = q["gru"](q["lstm"](x)[0])[0]
    fusedrnn.convert(q)
    assert q["lstm"] is qlstm and isinstance(q["gru"], fusedrnn.GRU)
    torch.testing.assert_close(q["gru"](q["lstm"](x)[0])[0], want, rtol=1e-5, atol=1e-6)


def test_a_backend_loads_once_when_modules_are_built_in_several_threads():
    """Modules load their backends when built (backends.load_for); built in several threads
    at once, a backend's load (extension import, op registrations) must still run once."""
    import threading
    import time
    from fusedrnn.backends import Backend
    calls = []

    def slow_load():
        calls.append(threading.get_ident())
        time.sleep(0.2)  # (long enough for every thread to arrive while it runs)
        return None
    b = Backend(name="slow", ops_backend="reference", device_types=("cpu",), dtypes=(torch.float32,), load=slow_load)
    results = []
    threads = [threading.Thread(target=lambda: results.append(b.unavailable())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [None] * 4
