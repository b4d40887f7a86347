"""The persistent CUDA kernels (csrc/cuda/kernels/persistent.cuh: the whole sequence in one
cooperative launch, W_hh slices kept on chip, a grid barrier per step) under the CPU
emulation, against the reference: forward and every gradient, each cell and dtype, lengths,
reverse, several grid shapes (one block, several, ragged last block, one unit per block),
batch chunking; the auto choice and its fallback to the per-step kernels; and mutation
tests: without the grid barrier, or without any one of the kernel's __syncthreads, the
comparisons fail.

The emulator runs the blocks of a cooperative launch greedily (one block runs until all its
threads wait at grid.sync()), so a block reading state another block has not written yet
(a missing or misplaced grid barrier) reads stale/poisoned values deterministically.
"""
import re

import pytest
import torch

from op_harness import TOL, check_against_reference, make_inputs
from test_emulated_ops import check_kernel
from fusedrnn.backends import registry
from fusedrnn.contract import GATES

pytestmark = pytest.mark.emulated

E = pytest.importorskip("fusedrnn._emulated", reason="fusedrnn._emulated is not built")

THREADS = 256  # kPThreads


@pytest.fixture(autouse=True)
def _persistent():
    algo, dev = E.get_algo(), E.get_pretend_device()
    E.set_algo("persistent")
    E.set_pretend_device(4, 100 * 1024)
    yield
    E.set_algo(algo)
    E.set_pretend_device(*dev)
    E.set_drop_grid_sync(False)
    E.set_drop_barrier("")


def _inputs(cell, T, B, H, dtype=torch.float32, **kw):
    extra = {"relu": kw.pop("relu", False)} if cell == "rnn" else {}
    if cell == "gru":
        extra["bias"] = kw.pop("bias", True)
    return make_inputs(cell, T, B, H, dtype=dtype, **extra, **kw)


def _forward_and_backward_ran_persistent(cell):
    assert E.last_algo().startswith(f"{cell} backward: persistent"), E.last_algo()


# (T, B, H, pretend SMs): several blocks with a ragged last one (20 = 7+7+6), one block,
# one unit per block (H=7 on 16 SMs), batch 1.
GRIDS = [(4, 3, 20, 3), (3, 2, 9, 1), (3, 3, 7, 16), (4, 1, 20, 4)]
VARIANTS = [dict(), dict(lengths=True), dict(reverse=True), dict(lengths=True, reverse=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"T{g[0]}B{g[1]}H{g[2]}sm{g[3]}")
def test_against_reference(cell, grid, dtype):
    T, B, H, sms = grid
    E.set_pretend_device(sms, 100 * 1024)
    i = GRIDS.index(grid)
    variant = VARIANTS[i % len(VARIANTS)]  # each grid with a different lengths/reverse variant
    kw = {}
    if cell == "rnn":
        kw["relu"] = i % 2 == 1
    if cell == "gru":
        kw["bias"] = i != 1
    check_kernel("emulated", cell, _inputs(cell, T, B, H, dtype, **variant, **kw))
    _forward_and_backward_ran_persistent(cell)
    n_blocks = -(-H // -(-H // sms))
    assert f"{n_blocks} blocks <= {sms} SMs" in E.last_algo()
    assert ("tensor cores" if dtype != torch.float32 else "SIMT fp32") in E.last_algo()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_more_outputs_than_threads(cell, dtype):
    """One block owning 40 units x 20 batch rows = 800 outputs for 256 threads: each thread
    computes several (only its first one's gx is prefetched)."""
    E.set_pretend_device(1, 100 * 1024)
    check_kernel("emulated", cell, _inputs(cell, 3, 20, 40, dtype, lengths=True))
    _forward_and_backward_ran_persistent(cell)
    assert "1 blocks <= 1 SMs, batch chunk 20 of 20" in E.last_algo(), E.last_algo()


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "+".join(v) or "plain")
def test_lengths_and_reverse_fp32(cell, variant):
    check_against_reference("emulated", cell, _inputs(cell, 5, 4, 12, **variant))
    _forward_and_backward_ran_persistent(cell)


def _smem(na, K, U, bch, elem, mma=True):
    """persistent_smem() of kernels/persistent.cuh."""
    a16 = lambda x: (x + 15) // 16 * 16  # noqa: E731
    up = lambda x, m: (x + m - 1) // m * m  # noqa: E731
    if elem == 2 and mma:  # tensor-core layout
        ks, rp, bp = up(K, 16) + 8, up(na * U, 8), up(bch, 16)
        return a16(rp * ks * 2) + 2 * a16(bp * ks * 2) + 4 * max(bp * rp, 128 * THREADS // 32)
    return a16(na * U * K * elem) + a16(bch * K * 4) + na * max(THREADS, bch * U) * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_batch_chunks(cell, direction, dtype):
    """Shared memory for only 2 of the batch rows next to the W slice (SIMT), or one
    16-row tile of them (tensor cores): the state is staged in several chunks."""
    T, B, H, sms = 3, 5 if dtype == torch.float32 else 19, 12, 3
    U, ng = 4, GATES[cell]
    na, K = (ng, H) if direction == "forward" else (1, ng * H)
    elem = 4 if dtype == torch.float32 else 2
    chunk = 2 if dtype == torch.float32 else 16
    smem = _smem(na, K, U, chunk, elem)  # `chunk` rows fit, `chunk + 1` do not
    assert _smem(na, K, U, chunk + 1, elem) > smem
    want = f"batch chunk {chunk} of {B}"
    args = _inputs(cell, T, B, H, dtype, lengths=True, reverse=direction == "backward")
    if direction == "backward":  # forward with room for every row; then shrink for the backward
        E.set_pretend_device(sms, 100 * 1024)
        a = tuple(x.detach().requires_grad_(True) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                  for x in args)
        n = 3 if cell == "lstm" else 2
        outs = registry()["emulated"].op(cell, "forward")(*a)[:n]
        ra = tuple(x.detach().double().requires_grad_(True) if isinstance(x, torch.Tensor) and x.is_floating_point()
                   else x for x in args)
        ref = registry()["reference"].op(cell, "forward")(*ra)[:n]
        seeds = [torch.randn_like(o) for o in outs]
        E.set_pretend_device(sms, smem)
        leaves = [x for x in a if isinstance(x, torch.Tensor) and x.requires_grad]
        got = torch.autograd.grad(outs, leaves, seeds, retain_graph=True)
        assert want in E.last_algo(), E.last_algo()
        E.set_algo("per_step")  # the spec at this dtype: same inputs, y and seeds
        ref_grads = torch.autograd.grad(outs, leaves, seeds)
        if dtype == torch.float32:  # and in float64
            ref_grads = torch.autograd.grad(ref, [x for x in ra if isinstance(x, torch.Tensor) and x.requires_grad],
                                            [s.double() for s in seeds])
        for g, w in zip(got, ref_grads):
            torch.testing.assert_close(g.double(), w.double(), atol=TOL[dtype][0], rtol=TOL[dtype][1])
    else:
        E.set_pretend_device(sms, smem)
        check_against_reference("emulated", cell, args, backward=False)
        assert E.last_algo().startswith(f"{cell} forward: persistent") and want in E.last_algo(), E.last_algo()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_half_falls_back_to_simt_when_the_tensor_core_layout_does_not_fit(cell, dtype):
    """fp16/bf16 run on tensor cores when their (padded) layout fits, else on the SIMT kernel."""
    T, B, H, sms = 3, 3, 20, 3
    U, ng = 7, GATES[cell]
    simt = max(_smem(ng, H, U, B, 2, mma=False), _smem(1, ng * H, U, B, 2, mma=False))
    assert simt < min(_smem(ng, H, U, 1, 2), _smem(1, ng * H, U, 1, 2))
    E.set_pretend_device(sms, simt)
    check_kernel("emulated", cell, _inputs(cell, T, B, H, dtype, lengths=True, reverse=True))
    assert E.last_algo().startswith(f"{cell} backward: persistent"), E.last_algo()
    assert "SIMT fp32 FMAs (the tensor-core layout does not fit)" in E.last_algo(), E.last_algo()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_half_on_simt_where_the_gpu_has_no_tensor_core_mma(cell, dtype):
    """A GPU below compute capability 8.0 (a T4: 7.5) has no mma.m16n8k16 for fp16/bf16:
    the persistent kernels plan the SIMT layout there even when the tensor-core one fits
    (the tensor-core kernel compiled for such a GPU traps), with the same results."""
    E.set_pretend_device(4, 100 * 1024, 7)
    check_kernel("emulated", cell, _inputs(cell, 3, 3, 20, dtype, lengths=True, reverse=True))
    assert E.last_algo().startswith(f"{cell} backward: persistent"), E.last_algo()
    assert "SIMT fp32 FMAs (tensor cores: mma.m16n8k16 needs compute capability 8.0+)" in E.last_algo(), E.last_algo()
    E.set_pretend_device(4, 100 * 1024, 8)
    check_kernel("emulated", cell, _inputs(cell, 3, 3, 20, dtype, lengths=True, reverse=True))
    assert "tensor cores (mma.m16n8k16" in E.last_algo(), E.last_algo()


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_auto_chooses_and_says_why(cell):
    """auto: persistent when the W_hh slices fit the (pretend) device, per-step otherwise
    (results right either way); forced persistent that does not fit raises."""
    E.set_algo("auto")
    args = _inputs(cell, 3, 2, 24)
    E.set_pretend_device(4, 100 * 1024)
    check_against_reference("emulated", cell, args)
    assert re.match(rf"{cell} backward: persistent \(auto: W_hh slice 6 units", E.last_algo()), E.last_algo()
    E.set_pretend_device(4, 1024)  # not even the partial sums fit
    check_against_reference("emulated", cell, args)
    assert re.match(rf"{cell} backward: per_step \(auto: .*> 1024 B shared memory per block", E.last_algo()), \
        E.last_algo()
    E.set_algo("persistent")
    with pytest.raises(RuntimeError, match="cannot run persistent"):
        registry()["emulated"].op(cell, "forward")(*args)
    E.set_algo("per_step")
    registry()["emulated"].op(cell, "forward")(*args)
    assert E.last_algo() == f"{cell} forward: per_step (forced by set_algo('per_step'))"


def test_lstm_projection_falls_back_to_per_step():
    E.set_algo("auto")
    check_against_reference("emulated", "lstm", make_inputs("lstm", 3, 2, 12, P=5))
    assert "per_step" in E.last_algo() and "projection" in E.last_algo(), E.last_algo()


def test_every_schedule_gives_the_same_bits():
    args = _inputs("gru", 3, 3, 20, lengths=True)
    op = registry()["emulated"].op("gru", "forward")
    E.set_pretend_device(3, 100 * 1024)
    saved = E.get_schedule()
    try:
        outs = []
        for mode, seed in [(1, 0), (2, 0), (3, 7)]:
            E.set_schedule(mode, seed)
            outs.append(op(*args))
    finally:
        E.set_schedule(*saved)
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------ mutation tests
MUT = dict(T=3, B=3, H=20)  # 3 blocks on the pretend 3-SM device
MUT_DTYPES = [torch.float32, torch.bfloat16]  # the SIMT and the tensor-core paths


def _mut_inputs(cell, dtype=torch.float32):
    return _inputs(cell, MUT["T"], MUT["B"], MUT["H"], dtype, lengths=True)


@pytest.mark.parametrize("dtype", MUT_DTYPES, ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_dropping_the_grid_barrier_fails_forward_and_backward(cell, dtype):
    E.set_pretend_device(3, 100 * 1024)
    args = _mut_inputs(cell, dtype)
    check_kernel("emulated", cell, args)  # passes with the barrier
    # forward without it
    E.set_drop_grid_sync(True)
    with pytest.raises(AssertionError):
        check_against_reference("emulated", cell, args, backward=False)
    E.set_drop_grid_sync(False)
    # backward without it (the forward ran with it)
    a = tuple(x.detach().requires_grad_(True) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
              for x in args)
    n = 3 if cell == "lstm" else 2
    outs = registry()["emulated"].op(cell, "forward")(*a)[:n]
    seeds = [torch.randn_like(o) for o in outs]
    leaves = [x for x in a if isinstance(x, torch.Tensor) and x.requires_grad]
    good = torch.autograd.grad(outs, leaves, seeds, retain_graph=True)
    E.set_drop_grid_sync(True)
    try:
        bad = torch.autograd.grad(outs, leaves, seeds)
    finally:
        E.set_drop_grid_sync(False)
    assert E.last_algo().startswith(f"{cell} backward: persistent")
    # grad of h0 depends on every step's exchange through the barrier
    assert not all(torch.allclose(g, b, atol=1e-4, rtol=1e-4, equal_nan=False) for g, b in zip(good, bad))


def test_every_persistent_kernel_barrier_is_caught_when_removed():
    E.set_pretend_device(3, 100 * 1024)
    cases = [(cell, dt) for cell in GATES for dt in MUT_DTYPES]
    for cell, dt in cases:  # executes every barrier of the persistent kernels
        check_kernel("emulated", cell, _mut_inputs(cell, dt))
    sites = [s for s in E.barrier_sites() if s.endswith(tuple(f"persistent.cuh:{n}" for n in range(10000)))]
    assert len(sites) >= 2, E.barrier_sites()
    survived = []
    try:
        for site in sites:
            E.set_drop_barrier(site)
            for cell, dt in cases:
                try:
                    check_kernel("emulated", cell, _mut_inputs(cell, dt))
                except (AssertionError, RuntimeError):
                    continue
                survived.append((site, cell, dt))
    finally:
        E.set_drop_barrier("")
    assert not survived, f"removing these barriers went unnoticed: {survived}"
