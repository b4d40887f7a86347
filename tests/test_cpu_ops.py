"""The `cpu` backend (csrc/cpu, fusedrnn._C) at op level: every cell against the
reference backend (forward and all gradients, float64 tight and float32 ~1e-5),
gradcheck in float64 and torch.library.opcheck."""
import os
import signal
import time

import pytest
import torch

from fusedrnn.backends import registry
from op_harness import check_against_reference, gradcheck_backend, make_inputs, opcheck_backend


def _cpu_backend_or_skip():
    be = registry().get("cpu")
    why = "the cpu backend is not registered" if be is None else be.unavailable()
    if why:
        pytest.skip(f"cpu backend unavailable: {why}")
    return be


@pytest.fixture(autouse=True)
def _need_cpu_backend():
    _cpu_backend_or_skip()


# (cell, P, flag): flag is relu for RNN, "no bias" for GRU.
VARIANTS = [("lstm", 0, False), ("lstm", 5, False), ("gru", 0, False), ("gru", 0, True),
            ("rnn", 0, False), ("rnn", 0, True)]


def _kw(cell, flag):
    return {"relu": flag} if cell == "rnn" else {"bias": not flag} if cell == "gru" else {}


def _id(v):
    cell, P, flag = v
    return cell + (f"-proj{P}" if P else "") + ("-relu" if cell == "rnn" and flag else "") + \
        ("-nobias" if cell == "gru" and flag else "")


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("T,B,H", [(7, 3, 13), (1, 1, 13), (9, 2, 24)])  # T >= 8: packed weights
def test_against_reference(variant, dtype, lengths, reverse, T, B, H):
    cell, P, flag = variant
    args = make_inputs(cell, T, B, H, P=P, dtype=dtype, lengths=lengths, reverse=reverse, **_kw(cell, flag))
    check_against_reference("cpu", cell, args)


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_large_multithreaded(variant, dtype):
    """Sizes where the kernels split the hidden units over threads (several slices)."""
    cell, P, flag = variant
    P = 96 if P else 0
    args = make_inputs(cell, 9, 12, 256, P=P, dtype=dtype, lengths=True, reverse=True, **_kw(cell, flag))
    check_against_reference("cpu", cell, args)


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
@pytest.mark.parametrize("threads", [3, 5])
@pytest.mark.parametrize("tiled,split", [(2, 0), (2, 1), (2, 2), (3, 0), (0, 1)],
                         ids=["auto", "units", "rows", "zmm", "blas"])
def test_more_threads_than_this_machine(variant, threads, tiled, split, cpu_options):
    """Users' CPUs have more cores than CI's 2: the partitions over 3 and 5 threads (unit
    slices, batch rows, the GEMMs' blocks and their stealing) on odd sizes (B=7: rows 2-3
    per thread; H=100: a partial last panel), against the reference, forward and backward.
    (Oversubscribed here, so small; a 1456-case run of this at 3, 4, 5 and 8 threads, B 1-64,
    H 16-100, passed on 2026-11-30.)"""
    cell, P, flag = variant
    cpu_options(tiled, 1, split)
    torch.set_num_threads(threads)
    for B, H in ((7, 100), (13, 44)):
        args = make_inputs(cell, 9, B, H, P=24 if P else 0, dtype=torch.float32, lengths=True, reverse=True,
                           **_kw(cell, flag))
        check_against_reference("cpu", cell, args)
    for I in (70, 9):  # (9: cpu::gemm's narrow kernels, narrow_gemm_t's partial sums per thread)
        x, w = torch.randn(301, I, requires_grad=True), torch.randn(130, I, requires_grad=True)
        b = torch.randn(130, requires_grad=True)
        y = torch.ops.fusedrnn.projection(x, w, b)
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, w, b), g)
        xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
        yr = torch.nn.functional.linear(xd, wd, bd)
        torch.testing.assert_close(y, yr.float(), atol=1e-4, rtol=1e-5)
        for a, r in zip(got, torch.autograd.grad(yr, (xd, wd, bd), g.double())):
            torch.testing.assert_close(a, r.float(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_gradcheck(variant, lengths, reverse):
    cell, P, flag = variant
    P = 3 if P else 0
    args = make_inputs(cell, 5, 3, 4, P=P, dtype=torch.float64, lengths=lengths, reverse=reverse, **_kw(cell, flag))
    assert gradcheck_backend("cpu", cell, args)


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_opcheck(variant, dtype):
    cell, P, flag = variant
    P = 2 if P else 0
    args = make_inputs(cell, 4, 3, 5, P=P, dtype=dtype, lengths=True, reverse=True, **_kw(cell, flag))
    opcheck_backend("cpu", cell, args)


def _lengths_index(cell):
    return {"lstm": 5, "gru": 4, "rnn": 3}[cell]


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_zero_lengths_and_unsorted(variant, reverse):
    """Empty sequences keep their initial state and output 0; lengths in any order."""
    cell, P, flag = variant
    args = list(make_inputs(cell, 5, 4, 6, P=P, dtype=torch.float64, reverse=reverse, **_kw(cell, flag)))
    args[_lengths_index(cell)] = torch.tensor([0, 5, 2, 3])
    check_against_reference("cpu", cell, tuple(args))
    outs = registry()["cpu"].op(cell, "forward")(*args)
    assert torch.equal(outs[1][0], args[1][0]), "h_n of a length-0 sequence must be h0"
    assert (outs[0][:, 0] == 0).all()


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_all_empty_outputs_do_not_alias_inputs(variant):
    cell, P, flag = variant
    for T, L in ((0, None), (3, torch.zeros(2, dtype=torch.long))):
        args = list(make_inputs(cell, max(T, 1), 2, 6, P=P, dtype=torch.float64, **_kw(cell, flag)))
        args[0] = args[0][:T].contiguous()
        args[_lengths_index(cell)] = L
        if T:  # (the reference cannot run T = 0)
            check_against_reference("cpu", cell, tuple(args))
        args = [a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in args]
        outs = registry()["cpu"].op(cell, "forward")(*args)
        assert outs[0].shape[0] == T and (outs[0] == 0).all()
        n = 3 if cell == "lstm" else 2
        g = [torch.randn_like(o) for o in outs[:n]]
        grads = torch.autograd.grad(outs[1:n], args[1:n], g[1:])
        for got, want in zip(grads, g[1:]):
            assert torch.equal(got, want), "with no active step, grad of the initial state is grad of the final"
        assert torch.equal(outs[1], args[1])
        assert outs[1].data_ptr() != args[1].data_ptr()
        if cell == "lstm":
            assert torch.equal(outs[2], args[2]) and outs[2].data_ptr() != args[2].data_ptr()


def test_noncontiguous_inputs():
    gx, h0, c0, w_hh, w_hr, L, rev = make_inputs("lstm", 5, 3, 8, dtype=torch.float64)
    gx_nc = gx.transpose(0, 1).contiguous().transpose(0, 1)
    w_nc = w_hh.t().contiguous().t()
    assert not gx_nc.is_contiguous() and not w_nc.is_contiguous()
    check_against_reference("cpu", "lstm", (gx_nc, h0, c0, w_nc, w_hr, L, rev))


@pytest.mark.parametrize("bad,match", [
    ("dtype", "dtype"), ("shape", "shape"), ("lengths", "outside"), ("lengths_dtype", "int64"), ("half", "float32"),
])
def test_errors_are_clear(bad, match):
    op = registry()["cpu"].op("lstm", "forward")
    gx, h0, c0, w_hh, w_hr, L, rev = make_inputs("lstm", 4, 2, 5, dtype=torch.float32)
    if bad == "dtype":
        h0 = h0.double()
    elif bad == "shape":
        w_hh = w_hh[:, :3]
    elif bad == "lengths":
        L = torch.tensor([2, 9])
    elif bad == "lengths_dtype":
        L = torch.tensor([2, 3], dtype=torch.int32)
    elif bad == "half":
        gx, h0, c0, w_hh = (t.half() for t in (gx, h0, c0, w_hh))
    with pytest.raises(RuntimeError, match=match):
        op(gx, h0, c0, w_hh, w_hr, L, rev)


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
@pytest.mark.parametrize("tiled,split", [(3, 1), (3, 2), (2, 1), (2, 2), (1, 1), (1, 2), (0, 1), (0, 2)],
                         ids=["zmm", "zmm-rows", "tiled32", "tiled32-rows", "tiled", "tiled-rows", "blas", "blas-rows"])
@pytest.mark.parametrize("H", [44, 64])  # 44: partial last 8- and 32-unit panels
@pytest.mark.parametrize("lengths,reverse", [(False, False), (True, True)], ids=["full", "lengths-rev"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_forced_paths(variant, tiled, split, H, lengths, reverse, dtype, cpu_options):
    """float32 with the packed-panel micro-kernels (AVX2: 16 registers; tiled32: the
    recurrent steps' kernels in AVX-512's 32 registers; zmm: 4-vector panels on 16-float
    vectors; the last two where the CPU has AVX-512, else the same as tiled) and with BLAS,
    on at least 2 threads with min_work = 1, T >= 8 so the weight is packed; float64 the
    same on TiledD (8-double vectors, 6-row blocks: 13 = 6 + 5 + 2, 17 = 6 + 6 + 5) in zmm
    and tiled32 where the CPU has AVX-512, on BLAS otherwise. The time loop
    split by hidden units (split 1: every step over as many threads as there are panels) or
    by batch rows (split 2: each thread its rows, e.g. 13 = 6 + 7, through the whole loop).
    Batch 1 (the GEMV kernel), 5, 12, 13 and 17: row blocks of every height (4-vector
    panels: 13 = 3 + 3 + 3 + 2 + 2, tiled32 4 + 4 + 3 + 2; zmm: 12 = 8 + 4, 13 = 8 + 5 (by
    rows 6 and 7), 17 = 8 + 7 + 2 (by rows 8 and 7 + 2), 5 by rows 2 and 3; GRU's forward
    4 + 4 + 3 + 2; 5 = 3 + 2). B=13 once more with h0 = 0, where the first step's GEMM
    computes one row that every row's cell reads."""
    cell, P, flag = variant
    cpu_options(tiled, 1, split)
    torch.set_num_threads(max(2, torch.get_num_threads()))
    P = 24 if P else 0
    for B, zero_h0 in ((1, False), (5, False), (12, False), (13, False), (17, False), (13, True)):
        args = make_inputs(cell, 9, B, H, P=P, dtype=dtype, lengths=lengths, reverse=reverse, **_kw(cell, flag))
        if zero_h0:
            args = (args[0], torch.zeros_like(args[1])) + args[2:]
        check_against_reference("cpu", cell, args)


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
@pytest.mark.parametrize("tiled,split", [(3, 1), (3, 2), (2, 1), (2, 2), (0, 1), (0, 2)],
                         ids=["zmm", "zmm-rows", "tiled32", "tiled32-rows", "blas", "blas-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_zero_h0_keeps_non_finite_weights(variant, tiled, split, dtype, cpu_options):
    """With h0 = 0 the first step computes one row of 0 @ W_hh^T for all rows: an inf or
    NaN in W_hh must still give NaN in exactly the units where the reference (a full
    GEMM: 0 * inf = NaN) has it, in every row (with a projection, every output is NaN).
    float64 too: TiledD's kernels in zmm and tiled32."""
    cell, P, flag = variant
    cpu_options(tiled, 1, split)
    torch.set_num_threads(max(2, torch.get_num_threads()))
    args = list(make_inputs(cell, 9, 13, 40, P=24 if P else 0, dtype=dtype, **_kw(cell, flag)))
    args[1] = torch.zeros_like(args[1])
    w_hh = args[3 if cell == "lstm" else 2].clone()
    w_hh[5, 3], w_hh[-7, 0] = float("inf"), float("nan")
    args[3 if cell == "lstm" else 2] = w_hh
    y = registry()["cpu"].op(cell, "forward")(*args)[0]
    want = registry()["reference"].op(cell, "forward")(*(a.double() if isinstance(a, torch.Tensor) and
                                                          a.is_floating_point() else a for a in args))[0]
    assert want[0].isnan().any() and (P or not want[0].isnan().all()), "the case must have NaN units at step 0"
    assert torch.equal(y[0].isnan(), want[0].isnan())
    finite = ~want[0].isnan()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y[0][finite], want[0][finite].to(dtype), atol=2 * tol, rtol=tol)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != ("rnn", 0, True)], ids=_id)
def test_zero_h0_weight_grad_keeps_non_finite_gradients(variant):
    """grad_w_hh skips dfirst^T @ h0 when h0 = 0, but not when the first step's gradient has
    an inf (inf * 0 = NaN): an inf in grad_y[0] must give grad_w_hh the reference's NaNs.
    (Not the ReLU RNN: where the pre-activation is <= 0 the reference's backward gives
    inf * 0 = NaN and torch.relu's, like the kernels', 0.)"""
    cell, P, flag = variant
    args = list(make_inputs(cell, 6, 5, 16, P=P, dtype=torch.float32, **_kw(cell, flag)))
    args[1] = torch.zeros_like(args[1])
    iw = 3 if cell == "lstm" else 2
    got = []
    for name, dtype in (("cpu", torch.float32), ("reference", torch.float64)):
        a = [x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in args]
        a[iw].requires_grad_(True)
        y = registry()[name].op(cell, "forward")(*a)[0]
        g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(dtype)
        g[0, 2, 1] = float("inf")
        got.append(torch.autograd.grad(y, a[iw], g)[0])
    assert got[1].isnan().any()
    assert torch.equal(got[0].isnan(), got[1].isnan())


def _results_by_split(cell, args, cpu_options):
    """[outputs + all gradients] of the forward op on `args` (float32, on 2+ threads), with
    the time loop split by units, then by rows (the same random output gradients)."""
    torch.set_num_threads(max(2, torch.get_num_threads()))
    op = registry()["cpu"].op(cell, "forward")
    seeds, results = None, []
    for split in (1, 2):
        cpu_options(-1, 1, split)
        a = tuple(x.detach().requires_grad_(True) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                  for x in args)
        outs = op(*a)[:3 if cell == "lstm" else 2]
        seeds = seeds or [torch.randn_like(o) for o in outs]
        leaves = [x for x in a if isinstance(x, torch.Tensor) and x.requires_grad]
        results.append(list(outs) + list(torch.autograd.grad(outs, leaves, seeds)))
    return results


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
@pytest.mark.parametrize("lengths,reverse", [(False, False), (False, True), (True, True)],
                         ids=["full", "rev", "lengths-rev"])
def test_split_does_not_change_results(variant, lengths, reverse, cpu_options):
    """The time loop split by batch rows gives the same bits as split by hidden units, in
    every output and gradient (each value is the same sums in the same order: only which
    thread computes it changes), so results do not depend on the machine's thread count
    or on make_split's choice. B=24 on 2 threads: 12 rows each (4-row blocks, tiled32) or
    3 + 3 + 3 + 3 (16 registers)."""
    cell, P, flag = variant
    args = make_inputs(cell, 11, 24, 72, P=P, dtype=torch.float32, lengths=lengths, reverse=reverse,
                       **_kw(cell, flag))
    for i, (u, r) in enumerate(zip(*_results_by_split(cell, args, cpu_options))):
        assert torch.isfinite(u).all() and torch.isfinite(r).all(), f"result {i}: non-finite (unwritten?)"
        assert torch.equal(u, r), f"result {i}: split by rows differs from split by units by {(u - r).abs().max()}"


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
@pytest.mark.parametrize("tiled", [3, 2, 0], ids=["zmm", "tiled32", "blas"])
def test_rows_split_on_more_threads_than_unit_slices(variant, tiled, cpu_options):
    """A hidden size of one slice granule (16 units; RNN 32) has one unit slice, yet a batch
    of 24 rows can run on 2 threads split by rows (Slices.threads): the same bits as the
    single thread of the split by units, and the reference, in every output and gradient,
    with each thread's own scratch (the bfloat16 A rows, the backward's dh tiles)."""
    cell, P, flag = variant
    cpu_options(tiled, 1)
    H = 32 if cell == "rnn" else 16
    args = make_inputs(cell, 11, 24, H, P=P, dtype=torch.float32, lengths=True, **_kw(cell, flag))
    for i, (u, r) in enumerate(zip(*_results_by_split(cell, args, cpu_options))):
        assert torch.isfinite(u).all() and torch.isfinite(r).all(), f"result {i}: non-finite (unwritten?)"
        assert torch.equal(u, r), f"result {i}: split by rows differs from split by units by {(u - r).abs().max()}"
    check_against_reference("cpu", cell, args)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_backward_takes_non_contiguous_gradients(cell):
    """The cpu backward ops make non-contiguous incoming gradients contiguous themselves
    (in pooled memory; ops.py passes them through for this backend): an expanded grad_y
    (what y.sum() sends) and a transposed one give the gradients of their contiguous copies."""
    op = registry()["cpu"].op(cell, "forward")
    args = make_inputs(cell, 9, 6, 40, dtype=torch.float32, lengths=True)
    a = tuple(x.detach().requires_grad_(True) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
              for x in args)
    y = op(*a)[0]
    leaves = [x for x in a if isinstance(x, torch.Tensor) and x.requires_grad]
    for g in (torch.randn(1, 1, y.shape[2]).expand_as(y), torch.randn(y.shape[1], y.shape[0], y.shape[2]).transpose(0, 1)):
        assert not g.is_contiguous()
        got = torch.autograd.grad(y, leaves, g, retain_graph=True)
        want = torch.autograd.grad(y, leaves, g.contiguous(), retain_graph=True)
        for i, (u, w) in enumerate(zip(got, want)):
            assert torch.isfinite(u).all() and torch.equal(u, w), f"gradient {i} differs"


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("B", [13, 5])
def test_large_weight_prefetch_path(cell, B):
    """float32, packed weight >= 8 MB: the micro-kernel prefetches the next weight block
    while it computes (kernels.cpp, TiledF::rows), forward and backward: B >= 12 in a burst
    per row block (13 = 3 x 3 + 2 + 2 also ends on short blocks), B < 12 inside the k loops
    (LSTM 5 = 3 + 2, GRU 5 = 3 + 2: its 4-row blocks end on two short ones)."""
    args = make_inputs(cell, 8, B, 1024, dtype=torch.float32, lengths=True, reverse=True)
    check_against_reference("cpu", cell, args)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("tiled", [3, 2], ids=["zmm", "tiled32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_recurrent_steps_over_several_k_blocks(cell, tiled, dtype, cpu_options):
    """The recurrent steps' GEMMs run k in blocks of 512 floats or 256 doubles
    (kernels.cpp, TiledF::kStepKC; TiledD's), each block after the first adding to the
    partial sums in C: hidden 600 has two blocks in the forward, and the backward's
    dh = dG @ W_hh (k = 4H, 3H or H) two to five."""
    cpu_options(tiled, 1, 1)
    args = make_inputs(cell, 8, 11, 600, dtype=dtype, lengths=True, reverse=True)
    check_against_reference("cpu", cell, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("P", [0, 40], ids=["noproj", "proj"])
@pytest.mark.parametrize("zero_h0", [False, True], ids=["h0", "zero-h0"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_lstm_inference_gates_in_row_chunks(dtype, P, zero_h0, lengths, cpu_options):
    """An LSTM forward in inference, split by batch rows, runs each thread's step GEMM and
    cells one micro-kernel row block at a time in float32 where a row's gates take >= 2 KB
    (kernels.cpp, cell_chunk_rows): B=42 on 2 threads (21 rows each: blocks of 8, 8, 5 on
    AVX-512), H=72 (1152 B: all rows at once) and H=136 (2176 B). Not with the first
    step's single GEMM row (h0 = 0), at steps where rows have ended (lengths), or in
    float64 (run here as the same check of the unchunked steps). The outputs equal those
    of the training forward (all rows at once, the same sums) bit for bit, and the
    reference's."""
    cpu_options(-1, 1, 2)  # (split by batch rows)
    torch.set_num_threads(2)
    op, ref = registry()["cpu"].op("lstm", "forward"), registry()["reference"].op("lstm", "forward")
    for H in (72, 136):
        args = make_inputs("lstm", 7, 42, H, P=P, dtype=dtype, lengths=lengths, reverse=True, train=False)
        if zero_h0:
            args = (args[0], torch.zeros_like(args[1]), *args[2:])
        got = op(*args)[:3]
        for name, a, b in zip(("y", "h_n", "c_n"), got, op(*args[:-1], True)[:3]):
            assert torch.equal(a, b), f"H={H} {name}: inference differs from the training forward"
        want = ref(*(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args))
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        for a, r in zip(got, want[:3]):
            torch.testing.assert_close(a.double(), r, atol=tol, rtol=tol)


def test_output_pool_reuses_memory_and_keeps_results_independent():
    """Large outputs (>= 1 MB) come from the cpu output pool (csrc/cpu/output_pool.h): a
    freed output's memory is reused by the next call, results stay those of the reference
    whether the memory is fresh or reused (outputs are NaN-poisoned before the kernel writes
    them: FUSEDRNN_POISON=1 in conftest), outputs alive at the same time never share it, and
    they remain ordinary resizable tensors."""
    from fusedrnn import _C
    op = registry()["cpu"].op("lstm", "forward")
    ref = registry()["reference"].op("lstm", "forward")
    torch.manual_seed(0)
    args = [make_inputs("lstm", 9, 120, 256, dtype=torch.float32) for _ in range(3)]  # y: 1.1 MB
    want = [ref(*(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in arg))[0]
            for arg in args]
    first = op(*args[0], False)[0]
    second = op(*args[1], False)[0]  # while `first` is alive: other memory
    assert second.data_ptr() != first.data_ptr()
    torch.testing.assert_close(first.double(), want[0], atol=2e-5, rtol=1e-5)
    del first
    pooled = _C._pool_bytes()
    assert pooled >= 9 * 120 * 256 * 4
    third = op(*args[2], False)[0]  # takes a pooled block (the oldest that fits)
    assert _C._pool_bytes() < pooled
    assert third.data_ptr() != second.data_ptr()
    torch.testing.assert_close(second.double(), want[1], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(third.double(), want[2], atol=2e-5, rtol=1e-5)
    third.resize_(2 * third.numel())
    assert third.numel() == 2 * 9 * 120 * 256


def test_output_pool_under_concurrent_calls():
    """Calls from several Python threads at once (the ops run without the GIL), each output
    from the pool, freed in any thread: every result equals the one computed alone, so no
    block was handed to two live tensors."""
    import threading
    op = registry()["cpu"].op("lstm", "forward")
    torch.manual_seed(1)
    cases = [make_inputs("lstm", 9, 120, 256, dtype=torch.float32) for _ in range(4)]  # y: 1.1 MB, pooled
    want = [op(*args, True)[0].clone() for args in cases]
    errors = []

    def worker(i):
        for _ in range(6):
            y, _, _, gates, cells = op(*cases[i], True)
            if not torch.equal(y, want[i]):
                errors.append(i)
            del gates, cells

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"threads {sorted(set(errors))} got results that differ from the serial ones"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_output_pool_survives_fork_while_another_thread_holds_it():
    """A process forked while another thread is inside the pool (here: a thread holding its
    lock for 0.3 s) must get a usable pool: the child's pooled allocations would otherwise wait
    forever on a lock whose owner does not exist in the child. The child runs an op with a
    pooled (>= 1 MB) output and checks it against the parent's; it must exit within 60 s."""
    from fusedrnn import _C
    op = registry()["cpu"].op("rnn", "forward")
    args = make_inputs("rnn", 9, 120, 256, dtype=torch.float32)  # y: 1.1 MB, pooled
    want = op(*args)[0]
    _C._pool_hold_lock_for_test(300)
    pid = os.fork()
    if pid == 0:  # child: no test framework calls, just the result as the exit status
        ok = False
        try:
            torch.set_num_threads(1)  # (OpenMP's worker threads do not exist in a forked child)
            ok = torch.equal(op(*args)[0], want)
        finally:
            os._exit(0 if ok else 3)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in its first pooled allocation")
        time.sleep(0.05)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
@pytest.mark.parametrize("tiled,split", [(3, 1), (3, 2), (2, 1), (2, 2), (1, 2), (0, 1), (0, 2)],
                         ids=["zmm", "zmm-rows", "tiled32", "tiled32-rows", "tiled-rows", "blas", "blas-rows"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_sorted_lengths_skip_ended_rows(variant, tiled, split, reverse, cpu_options):
    """Non-increasing lengths (Seq::active): forward and every gradient against the
    reference, on every path, with h0 = 0 too (the first step's single GEMM row), and the
    split by rows balanced by the sums of lengths."""
    cell, P, flag = variant
    cpu_options(tiled, 1, split)
    torch.set_num_threads(max(2, torch.get_num_threads()))
    for B, zero_h0 in ((1, False), (5, False), (13, False), (13, True)):
        args = list(make_inputs(cell, 9, B, 44, P=24 if P else 0, dtype=torch.float32, lengths="sorted",
                                reverse=reverse, **_kw(cell, flag)))
        if zero_h0:
            args[1] = torch.zeros_like(args[1])
        check_against_reference("cpu", cell, tuple(args))


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_sorted_lengths_split_by_rows_matches_split_by_units(variant, cpu_options):
    """With non-increasing lengths the split by rows (bounds at equal sums of lengths)
    matches the split by units in every output and gradient, to float32 rounding: not
    bit for bit, since the rows still running form other micro-kernel row blocks in each
    (see test_split_does_not_change_results)."""
    cell, P, flag = variant
    args = make_inputs(cell, 11, 24, 72, P=P, dtype=torch.float32, lengths="sorted", **_kw(cell, flag))
    for i, (u, r) in enumerate(zip(*_results_by_split(cell, args, cpu_options))):
        assert torch.isfinite(u).all() and torch.isfinite(r).all(), f"result {i}: non-finite (unwritten?)"
        torch.testing.assert_close(r, u, atol=2e-6, rtol=1e-5, msg=f"result {i}: split by rows against units")
