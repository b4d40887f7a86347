"""Random module configurations against torch.nn: what a drop-in user may combine, drawn
at random, beyond the grids of tests/test_modules.py (which run every option at tiny
sizes): sizes that cross the cpu kernels' tile and thread-split boundaries (hidden up to
300, batch up to 70, input size unrelated to hidden), inputs that are transposed or
strided views, PackedSequences, frozen parameters, an input that needs no gradient, hx
given or detached, train mode (with dropout between layers), no_grad, and the double backward.

Each case is drawn from its test id's number and FUSEDRNN_TEST_SEED (tests/conftest.py), so
a failure names a configuration that can be drawn again; a soak run loops over seeds.
float64 on the cpu and reference backends (against torch.nn within 1e-8 + 1e-7 relative),
float32 at small sizes on the backends that run under emulation or the interpreter, and
float16 / bfloat16 on the cpu backend (its error against float64 torch.nn within twice
torch.nn's own in that dtype, plus 1e-2 of the largest value).
"""
from __future__ import annotations

import copy
import random

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from conftest import TEST_SEED
from module_harness import make_pair, make_hx
from op_harness import backend_or_skip

F64 = dict(atol=1e-8, rtol=1e-7)
F32 = dict(atol=3e-4, rtol=3e-4)


def draw(case: int, backend: str, small: bool) -> dict:
    """One random configuration (a plain dict, printed on failure)."""
    r = random.Random(f"{backend}-{case}-{TEST_SEED}")
    cell = r.choice(["lstm", "gru", "rnn"])
    hmax = 40 if small else 300
    H = r.choice([1, 2, 7, 8, 9, 16, 17, 31, 32, 33, r.randint(1, hmax), r.randint(1, hmax)])
    H = min(H, hmax)
    cfg = dict(input_size=r.choice([1, 3, H, r.randint(1, hmax)]), hidden_size=H,
               num_layers=r.choice([1, 1, 2, 3]), bias=r.random() < 0.8, batch_first=r.random() < 0.5,
               bidirectional=r.random() < 0.4)
    if cell == "lstm" and H > 1 and r.random() < 0.3:
        cfg["proj_size"] = r.randint(1, H - 1)
    if cell == "rnn":
        cfg["nonlinearity"] = r.choice(["tanh", "relu"])
    if cfg["num_layers"] > 1 and r.random() < 0.3:
        cfg["dropout"] = 0.4  # (in train mode: the same seed must draw torch.nn's masks)
    return dict(cell=cell, cfg=cfg, T=r.choice([1, 2, r.randint(3, 8 if small else 40)]),
                B=r.choice([1, 2, 3, r.randint(4, 6 if small else 70)]),
                layout=r.choice(["contiguous", "transposed", "strided"]), packed=r.random() < 0.4,
                x_grad=r.random() < 0.7, hx=r.choice([None, "leaf", "detached"]), train_mode=r.random() < 0.5,
                frozen=[r.random() < 0.2 for _ in range(16)], no_grad=r.random() < 0.15, seed=r.randrange(2**31))


def _input(c, dtype):
    """(module input, the leaf whose gradient is compared or None)."""
    T, B, I, bf = c["T"], c["B"], c["cfg"]["input_size"], c["cfg"]["batch_first"]
    lead = (B, T) if bf else (T, B)
    if c["layout"] == "transposed":
        base = torch.randn(lead[1], lead[0], I, dtype=dtype)
        x = base.transpose(0, 1)
    elif c["layout"] == "strided":
        base = torch.randn(*lead, 2 * I, dtype=dtype)
        x = base[..., ::2]
    else:
        base = x = torch.randn(*lead, I, dtype=dtype)
    if c["x_grad"]:
        base.requires_grad_(True)
    if c["packed"]:
        lengths = torch.randint(1, T + 1, (B,))
        lengths[torch.randint(0, B, ())] = T
        x = pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=False)
    return x, base if c["x_grad"] else None


def _outputs(out):
    y, st = out
    return [y.data if isinstance(y, PackedSequence) else y] + (list(st) if isinstance(st, tuple) else [st])


def _results(m, x, hx, leaf, c, double, seed_dtype=None):
    """(outputs and gradients, which outputs require grad) of module m on one case.
    seed_dtype: the output gradients drawn are rounded to it first (a float64 model then
    gets the same ones as a model in that dtype)."""
    hx_leaves = [h for h in (hx if isinstance(hx, tuple) else [hx]) if h is not None and h.requires_grad]
    with torch.set_grad_enabled(not c["no_grad"]):
        torch.manual_seed(c["seed"] + 1)  # (dropout's masks)
        outs = _outputs(m(x, hx))
    got = [o.detach() for o in outs]
    wrt = ([] if leaf is None else [leaf]) + hx_leaves + [p for p in m.parameters() if p.requires_grad]
    if not c["no_grad"] and wrt and any(o.requires_grad for o in outs):
        gen = torch.Generator().manual_seed(1)
        seeds = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(seed_dtype or o.dtype).to(o.dtype)
                 for o in outs]
        grads = torch.autograd.grad(outs, wrt, seeds, create_graph=double, allow_unused=True, retain_graph=True)
        if double:  # a penalty on the first gradients, differentiated again
            penalty = sum((g * g.sin()).sum() for g in grads if g is not None and g.requires_grad)
            if isinstance(penalty, torch.Tensor):
                grads = torch.autograd.grad(penalty, wrt, allow_unused=True, retain_graph=True)
        got += [g for g in grads if g is not None]
    return got, [o.requires_grad for o in outs]


def _case(c, backend, dtype):
    """(torch.nn's module, fusedrnn's, input, hx, the input's leaf) for one case."""
    torch.manual_seed(c["seed"])
    ref, ours = make_pair(c["cell"], backend, dtype=dtype, init_range=None, **c["cfg"])
    for m in (ref, ours):
        m.train(c["train_mode"])
        for p, frozen in zip(m.parameters(), c["frozen"]):
            p.requires_grad_(not frozen)
    x, leaf = _input(c, dtype)
    hx = None if c["hx"] is None else make_hx(c["cell"], c["cfg"], c["B"], dtype=dtype)
    if c["hx"] == "detached":
        hx = tuple(h.detach() for h in hx) if isinstance(hx, tuple) else hx.detach()
    return ref, ours, x, hx, leaf


def _check(c, backend, dtype, tol, double=False):
    ref, ours, x, hx, leaf = _case(c, backend, dtype)
    want, want_rg = _results(ref, x, hx, leaf, c, double)
    got, got_rg = _results(ours, x, hx, leaf, c, double)
    assert ours.last_backend == backend, (ours.last_backend, c)
    assert got_rg == want_rg and len(got) == len(want), (got_rg, want_rg, len(got), len(want), c)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"result {i} of {c}: {m}")


@pytest.mark.parametrize("case", range(40))
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_random_config_float64(backend, case):
    backend_or_skip(backend)
    _check(draw(case, backend, small=False), backend, torch.float64, F64)


@pytest.mark.parametrize("case", range(24))
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_random_config_double_backward(backend, case):
    backend_or_skip(backend)
    c = draw(case, f"{backend}-double", small=True)
    c["no_grad"] = False
    _check(c, backend, torch.float64, F64, double=True)


@pytest.mark.parametrize("case", range(10))
@pytest.mark.parametrize("backend", [pytest.param("emulated", marks=pytest.mark.emulated),
                                     pytest.param("triton", marks=pytest.mark.interpreter)])
def test_random_config_float32_small(backend, case):
    backend_or_skip(backend)
    c = draw(case, backend, small=True)
    if c["cell"] == "rnn":  # (float32 ReLU: a kink flips by rounding, torch.nn's and ours alike)
        c["cfg"]["nonlinearity"] = "tanh"
    _check(c, backend, torch.float32, F32)


@pytest.mark.parametrize("case", range(12))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_random_config_half_precision(dtype, case):
    """Both against torch.nn in float64 on the same (rounded) weights and inputs: ours no
    further from it than twice torch.nn's own error in `dtype`, plus 1e-2 of the largest
    value. (The input's and hx's gradients are not compared: they need no gradient here.)"""
    backend_or_skip("cpu")
    c = draw(case, f"cpu-{dtype}", small=False)
    # (torch.nn's half-precision backward is slow at larger sizes)
    c.update(x_grad=False, hx=None, no_grad=c["no_grad"] or c["T"] * c["cfg"]["hidden_size"] > 2000)
    if c["cell"] == "rnn":
        c["cfg"]["nonlinearity"] = "tanh"
    ref, ours, x, _, _ = _case(c, "cpu", dtype)
    exact = copy.deepcopy(ref).double()
    want, _ = _results(ref, x, None, None, c, False)
    got, _ = _results(ours, x, None, None, c, False)
    assert ours.last_backend == "cpu"
    truth, _ = _results(exact, x.double(), None, None, c, False, seed_dtype=dtype)
    # Over the results as a whole (each error relative to the result's largest value, at
    # least 1e-3): per result, a few values at hidden size 1 are a coin toss in which of
    # two rounded computations lands nearer (bfloat16 RNN, hidden 1, 3 layers, T = 36:
    # one gradient 6.7% off against torch.nn's 0.6%, another 4.7% off in torch.nn's
    # against ours' 0.4%). Over 12 such models ours' worst was 0.33x torch.nn's (median).
    def worst(results):
        return max((((r.double() - e).abs().max() / max(e.abs().max().item(), 1e-3)).item(), i)
                   for i, (r, e) in enumerate(zip(results, truth)))
    (err, i), (ref_err, j) = worst(got), worst(want)
    assert err <= 2 * ref_err + 1e-2, (f"result {i}: {err:.3g} of its largest value, torch.nn's worst "
                                       f"{ref_err:.3g} (result {j})", c)
