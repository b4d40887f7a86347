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
