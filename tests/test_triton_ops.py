"""Op-level tests of the `triton` backend against the reference (forward and backward).

`interpreter` tests run every kernel under TRITON_INTERPRET=1 on CPU tensors (CI);
`gpu` tests run the same checks on a CUDA device with its precision settings
(skipped here). Outputs are NaN-poisoned (conftest), so an unwritten element fails.
"""
import os

import pytest
import torch

from op_harness import TOL, check_against_reference, make_inputs

from fusedrnn.backends import Call, registry, select

VARIANTS = [("lstm", {}), ("lstm", {"P": 12}), ("gru", {"bias": True}), ("gru", {"bias": False}),
            ("rnn", {"relu": False}), ("rnn", {"relu": True})]
VARIANT_IDS = ["lstm", "lstm-proj", "gru", "gru-nobias", "rnn-tanh", "rnn-relu"]
interpreter = pytest.mark.interpreter
gpu = pytest.mark.gpu

# (conftest has set TRITON_INTERPRET before this import when there is no GPU)
triton = pytest.importorskip("triton")
tl = triton.language
from fusedrnn.triton_kernels.recurrence import _cast_out  # noqa: E402


@triton.jit
def _cast_kernel(x, out, N, RTNE_BF16: tl.constexpr):
    r = tl.arange(0, 1024)
    m = r < N
    tl.store(out + r, _cast_out(tl.load(x + r, mask=m, other=0.0), out.dtype.element_ty, RTNE_BF16), mask=m)


def _launch():
    from fusedrnn.triton_kernels import launch
    return launch


@pytest.fixture
def blocks(monkeypatch):
    """Force the tile sizes (hence the program grid) of the next calls."""
    launch = _launch()

    def set_blocks(bb, bh, bk):
        monkeypatch.setattr(launch, "default_blocks", lambda B, H: launch.Blocks(bb, bh, bk))
    return set_blocks


# ----------------------------------------------------------------------------- interpreter
@interpreter
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_fp32(variant, lengths, reverse):
    # H=40, B=3: neither is a multiple of any tile size; default tiles give 3 programs
    cell, kw = variant
    check_against_reference("triton", cell, make_inputs(cell, 5, 3, 40, lengths=lengths, reverse=reverse, **kw))


@interpreter
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_half(variant, dtype, reverse):
    cell, kw = variant
    check_against_reference("triton", cell,
                            make_inputs(cell, 5, 3, 24, dtype=dtype, lengths=True, reverse=reverse, **kw))


@pytest.fixture
def path(monkeypatch):
    """Force the per-step kernels ("step") or keep the default choice ("auto": under the
    interpreter, the time-loop kernels whenever the grid has a single hidden tile)."""
    launch = _launch()

    def set_path(p):
        if p == "step":
            monkeypatch.setattr(launch, "choose_mode", lambda *args: launch.STEP)
    return set_path


GRIDS = {  # id: (tiles, path); B=20, H=40 against tiles of 16..64: partial tiles in batch, hidden and K
    "grid3x2-k3-step": ((16, 16, 16), "auto"),
    "grid3x1-k2-step": ((64, 16, 32), "auto"),
    "grid1x1-step": ((32, 64, 64), "step"),
    "grid1x1-loop": ((32, 64, 64), "auto"),
    "grid1x2-k3-loop": ((16, 64, 16), "auto"),
}


@interpreter
@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_program_grids(blocks, path, grid, cell):
    tiles, p = GRIDS[grid]
    blocks(*tiles)
    path(p)
    launch = _launch()
    n_h = -(-40 // tiles[1])
    mode = launch.choose_mode(4, (n_h, 1), torch.device("cpu"), None)
    assert mode == (launch.SEQ if grid.endswith("loop") else launch.STEP) or p == "step"
    check_against_reference("triton", cell, make_inputs(cell, 4, 20, 40, lengths=True, reverse=True))


def test_time_loop_modes():
    """One hidden tile: SEQ. More: PERSISTENT where all programs can be resident (a GPU with
    enough SMs; tests/test_triton_persistent.py under the interpreter), else per-step."""
    launch = _launch()
    cpu = torch.device("cpu")
    assert launch.choose_mode(5, (1, 3), cpu, None) == launch.SEQ
    assert launch.choose_mode(5, (2, 3), cpu, None) == launch.STEP  # sequential interpreter
    assert launch.choose_mode(0, (1, 1), cpu, None) == launch.STEP
    assert launch.choose_mode(5, (1, 3), cpu, False) == launch.STEP
    with pytest.raises(ValueError, match="one-launch mode"):
        launch.choose_mode(5, (2, 1), cpu, True)
    assert launch.persistent_blocks(16, 1024, 132) == launch.Blocks(16, 16, 64)    # 64 programs
    assert launch.persistent_blocks(256, 1024, 132) == launch.Blocks(64, 32, 64)   # 4 x 32 programs
    assert launch.persistent_blocks(256, 4096, 132) is None                       # 256 programs > 132 SMs
    assert launch.default_blocks(3, 40).BLOCK_H >= 40  # small H: one tile, in-kernel time loop


@interpreter
@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[1], VARIANTS[2], VARIANTS[4]],
                         ids=["lstm", "lstm-proj", "gru", "rnn"])
def test_program_order_independence(blocks, monkeypatch, variant):
    # The interpreter runs a launch's programs one after the other in grid order, so a
    # program that reads what another program of the same launch writes goes unnoticed
    # in one of the two directions. Run every grid in reverse order as well: with the
    # forward-order tests above, any same-launch cross-program dependency changes a result.
    from triton.runtime import interpreter as interp
    builder = interp.interpreter_builder
    calls = []

    def reversed_idx(x, y, z, _orig=builder.set_grid_idx):
        gx, gy, gz = builder.grid_dim
        calls.append((x, y, z))
        _orig(gx - 1 - x, gy - 1 - y, gz - 1 - z)
    monkeypatch.setattr(builder, "set_grid_idx", reversed_idx)
    blocks(16, 16, 16)
    cell, kw = variant
    check_against_reference("triton", cell, make_inputs(cell, 4, 20, 40, lengths=True, reverse=True, **kw))
    assert len(calls) > 6, "the reversed grid order was not used"


@interpreter
@pytest.mark.parametrize("T,B", [(1, 1), (1, 4), (6, 1)])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_batch1_and_T1(cell, T, B):
    check_against_reference("triton", cell, make_inputs(cell, T, B, 20, lengths=True, reverse=T > 1))


@interpreter
@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[2], VARIANTS[4]], ids=["lstm", "gru", "rnn"])
def test_hidden_512(blocks, variant):
    # 4 programs over the hidden units, 4 K chunks (tiles kept large: the interpreter is slow)
    cell, kw = variant
    blocks(16, 128, 128)
    check_against_reference("triton", cell, make_inputs(cell, 3, 2, 512, lengths=True, reverse=True, **kw))


@interpreter
def test_hidden_2048_rnn(blocks):
    # The size target, forward and backward (4 programs of 512 units; larger cells
    # at this size cost too much interpreter time for CI: the gpu tests cover them)
    blocks(16, 512, 512)
    check_against_reference("triton", "rnn", make_inputs("rnn", 2, 1, 2048, lengths=False))


@interpreter
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_zero_and_full_lengths(cell):
    args = list(make_inputs(cell, 4, 3, 20, lengths=True, reverse=True))
    L_idx = {"lstm": 5, "gru": 4, "rnn": 3}[cell]
    args[L_idx] = torch.tensor([0, 4, 2])
    check_against_reference("triton", cell, tuple(args))


@interpreter
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_saved_tensors_match_reference(cell):
    # the saved tensors follow the reference's format (also zero at padded steps)
    args = make_inputs(cell, 5, 3, 20, lengths=True, reverse=True)
    got = registry()["triton"].op(cell, "forward")(*args)
    want = registry()["reference"].op(cell, "forward")(*args)
    n = 3 if cell == "lstm" else 2
    for g, w in zip(got[n:], want[n:]):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=2e-6, rtol=1e-5)


@interpreter
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_tf32_precision_path(cell):
    # the PREC="tf32" variant of every kernel compiles and runs (exact under the interpreter)
    launch = _launch()
    from fusedrnn import reference as R
    args = make_inputs(cell, 4, 3, 24, lengths=True, reverse=True)
    got = getattr(launch, f"{cell}_forward")(*args, precision="tf32")
    want = getattr(R, f"{cell}_forward")(*args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=TOL["tf32"][0], rtol=TOL["tf32"][1])
    grads = [torch.randn_like(o) for o in got[:3 if cell == "lstm" else 2]]
    if cell == "lstm":
        gx, h0, c0, w, _, L, rev = args
        got_b = launch.lstm_backward(*grads, h0, c0, w, None, L, rev, *got[0:1], *got[3:], precision="tf32")
        want_b = R.lstm_backward(*grads, h0, c0, w, None, L, rev, want[0], *want[3:])
    elif cell == "gru":
        gx, h0, w, b, L, rev = args
        got_b = launch.gru_backward(*grads, h0, w, b, L, rev, got[0], *got[2:], precision="tf32")
        want_b = R.gru_backward(*grads, h0, w, b, L, rev, want[0], *want[2:])
    else:
        gx, h0, w, L, rev, relu = args
        got_b = launch.rnn_backward(*grads, h0, w, L, rev, relu, got[0], precision="tf32")
        want_b = R.rnn_backward(*grads, h0, w, L, rev, relu, want[0])
    for g, w in zip(got_b, want_b):
        torch.testing.assert_close(g, w, atol=TOL["tf32"][0], rtol=TOL["tf32"][1])


def test_dot_flags(monkeypatch):
    launch = _launch()
    cpu, cuda, turing = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)
    monkeypatch.setattr(launch, "_TF32", {0: True, 1: False})  # device 1: no TF32 tensor cores (a T4)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert launch.dot_flags(torch.float32, cuda)["PREC"] == "ieee"
        assert launch.dot_flags(torch.bfloat16, cuda)["PREC"] == "tf32"
        assert launch.dot_flags(torch.bfloat16, turing)["PREC"] == "ieee"
        assert launch.dot_flags(torch.float16, cpu)["PREC"] == "ieee"
        torch.set_float32_matmul_precision("high")
        assert launch.dot_flags(torch.float32, cuda)["PREC"] == "tf32"
        assert launch.dot_flags(torch.float32, turing)["PREC"] == "ieee"
        assert launch.dot_flags(torch.float32, cuda, "ieee")["PREC"] == "ieee"
    finally:
        torch.set_float32_matmul_precision(old)
    with pytest.raises(ValueError, match="precision"):
        launch.dot_flags(torch.float32, cpu, "bf16x3")


@interpreter
def test_bf16_rounding_twin_matches_torch():
    # The interpreter truncates fp32 -> bf16; the twin must round like the GPU (and torch).
    x = torch.randn(1000) * torch.logspace(-3, 3, 1000)
    # exact ties between two bf16 values (odd and even lower neighbours): must go to the even one
    hi = torch.randint(0x3C00, 0x4400, (48,), dtype=torch.int32)
    ties = ((hi << 16) | 0x8000).view(torch.float32)
    x = torch.cat([x[:952], ties])
    out = torch.empty(1000, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, out, 1000, RTNE_BF16=True)
    assert torch.equal(out, x.bfloat16())
    _cast_kernel[(1,)](x, out, 1000, RTNE_BF16=False)  # the interpreter's own cast: shows why the twin exists
    assert not torch.equal(out, x.bfloat16())


def test_default_blocks_spread_small_batches():
    launch = _launch()
    for H in (512, 1024, 2048, 4096):
        for B in (1, 2, 5, 16):
            blk = launch.default_blocks(B, H)
            programs = -(-H // blk.BLOCK_H) * -(-B // blk.BLOCK_B)
            assert programs >= 32, (B, H, blk, programs)
            assert blk.BLOCK_B >= 16 and blk.BLOCK_H >= 16 and blk.BLOCK_K >= 16  # tl.dot's minimum
    assert launch.default_blocks(1, 2048).BLOCK_H == 16  # 128 programs for one sequence


def test_refusals(monkeypatch):
    be = registry()["triton"]
    why = be.refuses(Call(cell="gru", device=torch.device("cuda"), dtype=torch.float64, hidden_size=64))
    assert why and "float64" in why
    # auto never picks triton for CPU tensors
    chosen, _ = select("auto", Call(cell="gru", device=torch.device("cpu"), dtype=torch.float32, hidden_size=8))
    assert chosen.name != "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if be.unavailable() is None:
        why = be.refuses(Call(cell="rnn", device=torch.device("cpu"), dtype=torch.float32, hidden_size=8))
        assert why and "TRITON_INTERPRET" in why


@interpreter
@pytest.mark.parametrize("tiles", [(16, 16, 16), (32, 64, 32)], ids=["grid3x2-proj2x2", "grid1x1-proj1x1"])
def test_projection_grids(blocks, tiles):
    # the gate kernels split H=40, the projection kernels split P=24, with partial tiles
    blocks(*tiles)
    check_against_reference("triton", "lstm", make_inputs("lstm", 4, 20, 40, P=24, lengths=True, reverse=True))


# ----------------------------------------------------------------------------- gpu
def _gpu_tol(dtype):
    if dtype == torch.float32:
        return TOL["tf32"] if torch.get_float32_matmul_precision() != "highest" else TOL[torch.float32]
    return TOL[dtype]


@gpu
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("H", [40, 512, 2048])
@pytest.mark.parametrize("B", [1, 16, 70])
def test_gpu_against_reference(variant, dtype, H, B):
    cell, kw = variant
    check_against_reference("triton", cell,
                            make_inputs(cell, 7, B, H, dtype=dtype, device="cuda", lengths=True, reverse=True, **kw),
                            tol=_gpu_tol(dtype))


@gpu
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_gpu_compile_matches_eager(cell):
    from op_harness import opcheck_backend
    args = make_inputs(cell, 5, 4, 64, device="cuda", lengths=True, reverse=True)
    opcheck_backend("triton", cell, args)
    op = registry()["triton"].op(cell, "forward")
    n = 3 if cell == "lstm" else 2
    f = torch.compile(lambda *a: [o.sum() for o in op(*a)[:n]], fullgraph=True)
    leaves = [a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
              for a in args]
    got = f(*leaves)
    g_got = torch.autograd.grad(sum(got), [a for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad])
    want = [o.sum() for o in op(*leaves)[:n]]
    g_want = torch.autograd.grad(sum(want), [a for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad])
    for a, b in zip(list(got) + list(g_got), list(want) + list(g_want)):
        torch.testing.assert_close(a, b)


@gpu
def test_gpu_bf16_rounding_paths_agree():
    x = torch.randn(1024, device="cuda") * 10
    a, b = torch.empty(1024, dtype=torch.bfloat16, device="cuda"), torch.empty(1024, dtype=torch.bfloat16,
                                                                                device="cuda")
    _cast_kernel[(1,)](x, a, 1024, RTNE_BF16=True)
    _cast_kernel[(1,)](x, b, 1024, RTNE_BF16=False)
    assert torch.equal(a, x.bfloat16()) and torch.equal(b, x.bfloat16())


def test_interpreter_env_is_set_when_no_gpu():
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"
