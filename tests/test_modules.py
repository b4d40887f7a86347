"""fusedrnn.LSTM/GRU/RNN against torch.nn with shared weights, float64, forward and backward,
over every combination of the constructor options and input forms (issue 2's grid),
for each backend that runs natively on the CPU."""
import itertools

import pytest
import torch

from fusedrnn.backends import registry
from module_harness import INPUT_KINDS, compare_modules

CPU_BACKENDS = ["reference", "cpu"]


def _grid(cell):
    extra = {"lstm": [{"proj_size": 0}, {"proj_size": 2}],
             "gru": [{}],
             "rnn": [{"nonlinearity": "tanh"}, {"nonlinearity": "relu"}]}[cell]
    for layers, bias, bf, bi, ex in itertools.product((1, 2, 3), (True, False), (False, True), (False, True), extra):
        cfg = dict(input_size=3, hidden_size=4, num_layers=layers, bias=bias, batch_first=bf, bidirectional=bi, **ex)
        name = f"L{layers}-{'bias' if bias else 'nobias'}-{'bf' if bf else 'tf'}-{'bi' if bi else 'uni'}" + \
            "".join(f"-{k}{v}" for k, v in ex.items())
        yield pytest.param(cfg, id=name)


def _require(backend):
    why = registry()[backend].unavailable() if backend in registry() else "not registered"
    if why:
        pytest.skip(f"backend {backend!r} unavailable: {why}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("hx_given", [False, True], ids=["hx0", "hx"])
@pytest.mark.parametrize("input_kind", INPUT_KINDS)
@pytest.mark.parametrize("cell,cfg", [pytest.param(c, p.values[0], id=f"{c}-{p.id}")
                                       for c in ("lstm", "gru", "rnn") for p in _grid(c)])
def test_matches_torch_nn(backend, cell, cfg, input_kind, hx_given):
    _require(backend)
    compare_modules(cell, backend, cfg, input_kind, hx_given)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_float32_longer_sequence(backend, cell):
    _require(backend)
    cfg = dict(input_size=7, hidden_size=33, num_layers=2, bidirectional=True)
    compare_modules(cell, backend, cfg, "packed_unsorted", True, dtype=torch.float32, atol=2e-5, rtol=1e-4,
                    T=17, B=5, init_range=None)


@pytest.mark.parametrize("hx_given", [False, True], ids=["hx0", "hx"])
@pytest.mark.parametrize("input_kind", INPUT_KINDS)
@pytest.mark.parametrize("cell,cfg", [pytest.param(c, p.values[0], id=f"{c}-{p.id}")
                                       for c in ("lstm", "gru", "rnn") for p in _grid(c)
                                       if p.values[0]["num_layers"] <= 2])
def test_single_step_runs_the_cell_op(cell, cfg, input_kind, hx_given, monkeypatch):
    """T = 1 (step-by-step decoding through the sequence modules): on the cpu backend each
    layer and direction is one call of the cell op (projection and step together), and the
    result is torch.nn's, forward and backward. (LSTM with projection keeps the sequence op.)"""
    _require("cpu")
    backend = registry()["cpu"]
    real, calls = backend.cell_op, []

    def counting(c):
        op = real(c)

        def call(*args):
            calls.append(c)
            return op(*args)
        return call
    monkeypatch.setattr(backend, "cell_op", counting)
    compare_modules(cell, "cpu", cfg, input_kind, hx_given, T=1)
    D = 2 if cfg["bidirectional"] else 1
    assert len(calls) == (0 if cfg.get("proj_size") else cfg["num_layers"] * D)


PACKED_INFERENCE = [("lstm", dict(num_layers=2, bidirectional=True, proj_size=3, batch_first=True)),
                    ("lstm", dict(bias=False)), ("gru", dict(num_layers=3, bidirectional=True)),
                    ("rnn", dict(nonlinearity="relu", num_layers=2))]


@pytest.mark.parametrize("backend", ["cpu", "reference", pytest.param("emulated", marks=pytest.mark.emulated)])
@pytest.mark.parametrize("grad_mode", ["no_grad", "frozen"])
@pytest.mark.parametrize("cell,cfg", PACKED_INFERENCE, ids=[f"{c}-{'-'.join(k)}" for c, k in PACKED_INFERENCE])
def test_packed_inference_matches_torch_nn(backend, grad_mode, cell, cfg):
    """A PackedSequence of unequal lengths where nothing records a gradient (under no_grad,
    or with frozen weights and input): the input projection computes only the rows that
    hold data (modules.py, _sequence_layer), in sorted and unsorted packing, with hx."""
    import contextlib

    from torch.nn.utils.rnn import pack_padded_sequence

    from module_harness import make_hx, make_pair
    _require(backend)
    dtype = torch.float64 if backend != "emulated" else torch.float32
    cfg = dict(input_size=5, hidden_size=6, **cfg)
    ref, ours = make_pair(cell, backend, dtype=dtype, **cfg)
    for p in (*ref.parameters(), *ours.parameters()):
        p.requires_grad_(grad_mode != "frozen")
    B, T = 7, 9
    x = torch.randn(B, T, 5, dtype=dtype) if cfg.get("batch_first") else torch.randn(T, B, 5, dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,))
    lengths[2] = T
    hx = make_hx(cell, cfg, B, dtype=dtype)
    hx = tuple(h.detach() for h in hx) if isinstance(hx, tuple) else hx.detach()
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-5)
    for enforce_sorted in (False, True):
        L = lengths.sort(descending=True).values if enforce_sorted else lengths
        packed = pack_padded_sequence(x, L, batch_first=cfg.get("batch_first", False), enforce_sorted=enforce_sorted)
        with torch.no_grad() if grad_mode == "no_grad" else contextlib.nullcontext():
            (y, st), (y_ref, st_ref) = ours(packed, hx), ref(packed, hx)
        assert ours.last_backend == backend, ours.last_backend_reason
        torch.testing.assert_close(y.data, y_ref.data, **tol)
        assert torch.equal(y.batch_sizes, y_ref.batch_sizes)
        for a, b in zip(st if isinstance(st, tuple) else (st,), st_ref if isinstance(st_ref, tuple) else (st_ref,)):
            torch.testing.assert_close(a, b, **tol)
