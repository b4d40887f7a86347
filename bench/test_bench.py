"""pytest-benchmark suite over a few canonical shapes: `pytest bench/ --benchmark-only`.

Every implementation `python -m bench` would time on this machine's default device
(torch.nn, the fusedrnn contender backends, importable peers) is first checked against
torch.nn on the same weights and input, then timed by pytest-benchmark with a fresh input
per round (made in the untimed setup). On a GPU the timed function synchronizes the device
before it returns, so the time covers the kernels, not just their launch.
Compare runs with pytest-benchmark's own options (--benchmark-compare, --benchmark-group-by).
"""
import pytest
import torch

from bench.cases import Case
from bench.harness import check, outputs, timed_call, tolerance
from bench.impls import BASELINE, select, torch_module
from bench.timing import sync

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS, NOT_RUN = select(DEVICE, None)
ROUNDS = 20 if DEVICE.type == "cuda" else 8

CASES = [Case(cell, 32, 64, 256, 256, 1, False, "float32", mode)
         for cell in ("lstm", "gru", "rnn") for mode in ("inference", "training")]
CASES.append(Case("lstm", 1, 256, 512, 512, 1, False, "float32", "inference"))  # latency-bound


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: i.name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label().replace(" ", "-"))
def test_recurrence(benchmark, case, impl):
    why = impl.refuses(case, DEVICE)
    if why:
        pytest.skip(f"{impl.name}: {why}")
    ref = torch_module(case, DEVICE, seed=0)
    runner = impl.build(case, ref, DEVICE)
    x0 = torch.randn(case.seq_len, case.batch, case.input_size, device=DEVICE, dtype=case.torch_dtype)
    g0 = torch.randn(case.seq_len, case.batch, case.directions * case.hidden_size, device=DEVICE,
                     dtype=case.torch_dtype) if case.mode == "training" else None
    if impl.name != BASELINE:  # a wrong fast kernel fails here instead of being timed
        err, where = check(outputs(runner, case, x0, g0), outputs(ref_runner(ref), case, x0, g0),
                           impl.compare_param_grads)
        assert err <= tolerance(case, DEVICE), f"{impl.name} differs from torch.nn: {where} rel. error {err:.2e}"
    prepare, run = timed_call(runner, case, DEVICE)
    runner.set_mode(case.mode)

    def setup():
        args = prepare()
        sync(DEVICE)
        return (args,), {}

    def target(args):
        run(args)
        sync(DEVICE)

    benchmark.group = case.label()
    benchmark.extra_info.update(device=str(DEVICE), impl=impl.name, tokens=case.tokens, flops=case.flops())
    benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=2, iterations=1)


def ref_runner(ref):
    from bench.impls import Runner
    return Runner(ref)
