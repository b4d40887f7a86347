"""Double backward (fusedrnn/double_backward.py): a backward with create_graph=True runs
the reference backward in differentiable ops (the cell ops: their formulas in ATen ops,
csrc/cpu/cell_grads.h), so its result can be differentiated again. On the
cpu backend (C++ autograd): gradgradcheck in float64 at op level (gx a leaf, gx from
fusedrnn::projection, the cell ops) and against torch.nn at module level (gradient
penalties, second derivatives in the weights). On the backends whose ops have Python
autograd (reference, Triton under the interpreter, CUDA kernels under emulation): the same
at op level (gradgradcheck where float64 runs, else the reference backend's second
derivatives) and against torch.nn at module level. Where it is not supported it still raises."""
import weakref

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from op_harness import GATES, backend_or_skip, make_inputs

import fusedrnn
from fusedrnn import double_backward
from fusedrnn.backends import registry
from fusedrnn.projection import input_projection

# The backends whose ops have Python autograd (fusedrnn/ops.py), as run on CPU tensors here.
PYTHON_AUTOGRAD = [pytest.param("reference"), pytest.param("triton", marks=pytest.mark.interpreter),
                   pytest.param("emulated", marks=pytest.mark.emulated)]


@pytest.fixture(autouse=True)
def _backend_available(request):
    """The test's `backend` parameter (the cpu backend where it has none), or a skip."""
    callspec = getattr(request.node, "callspec", None)
    backend_or_skip(callspec.params.get("backend", "cpu") if callspec else "cpu")


def _dtype(backend):
    return torch.float64 if backend in ("cpu", "reference") else torch.float32


def _f64_leaves(args):
    return tuple(a.double().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def _diff(cell, outs):
    return outs[:3] if cell == "lstm" else outs[:2]


def _op_of(cell, args, positions, backend="cpu"):
    """`cell`'s forward op of `backend` as a function of its arguments at `positions` (the
    others fixed), returning the differentiable results."""
    op = registry()[backend].op(cell, "forward")

    def f(*ts):
        full = list(args)
        for i, t in zip(positions, ts):
            full[i] = t
        return _diff(cell, op(*full))
    return f


def _check(f, inputs):
    """The create_graph backward's gradients equal the fused backward's (gradgradcheck alone
    would pass a wrong recompute: it checks the second derivative against the first as that
    same backward computes it), then gradgradcheck."""
    outs = f(*inputs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    ws = [torch.randn_like(o) for o in outs]

    def loss():
        got = f(*inputs)
        return sum((o * w).sum() for o, w in zip(got if isinstance(got, (tuple, list)) else (got,), ws))
    fused = torch.autograd.grad(loss(), inputs)
    recomputed = torch.autograd.grad(loss(), inputs, create_graph=True)
    for a, b in zip(fused, recomputed):
        torch.testing.assert_close(b, a)
    assert torch.autograd.gradgradcheck(f, inputs)


SEQ_CASES = [("lstm", {}), ("lstm", {"P": 2}), ("lstm", {"lengths": True, "reverse": True}),
             ("gru", {}), ("gru", {"bias": False, "lengths": True}), ("rnn", {}),
             ("rnn", {"relu": True, "reverse": True})]


@pytest.mark.parametrize("cell,kw", SEQ_CASES, ids=[f"{c}-{'-'.join(k) or 'plain'}" for c, k in SEQ_CASES])
def test_gradgradcheck_sequence_op(cell, kw):
    """gx a leaf: the op's create_graph backward differentiates the reference from gx itself."""
    args = _f64_leaves(make_inputs(cell, 4, 3, 3, **kw))
    pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    _check(_op_of(cell, args, pos), [args[i] for i in pos])


@pytest.mark.parametrize("cell,kw,which", [("lstm", {"P": 2}, (0, 2, 4)), ("lstm", {}, (0, 3)), ("gru", {}, (0, 1, 3)),
                                           ("rnn", {}, (0, 1))])
def test_gradgradcheck_sequence_op_some_inputs(cell, kw, which):
    """Only some inputs need gradients (the create_graph backward computes only those). gx
    is among them: a gx that needs none and did not come from the projection is not kept for
    a double backward (see test_still_raises_where_unsupported; a frozen projection's is
    recomputed: test_frozen_input_projection_matches_torch_nn)."""
    args = list(_f64_leaves(make_inputs(cell, 4, 3, 3, **kw)))
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and i not in which:
            args[i] = a.detach()
    _check(_op_of(cell, args, which), [args[i] for i in which])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_gradgradcheck_projection_then_sequence_op(cell):
    """gx = fusedrnn::projection(x, w_ih, b), as in the modules: the second derivatives reach
    x, w_ih and b through the projection's recomputed output."""
    T, B, I, H = 4, 2, 3, 3
    args = _f64_leaves(make_inputs(cell, T, B, H))
    G = args[0].shape[-1]
    x, w_ih, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((T, B, I), (G, I), (G,)))
    wi = 3 if cell == "lstm" else 2  # (w_hh's position)
    op = _op_of(cell, args, (0, 1, wi))
    _check(lambda x, w_ih, b, h0, w_hh: op(torch.ops.fusedrnn.projection(x, w_ih, b), h0, w_hh),
           (x, w_ih, b, args[1], args[wi]))


def test_gradgradcheck_projection():
    x, w, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((3, 2, 5), (8, 5), (8,)))
    _check(lambda *t: torch.ops.fusedrnn.projection(*t).sin(), (x, w, b))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
def test_gradgradcheck_rnn_op_with_a_computed_gx(backend, relu):
    """The RNN's create_graph backward reads only its output y (no gx to recompute): gx = a
    leaf's clone, neither a leaf itself nor a projection's output, has second derivatives too."""
    be = backend_or_skip(backend, "rnn")
    gx, h0, w_hh, lengths, reverse, _ = make_inputs("rnn", 5, 3, 4, dtype=torch.float64, lengths=True,
                                                    reverse=True, relu=relu)
    ts = [t.requires_grad_() for t in (gx, h0, w_hh)]
    op = be.op("rnn", "forward")
    _check(lambda a, h, w: op(a.clone(), h, w, lengths, reverse, relu), ts)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "rnn_relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_gradgradcheck_cell_op(cell, bias):
    """The cell ops' create_graph backward: their gradient formulas in ATen ops
    (csrc/cpu/cell_grads.h)."""
    cell, relu = cell.split("_")[0], cell.endswith("relu")
    B, I, H = 2, 3, 4
    G = GATES[cell] * H
    shapes = [(B, I), (B, H)] + ([(B, H)] if cell == "lstm" else []) + [(G, I), (G, H)] + ([(G,), (G,)] if bias else [])
    ts = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in shapes]
    op = getattr(torch.ops.fusedrnn, f"{cell}_cell")
    n = 4 if cell == "lstm" else 3

    def f(*t):
        b = list(t[n + 1:]) if bias else [None, None]
        out = op(*t[:n + 1], *b, relu if cell == "rnn" else True)  # (the last argument: train, or the RNN's relu)
        return out[:2] if cell == "lstm" else out[0] if cell == "gru" else out
    _check(f, ts)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_third_derivatives_of_cell_ops(cell):
    """The LSTM and GRU cells' create_graph backward reads the saved gates through a
    SavedGates node (csrc/cpu/autograd.cpp), whose own backward differentiates through its
    output again: gradgradcheck of the first derivatives (made with create_graph) checks the
    third derivatives, in float64."""
    B, I, H = 2, 3, 2
    G = GATES[cell] * H
    shapes = [(B, I), (B, H)] + ([(B, H)] if cell == "lstm" else []) + [(G, I), (G, H), (G,), (G,)]
    ts = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in shapes]
    op = getattr(torch.ops.fusedrnn, f"{cell}_cell")
    w = torch.randn(B, H, dtype=torch.float64)

    def first_derivatives(*t):
        out = op(*t, True)
        y = out[0] * w + (out[1].sin() if cell == "lstm" else 0)
        return torch.autograd.grad(y.square().sum(), t, create_graph=True)
    assert torch.autograd.gradgradcheck(first_derivatives, ts)


@pytest.mark.parametrize("used", [0, 1], ids=["h", "c"])
def test_gradgradcheck_lstm_cell_op_one_output(used):
    """Only h1 or only c1 reaches the loss: the other's gradient is undefined in the backward
    (the constant 0 in cell_grads.h's formulas)."""
    B, I, H = 2, 3, 4
    shapes = [(B, I), (B, H), (B, H), (4 * H, I), (4 * H, H), (4 * H,), (4 * H,)]
    ts = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in shapes]
    _check(lambda *t: torch.ops.fusedrnn.lstm_cell(*t, True)[used], ts)


def _penalty(module, x, hx=None, packed_lengths=None):
    """|d(sum y sin y)/dx|^2 differentiated in the weights: a gradient of a gradient."""
    inp = pack_padded_sequence(x, packed_lengths, enforce_sorted=False) if packed_lengths is not None else x
    out = module(inp) if hx is None else module(inp, hx)
    y = out[0] if isinstance(out, tuple) else out
    y = y.data if isinstance(y, torch.nn.utils.rnn.PackedSequence) else y
    (gx,) = torch.autograd.grad((y * y.sin()).sum(), x, create_graph=True)
    return torch.autograd.grad(gx.square().sum(), list(module.parameters()), allow_unused=True)


MODULE_CASES = [("LSTM", {}), ("LSTM", {"num_layers": 2, "proj_size": 3, "bidirectional": True}),
                ("GRU", {"bias": False, "batch_first": True}), ("GRU", {"num_layers": 2, "bidirectional": True}),
                ("RNN", {"nonlinearity": "relu"}), ("RNN", {"num_layers": 2}),
                ("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {"bias": False})]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind,kw", MODULE_CASES, ids=[f"{k}-{'-'.join(kw) or 'plain'}" for k, kw in MODULE_CASES])
def test_gradient_penalty_matches_torch_nn(kind, kw, dtype):
    _check_penalty("cpu", kind, kw, dtype)


def _check_penalty(backend, kind, kw, dtype):
    """A module's gradient penalty (_penalty) on `backend` against torch.nn's."""
    ours = getattr(fusedrnn, kind)(4, 6, backend=backend, **kw).to(dtype)
    ref = getattr(nn, kind)(4, 6, **kw).to(dtype)
    ref.load_state_dict(ours.state_dict())
    shape = (3, 4) if kind.endswith("Cell") else (3, 9, 4) if kw.get("batch_first") else (9, 3, 4)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    tol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-4)
    for a, b in zip(_penalty(ours, x), _penalty(ref, x)):
        torch.testing.assert_close(a, b, **tol)
    assert ours.last_backend == backend


def test_gradient_penalty_packed_with_hx_matches_torch_nn():
    ours = fusedrnn.LSTM(4, 5, backend="cpu").double()
    ref = nn.LSTM(4, 5).double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(8, 3, 4, dtype=torch.float64, requires_grad=True)
    hx = (torch.randn(1, 3, 5, dtype=torch.float64), torch.randn(1, 3, 5, dtype=torch.float64))
    lengths = torch.tensor([8, 3, 5])
    for a, b in zip(_penalty(ours, x, hx, lengths), _penalty(ref, x, hx, lengths)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_second_derivative_in_the_weights_matches_torch_nn(kind):
    """As in MAML or a Hessian-vector product: the gradient in the weights, then its norm's
    gradient (the weights' second derivatives; the input needs no gradient)."""
    ours = getattr(fusedrnn, kind)(3, 5, backend="auto").double()
    ref = getattr(nn, kind)(3, 5).double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(10, 2, 3, dtype=torch.float64)
    results = []
    for m in (ours, ref):
        g = torch.autograd.grad(m(x)[0].tanh().sum(), list(m.parameters()), create_graph=True)
        results.append(torch.autograd.grad(sum(t.square().sum() for t in g), list(m.parameters())))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    assert ours.last_backend == "cpu"


def _events(fn):
    with torch.autograd.profiler.profile() as prof:
        fn()
    return prof.function_events


def _profiled_ops(fn):
    return {e.name for e in _events(fn)}


def test_first_order_backward_does_not_recompute():
    """Without create_graph the fused backward kernels run; only create_graph runs the
    reference backward in differentiable ops (fusedrnn::sequence_grads)."""
    m = fusedrnn.GRU(4, 5, backend="cpu")
    x = torch.randn(7, 2, 4, requires_grad=True)
    names = _profiled_ops(lambda: m(x)[0].sum().backward())
    assert "fusedrnn::gru_backward" in names and "fusedrnn::sequence_grads" not in names
    names = _profiled_ops(lambda: torch.autograd.grad(m(x)[0].sum(), x, create_graph=True))
    assert "fusedrnn::sequence_grads" in names and "fusedrnn::gru_backward" not in names


def test_gx_is_not_kept_alive():
    """The sequence op keeps the projection's inputs for a double backward, not gx itself."""
    x, w, b = (torch.randn(*s, requires_grad=True) for s in ((5, 2, 3), (12, 3), (12,)))
    gx = torch.ops.fusedrnn.projection(x, w, b)
    ref = weakref.ref(gx)
    y = torch.ops.fusedrnn.lstm_forward(gx, torch.randn(2, 3), torch.randn(2, 3), torch.randn(12, 3), None, None,
                                        False, True)[0]
    del gx
    assert ref() is None
    y.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_still_raises_where_unsupported():
    """A sequence op whose gx is neither a leaf nor the projection's output (here gx = 2 * a),
    or needs no gradient and is not a frozen projection's output (keeping it for a double
    backward would cost its memory in every training step; here also right after a frozen
    projection of another gx, whose note must not be taken for this one): the double
    backward raises, pointing to backend 'torch.nn'."""
    args = _f64_leaves(make_inputs("gru", 4, 2, 3))
    y = torch.ops.fusedrnn.gru_forward(args[0] * 2, *args[1:])[0]
    (g,) = torch.autograd.grad(y.square().sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward.*backend to 'torch.nn'"):
        g.sum().backward()
    for frozen_projection_before in (False, True):
        if frozen_projection_before:
            torch.ops.fusedrnn.projection(torch.randn(4, 2, 5, dtype=torch.float64),
                                          torch.randn(9, 5, dtype=torch.float64), None)
        y = torch.ops.fusedrnn.gru_forward(args[0].detach(), *args[1:])[0]
        (g,) = torch.autograd.grad(y.square().sum(), args[1], create_graph=True)
        with pytest.raises(RuntimeError, match="double backward.*backend to 'torch.nn'"):
            g.sum().backward()


FROZEN_CASES = [("LSTM", {"num_layers": 2, "proj_size": 3, "bidirectional": True}), ("LSTM", {"packed": True}),
                ("GRU", {"num_layers": 2}), ("GRU", {"bidirectional": True, "packed": True}),
                ("RNN", {"bias": False}), ("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {"nonlinearity": "relu"})]


def _first(t):
    return t[0] if isinstance(t, tuple) else t


def _frozen_projection_hessian(module, x, h0=None, lengths=None):
    """d/d(w_hh, h0) of |d(sum y^2)/d(w_hh, h0)|^2 with the input projection frozen: x,
    w_ih and the biases gx adds need no gradient (GRU's b_hh is in its recurrence), as when
    fine-tuning only the recurrent weights or a learned initial state."""
    gru = "GRU" in type(module).__name__
    for name, p in module.named_parameters():
        p.requires_grad_(name.startswith("weight_hh") or (gru and name.startswith("bias_hh")))
    ws = [p for p in module.parameters() if p.requires_grad] + ([] if h0 is None else [_first(h0)])
    inp = x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)
    y = _first(module(inp) if h0 is None else module(inp, h0))
    y = y.data if isinstance(y, torch.nn.utils.rnn.PackedSequence) else y
    gs = torch.autograd.grad(y.square().sum(), ws, create_graph=True)
    return torch.autograd.grad(sum((g * g.cos()).sum() for g in gs), ws)


@pytest.mark.parametrize("backend", [pytest.param("cpu")] + PYTHON_AUTOGRAD)
@pytest.mark.parametrize("kind,kw", FROZEN_CASES, ids=[f"{k}-{'-'.join(kw) or 'plain'}" for k, kw in FROZEN_CASES])
def test_frozen_input_projection_matches_torch_nn(backend, kind, kw):
    """A layer whose x, w_ih and biases all need no gradient has no projection node: the
    projection notes its inputs (csrc/cpu/autograd.cpp FrozenProjection; Python: gx's
    attribute) and the create_graph backward recomputes gx from them, as a constant."""
    kw = dict(kw)
    packed = kw.pop("packed", False)
    dtype = _dtype(backend)
    ours = getattr(fusedrnn, kind)(4, 6, backend=backend, **kw).to(dtype)
    ref = getattr(nn, kind)(4, 6, **kw).to(dtype)
    ref.load_state_dict(ours.state_dict())
    cell = kind.endswith("Cell")
    x = torch.randn(*((3, 4) if cell else (7, 3, 4)), dtype=dtype)
    D = (2 if kw.get("bidirectional") else 1) * kw.get("num_layers", 1)
    h0 = torch.randn(*((3,) if cell else (D, 3)), kw.get("proj_size", 6), dtype=dtype, requires_grad=True)
    if kind.startswith("LSTM"):
        h0 = (h0, torch.randn(*h0.shape[:-1], 6, dtype=dtype))
    lengths = torch.tensor([7, 2, 5]) if packed else None
    got = _frozen_projection_hessian(ours, x, h0, lengths)
    for a, b in zip(got, _frozen_projection_hessian(ref, x, h0, lengths)):
        # (float32: relative to the largest entry; ReLU's second derivatives reach 1e3-1e4)
        tol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else \
            dict(atol=2e-5 + 1e-5 * b.abs().max().item(), rtol=1e-4)
        torch.testing.assert_close(a, b, **tol)
    assert ours.last_backend == backend and all(g.abs().sum() > 0 for g in got)


def test_frozen_projection_note_keeps_neither_gx_nor_x_alive():
    """The frozen projection's note (FrozenProjection) references gx weakly, and a sequence
    op clears it: x, referenced by it, lives only as long as the op's node needs it."""
    x, w = torch.randn(5, 2, 3), torch.randn(12, 3)
    h0 = torch.randn(2, 3, requires_grad=True)
    gx = torch.ops.fusedrnn.projection(x, w, None)
    ref_gx, ref_x = weakref.ref(gx), weakref.ref(x)
    y = torch.ops.fusedrnn.lstm_forward(gx, h0, torch.randn(2, 3), torch.randn(12, 3), None, None, False, True)[0]
    del gx, x
    assert ref_gx() is None and ref_x() is not None  # (the op's node keeps x for a double backward)
    (g,) = torch.autograd.grad(y.square().sum(), h0, create_graph=True)
    g.square().sum().backward()
    assert h0.grad is not None and h0.grad.abs().sum() > 0
    del y, g
    assert ref_x() is None
    x = torch.randn(5, 2, 3)
    ref_x = weakref.ref(x)
    torch.ops.fusedrnn.projection(x, w, None)  # on its own: noted until the next sequence op
    del x
    torch.ops.fusedrnn.rnn_forward(torch.randn(5, 2, 3), torch.randn(2, 3), torch.randn(3, 3), None, False, False)
    assert ref_x() is None


BF16_CASES = [("LSTM", {}), ("LSTM", {"proj_size": 5, "bidirectional": True}), ("GRU", {"num_layers": 2}),
              ("RNN", {"bias": False})]


@pytest.fixture
def matmul_precision():
    """torch.set_float32_matmul_precision for one test, restored after."""
    old = torch.backends.mkldnn.matmul.fp32_precision
    yield torch.set_float32_matmul_precision
    torch.backends.mkldnn.matmul.fp32_precision = old


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32-medium"])
@pytest.mark.parametrize("kind,kw", BF16_CASES, ids=[f"{k}-{'-'.join(kw) or 'plain'}" for k, kw in BF16_CASES])
def test_bfloat16_kernels_path_gradient_penalty(kind, kw, dtype, matmul_precision):
    """The bfloat16 kernels' path (bfloat16 modules, and float32 under matmul precision
    "medium", on AVX512-BF16 CPUs): its projection (fusedrnn::projection_bf16) has C++
    autograd like the float32 one, so the create_graph backward recomputes gx from its
    bfloat16 x and w and the recurrence from the bfloat16 w_hh, in float32. Against torch.nn
    in float64 on the same (rounded) weights and input, within bfloat16's tolerance."""
    from fusedrnn.backends import native
    if not native._bf16_recurrence(10):
        pytest.skip("the bfloat16 kernels do not run on this CPU")
    ours = getattr(fusedrnn, kind)(8, 12, backend="cpu", **kw).to(dtype)
    exact = getattr(nn, kind)(8, 12, **kw).double()
    exact.load_state_dict(ours.state_dict())
    x = torch.randn(10, 3, 8).to(dtype)
    if dtype == torch.float32:
        matmul_precision("medium")
    got = _penalty(ours, x.clone().requires_grad_())
    assert "bfloat16 products" in ours.last_backend_reason
    want = _penalty(exact, x.double().requires_grad_())
    for (name, _), a, b in zip(ours.named_parameters(), got, want):
        assert a.dtype == dtype, name
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double(), b, rtol=5e-2, atol=3e-2 * scale, msg=name)


@pytest.mark.parametrize("kind,op,per_step", [("LSTMCell", "aten::sigmoid_backward", 3),
                                               ("GRUCell", "aten::sigmoid_backward", 2),
                                               ("RNNCell", "aten::tanh_backward", 1)])
def test_cells_over_unbind_run_their_formulas_once_per_step(kind, op, per_step):
    """`for x_t in x` (one UnbindBackward for every step): the create_graph backward runs each
    step's gradient formulas once (csrc/cpu/cell_grads.h: the LSTM's backward unit has 3
    sigmoid derivatives, the GRU's 2, from the saved gates; the RNN starts from its saved
    output), with no nested autograd.grad, no recomputation of ATen's cell and none of the
    step's GEMMs. (A nested grad on the saved inputs themselves had run every earlier step's
    node again, each with its own nested grad: 2^T recomputations.)"""
    T = 8
    m = getattr(fusedrnn, kind)(3, 4, backend="cpu")
    x = torch.randn(T, 2, 3, requires_grad=True)
    state, ys = None, []
    for x_t in x:
        state = m(x_t, state)
        ys.append(state[0] if isinstance(state, tuple) else state)
    loss = torch.stack(ys).square().sum()
    got = {}

    def first():
        got["g"] = torch.autograd.grad(loss, x, create_graph=True)[0]
    names = [e.name for e in _events(first)]
    assert names.count(op) == per_step * T
    assert not any(n in names for n in ("aten::lstm_cell", "aten::gru_cell", "aten::rnn_tanh_cell", "aten::linear",
                                        "aten::addmm"))
    got["g"].square().sum().backward()
    assert m.weight_hh.grad is not None and torch.isfinite(m.weight_hh.grad).all()


def test_chunks_carrying_the_state_recompute_once_per_chunk():
    """Chunks of one tensor, the state carried from chunk to chunk, the weights' gradients
    asked for (their AccumulateGrad is reached from every chunk): one sequence_grads per
    chunk (see test_cells_over_unbind_run_their_formulas_once_per_step)."""
    m = fusedrnn.GRU(3, 4, backend="cpu")
    x = torch.randn(24, 2, 3, requires_grad=True)

    def penalty():
        h, ys = None, []
        for xc in x.split(3):
            y, h = m(xc, h)
            ys.append(y)
        gs = torch.autograd.grad(torch.cat(ys).square().sum(), [x, *m.parameters()], create_graph=True)
        sum(g.square().sum() for g in gs).backward()
    assert sum(1 for e in _events(penalty) if e.name == "fusedrnn::sequence_grads") == 8


# ----------------------------------------------------------------------------- Python autograd
# The ops of the reference, Triton, CUDA and emulated backends (fusedrnn/ops.py), and their
# modules, whose input projection (projection.input_projection) is F.linear.
def _hvp(f, inputs, vs, ws):
    """The second derivatives as a Hessian-vector product: d/d inputs of <d<f, ws>/d inputs, vs>."""
    outs = f(*inputs)
    (gs) = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, ws)), inputs, create_graph=True)
    return torch.autograd.grad(sum((g * v).sum() for g, v in zip(gs, vs)), inputs, allow_unused=True)


def _check_python_autograd(backend, cell, args, positions):
    """gradgradcheck where the backend runs float64; else the create_graph gradients equal
    the fused backward's and the second derivatives equal the reference backend's."""
    inputs = [args[i] for i in positions]
    if _dtype(backend) == torch.float64:
        return _check(_op_of(cell, args, positions, backend), inputs)
    f, f_ref = _op_of(cell, args, positions, backend), _op_of(cell, args, positions, "reference")
    ws = [torch.randn_like(o) for o in f(*inputs)]
    vs = [torch.randn_like(t) for t in inputs]
    fused = torch.autograd.grad(sum((o * w).sum() for o, w in zip(f(*inputs), ws)), inputs)
    recomputed = torch.autograd.grad(sum((o * w).sum() for o, w in zip(f(*inputs), ws)), inputs, create_graph=True)
    for a, b in zip(fused, recomputed):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)
    for a, b in zip(_hvp(f, inputs, vs, ws), _hvp(f_ref, inputs, vs, ws)):
        assert a is not None
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def _leaves(args, dtype):
    return tuple(a.to(dtype).requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


@pytest.mark.parametrize("backend", PYTHON_AUTOGRAD)
@pytest.mark.parametrize("cell,kw", SEQ_CASES, ids=[f"{c}-{'-'.join(k) or 'plain'}" for c, k in SEQ_CASES])
def test_python_autograd_sequence_op(backend, cell, kw):
    """gx a leaf: the create_graph backward recomputes the gates from gx itself."""
    args = _leaves(make_inputs(cell, 4, 3, 3, **kw), _dtype(backend))
    _check_python_autograd(backend, cell, args, [i for i, a in enumerate(args)
                                                 if isinstance(a, torch.Tensor) and a.requires_grad])


@pytest.mark.parametrize("backend", PYTHON_AUTOGRAD)
@pytest.mark.parametrize("cell,kw,which", [("lstm", {"P": 2}, (0, 2, 4)), ("gru", {}, (0, 1, 3)), ("rnn", {}, (0, 2))])
def test_python_autograd_sequence_op_some_inputs(backend, cell, kw, which):
    args = list(_leaves(make_inputs(cell, 4, 3, 3, **kw), _dtype(backend)))
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and i not in which:
            args[i] = a.detach()
    _check_python_autograd(backend, cell, args, which)


@pytest.mark.parametrize("backend", PYTHON_AUTOGRAD)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_python_autograd_projection_then_sequence_op(backend, cell):
    """gx = input_projection(x, w_ih, b), as in these backends' modules: the second
    derivatives reach x, w_ih and b through the recomputed projection."""
    T, B, I, H = 4, 2, 3, 3
    dtype = _dtype(backend)
    args = _leaves(make_inputs(cell, T, B, H), dtype)
    G = args[0].shape[-1]
    wi = 3 if cell == "lstm" else 2  # (w_hh's position)
    x, w_ih, b = (torch.randn(*s, dtype=dtype, requires_grad=True) for s in ((T, B, I), (G, I), (G,)))
    full = (x, w_ih, b, args[1], args[wi])
    op = _op_of(cell, args, (0, 1, wi), backend)
    f = lambda x, w_ih, b, h0, w_hh: op(input_projection(x, w_ih, b), h0, w_hh)  # noqa: E731
    if dtype == torch.float64:
        return _check(f, full)
    ref = _op_of(cell, args, (0, 1, wi), "reference")
    f_ref = lambda x, w_ih, b, h0, w_hh: ref(input_projection(x, w_ih, b), h0, w_hh)  # noqa: E731
    ws = [torch.randn_like(o) for o in f(*full)]
    vs = [torch.randn_like(t) for t in full]
    for a, b in zip(_hvp(f, full, vs, ws), _hvp(f_ref, full, vs, ws)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", PYTHON_AUTOGRAD)
@pytest.mark.parametrize("kind,kw", MODULE_CASES, ids=[f"{k}-{'-'.join(kw) or 'plain'}" for k, kw in MODULE_CASES])
def test_python_autograd_gradient_penalty_matches_torch_nn(backend, kind, kw):
    _check_penalty(backend, kind, kw, _dtype(backend))


@pytest.mark.parametrize("backend", PYTHON_AUTOGRAD)
def test_python_autograd_packed_with_hx_and_weight_second_derivatives(backend):
    """A PackedSequence with hx, and (as in MAML) the weights' second derivatives."""
    dtype = _dtype(backend)
    ours = fusedrnn.LSTM(4, 5, backend=backend).to(dtype)
    ref = nn.LSTM(4, 5).to(dtype)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(8, 3, 4, dtype=dtype, requires_grad=True)
    hx = (torch.randn(1, 3, 5, dtype=dtype), torch.randn(1, 3, 5, dtype=dtype))
    tol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-4)
    for a, b in zip(_penalty(ours, x, hx, torch.tensor([8, 3, 5])), _penalty(ref, x, hx, torch.tensor([8, 3, 5]))):
        torch.testing.assert_close(a, b, **tol)
    results = []
    for m in (ours, ref):
        g = torch.autograd.grad(m(x.detach())[0].tanh().sum(), list(m.parameters()), create_graph=True)
        results.append(torch.autograd.grad(sum(t.square().sum() for t in g), list(m.parameters())))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol)


def _count_recomputes(monkeypatch):
    calls = []
    real = double_backward.grads_from_outputs
    monkeypatch.setattr(double_backward, "grads_from_outputs", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("backend", ["reference"])
def test_python_autograd_recomputes_only_with_create_graph(backend, monkeypatch):
    """Without create_graph the backward op runs; only create_graph runs the reference
    backward (double_backward.grads_from_outputs), once per layer, also for cells over
    x.unbind(0) (once per step) and for chunks carrying the state."""
    calls = _count_recomputes(monkeypatch)
    m = fusedrnn.GRU(4, 5, backend=backend)
    x = torch.randn(7, 2, 4, requires_grad=True)
    m(x)[0].sum().backward()
    assert not calls
    torch.autograd.grad(m(x)[0].sum(), x, create_graph=True)
    assert len(calls) == 1
    cell, T = fusedrnn.LSTMCell(3, 4, backend=backend), 6
    x = torch.randn(T, 2, 3, requires_grad=True)
    calls.clear()
    state, ys = None, []
    for x_t in x:
        state = cell(x_t, state)
        ys.append(state[0])
    (g,) = torch.autograd.grad(torch.stack(ys).square().sum(), x, create_graph=True)
    g.square().sum().backward()
    assert len(calls) == T
    calls.clear()
    h, ys = None, []
    for xc in torch.randn(12, 2, 4, requires_grad=True).split(3):
        y, h = m(xc, h)
        ys.append(y)
    gs = torch.autograd.grad(torch.cat(ys).square().sum(), list(m.parameters()), create_graph=True)
    sum(g.square().sum() for g in gs).backward()
    assert len(calls) == 4


def test_python_autograd_keeps_the_projections_inputs_not_gx():
    be = registry()["reference"]
    x, w, b = (torch.randn(*s, requires_grad=True) for s in ((5, 2, 3), (12, 3), (12,)))
    gx = input_projection(x, w, b)
    ref = weakref.ref(gx)
    y = be.op("lstm", "forward")(gx, torch.randn(2, 3), torch.randn(2, 3), torch.randn(12, 3), None, None, False,
                                 True)[0]
    del gx
    assert ref() is None
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    g.square().sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", PYTHON_AUTOGRAD)
def test_python_autograd_still_raises_where_unsupported(backend):
    """gx computed by something else than the projection (an op call with gx = 2 * a), or a
    gx that needs no gradient and is not the projection's output (gx is not kept): the
    double backward raises, pointing to backend 'torch.nn'."""
    dtype = _dtype(backend)
    args = _leaves(make_inputs("gru", 4, 2, 3), dtype)
    op = registry()[backend].op("gru", "forward")
    y = op(args[0] * 2, *args[1:])[0]
    (g,) = torch.autograd.grad(y.square().sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward.*backend to 'torch.nn'"):
        g.sum().backward()
    y = op(args[0].detach(), *args[1:])[0]
    (g,) = torch.autograd.grad(y.square().sum(), args[1], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward.*backend to 'torch.nn'"):
        g.sum().backward()


@pytest.mark.parametrize("backend", [p for p in PYTHON_AUTOGRAD if p.values[0] != "triton"]
                         + [pytest.param("cpu")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_half_precision_gradient_penalty_matches_torch_nn(backend, dtype, kind):
    """float16 and bfloat16 modules (computed in float32, as the op contract says): within
    the dtype's tolerance of torch.nn. (The cpu backend's bfloat16 kernels' path:
    test_bfloat16_kernels_path_gradient_penalty.)"""
    from fusedrnn.backends import native
    if backend == "cpu" and dtype == torch.bfloat16 and native._bf16_recurrence(7):
        pytest.skip("bfloat16 runs on the bfloat16 kernels on this CPU")
    ours = getattr(fusedrnn, kind)(8, 16, backend=backend)
    ref = getattr(nn, kind)(8, 16)
    ref.load_state_dict(ours.state_dict())
    ours, ref = ours.to(dtype), ref.to(dtype)
    x = torch.randn(7, 3, 8, dtype=dtype, requires_grad=True)
    for a, b in zip(_penalty(ours, x), _penalty(ref, x)):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2 * b.float().abs().max().item(), rtol=3e-2)
    assert ours.last_backend == backend


@pytest.mark.parametrize("backend", [pytest.param("cpu"), *PYTHON_AUTOGRAD])
@pytest.mark.parametrize("kind", ["LSTM", "GRUCell"])
def test_autograd_functional_hessian_and_hvp_match_torch_nn(backend, kind):
    """torch.autograd.functional's hessian (vectorized: the second backward runs batched
    gradients) and hvp, in the input, against torch.nn."""
    from torch.autograd.functional import hessian, hvp
    dtype = _dtype(backend)
    ours = getattr(fusedrnn, kind)(3, 4, backend=backend).to(dtype)
    ref = getattr(nn, kind)(3, 4).to(dtype)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(*((2, 3) if kind.endswith("Cell") else (5, 2, 3)), dtype=dtype)
    v = torch.randn_like(x)
    tol = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-4)

    def f(m):
        def loss(t):
            out = m(t)
            return (out[0] if isinstance(out, tuple) else out).sin().sum()
        return loss
    torch.testing.assert_close(hessian(f(ours), x, vectorize=True), hessian(f(ref), x, vectorize=True), **tol)
    torch.testing.assert_close(hvp(f(ours), x, v)[1], hvp(f(ref), x, v)[1], **tol)
    assert ours.last_backend == backend
