"""float16 and bfloat16 modules on the CPU: backend "cpu" computes them in float32
(Backend.float32_for; the module casts input, states and weights in and the results
back), and `auto` picks it where it was measured faster than torch.nn's own low-precision
CPU kernels (torch_nn_faster_low_precision in fusedrnn/backends/__init__.py)."""
import pytest
import torch
from torch import nn

import fusedrnn
from fusedrnn import backends
from fusedrnn.backends import Call, available_backends, torch_nn_faster_low_precision

pytestmark = pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="cpu backend not built")

# Results cast to the dtype once at the end, from a float32 computation: within a few of
# the dtype's rounding steps of torch.nn in float32 on the same (rounded) weights.
TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}
SEQUENCE = [("LSTM", {"num_layers": 2}), ("LSTM", {"proj_size": 5, "batch_first": True}),
            ("GRU", {"bidirectional": True}), ("RNN", {"nonlinearity": "relu", "num_layers": 2})]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _trio(kind, kw, dtype):
    """fusedrnn's module forced to "cpu" in `dtype`, torch.nn's in float32 and in `dtype`,
    all with the same (dtype-rounded) weights."""
    ours = getattr(fusedrnn, kind)(6, 8, backend="cpu", **kw).to(dtype)
    ref32 = getattr(nn, kind)(6, 8, **kw)
    ref32.load_state_dict(ours.state_dict())
    ref_low = getattr(nn, kind)(6, 8, **kw).to(dtype)
    ref_low.load_state_dict(ours.state_dict())
    return ours, ref32, ref_low


def _check(ours, ref32, ref_low, inputs, dtype, call=lambda m, *a: m(*a)):
    """Forward and backward of `ours` on the low-precision `inputs` against torch.nn in
    float32 (tight) and in the same dtype (its own rounding: looser). `call(module, *inputs)`
    runs a module."""
    low = [t.clone().requires_grad_() for t in inputs]
    f32 = [t.float().requires_grad_() for t in inputs]
    got, want = _first(call(ours, *low)), _first(call(ref32, *f32))
    # (sequence modules of 8+ steps: the bfloat16 kernels where the CPU has them)
    T = inputs[0].shape[1 if ours.batch_first else 0] if hasattr(ours, "batch_first") else 1
    bf16_kernels = dtype == torch.bfloat16 and backends.registry()["cpu"].bf16_recurrence(T)
    assert ours.last_backend == "cpu"
    assert ("bfloat16 products" if bf16_kernels else "computed in float32") in ours.last_backend_reason
    assert got.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(got.float(), _first(call(ref_low, *inputs)).float(), rtol=3 * tol, atol=3 * tol)
    g = torch.randn_like(want)
    got.backward(g.to(dtype))
    want.backward(g)
    for a, b in zip(low, f32):
        assert a.grad.dtype == dtype
        torch.testing.assert_close(a.grad.float(), b.grad, rtol=tol, atol=tol)
    for (name, p), (_, q) in zip(ours.named_parameters(), ref32.named_parameters()):
        assert p.grad.dtype == dtype, name
        # (a weight gradient sums over all steps and rows: scale the tolerance by its size)
        scale = max(1.0, q.grad.abs().max().item())
        torch.testing.assert_close(p.grad.float(), q.grad, rtol=tol, atol=tol * scale, msg=name)


@pytest.mark.parametrize("T", [1, 9])  # (T = 1: one step runs the cell op)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind,kw", SEQUENCE, ids=["lstm", "lstm-proj", "gru-bidir", "rnn-relu"])
def test_sequence_modules_compute_in_float32(kind, kw, dtype, T):
    torch.manual_seed(0)
    ours, ref32, ref_low = _trio(kind, kw, dtype)
    B = 3
    x = torch.randn(B, T, 6) if kw.get("batch_first") else torch.randn(T, B, 6)
    _check(ours, ref32, ref_low, [x.to(dtype)], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_packed_sequence_and_initial_state_in_low_precision(dtype):
    torch.manual_seed(1)
    ours, ref32, ref_low = _trio("GRU", {"num_layers": 2}, dtype)
    x = torch.randn(7, 4, 6).to(dtype)
    h0 = torch.randn(2, 4, 8).to(dtype)

    def call(m, x, h0):
        packed = nn.utils.rnn.pack_padded_sequence(x, [7, 5, 5, 2], enforce_sorted=False)
        y, h = m(packed, h0)
        return torch.cat([nn.utils.rnn.pad_packed_sequence(y)[0].flatten(), h.flatten()])
    _check(ours, ref32, ref_low, [x, h0], dtype, call)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_compute_in_float32(kind, dtype):
    torch.manual_seed(2)
    ours, ref32, ref_low = _trio(kind, {}, dtype)
    inputs = [torch.randn(5, 6).to(dtype)] + [torch.randn(5, 8).to(dtype) for _ in range(2 if kind == "LSTMCell" else 1)]
    if kind == "LSTMCell":  # both new states, from both initial states
        _check(ours, ref32, ref_low, inputs, dtype, lambda m, x, h, c: torch.cat(m(x, (h, c)), 1))
    else:
        _check(ours, ref32, ref_low, inputs, dtype)


@pytest.fixture
def measured_cpu(monkeypatch):
    """auto's rule as measured (a CPU with oneDNN's AVX-512 bfloat16 kernels, without AMX or
    AVX512-FP16, the cpu kernels on 8-float vectors), wherever the test runs."""
    monkeypatch.setattr(backends, "_native_low_precision", lambda dtype: False)
    monkeypatch.setattr(backends, "_onednn_avx512_low_precision", lambda: True)
    monkeypatch.setattr(backends, "CPU_ZMM", False)
    monkeypatch.setattr(backends, "_TORCH_NN_CANNOT", set())


# (cell, dtype, batch, hidden, grad, sequence) -> does auto run ours? From the measurements
# in fusedrnn/backends/__init__.py (LOW_PRECISION).
RULE = [
    ("lstm", torch.float16, 64, 1024, False, True, True), ("gru", torch.float16, 1, 64, True, True, True),
    ("lstm", torch.float16, 8, 256, False, False, True), ("rnn", torch.float16, 1, 256, False, False, False),
    ("lstm", torch.bfloat16, 1, 256, False, True, False), ("lstm", torch.bfloat16, 4, 128, True, True, True),
    ("lstm", torch.bfloat16, 8, 256, True, True, False), ("lstm", torch.bfloat16, 16, 768, True, True, True),
    ("lstm", torch.bfloat16, 32, 1024, True, True, False), ("lstm", torch.bfloat16, 8, 1024, False, True, False),
    ("gru", torch.bfloat16, 16, 256, False, True, True), ("gru", torch.bfloat16, 32, 256, False, True, False),
    ("gru", torch.bfloat16, 8, 1024, True, True, True), ("gru", torch.bfloat16, 32, 256, True, True, True),
    ("gru", torch.bfloat16, 64, 256, True, True, False), ("rnn", torch.bfloat16, 32, 512, True, True, False),
    ("rnn", torch.bfloat16, 64, 256, False, True, True), ("rnn", torch.bfloat16, 32, 512, False, True, False),
    ("gru", torch.bfloat16, 1, 64, True, False, False),
]


@pytest.mark.parametrize("cell,dtype,batch,hidden,grad,sequence,ours", RULE)
def test_auto_rule_for_low_precision(cell, dtype, batch, hidden, grad, sequence, ours, measured_cpu):
    cpu = backends.registry()["cpu"]
    call = Call(cell, torch.device("cpu"), dtype, hidden, 0, batch)
    why = torch_nn_faster_low_precision(call, cpu, grad, sequence)
    assert (why is None) == ours, why
    # float32 and the reference (no float32 compute) are never this rule's business
    assert torch_nn_faster_low_precision(call._replace(dtype=torch.float32), cpu, grad, sequence) is None
    assert torch_nn_faster_low_precision(call, backends.registry()["reference"], grad, sequence) is None


# bfloat16 where the cpu backend's bfloat16 dot products run (bf16_kernels):
# (cell, batch, hidden, grad) -> ours? Inference: LSTM at batch <= 4, or <= 8 from hidden
# 1024; GRU, RNN always. Training: LSTM below batch x hidden 16384 or from hidden 512;
# GRU, RNN always.
RULE_BF16_KERNELS = [("lstm", 1, 256, False, True), ("lstm", 4, 512, False, True), ("lstm", 8, 512, False, False),
                     ("lstm", 8, 1024, False, True), ("lstm", 32, 256, False, False),
                     ("lstm", 16, 1024, False, False), ("gru", 64, 1024, False, True),
                     ("rnn", 64, 1024, False, True), ("gru", 32, 512, False, True),
                     ("lstm", 8, 512, True, True), ("lstm", 32, 512, True, True), ("lstm", 64, 1024, True, True),
                     ("lstm", 64, 256, True, False), ("lstm", 32, 256, True, True), ("gru", 64, 256, True, True), ("gru", 64, 1024, True, True),
                     ("rnn", 32, 512, True, True), ("rnn", 64, 1024, True, True)]


@pytest.mark.parametrize("cell,batch,hidden,grad,ours", RULE_BF16_KERNELS)
def test_auto_rule_for_bf16_kernels(cell, batch, hidden, grad, ours, measured_cpu):
    cpu = backends.registry()["cpu"]
    call = Call(cell, torch.device("cpu"), torch.bfloat16, hidden, 0, batch)
    assert (torch_nn_faster_low_precision(call, cpu, grad, True, True) is None) == ours


def test_auto_rule_for_bf16_kernels_on_zmm(measured_cpu, monkeypatch):
    """With the zmm kernels (Zen 5) LSTM inference runs ours up to batch 4 at every hidden
    size, torch.nn's from batch 5 (0.92-0.99x at batch 8 on 2026-12-01; on Zen 4's rule batch
    8 is ours from hidden 1024); GRU, RNN and training unchanged."""
    monkeypatch.setattr(backends, "CPU_ZMM", True)
    cpu = backends.registry()["cpu"]
    for cell, batch, hidden, grad, ours in (("lstm", 8, 1024, False, False), ("lstm", 4, 1024, False, True),
                                            ("lstm", 8, 256, False, False), ("lstm", 4, 256, False, True),
                                            ("lstm", 16, 512, False, False),
                                            ("lstm", 32, 1024, False, False), ("gru", 64, 1024, False, True),
                                            ("gru", 32, 512, False, True), ("gru", 64, 1024, True, True),
                                            ("rnn", 64, 1024, False, True)):
        call = Call(cell, torch.device("cpu"), torch.bfloat16, hidden, 0, batch)
        assert (torch_nn_faster_low_precision(call, cpu, grad, True, True) is None) == ours, (cell, batch, hidden)


def test_auto_runs_bf16_kernels_in_inference(measured_cpu):
    if not backends.registry()["cpu"].bf16_recurrence(9):
        pytest.skip("no AVX512-BF16 on this CPU")
    m = fusedrnn.GRU(64, 256).bfloat16()  # (B=32: torch.nn without the bfloat16 kernels)
    with torch.no_grad():
        m(torch.randn(9, 32, 64).bfloat16())
    assert m.last_backend == "cpu" and "bfloat16 products" in m.last_backend_reason


# Where torch.nn's low-precision RNNs run emulated (no AVX-512 in oneDNN: Zen 3, measured
# 2026-12-01): (cell, dtype, batch, hidden, grad, sequence) -> does auto run ours?
# Sequences always; cells in training from 2^16 multiply-adds per step (batch x hidden^2 x
# gates), in inference from batch 8 and 2^18.
RULE_EMULATED = [
    ("lstm", torch.bfloat16, 1, 256, False, True, True), ("lstm", torch.bfloat16, 64, 512, False, True, True),
    ("gru", torch.bfloat16, 64, 512, True, True, True), ("rnn", torch.float16, 64, 1024, False, True, True),
    ("lstm", torch.bfloat16, 1, 64, True, False, False), ("lstm", torch.bfloat16, 1, 128, True, False, True),
    ("rnn", torch.float16, 8, 64, True, False, False), ("rnn", torch.bfloat16, 16, 64, True, False, True),
    ("gru", torch.bfloat16, 4, 1024, False, False, False), ("lstm", torch.float16, 8, 64, False, False, False),
    ("lstm", torch.bfloat16, 8, 128, False, False, True), ("rnn", torch.bfloat16, 8, 256, False, False, True),
    ("rnn", torch.float16, 8, 128, False, False, False), ("gru", torch.bfloat16, 1, 1024, False, False, False),
]


@pytest.mark.parametrize("cell,dtype,batch,hidden,grad,sequence,ours", RULE_EMULATED)
def test_auto_rule_where_torch_nn_emulates_low_precision(cell, dtype, batch, hidden, grad, sequence, ours,
                                                         measured_cpu, monkeypatch):
    monkeypatch.setattr(backends, "_onednn_avx512_low_precision", lambda: False)
    call = Call(cell, torch.device("cpu"), dtype, hidden, 0, batch)
    why = torch_nn_faster_low_precision(call, backends.registry()["cpu"], grad, sequence)
    assert (why is None) == ours, why


def test_auto_runs_ours_for_bfloat16_where_torch_nn_emulates_it(measured_cpu, monkeypatch):
    """A module's forward follows that rule: a bfloat16 LSTM that the AVX-512 rule hands to
    torch.nn runs ours where torch.nn would emulate bfloat16, and matches torch.nn."""
    x = torch.randn(9, 8, 16).bfloat16()
    ours = fusedrnn.LSTM(16, 32).bfloat16()
    ref = nn.LSTM(16, 32).bfloat16()
    ref.load_state_dict(ours.state_dict())
    for emulated in (False, True):
        monkeypatch.setattr(backends, "_onednn_avx512_low_precision", lambda: not emulated)
        with torch.no_grad():
            y = ours(x)[0]
        assert ours.last_backend == ("cpu" if emulated else "torch.nn"), ours.last_backend_reason
        torch.testing.assert_close(y.float(), ref(x)[0].float(), rtol=3e-2, atol=3e-2)


def test_auto_keeps_torch_nn_on_cpus_with_native_low_precision_units(monkeypatch):
    monkeypatch.setattr(backends, "_native_low_precision", lambda dtype: True)
    call = Call("gru", torch.device("cpu"), torch.float16, 64, 0, 1)
    assert "native float16" in torch_nn_faster_low_precision(call, backends.registry()["cpu"], False, True)


def test_auto_runs_ours_or_torch_nn_by_the_rule(measured_cpu):
    x = torch.randn(6, 2, 6)
    lstm16 = fusedrnn.LSTM(6, 8).half()
    lstm16(x.half())
    assert lstm16.last_backend == "cpu" and "computed in float32" in lstm16.last_backend_reason
    lstm_bf = fusedrnn.LSTM(6, 8).bfloat16()
    with torch.no_grad():
        y = lstm_bf(x.bfloat16())[0]
    assert lstm_bf.last_backend == "torch.nn", lstm_bf.last_backend_reason
    ref = nn.LSTM(6, 8).bfloat16()
    ref.load_state_dict(lstm_bf.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(y, ref(x.bfloat16())[0], rtol=0, atol=0)
    lstm_bf(x.bfloat16())  # training, batch 2: ours
    assert lstm_bf.last_backend == "cpu", lstm_bf.last_backend_reason


def test_auto_falls_back_to_float32_compute_where_torch_nn_fails(monkeypatch, measured_cpu):
    """Where the rule picks torch.nn but its low-precision kernel raises (some CPUs lack
    one), the float32 compute runs, and later calls go straight to it."""
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        raise RuntimeError("no bfloat16 kernel here")
    monkeypatch.setattr(nn.LSTM, "forward", failing)
    ours = fusedrnn.LSTM(6, 8).bfloat16()
    x = torch.randn(5, 3, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(2):
            y, _ = ours(x)
            assert ours.last_backend == "cpu", ours.last_backend_reason
    assert len(calls) == 1
    monkeypatch.undo()
    ref = nn.LSTM(6, 8)
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(y.float(), ref(x.float())[0], rtol=3e-2, atol=3e-2)


def _under_cpu_autocast(kind):
    """fusedrnn's `kind` and torch.nn's with the same weights, on one input under CPU
    autocast to bfloat16: (fusedrnn's module, its result, torch.nn's result, whether
    torch.nn could run it). Where it cannot (oneDNN has no bfloat16 LSTM primitive on
    CPUs without AVX512, e.g. Zen 3: "could not create a primitive descriptor"), torch.nn's
    result is what autocast asks for: float32 math on bfloat16-rounded input and weights,
    rounded to bfloat16."""
    ours = getattr(fusedrnn, kind)(6, 8)
    ref = getattr(nn, kind)(6, 8)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 6) if kind.endswith("Cell") else torch.randn(5, 4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _first(ours(x))
        try:
            return ours, got, _first(ref(x)), True
        except RuntimeError as e:
            if "primitive descriptor" not in str(e):
                raise
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.bfloat16().float())
    return ours, got, _first(ref(x.bfloat16().float())).bfloat16(), False


@pytest.mark.parametrize("kind", ["LSTM", "RNN", "RNNCell"])  # (GRU and the other cells stay float32)
def test_cpu_autocast_runs_float32_compute_or_torch_nn_not_the_reference(kind, measured_cpu):
    """Under CPU autocast these run in bfloat16 (fusedrnn/autocast.py); before, auto ran
    the reference there (the cpu backend had no bfloat16), a per-step loop."""
    ours, got, want, _ = _under_cpu_autocast(kind)
    assert ours.last_backend in ("cpu", "torch.nn"), ours.last_backend_reason
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("kind", ["LSTM", "RNNCell"])
def test_cpu_autocast_without_the_cpu_backend_runs_torch_nn(kind, no_cpu_backend):
    """Where only the reference could run the autocast dtype (an install without the
    compiled kernels), auto runs torch.nn's forward, which autocasts itself; where torch.nn
    cannot run it on this CPU, auto runs the reference instead of raising torch.nn's error."""
    ours, got, want, torch_nn_ran = _under_cpu_autocast(kind)
    if torch_nn_ran:
        assert ours.last_backend == "torch.nn", ours.last_backend_reason
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        assert ours.last_backend == "reference", ours.last_backend_reason
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)


def test_under_compile_no_lstm_goes_to_torch_nns_onednn_kernel(monkeypatch, measured_cpu):
    """torch.nn's oneDNN LSTM fails to compile with grad enabled (torch 2.14), so while
    compiling, auto keeps an LSTM on fusedrnn's ops; GRU and RNN (which compile in torch.nn)
    still follow the measured rule."""
    monkeypatch.setattr(backends, "onednn_avx512", lambda: True)
    monkeypatch.setattr(backends, "CPU_ZMM", False)  # (the float32 rule's CPUs: 8-float kernels)
    cpu = backends.registry()["cpu"]
    lstm_bf16 = Call("lstm", torch.device("cpu"), torch.bfloat16, 256, 0, 64)
    gru_bf16 = lstm_bf16._replace(cell="gru")
    lstm_fp32 = lstm_bf16._replace(dtype=torch.float32)
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        assert (torch_nn_faster_low_precision(lstm_bf16, cpu, False, True) is None) == compiling
        assert (backends.torch_nn_faster(lstm_fp32, 32, False, input_size=256) is None) == compiling
        assert backends.torch_nn_faster(lstm_fp32, 32, False, input_size=256, bf16_kernels=True) is None  # ("medium")
        assert torch_nn_faster_low_precision(gru_bf16, cpu, False, True) is not None
