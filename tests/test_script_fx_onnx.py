"""torch.jit.script, torch.fx.symbolic_trace and torch.onnx.export of fusedrnn's modules.
Script and ONNX export capture torch.nn's forward, which TorchScript can compile and ONNX
has operators for; fusedrnn's Python forward and custom ops have neither. Before,
scripting failed ("Lambda aren't supported") and both ONNX exporters failed on the
fusedrnn ops. FX keeps the modules as leaves, as torch.nn's (before, it traced into the
forward and failed). See BackendChoice.__prepare_scriptable__ and _fx_leaf
(fusedrnn/modules.py) and onnx_export (fusedrnn/transforms.py)."""
import warnings
from typing import Optional, Tuple

import pytest
import torch
from torch import Tensor, nn

import fusedrnn

SEQUENCE = [("LSTM", {"proj_size": 3, "num_layers": 2, "bidirectional": True}),
            ("GRU", {"batch_first": True, "num_layers": 2}),
            ("RNN", {"nonlinearity": "relu", "bidirectional": True})]
CELLS = [("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {"nonlinearity": "relu"})]


class _Model(nn.Module):
    """A user's model: TorchScript compiles the RNN as a submodule (torch.nn's sequence
    modules, whose forward is overloaded, script only that way)."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]


def _pair(kind, kw, **extra):
    """fusedrnn's module and torch.nn's, with the same weights."""
    torch.manual_seed(0)
    ours = getattr(fusedrnn, kind)(4, 6, **kw, **extra)
    ref = getattr(nn, kind)(4, 6, **kw)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _check_forward_and_backward(run, ref_run, inputs, params, ref_params):
    """run(*inputs) against ref_run(*inputs), and the gradients of inputs and parameters:
    both run torch.nn's kernels, so they agree exactly."""
    got, want = run(*inputs), ref_run(*inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, [*inputs, *params], g),
                    torch.autograd.grad(want, [*inputs, *ref_params], g)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind,kw", SEQUENCE, ids=[k for k, _ in SEQUENCE])
def test_script_a_model_holding_a_sequence_module(kind, kw, tmp_path):
    ours, ref = _pair(kind, kw)
    params = list(ours.parameters())
    model = _Model(ours)
    scripted = torch.jit.script(model)
    torch.jit.save(scripted, tmp_path / "model.pt")
    loaded = torch.jit.load(tmp_path / "model.pt")
    x = torch.randn(5, 3, 4, requires_grad=True)
    _check_forward_and_backward(scripted, lambda x: ref(x)[0], [x], params, list(ref.parameters()))
    _check_forward_and_backward(loaded, lambda x: ref(x)[0], [x], list(loaded.parameters()),
                                list(ref.parameters()))
    # PyTorch's __prepare_scriptable__ protocol put torch.nn's twin into the model, holding
    # the same Parameter objects; convert() swaps fusedrnn back in.
    assert type(model.rnn) is getattr(nn, kind)
    assert all(a is b for a, b in zip(model.rnn.parameters(), params))
    fusedrnn.convert(model)
    assert type(model.rnn) is getattr(fusedrnn, kind)
    assert all(a is b for a, b in zip(model.rnn.parameters(), params))


@pytest.mark.parametrize("kind,kw", SEQUENCE, ids=[k for k, _ in SEQUENCE])
def test_script_a_sequence_module_directly_gives_what_torch_nn_gives(kind, kw):
    """torch.jit.script(nn.LSTM(...)) compiles only the overloads of its forward (no
    `forward`); fusedrnn's module scripts to the same."""
    ours, ref = _pair(kind, kw)
    got, want = torch.jit.script(ours), torch.jit.script(ref)
    assert got.original_name == want.original_name == kind
    assert sorted(m for m in dir(got) if m.startswith("forward")) == \
        sorted(m for m in dir(want) if m.startswith("forward"))


def _scaled(module: nn.Module, inputs: Tuple[Tensor, Optional[Tensor]], output: Tensor) -> Tensor:
    return output * 2.0  # a forward hook, typed so that TorchScript compiles it


@pytest.mark.parametrize("kind,kw", CELLS, ids=[k for k, _ in CELLS])
def test_script_a_cell_with_its_forward_hook(kind, kw):
    ours, ref = _pair(kind, kw)
    x = torch.randn(3, 4, requires_grad=True)
    if kind == "LSTMCell":  # (its output is a pair: the hook on the GRU/RNN cells stands for all)
        run, ref_run, inputs = torch.jit.script(_Model(ours)), lambda x: ref(x)[0], [x]
    else:  # the scripted hook is called with the forward's arguments, so both are given
        ours.register_forward_hook(_scaled)
        run, ref_run = torch.jit.script(ours), lambda x, h: ref(x, h) * 2.0
        inputs = [x, torch.randn(3, 6, requires_grad=True)]
    _check_forward_and_backward(run, ref_run, inputs, list(run.parameters()), list(ref.parameters()))


def test_script_with_a_forced_backend_raises():
    with pytest.raises(RuntimeError, match="backend 'reference' cannot run under torch.jit.script"):
        torch.jit.script(_Model(fusedrnn.LSTM(4, 6, backend="reference")))


class _ModelWithState(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, h):
        out = self.rnn(x, h)
        return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("kind,kw", SEQUENCE + CELLS, ids=[k for k, _ in SEQUENCE + CELLS])
def test_fx_symbolic_trace_keeps_the_module_as_a_leaf(kind, kw):
    """As torch.nn's RNNs: one call_module node; the GraphModule runs fusedrnn's module
    (its backend, not torch.nn's) and matches the model exactly, forward and backward."""
    ours, ref = _pair(kind, kw)
    cell = kind.endswith("Cell")
    model = _ModelWithState(ours) if cell and kind != "LSTMCell" else _Model(ours)
    gm = torch.fx.symbolic_trace(model)
    want_nodes = [(n.op, n.target) for n in torch.fx.symbolic_trace(type(model)(ref)).graph.nodes]
    assert [(n.op, n.target) for n in gm.graph.nodes] == want_nodes
    assert ("call_module", "rnn") in want_nodes and gm.rnn is ours
    x = torch.randn(3, 4, requires_grad=True) if cell else torch.randn(5, 3, 4, requires_grad=True)
    inputs = [x, torch.randn(3, 6, requires_grad=True)] if isinstance(model, _ModelWithState) else [x]
    got = gm(*inputs)
    assert ours.last_backend != "torch.nn", ours.last_backend_reason
    want = model(*inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got, type(model)(ref)(*inputs), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, [*inputs, *ours.parameters()], g),
                    torch.autograd.grad(want, [*inputs, *ours.parameters()], g)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fx_symbolic_trace_of_the_module_itself_raises_as_for_torch_nn():
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(nn.GRU(4, 6))
    with pytest.raises(torch.fx.proxy.TraceError, match="cannot be the root of torch.fx.symbolic_trace"):
        torch.fx.symbolic_trace(fusedrnn.GRU(4, 6))


def _trace_as_onnx_export(monkeypatch, module, inputs):
    """What torch.onnx.export's TorchScript-based exporter does first: trace with its export
    flag set. Runs without the onnx package (not a dependency of fusedrnn)."""
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (trace is deprecated; TracerWarnings)
        return torch.jit.trace(module, inputs, check_trace=False)


_ATEN = {"LSTM": "aten::lstm", "GRU": "aten::gru", "RNN": "aten::rnn_relu"}


@pytest.mark.parametrize("kind,kw", SEQUENCE + CELLS, ids=[k for k, _ in SEQUENCE + CELLS])
def test_onnx_export_captures_torch_nn_forward(kind, kw, monkeypatch):
    """Under ONNX export the graph holds torch.nn's ops (which ONNX's exporters translate
    into its LSTM / GRU / RNN operators), none of fusedrnn's; outside a trace the flag
    changes nothing."""
    ours, ref = _pair(kind, kw)
    cell = kind.endswith("Cell")
    x = torch.randn(3, 4) if cell else torch.randn(5, 3, 4)
    module = ours if kind in ("GRUCell", "RNNCell") else _Model(ours)
    traced = _trace_as_onnx_export(monkeypatch, module, (x,))
    graph = str(traced.inlined_graph)
    assert "fusedrnn::" not in graph and _ATEN.get(kind, "") in graph
    assert ours.last_backend == "torch.nn" and "torch.onnx.export" in ours.last_backend_reason
    x = x.clone().requires_grad_()
    _check_forward_and_backward(traced, lambda x: ref(x) if module is ours else ref(x)[0], [x],
                                list(ours.parameters()), list(ref.parameters()))
    module(x)  # eager, the flag still patched: fusedrnn's backend runs
    assert ours.last_backend != "torch.nn", ours.last_backend_reason


def test_onnx_export_with_a_forced_backend_raises(monkeypatch):
    with pytest.raises(RuntimeError, match="backend 'reference' cannot run under torch.onnx.export"):
        _trace_as_onnx_export(monkeypatch, fusedrnn.GRU(4, 6, backend="reference"), (torch.randn(5, 3, 4),))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
@pytest.mark.parametrize("kind,kw", [("LSTM", {"num_layers": 2, "bidirectional": True}), SEQUENCE[1], CELLS[1]],
                         ids=["LSTM", "GRU", "GRUCell"])  # (torch.nn's LSTM with proj_size has no ONNX export)
def test_onnx_export_runs_in_onnxruntime(kind, kw, dynamo, tmp_path):
    """The real exporters end to end, where onnx, onnxscript and onnxruntime are installed
    (they are not fusedrnn's dependencies: skipped elsewhere)."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    ours, _ = _pair(kind, kw)
    ours.eval()
    x = torch.randn(3, 4) if kind.endswith("Cell") else torch.randn(5, 3, 4)
    module = ours if kind == "GRUCell" else _Model(ours)
    path = str(tmp_path / "model.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module, (x,), dynamo=True, verbose=False).save(path)
        else:
            torch.onnx.export(module, (x,), path, dynamo=False)
    session = ort.InferenceSession(path)
    x = torch.randn_like(x)  # fresh input: nothing was baked in
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})[:1]
    with torch.no_grad():
        want = module(x)
    assert ours.last_backend != "torch.nn"  # the eager comparison ran fusedrnn's kernels
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)
