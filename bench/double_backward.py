"""CPU benchmark of a double backward: a gradient-penalty training step through fusedrnn's
modules (backend="cpu") against torch.nn's.

    python bench/double_backward.py [--cells lstm,gru,rnn,lstmcell,grucell,rnncell] [--shapes 64x8,256x32]
                                    [--seq 32] [--rounds 7]

A shape is HIDDENxBATCH (input_size = hidden). The cells (lstmcell, ...) run the sequence one
cell call per step, as step-by-step code does. One step: y = rnn(x); g = d(sum y^2)/dx with
create_graph=True; then the backward of |g|^2 + sum y into the weights (a gradient of a
gradient: fusedrnn recomputes each layer with the reference there, fusedrnn/double_backward.py).
Same weights and inputs for both; interleaved rounds of blocks of steps, median per step.
Speedup = torch.nn / fusedrnn.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fusedrnn  # noqa: E402
from bench.cells import time_block  # noqa: E402
from bench.env import cpu_name  # noqa: E402

CLASSES = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN", "lstmcell": "LSTMCell", "grucell": "GRUCell",
           "rnncell": "RNNCell"}


def run(model, x):
    """y [T, B, H]: the module over the sequence, or a cell called once per step."""
    if not type(model).__name__.endswith("Cell"):
        return model(x)[0]
    state, ys = None, []
    for x_t in x.unbind(0):
        state = model(x_t, state)
        ys.append(state[0] if isinstance(state, tuple) else state)
    return torch.stack(ys)


def penalty_step(model, x):
    def step():
        y = run(model, x)
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        (g.square().sum() + y.sum()).backward()
    return step


def bench(cell: str, H: int, B: int, T: int, rounds: int, block_s: float) -> tuple[float, float]:
    torch.manual_seed(0)
    ref = getattr(torch.nn, CLASSES[cell])(H, H)
    mine = getattr(fusedrnn, CLASSES[cell])(H, H, backend="cpu")
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, H, requires_grad=True)
    leaves = [x] + list(ref.parameters()) + list(mine.parameters())
    steps = {"ref": penalty_step(ref, x), "mine": penalty_step(mine, x)}
    grads = {}
    for k, f in steps.items():  # the benchmark must compare equal computations
        time_block(f, 1, leaves)
        grads[k] = [p.grad.clone() for p in (ref if k == "ref" else mine).parameters()]
    for a, b in zip(grads["ref"], grads["mine"]):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), f"{cell} H={H} B={B}: gradients differ"
    n = max(1, int(block_s / time_block(steps["ref"], 1, leaves)))  # steps per block: about block_s
    times = {"ref": [], "mine": []}
    for r in range(rounds):
        for k in ("ref", "mine")[:: 1 if r % 2 == 0 else -1]:
            times[k].append(time_block(steps[k], n, leaves))
    return statistics.median(times["ref"]), statistics.median(times["mine"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default="lstm,gru,rnn,lstmcell,grucell,rnncell")
    p.add_argument("--shapes", default="64x8,128x16,256x32", help="HIDDENxBATCH,...")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--block-ms", type=float, default=100.0, help="time per block of steps of one implementation")
    a = p.parse_args()
    print(f"device: {cpu_name()} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}), "
          f"torch {torch.__version__}; gradient-penalty step, float32, seq_len {a.seq}, "
          f"median of {a.rounds} interleaved rounds")
    print(f"{'cell':8s} {'hidden':>6s} {'batch':>5s} {'torch.nn ms':>12s} {'fusedrnn ms':>12s} {'speedup':>8s}")
    for cell in a.cells.split(","):
        for shape in a.shapes.split(","):
            H, B = (int(v) for v in shape.lower().split("x"))
            t_ref, t_mine = bench(cell, H, B, a.seq, a.rounds, a.block_ms / 1e3)
            print(f"{CLASSES[cell]:8s} {H:6d} {B:5d} {t_ref * 1e3:12.2f} {t_mine * 1e3:12.2f} {t_ref / t_mine:7.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
