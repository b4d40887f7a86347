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
    return _C.bf16_forward_runs(T)


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


# (cell, H, P, bias, relu): H = 37 and P = 21 are odd (the k pairs' zero pad, partial panels).
CASES = [("lstm", 64, 0, True, False), ("lstm", 37, 21, True, False), ("gru", 37, 0, True, False),
         ("gru", 64, 0, False, False), ("rnn", 40, 0, True, False), ("rnn", 37, 0, True, True)]


@needs_bf16
@pytest.mark.parametrize("split", [1, 2], ids=["by-units", "by-rows"])
@pytest.mark.parametrize("B", [1, 6, 9])  # (the micro-kernel's row blocks: 1, 4 + 2, 4 + 3 + 2)
@pytest.mark.parametrize("lengths,reverse", [(False, False), (True, True)])
@pytest.mark.parametrize("cell,H,P,bias,relu", CASES)
def test_bf16_weight_forward_against_reference(cell, H, P, bias, relu, lengths, reverse, B, split, cpu_options):
    backend_or_skip("reference", cell)
    cpu_options(-1, 1 << 8, split)  # (small min_work: these small shapes still run on 2 threads)
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
    with pytest.raises(RuntimeError, match="inference only"):
        ops.get_op("lstm", "forward", "cpu")(*args[:3], w, *args[4:], True)
    with pytest.raises(RuntimeError, match="needs float32 gx"):
        d = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        ops.get_op("lstm", "forward", "cpu")(*d[:3], w, *d[4:], False)
    gx, h0, w_hh, L, rev, relu = make_inputs("rnn", 9, 2, 8)
    with pytest.raises(RuntimeError, match="inference only"):
        ops.get_op("rnn", "forward", "cpu")(gx.requires_grad_(), h0, w_hh.bfloat16(), L, rev, relu)


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


def test_bf16_modules_with_grad_compute_in_float32():
    """A forward autograd records (training, or eval with grad enabled) keeps float32 compute:
    the bfloat16 kernels have no backward."""
    m = fusedrnn.GRU(8, 16, backend="cpu").bfloat16()
    m(torch.randn(10, 2, 8).bfloat16())[0].sum().backward()
    assert "computed in float32" in m.last_backend_reason
    assert m.weight_hh_l0.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("tiled", [-1, 0], ids=["bf16-kernel", "float32-fallback"])
@pytest.mark.parametrize("M,N,K", [(1, 32, 64), (5, 40, 7), (97, 100, 300), (200, 64, 513), (3, 8, 1)])
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
    with pytest.raises(RuntimeError, match="inference only"):
        torch.ops.fusedrnn.projection_bf16(x, w.requires_grad_(), None)
