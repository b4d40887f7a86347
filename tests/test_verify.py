"""The check of a backend's kernels against the reference on their device (fusedrnn/verify.py):
real kernels pass it, broken ones (forward, backward, the inference forward, lengths) fail
it, and "auto" then goes on to the next backend with a warning; the command line.

On a GPU the check runs the cuda and triton backends; here it runs the kernels CI can run
(cpu natively, the CUDA sources under emulation, Triton under the interpreter), and the
wiring is tested with verify.DEVICE_TYPES extended to "cpu" and a broken backend made by
wrapping the cpu backend's ops.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fusedrnn
from fusedrnn import backends, verify
from fusedrnn.backends import Backend, Call
from op_harness import backend_or_skip

CPU = torch.device("cpu")


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("backend", ["cpu", pytest.param("emulated", marks=pytest.mark.emulated),
                                     pytest.param("triton", marks=pytest.mark.interpreter)])
def test_real_kernels_pass_the_check(backend, cell):
    be = backend_or_skip(backend, cell)
    for call in (Call(cell, CPU, torch.float32, 9, 0, 3), Call(cell, CPU, torch.float32, 33, 0, 1)):
        measured = verify.measure(be, call)
        assert len(measured) == len(verify.cases(call)) == 3
        assert verify.check(be, call, measured) is None, measured
        # (the measure is an error, not a constant: kernels in float32 are off by rounding only)
        assert all(0 < err < 1e-5 for _, _, err in measured), measured


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_kernels_pass_the_check_on_this_gpu(backend, dtype):
    be = backends.registry()[backend]
    for cell in ("lstm", "gru", "rnn"):
        for B, H in ((1, 1), (5, 33), (64, 512)):
            call = Call(cell, torch.device("cuda"), dtype, H, 0, B)
            if be.refuses(call) is None:
                assert verify.check(be, call) is None


def test_the_check_passes_projections_and_float64():
    be = backend_or_skip("cpu")
    for call in (Call("lstm", CPU, torch.float32, 12, 5, 4), Call("gru", CPU, torch.float64, 7, 0, 2)):
        measured = verify.measure(be, call)
        assert verify.check(be, call, measured) is None, measured
    assert max(err for _, _, err in measured) < 1e-13


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def _broken(fault: str, cell: str = "lstm", name: str = "broken") -> Backend:
    """The cpu backend's ops with one fault: "y" (one output value off in every forward),
    "grad" (w_hh's gradient 3% off), "inference" (y off in forwards with train=False only),
    "lengths" (h_n off only when lengths are given), "none" (no fault)."""
    op = backends.registry()["cpu"].op(cell, "forward")
    names = verify.arg_names(cell)

    def forward(*args):
        a = dict(zip(names, args))
        if fault == "grad":
            a["w_hh"] = _ScaleGrad.apply(a["w_hh"], 1.03)
        outs = list(op(*a.values()))
        if fault == "y" or (fault == "inference" and a.get("train") is False):
            outs[0] = outs[0] + torch.zeros_like(outs[0]).index_fill_(0, torch.tensor([outs[0].shape[0] - 1]), 0.5)
        if fault == "lengths" and a["lengths"] is not None:
            outs[1] = outs[1] * 1.1
        return tuple(outs)

    be = Backend(name=name, ops_backend="cpu", device_types=("cpu",), dtypes=(torch.float32,),
                 load=lambda: None, verify_on_device=True)
    be._ops[(cell, "forward")] = forward
    return be


@pytest.mark.parametrize("fault,what", [("y", "y off"), ("grad", "grad w_hh off"),
                                        ("inference", "(lengths)"), ("lengths", "h_n off")])
def test_a_broken_kernel_fails_the_check(fault, what):
    backend_or_skip("cpu")
    call = Call("lstm", CPU, torch.float32, 6, 0, 3)
    why = verify.check(_broken(fault), call)
    assert why is not None and what in why, why
    assert verify.check(_broken("none"), call) is None


@pytest.fixture
def checked_on_cpu(monkeypatch):
    """A broken backend "broken" (y off) and a sound one "sound", both checked on CPU tensors,
    ahead of "cpu" in auto's order; the check's and select's caches emptied."""
    backend_or_skip("cpu")
    reg = backends.registry()
    monkeypatch.setitem(reg, "broken", _broken("y"))
    monkeypatch.setitem(reg, "sound", _broken("none", name="sound"))
    monkeypatch.setattr(verify, "DEVICE_TYPES", {"cuda", "cpu"})
    monkeypatch.setattr(verify, "_RESULTS", {})
    monkeypatch.setattr(backends, "_CHOICES", {})
    monkeypatch.delenv("FUSEDRNN_VERIFY", raising=False)
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("broken", "cpu", "reference"))
    return monkeypatch


def test_auto_goes_on_past_a_backend_that_fails_its_check(checked_on_cpu):
    call = Call("lstm", CPU, torch.float32, 6, 0, 3)
    state = torch.random.get_rng_state()
    with pytest.warns(RuntimeWarning, match="backend 'broken' failed its check against the reference on cpu"):
        be, why = backends.select("auto", call)
    assert torch.equal(torch.random.get_rng_state(), state)  # (the check draws from its own generator)
    assert be.name == "cpu" and "broken: failed its check" in why and "y off by" in why, why
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per configuration
        backends._CHOICES.clear()
        assert backends.select("auto", call)[0].name == "cpu"
    # a sound backend first in the order runs
    checked_on_cpu.setitem(backends.AUTO_ORDER, "cpu", ("sound", "cpu", "reference"))
    assert backends.select("auto", Call("lstm", CPU, torch.float32, 6, 0, 4))[0].name == "sound"


def test_a_module_runs_the_next_backend_and_matches_torch_nn(checked_on_cpu):
    torch.manual_seed(3)
    ref = torch.nn.LSTM(5, 6, num_layers=2)
    m = fusedrnn.LSTM(5, 6, num_layers=2)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(7, 3, 5)
    with pytest.warns(RuntimeWarning, match="failed its check"), torch.inference_mode():
        y = m(x)[0]
    assert m.last_backend == "cpu" and "broken: failed its check" in m.last_backend_reason
    torch.testing.assert_close(y, ref(x)[0], atol=1e-5, rtol=1e-5)


def test_a_forced_backend_that_fails_runs_with_a_warning(checked_on_cpu):
    with pytest.warns(RuntimeWarning, match="backend 'broken' failed its check"):
        be, why = backends.select("broken", Call("lstm", CPU, torch.float32, 6, 0, 3))
    assert be.name == "broken" and "forced by backend='broken' (it failed its check" in why, why


def test_the_check_can_be_turned_off_and_waits_while_tracing(checked_on_cpu):
    call = Call("lstm", CPU, torch.float32, 6, 0, 3)
    checked_on_cpu.setenv("FUSEDRNN_VERIFY", "0")
    assert backends.select("auto", call)[0].name == "broken"
    checked_on_cpu.delenv("FUSEDRNN_VERIFY")
    backends._CHOICES.clear()
    checked_on_cpu.setattr(verify, "DEVICE_TYPES", {"cuda"})  # (as outside the tests: CPU calls not checked)
    assert backends.select("auto", call)[0].name == "broken"
    checked_on_cpu.setattr(verify, "DEVICE_TYPES", {"cuda", "cpu"})
    backends._CHOICES.clear()
    checked_on_cpu.setattr(torch.compiler, "is_compiling", lambda: True)
    assert backends.select("auto", call)[0].name == "broken"  # (no kernel can run while tracing)
    assert not verify._RESULTS and not backends._CHOICES  # (not remembered: checked at the next call)
    checked_on_cpu.setattr(torch.compiler, "is_compiling", lambda: False)
    names = []  # (under a torch.func transform: vmap)
    torch.vmap(lambda x: names.append(backends.select("auto", call)[0].name) or x)(torch.ones(2))
    assert names == ["broken"] and not verify._RESULTS and not backends._CHOICES
    checked_on_cpu.setattr(verify, "DEVICE_TYPES", {"cuda"})  # (no check due here: the choice is kept)
    torch.vmap(lambda x: backends.select("auto", call) and x)(torch.ones(2))
    assert backends._CHOICES and not verify.deferred(call)
    backends._CHOICES.clear()
    checked_on_cpu.setattr(verify, "DEVICE_TYPES", {"cuda", "cpu"})
    with pytest.warns(RuntimeWarning, match="failed its check"):
        assert backends.select("auto", call)[0].name == "cpu"


def test_backends_checked_on_a_gpu():
    reg = backends.registry()
    assert verify.DEVICE_TYPES == {"cuda"}
    assert [n for n in ("cpu", "cuda", "triton", "reference", "emulated") if n in reg and reg[n].verify_on_device] \
        == [n for n in ("cuda", "triton") if n in reg]


def test_command_line(checked_on_cpu, capsys):
    assert verify.main(["--device", "cpu", "--backends", "cpu,sound", "--sizes", "2x5,1x9"]) == 0
    out = capsys.readouterr().out
    assert "all agree with the reference" in out
    # per size: LSTM with and without projection, GRU, RNN; cpu in float64 and float32, "sound" in float32
    assert out.count(" ok (worst: ") == 2 * 4 * 2 + 2 * 4 * 1, out
    assert verify.main(["--device", "cpu", "--backends", "broken", "--sizes", "2x5"]) == 1
    out = capsys.readouterr().out
    assert "OFF: y off by" in out and "configuration(s) off" in out
