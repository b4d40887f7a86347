"""The cpu backend's one-step cell ops (fusedrnn/cell_ops.py, csrc/cpu/cell_ops.cpp and
autograd.cpp): against torch.nn's cell functions and the reference backend's
sequence op with T = 1, forward and backward, opcheck, gradcheck in float64, the
need_* flags of the backward ops, and their errors. Outputs are NaN-poisoned before
the kernels write them (FUSEDRNN_POISON=1, tests/conftest.py)."""
import pytest
import torch

import fusedrnn  # noqa: F401  (loads the backends)
from fusedrnn import cell_ops
from fusedrnn.backends import registry
from op_harness import GATES, TOL, backend_or_skip

TORCH_CELL = {"lstm": torch.lstm_cell, "gru": torch.gru_cell, "rnn": torch.rnn_tanh_cell, "rnn_relu": torch.rnn_relu_cell}
VARIANTS = ["lstm", "gru", "rnn", "rnn_relu"]


@pytest.fixture(autouse=True)
def _cpu_backend():
    backend_or_skip("cpu")


def make(variant, B, I, H, dtype=torch.float64, bias=True):
    """(x, state, w_ih, w_hh, b_ih, b_hh): random, scaled like torch.nn's initialisation."""
    cell = variant.split("_")[0]
    G = GATES[cell] * H
    r = lambda *s: (torch.rand(*s, dtype=dtype) * 2 - 1) / H ** 0.5  # noqa: E731
    state = [torch.randn(B, H, dtype=dtype) for _ in range(2 if cell == "lstm" else 1)]
    return (torch.randn(B, I, dtype=dtype), state, r(G, I), r(G, H),
            r(G) if bias else None, r(G) if bias else None)


def op_call(variant, x, state, w_ih, w_hh, b_ih, b_hh):
    """The cell op's differentiable results: [h1] or [h1, c1]."""
    cell = variant.split("_")[0]
    op = cell_ops.get(cell)
    if cell == "lstm":
        return list(op(x, state[0], state[1], w_ih, w_hh, b_ih, b_hh, True)[:2])
    if cell == "gru":
        return [op(x, state[0], w_ih, w_hh, b_ih, b_hh, True)[0]]
    return [op(x, state[0], w_ih, w_hh, b_ih, b_hh, variant == "rnn_relu")]


def torch_call(variant, x, state, w_ih, w_hh, b_ih, b_hh):
    out = TORCH_CELL[variant](x, tuple(state) if variant == "lstm" else state[0], w_ih, w_hh, b_ih, b_hh)
    return list(out) if isinstance(out, tuple) else [out]


def reference_call(variant, x, state, w_ih, w_hh, b_ih, b_hh):
    """The spec: the reference backend's sequence op with T = 1 on gx = x w_ih^T + biases."""
    cell = variant.split("_")[0]
    fwd = registry()["reference"].op(cell, "forward")
    if cell == "gru":
        gx = torch.nn.functional.linear(x, w_ih, b_ih)[None]
        return [fwd(gx, state[0], w_hh, b_hh, None, False)[1]]
    gx = torch.nn.functional.linear(x, w_ih, None if b_ih is None else b_ih + b_hh)[None]
    if cell == "lstm":
        return list(fwd(gx, state[0], state[1], w_hh, None, None, False)[1:3])
    return [fwd(gx, state[0], w_hh, None, False, variant == "rnn_relu")[1]]


def leaves(x, state, w_ih, w_hh, b_ih, b_hh):
    return [t for t in (x, *state, w_ih, w_hh, b_ih, b_hh) if t is not None]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B,I,H", [(1, 3, 5), (4, 7, 9), (9, 256, 256), (7, 150, 250), (6, 20, 300)],
                         ids=["B1", "B4", "B9-H256", "B7-I150-H250", "B6-I20-H300"])
def test_matches_torch_and_reference(variant, dtype, bias, B, I, H):
    # B1, B4: BLAS, the step on the calling thread; B9-H256: the step's GEMM split over
    # threads (the kernels' slices), and the dense parts on cpu::gemm's packed kernels
    # (cell_ops.cpp, packed_gemms); so are the last two's (odd sizes, partial panels; I=20:
    # dW_ih on the narrow kernels), the RNN's backward only
    args = make(variant, B, I, H, dtype, bias)
    for t in leaves(*args):
        t.requires_grad_(True)
    ours, theirs, spec = (f(variant, *args) for f in (op_call, torch_call, reference_call))
    atol, rtol = TOL[dtype]
    for a, b, c in zip(ours, theirs, spec):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
        torch.testing.assert_close(a, c, atol=atol, rtol=rtol)
    seeds = [torch.randn_like(o) for o in ours]
    g_ours = torch.autograd.grad(ours, leaves(*args), seeds)
    g_torch = torch.autograd.grad(theirs, leaves(*args), seeds)
    for a, b in zip(g_ours, g_torch):
        torch.testing.assert_close(a, b, atol=5 * atol, rtol=5 * rtol)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("wanted", ["x", "state", "weights", "x+weights", "c"])
def test_only_the_needed_gradients(variant, wanted):
    """need_h / need_x / need_w: whatever subset requires grad gets torch.nn's gradients."""
    if wanted == "c" and variant != "lstm":
        pytest.skip("only the LSTM has a cell state")
    args = make(variant, 3, 6, 8)
    x, state, w_ih, w_hh, b_ih, b_hh = args
    picked = {"x": [x], "state": state, "weights": [w_ih, w_hh, b_ih, b_hh], "c": state[1:],
              "x+weights": [x, w_ih, w_hh, b_ih, b_hh]}[wanted]
    for t in picked:
        t.requires_grad_(True)
    ours, theirs = op_call(variant, *args), torch_call(variant, *args)
    seeds = [torch.randn_like(o) for o in ours]
    for a, b in zip(torch.autograd.grad(ours, picked, seeds), torch.autograd.grad(theirs, picked, seeds)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_backward_op_skips_what_is_not_needed(cell):
    x, state, w_ih, w_hh, b_ih, b_hh = make(cell, 3, 6, 8)
    fwd, bwd = cell_ops.get(cell), getattr(torch.ops.fusedrnn, f"{cell}_cell_backward").default
    g = torch.randn(3, 8, dtype=torch.float64)
    if cell == "lstm":
        h1, c1, gates = fwd(x, state[0], state[1], w_ih, w_hh, b_ih, b_hh, True)
        res = bwd(g, g, x, state[0], state[1], w_ih, w_hh, True, gates, c1, False, False, False)
        assert [r.numel() for r in res] == [0, 0, 24, 0, 0, 0]  # grad_c is always computed
    elif cell == "gru":
        h1, gates, hn = fwd(x, state[0], w_ih, w_hh, b_ih, b_hh, True)
        res = bwd(g, x, state[0], w_ih, w_hh, True, h1, gates, hn, False, False, False)
        assert all(r.numel() == 0 for r in res)
    else:
        h1 = fwd(x, state[0], w_ih, w_hh, b_ih, b_hh, False)
        res = bwd(g, x, state[0], w_ih, w_hh, True, False, h1, False, False, False)
        assert all(r.numel() == 0 for r in res)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(variant, bias):
    args = make(variant, 3, 4, 5, bias=bias)
    x, state, w_ih, w_hh, b_ih, b_hh = args
    ts = leaves(*args)
    for t in ts:
        t.requires_grad_(True)
    n = len(state)

    def f(*t):
        bi, bh = (t[n + 3], t[n + 4]) if bias else (None, None)
        return tuple(op_call(variant, t[0], list(t[1:1 + n]), t[1 + n], t[2 + n], bi, bh))

    assert torch.autograd.gradcheck(f, ts)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(cell, dtype):
    x, state, w_ih, w_hh, b_ih, b_hh = make(cell, 3, 4, 5, dtype)
    for t in (x, w_ih, w_hh, b_ih, b_hh):
        t.requires_grad_(True)
    flag = [True] if cell != "rnn" else [False]
    torch.library.opcheck(cell_ops.get(cell), (x, *state, w_ih, w_hh, b_ih, b_hh, *flag))


def test_inference_results_equal_training_results():
    """train=False keeps no gates but computes the same step."""
    x, state, w_ih, w_hh, b_ih, b_hh = make("lstm", 4, 6, 8)
    a = cell_ops.get("lstm")(x, *state, w_ih, w_hh, b_ih, b_hh, True)
    b = cell_ops.get("lstm")(x, *state, w_ih, w_hh, b_ih, b_hh, False)
    assert b[2].numel() == 0
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    torch.testing.assert_close(a[1], b[1], atol=0, rtol=0)


def test_backward_after_train_false_raises():
    x, state, w_ih, w_hh, b_ih, b_hh = make("gru", 2, 3, 4)
    x.requires_grad_(True)
    h1 = cell_ops.get("gru")(x, state[0], w_ih, w_hh, b_ih, b_hh, False)[0]
    with pytest.raises(RuntimeError, match="train=False"):
        h1.sum().backward()


@pytest.mark.parametrize("bad,match", [
    ("w_ih rows", r"w_ih must have 4 \* hidden_size rows"),
    ("h shape", r"h must have shape \[2, 4\]"),
    ("dtype", r"h has dtype Float but the first argument"),
    ("one bias", "b_ih and b_hh must both be given"),
    ("x 3-D", "x must be 2-D"),
    ("int", "supports float32 and float64"),
])
def test_errors(bad, match):
    x, (h, c), w_ih, w_hh, b_ih, b_hh = make("lstm", 2, 3, 4)
    if bad == "w_ih rows":
        w_ih = w_ih[:-1]
    elif bad == "h shape":
        h = h[:, :-1]
    elif bad == "dtype":
        h = h.float()
    elif bad == "one bias":
        b_hh = None
    elif bad == "x 3-D":
        x = x[None]
    elif bad == "int":
        x = x.int()
    with pytest.raises(RuntimeError, match=match):
        cell_ops.get("lstm")(x, h, c, w_ih, w_hh, b_ih, b_hh, False)


@pytest.mark.parametrize("cls", [fusedrnn.LSTMCell, fusedrnn.GRUCell, fusedrnn.RNNCell])
def test_cells_use_the_cell_op(cls):
    """backend='cpu' runs a step as one cell op: a zero-state step is still correct, and the
    op (not the sequence op) ran (the profiler sees fusedrnn::<cell>_cell)."""
    m = cls(5, 7, backend="cpu")
    x = torch.randn(3, 5)
    with torch.profiler.profile() as p:
        m(x)
    names = {e.name for e in p.events()}
    cell = {"LSTMCell": "lstm", "GRUCell": "gru", "RNNCell": "rnn"}[cls.__name__]
    assert f"fusedrnn::{cell}_cell" in names and f"fusedrnn::{cell}_forward" not in names


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", ["empty batch", "non-contiguous", "hidden 1"])
def test_edge_cases_match_torch(variant, case):
    B, I, H = {"empty batch": (0, 3, 4), "non-contiguous": (4, 6, 5), "hidden 1": (2, 3, 1)}[case]
    x, state, w_ih, w_hh, b_ih, b_hh = make(variant, B, I, H)
    if case == "non-contiguous":  # transposed views of the same values
        x = x.t().contiguous().t()
        state = [s.t().contiguous().t() for s in state]
        w_hh = w_hh.t().contiguous().t()
        assert not x.is_contiguous() and not w_hh.is_contiguous()
    args = (x, state, w_ih, w_hh, b_ih, b_hh)
    for t in leaves(*args):
        t.requires_grad_(True)
    ours, theirs = op_call(variant, *args), torch_call(variant, *args)
    seeds = [torch.randn_like(o) for o in ours]
    for a, b in zip(ours + list(torch.autograd.grad(ours, leaves(*args), seeds)),
                    theirs + list(torch.autograd.grad(theirs, leaves(*args), seeds))):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_small_steps_leave_the_threads_as_they_were(cell):
    """A small step runs on the calling thread alone (csrc/cpu/cell_ops.cpp, OnCallingThread:
    our kernels' slices and MKL's thread count for the thread); afterwards, and after an
    error inside it, the thread's large steps have all threads again."""
    from fusedrnn import _C
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: nothing to restore")
    before = _C._calling_thread_threads()
    assert before[0] == torch.get_num_threads()
    x, state, w_ih, w_hh, b_ih, b_hh = make(cell, 4, 8, 16, torch.float32)
    for t in (x, *state, w_ih, w_hh):
        t.requires_grad_(True)
    out = op_call(cell, x, state, w_ih, w_hh, b_ih, b_hh)
    torch.autograd.grad(out, [x, *state, w_ih, w_hh], [torch.randn_like(o) for o in out])
    assert _C._calling_thread_threads() == before
    # an error raised inside a small step (checks that come after OnCallingThread: the LSTM
    # forward's c, the backward ops' incoming gradient)
    x, state, w_ih, w_hh = x.detach(), [s.detach() for s in state], w_ih.detach(), w_hh.detach()
    bad = torch.randn(4, 17)
    ops = torch.ops.fusedrnn
    with pytest.raises(RuntimeError, match="shape"):
        if cell == "lstm":
            ops.lstm_cell(x, state[0], bad, w_ih, w_hh, b_ih, b_hh, False)
        elif cell == "gru":
            h1, gates, hn = ops.gru_cell(x, state[0], w_ih, w_hh, b_ih, b_hh, True)
            ops.gru_cell_backward(bad, x, state[0], w_ih, w_hh, True, h1, gates, hn, True, True, True)
        else:
            h1 = ops.rnn_cell(x, state[0], w_ih, w_hh, b_ih, b_hh, False)
            ops.rnn_cell_backward(bad, x, state[0], w_ih, w_hh, True, False, h1, True, True, True)
    assert _C._calling_thread_threads() == before
