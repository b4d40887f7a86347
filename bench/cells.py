"""CPU benchmark of the cells: fusedrnn.LSTMCell / GRUCell / RNNCell (backend="cpu", one cell
op per step) against torch.nn's cells, one step at a time as in step-by-step decoding.

    python bench/cells.py [--cells lstm,gru,rnn] [--shapes 64x4,256x8,512x8,1024x32] [--rounds 7]
                          [--dtype float32|float64|bfloat16|float16]

A shape is HIDDENxBATCH (input_size = hidden). Same weights and inputs for both. Each round
times a block of calls of one implementation, then of the other (interleaved rounds, so
machine noise hits both alike); reported: the median over rounds of the time per step.
"inference" is one step under torch.no_grad(); "training" is one step plus the backward of
h.sum() (gradients of the input, the state and all weights). Speedup = torch.nn / fusedrnn.
In bfloat16 / float16 torch.nn runs its own low-precision kernels, backend "cpu" its
float32 compute (the module casts in and out).
At these sizes a step takes tens of microseconds, so per-call overhead (Python, the
dispatcher, autograd) counts as much as the kernels.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fusedrnn  # noqa: E402
from bench import side_by_side  # noqa: E402
from bench.env import cpu_name  # noqa: E402
from bench.timing import interleaved_blocks, time_block  # noqa: E402

CLASSES = {"lstm": "LSTMCell", "gru": "GRUCell", "rnn": "RNNCell"}


# Output tolerance of the check that both compute the same thing, per dtype.
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 1e-1, torch.float16: 2e-2}


def make_case(cell: str, H: int, B: int, train: bool, dtype=torch.float32):
    name = CLASSES[cell]
    ref = getattr(torch.nn, name)(H, H).to(dtype)
    mine = getattr(fusedrnn, name)(H, H, backend="cpu").to(dtype)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(B, H, dtype=dtype, requires_grad=train)
    h = torch.randn(B, H, dtype=dtype, requires_grad=train)
    hx = (h, torch.randn(B, H, dtype=dtype, requires_grad=train)) if cell == "lstm" else h
    out_ref, out_mine = ref(x, hx), mine(x, hx)  # the benchmark must compare equal computations
    tol = TOLERANCE[dtype]
    for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (out_ref, out_mine))):
        assert torch.allclose(a, b, atol=tol, rtol=tol), f"{name} H={H} B={B}: outputs differ"

    def step_fn(model):
        def step():
            out = model(x, hx)
            if train:
                (out[0] if isinstance(out, tuple) else out).sum().backward()
        return step
    return step_fn(ref), step_fn(mine), [x, h] + ([hx[1]] if cell == "lstm" else []) + \
        list(ref.parameters()) + list(mine.parameters())


def bench(cell: str, H: int, B: int, train: bool, rounds: int, block_s: float,
          dtype=torch.float32) -> tuple[float, float]:
    torch.manual_seed(0)
    ref, mine, leaves = make_case(cell, H, B, train, dtype)
    ctx = torch.enable_grad() if train else torch.no_grad()
    with ctx:
        for f in (ref, mine):
            time_block(f, 3, leaves)  # warm-up
        return interleaved_blocks(ref, mine, leaves, rounds=rounds, block_s=block_s, min_calls=3)


def main():
    p = side_by_side.parser(__doc__, cells="lstm,gru,rnn", shapes="64x4,256x8,512x8,1024x32", block_ms=50.0,
                            devices=False)
    p.add_argument("--modes", default="inference,training")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    print(f"device: {cpu_name()} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}), "
          f"torch {torch.__version__}; one step per call, {a.dtype}, median of {a.rounds} interleaved rounds")
    print(f"{'cell':10s} {'mode':10s} {'hidden':>6s} {'batch':>5s} {'torch.nn us':>12s} {'fusedrnn us':>12s} "
          f"{'speedup':>8s}")
    for mode in a.modes.split(","):
        for cell in a.cells.split(","):
            for H, B in side_by_side.shapes(a.shapes):
                t_ref, t_mine = bench(cell, H, B, mode == "training", a.rounds, a.block_ms / 1e3, dtype)
                print(f"{CLASSES[cell]:10s} {mode:10s} {H:6d} {B:5d} {t_ref * 1e6:12.1f} {t_mine * 1e6:12.1f} "
                      f"{t_ref / t_mine:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
