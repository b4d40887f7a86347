"""bfloat16 inference on the cpu backend's bfloat16 dot products (csrc/cpu/tiled_bf16.h):
the forward ops take a bfloat16 w_hh with float32 everything else (train=False), and a
bfloat16 module in inference keeps its weights and input projection in bfloat16
(Backend.bf16_recurrence, modules.py). Where the CPU lacks AVX512-BF16 (or the sequence
is shorter than 8 steps) the ops run float32 on the weight cast, and the modules compute
in float32."""
import pytest
import torch
from torch import nn

import fusedrnn
from fusedrnn import ops
from fusedrnn.backends import available_backends

from op_harness import TOL, assert_close, backend_or_skip, make_inputs

pytestmark = pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="cpu backend not built")


def _bf16_runs(T=9):
    from fusedrnn import _C
    return _C.bf16_kernels_run(T)


needs_bf16 = pytest.mark.skipif("cpu" not in available_backends("cpu") or not _bf16_runs(),
                                reason="no AVX512-BF16 on this CPU: the bfloat16 kernels do not run")


def _forward(backend, cell, args, w_hh):
    """The forward op of `backend` on `args` with w_hh replaced: its differentiable outputs."""
    op = ops.get_op(cell, "forward", backend)
    i = 3 if cell == "lstm" else 2
    args = args[:i] + (w_hh,) + args[i + 1:]
    if cell != "rnn":
        args = args + (False,)  # train=False
    outs = op(*args)
    return outs[:3] if cell == "lstm" else outs[:2]


# (cell, H, P, bias, relu): H = 37 and P = 21 are odd (the k pairs' zero pad, partial panels);
# H = 16: one unit slice, so by rows runs more threads than there are slices (Slices.threads).
CASES = [("lstm", 64, 0, True, False), ("lstm", 37, 21, True, False), ("lstm", 16, 0, True, False),
         ("gru", 37, 0, True, False),
         ("gru", 64, 0, False, False), ("rnn", 40, 0, True, False), ("rnn", 37, 0, True, True)]


@needs_bf16
@pytest.mark.parametrize("tiled", [2, 3], ids=["ymm", "zmm"])
@pytest.mark.parametrize("split", [1, 2], ids=["by-units", "by-rows"])
# (the micro-kernels' row blocks: 1, 4 + 2, 4 + 3 + 2, 4 x 3 + 3 + 2; zmm: 6, 7 + 2, 8 + 7 + 2)
@pytest.mark.parametrize("B", [1, 6, 9, 17])
@pytest.mark.parametrize("lengths,reverse", [(False, False), (True, True), ("sorted", False), ("sorted", True)])
@pytest.mark.parametrize("cell,H,P,bias,relu", CASES)
def test_bf16_weight_forward_against_reference(cell, H, P, bias, relu, lengths, reverse, B, split, tiled,
                                               cpu_options):
    """lengths "sorted": non-increasing (a PackedSequence's), where the kernels skip the
    rows that have ended (Seq::active). tiled: the 8-float (ymm) or 16-float (zmm) dot
    products."""
    backend_or_skip("reference", cell)
    cpu_options(tiled, 1 << 8, split)  # (small min_work: these small shapes still run on 2 threads)
    T = 11
    args = make_inputs(cell, T, B, H, P=P, lengths=lengths, reverse=reverse, bias=bias, relu=relu)
    w = args[3 if cell == "lstm" else 2].bfloat16()
    got = _forward("cpu", cell, args, w)
    # The spec on the same (bfloat16) weight in float64: the kernel's only other rounding is
    # h's to bfloat16 before each step's product.
    want = _forward("reference", cell, tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                                             else a for a in args), w.double())
    for name, g, r in zip(["y", "h_n", "c_n"], got, want):
        assert g.dtype == torch.float32
        assert_close(g, r, TOL[torch.bfloat16], f"{cell} {name}")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_bf16_weight_where_the_kernel_does_not_run_is_the_float32_op(cell, cpu_options):
    """Fewer than 8 steps, or the packed kernels off (FUSEDRNN_CPU_TILED=0): w_hh is cast
    to float32, exactly the float32 op's result."""
    for T, tiled in [(5, -1), (9, 0)]:
        cpu_options(tiled, 0)
        args = make_inputs(cell, T, 3, 16)
        w = args[3 if cell == "lstm" else 2].bfloat16()
        for g, r in zip(_forward("cpu", cell, args, w), _forward("cpu", cell, args, w.float())):
            torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_bf16_weight_errors():
    args = make_inputs("lstm", 9, 2, 8)
    w = args[3].bfloat16()
    with pytest.raises(RuntimeError, match="needs float32 gx"):
        d = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        ops.get_op("lstm", "forward", "cpu")(*d[:3], w, *d[4:], False)


# (not relu: its derivative jumps at 0, so a pre-activation near 0 that bfloat16 rounding
# moves across it changes the gradient by O(1); the float32 backward op is relu-tested elsewhere)
@needs_bf16
@pytest.mark.parametrize("T", [3, 11])  # (3: the kernels do not run, float32 on w_hh cast)
@pytest.mark.parametrize("split", [1, 2], ids=["by-units", "by-rows"])
@pytest.mark.parametrize("B", [1, 6, 9])
@pytest.mark.parametrize("sorted_lengths", [False, True], ids=["lengths", "sorted-lengths"])
@pytest.mark.parametrize("cell,H,P,bias,relu", [c for c in CASES if not c[-1]])
def test_bf16_weight_backward_against_reference(cell, H, P, bias, relu, B, split, T, sorted_lengths, cpu_options):
    """train=True with a bfloat16 w_hh: the backward op's recurrent GEMM on the bfloat16
    kernels too (W_hh^T packed, the pre-activation gradients rounded to bfloat16; with a
    projection, float32 on w_hh cast), and w_hh's gradient, one GEMM on torch's bfloat16
    matmul, comes back in bfloat16."""
    backend_or_skip("reference", cell)
    cpu_options(-1, 1 << 8, split)
    args = make_inputs(cell, T, B, H, P=P, lengths="sorted" if sorted_lengths else True, bias=bias, relu=relu)
    iw = 3 if cell == "lstm" else 2
    w = args[iw].bfloat16()

    def run(backend, dtype, w_hh):
        a = [t.detach().to(dtype).clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
             for t in args]
        a[iw] = w_hh.detach().requires_grad_()
        op = ops.get_op(cell, "forward", backend)
        outs = op(*a, *(() if cell == "rnn" else (True,)))
        diff = outs[:3] if cell == "lstm" else outs[:2]
        torch.manual_seed(1)
        sum((o * torch.randn(o.shape, dtype=torch.float64).to(o.dtype)).sum() for o in diff).backward()
        return [o.detach() for o in diff] + [t.grad for t in a if isinstance(t, torch.Tensor) and t.grad is not None]

    got = run("cpu", torch.float32, w)
    want = run("reference", torch.float64, w.double())
    assert len(got) == len(want)
    wgrad = [g for g in got if g.dtype == torch.bfloat16]
    assert len(wgrad) == 1 and wgrad[0].shape == w.shape  # w_hh's gradient, in bfloat16
    for i, (g, r) in enumerate(zip(got, want)):
        # (a weight gradient sums over all steps and rows: scale the tolerance by its size)
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(g.double(), r, rtol=3e-2, atol=3e-2 * scale, msg=lambda m: f"{cell} output/grad {i}: {m}")


# Modules: torch.nn in float32 on the same bfloat16 weights (gx and h rounded to bfloat16 in
# ours: within bfloat16's tolerance), and torch.nn's own bfloat16 modules (3x looser).
MODULES = [("LSTM", {"num_layers": 2}), ("LSTM", {"proj_size": 5, "batch_first": True}),
           ("GRU", {"bidirectional": True}), ("GRU", {"bias": False}), ("RNN", {"nonlinearity": "relu"})]


@pytest.mark.parametrize("kind,kw", MODULES, ids=["lstm-2", "lstm-proj", "gru-bidir", "gru-nobias", "rnn-relu"])
def test_bf16_modules_in_inference(kind, kw):
    ours = getattr(fusedrnn, kind)(12, 16, backend="cpu", **kw).bfloat16()
    ref32, ref16 = getattr(nn, kind)(12, 16, **kw), getattr(nn, kind)(12, 16, **kw).bfloat16()
    ref32.load_state_dict(ours.state_dict())
    ref16.load_state_dict(ours.state_dict())
    x = torch.randn(4, 10, 12) if kw.get("batch_first") else torch.randn(10, 4, 12)
    x = x.bfloat16()
    with torch.no_grad():
        got, want, low = ours(x), ref32(x.float()), ref16(x)
    kernel = "bfloat16 products" if _bf16_runs(10) else "computed in float32"
    assert kernel in ours.last_backend_reason
    tol = 3e-2
    for g, w, lo in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want),
                        torch.utils._pytree.tree_leaves(low)):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w, rtol=tol, atol=tol)
        torch.testing.assert_close(g.float(), lo.float(), rtol=3 * tol, atol=3 * tol)


@pytest.mark.parametrize("kind,kw", MODULES[:4] + [("RNN", {"num_layers": 2})],
                         ids=["lstm-2", "lstm-proj", "gru-bidir", "gru-nobias", "rnn-2"])  # (relu: see above)
def test_bf16_modules_in_training(kind, kw):
    """Training runs the forward on the bfloat16 kernels too (the backward in float32):
    gradients in the parameters' dtype, against torch.nn in float32 on the same weights."""
    ours = getattr(fusedrnn, kind)(12, 16, backend="cpu", **kw).bfloat16()
    ref32 = getattr(nn, kind)(12, 16, **kw)
    ref32.load_state_dict(ours.state_dict())
    x = torch.randn(4, 10, 12) if kw.get("batch_first") else torch.randn(10, 4, 12)
    x16, x32 = x.bfloat16().requires_grad_(), x.bfloat16().float().requires_grad_()
    got, want = ours(x16)[0], ref32(x32)[0]
    kernel = "bfloat16 products" if _bf16_runs(10) else "computed in float32"
    assert kernel in ours.last_backend_reason
    g = torch.randn_like(want)
    got.backward(g.bfloat16())
    want.backward(g)
    tol = 3e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    assert x16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x16.grad.float(), x32.grad, rtol=tol, atol=tol)
    for (name, p), (_, q) in zip(ours.named_parameters(), ref32.named_parameters()):
        assert p.grad.dtype == torch.bfloat16, name
        scale = max(1.0, q.grad.abs().max().item())
        torch.testing.assert_close(p.grad.float(), q.grad, rtol=tol, atol=tol * scale, msg=name)


@pytest.mark.parametrize("tiled", [-1, 0], ids=["bf16-kernel", "float32-fallback"])
@pytest.mark.parametrize("M,N,K", [(1, 32, 64), (5, 40, 7), (97, 100, 300), (200, 64, 513), (3, 8, 1), (3, 40, 0),
                                   (0, 40, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_projection_against_float64(M, N, K, bias, tiled, cpu_options):
    """fusedrnn::projection_bf16: bfloat16 products are exact in float32, so only float32
    summation separates it from float64 on the same bfloat16 values."""
    cpu_options(tiled, 0)
    x = torch.randn(M, K).bfloat16().reshape(M, 1, K)
    w = (torch.randn(N, K) / K ** 0.5).bfloat16()
    b = torch.randn(N) if bias else None
    got = torch.ops.fusedrnn.projection_bf16(x, w, b)
    want = x.double() @ w.double().t() + (0 if b is None else b.double())
    assert got.dtype == torch.float32 and got.shape == (M, 1, N)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_bf16_projection_errors():
    x, w = torch.randn(4, 8).bfloat16(), torch.randn(16, 8).bfloat16()
    with pytest.raises(RuntimeError, match="x must be bfloat16"):
        torch.ops.fusedrnn.projection_bf16(x.float(), w, None)
    with pytest.raises(RuntimeError, match="b must be float32"):
        torch.ops.fusedrnn.projection_bf16(x, w, torch.randn(16).bfloat16())
    with pytest.raises(RuntimeError, match=r"w must have shape \[16, 8\]"):
        torch.ops.fusedrnn.projection_bf16(x, w[:, :5], None)


def test_bf16_projection_backward():
    """Gradients of x and w in bfloat16 (float32 GEMMs on them cast), b's in float32."""
    x, w, b = torch.randn(3, 5, 24).bfloat16(), (torch.randn(40, 24) / 5).bfloat16(), torch.randn(40)
    g = torch.randn(3, 5, 40)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    torch.ops.fusedrnn.projection_bf16(xs, ws, bs).backward(g)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    (x64 @ w64.t() + b64).backward(g.double())
    assert (xs.grad.dtype, ws.grad.dtype, bs.grad.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    for got, want in [(xs.grad, x64.grad), (ws.grad, w64.grad), (bs.grad, b64.grad)]:
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2 * max(1.0, want.abs().max().item()))


def test_bf16_ops_pass_opcheck():
    """Schema, fake kernels and autograd registration of the bfloat16 path's ops."""
    x, w = torch.randn(3, 4, 24).bfloat16().requires_grad_(), (torch.randn(40, 24) / 5).bfloat16().requires_grad_()
    torch.library.opcheck(torch.ops.fusedrnn.projection_bf16.default, (x, w, torch.randn(40, requires_grad=True)))
    gx, h0, c0, w_hh, w_hr, L, rev = make_inputs("lstm", 9, 3, 8, lengths=True)
    args = (gx.requires_grad_(), h0, c0, w_hh.bfloat16().requires_grad_(), w_hr, L, rev, True)
    torch.library.opcheck(ops.get_op("lstm", "forward", "cpu"), args)


@pytest.mark.parametrize("train", [False, True])
def test_bf16_packed_sequence_with_initial_state(train):
    """lengths (a PackedSequence) and hx through the bfloat16 kernels (9+ steps)."""
    ours = fusedrnn.LSTM(6, 8, backend="cpu").bfloat16()
    ref = nn.LSTM(6, 8)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(11, 4, 6).bfloat16()
    h = (torch.randn(1, 4, 8).bfloat16(), torch.randn(1, 4, 8).bfloat16())

    def run(m, dtype):
        xs = x.detach().to(dtype).clone().requires_grad_(train)
        packed = nn.utils.rnn.pack_padded_sequence(xs, [11, 9, 9, 3], enforce_sorted=False)
        with torch.set_grad_enabled(train):
            y, (hn, cn) = m(packed, tuple(t.to(dtype) for t in h))
        out = torch.cat([nn.utils.rnn.pad_packed_sequence(y)[0].flatten(), hn.flatten(), cn.flatten()])
        if train:
            out.float().sum().backward()
        return out.float(), xs.grad

    got, gx = run(ours, torch.bfloat16)
    want, wx = run(ref, torch.float32)
    assert ("bfloat16 products" if _bf16_runs(11) else "computed in float32") in ours.last_backend_reason
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)
    if train:
        torch.testing.assert_close(gx.float(), wx, rtol=3e-2, atol=3e-2)


@pytest.fixture
def matmul_precision():
    """torch.set_float32_matmul_precision for one test, restored after."""
    old = torch.backends.mkldnn.matmul.fp32_precision
    yield torch.set_float32_matmul_precision
    torch.backends.mkldnn.matmul.fp32_precision = old


@pytest.mark.parametrize("kind,kw", MODULES[:4] + [("RNN", {"num_layers": 2})],
                         ids=["lstm-2", "lstm-proj", "gru-bidir", "gru-nobias", "rnn-2"])
def test_float32_under_matmul_precision_medium(kind, kw, matmul_precision):
    """torch.set_float32_matmul_precision("medium") lets float32 matmuls use bfloat16
    products: float32 modules then run on the bfloat16 kernels (within bfloat16's tolerance
    of torch.nn at full precision, forward and backward, gradients in float32); "highest"
    (the default) keeps them exact."""
    ours = getattr(fusedrnn, kind)(12, 16, backend="cpu", **kw)
    ref = getattr(nn, kind)(12, 16, **kw)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 10, 12) if kw.get("batch_first") else torch.randn(10, 4, 12)
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    matmul_precision("medium")
    got = ours(xo)[0]
    matmul_precision("highest")
    want = ref(xr)[0]
    assert got.dtype == torch.float32
    if _bf16_runs(10):
        assert "bfloat16 products (float32 matmul precision 'medium')" in ours.last_backend_reason
    else:
        assert "bfloat16" not in ours.last_backend_reason
    g = torch.randn_like(want)
    got.backward(g)
    want.backward(g)
    tol = 3e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=tol, atol=tol)
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert p.grad.dtype == torch.float32, name
        scale = max(1.0, q.grad.abs().max().item())
        torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol * scale, msg=name)
    with torch.no_grad():  # full precision again: exactly torch.nn's float32 (to float32 rounding)
        torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-5, atol=1e-5)
    assert "bfloat16" not in ours.last_backend_reason


def test_auto_under_matmul_precision_medium(matmul_precision, monkeypatch):
    """A float32 LSTM at a shape where auto otherwise runs torch.nn's oneDNN kernel (whose
    float32 LSTM does not use bfloat16 under "medium"): ours, on the bfloat16 kernels. While
    torch.compile traces, the setting is not read: float32."""
    if not _bf16_runs(32):
        pytest.skip("no AVX512-BF16 on this CPU")
    from fusedrnn import backends
    monkeypatch.setattr(backends, "onednn_avx512", lambda: True)
    monkeypatch.setattr(backends, "CPU_ZMM", False)  # (with the zmm kernels auto keeps ours anyway)
    m = fusedrnn.LSTM(256, 256)
    x = torch.randn(32, 64, 256)
    with torch.no_grad():
        m(x)
        assert m.last_backend == "torch.nn"
        matmul_precision("medium")
        m(x)
    assert m.last_backend == "cpu" and "bfloat16 products" in m.last_backend_reason
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not backends.float32_matmul_in_bf16()
