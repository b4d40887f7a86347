"""A bidirectional layer's two directions in one op call in inference (fusedrnn/bidirectional.py,
csrc/cpu/register.cpp: fusedrnn::{lstm,gru,rnn}_forward_pair): the two sequence ops' results,
run at once (one thread each) or one after the other; opcheck; and the modules call it once
per layer where nothing records a gradient and the directions run at once, with the results
of the per-direction path."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from fusedrnn import modules
from fusedrnn.backends import registry
from module_harness import make_pair
from op_harness import backend_or_skip, make_inputs


@pytest.fixture(autouse=True)
def _cpu():
    backend_or_skip("cpu")


CASES = [("lstm", {}), ("lstm", {"P": 16}), ("gru", {}), ("gru", {"bias": False}), ("rnn", {}), ("rnn", {"relu": True})]
T, B, H = 100, 5, 48  # (every case's directions have the work to run at once: >= 2^20 multiply-adds)


def _directions(cell, kw, dtype, lengths):
    """Forward-op arguments of the two directions: their own weights and states, one lengths."""
    a = make_inputs(cell, T, B, H, dtype=dtype, lengths=lengths, **kw)
    b = list(make_inputs(cell, T, B, H, dtype=dtype, **kw))
    L = {"lstm": 5, "gru": 4, "rnn": 3}[cell]  # (the lengths' position)
    b[L] = a[L]
    return a, tuple(b)


def _single(cell, args, reverse):
    if cell == "lstm":
        gx, h0, c0, w, w_hr, L, _ = args
        return list(torch.ops.fusedrnn.lstm_forward(gx, h0, c0, w, w_hr, L, reverse, False)[:3])
    if cell == "gru":
        gx, h0, w, b, L, _ = args
        return list(torch.ops.fusedrnn.gru_forward(gx, h0, w, b, L, reverse, False)[:2])
    gx, h0, w, L, _, relu = args
    return list(torch.ops.fusedrnn.rnn_forward(gx, h0, w, L, reverse, relu))


def _pair(cell, a, b):
    if cell == "lstm":
        y0, y1, h0, h1, c0, c1 = torch.ops.fusedrnn.lstm_forward_pair(a[0], b[0], a[1], b[1], a[2], b[2], a[3], b[3],
                                                                      a[4], b[4], a[5])
        return [y0, h0, c0], [y1, h1, c1]
    if cell == "gru":
        y0, y1, h0, h1 = torch.ops.fusedrnn.gru_forward_pair(a[0], b[0], a[1], b[1], a[2], b[2], a[3], b[3], a[4])
    else:
        y0, y1, h0, h1 = torch.ops.fusedrnn.rnn_forward_pair(a[0], b[0], a[1], b[1], a[2], b[2], a[3], a[5])
    return [y0, h0], [y1, h1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("lengths", [False, "sorted", True], ids=["full", "sorted", "unsorted"])
@pytest.mark.parametrize("min_work", [1 << 40, 1], ids=["at-once", "one-after-the-other"])
@pytest.mark.parametrize("cell,kw", CASES, ids=lambda c: str(c))
def test_pair_is_the_two_sequence_ops_bit_for_bit(cell, kw, min_work, lengths, dtype, cpu_options):
    """min_work 2^40: no step splits, so the pair runs the directions at once; 1: every step
    splits, so one after the other. Either way each direction's results are those of its
    sequence op alone (the same kernels, the same split), bit for bit; except an LSTM with
    projection run at once: its h @ w_hr^T is BLAS's, whose sums depend on how many threads
    BLAS has (one, inside the pair's parallel region), so to rounding."""
    cpu_options(-1, min_work)
    torch.set_num_threads(max(2, torch.get_num_threads()))
    a, b = _directions(cell, kw, dtype, lengths)
    w_hh = a[3] if cell == "lstm" else a[2]
    from fusedrnn import _C
    assert _C.directions_at_once(B * w_hh.shape[0] * w_hh.shape[1], T) == (min_work > 1)
    got = _pair(cell, a, b)
    for d, (args, reverse) in enumerate(((a, False), (b, True))):
        for i, (g, w) in enumerate(zip(got[d], _single(cell, args, reverse))):
            if kw.get("P") and min_work > 1:
                eps = torch.finfo(dtype).eps
                torch.testing.assert_close(g, w, atol=16 * eps, rtol=16 * eps, msg=f"direction {d}, output {i}")
            else:
                assert torch.equal(g, w), f"direction {d}, output {i}"


@pytest.mark.parametrize("cell,kw", CASES[::2], ids=lambda c: str(c))
def test_pair_opcheck(cell, kw):
    a, b = _directions(cell, kw, torch.float32, "sorted")
    name = f"{cell}_forward_pair"
    if cell == "lstm":
        args = (a[0], b[0], a[1], b[1], a[2], b[2], a[3], b[3], a[4], b[4], a[5])
    elif cell == "gru":
        args = (a[0], b[0], a[1], b[1], a[2], b[2], a[3], b[3], a[4])
    else:
        args = (a[0], b[0], a[1], b[1], a[2], b[2], a[3], a[5])
    torch.library.opcheck(getattr(torch.ops.fusedrnn, name).default, args)


def _count_pairs(monkeypatch):
    calls = []
    real = modules.forward_pair

    def counting(*args):
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(modules, "forward_pair", counting)
    return calls


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cell,cfg", [("lstm", {}), ("lstm", {"proj_size": 16}), ("gru", {"bias": False}),
                                      ("rnn", {"nonlinearity": "relu"})], ids=lambda c: str(c))
def test_modules_call_the_pair_once_per_layer_in_inference(cell, cfg, packed, monkeypatch):
    cfg = dict(input_size=6, hidden_size=64, num_layers=2, bidirectional=True, batch_first=True, **cfg)
    ref, ours = make_pair(cell, "cpu", init_range=None, **cfg)
    x = torch.randn(4, 64, 6, dtype=torch.float64)
    inp = pack_padded_sequence(x, torch.tensor([60, 64, 21, 50]), batch_first=True, enforce_sorted=False) if packed else x
    calls = _count_pairs(monkeypatch)

    def run():
        y, st = ours(inp)
        return [y.data if packed else y] + (list(st) if isinstance(st, tuple) else [st])

    with torch.no_grad():
        got = run()
        want_nn = run_ref = ref(inp)
    assert calls == [cell, cell]  # one per layer
    want_nn = [run_ref[0].data if packed else run_ref[0]] + (list(run_ref[1]) if cell == "lstm" else [run_ref[1]])
    for g, w in zip(got, want_nn):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)
    # the per-direction path: the same bits (to rounding with projection, see above)
    monkeypatch.setattr(registry()["cpu"], "direction_pairs", False)
    with torch.no_grad():
        per_direction = run()
    assert calls == [cell, cell]
    for g, w in zip(got, per_direction):
        if "proj_size" in cfg:
            torch.testing.assert_close(g, w, atol=1e-14, rtol=1e-14)
        else:
            assert torch.equal(g, w)


def test_not_where_a_gradient_is_recorded(monkeypatch):
    calls = _count_pairs(monkeypatch)
    m = fusedrnn.GRU(5, 64, bidirectional=True, backend="cpu")
    x = torch.randn(64, 4, 5)
    m(x)[0].sum().backward()  # parameters require grad
    assert calls == []
    m.requires_grad_(False)
    m(x.requires_grad_())[0].sum().backward()  # the input does
    assert calls == []
    m(x.detach())  # nothing does, grad mode on
    with torch.inference_mode():
        m(x)
    assert calls == ["gru", "gru"]


def test_only_where_the_directions_run_at_once(cpu_options, monkeypatch):
    """Where a step splits over threads (here: min_work 1) or one thread runs, the pair would
    run the directions one after the other, which measured no faster: the modules keep the
    per-direction path there."""
    calls = _count_pairs(monkeypatch)
    m = fusedrnn.LSTM(5, 64, bidirectional=True, backend="cpu")
    x = torch.randn(32, 2, 5)
    threads = torch.get_num_threads()
    with torch.no_grad():
        torch.set_num_threads(2)
        cpu_options(-1, 1)
        m(x)
        assert calls == []
        cpu_options(-1, 1 << 40)
        torch.set_num_threads(1)
        m(x)
        assert calls == []
        torch.set_num_threads(max(2, threads))
        m(x[:2])  # 2 steps: too little work to wake the other thread for
        assert calls == []
        m(x)
        assert calls == ["lstm"]


def test_not_under_torch_compile():
    """Dynamo cannot trace the C++ rule (directions_at_once): a fullgraph compile of a
    bidirectional module runs the per-direction ops, with the eager pair's results."""
    m = fusedrnn.GRU(5, 64, bidirectional=True, backend="cpu").eval()
    x = torch.randn(64, 4, 5)
    with torch.no_grad(), torch._dynamo.config.patch(allow_rnn=True):
        want = m(x)[0]
        got = torch.compile(m, fullgraph=True, backend="eager")(x)[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
