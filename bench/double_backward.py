"""Benchmark of a double backward: a gradient-penalty training step through fusedrnn's
modules against torch.nn's.

    python bench/double_backward.py [--cells lstm,gru,rnn,lstmcell,grucell,rnncell] [--shapes 64x8,256x32]
                                    [--seq 32] [--rounds 7] [--device cpu|cuda] [--backend NAME]

--backend defaults to "cpu" on the CPU and "auto" elsewhere. On CUDA torch.nn's cuDNN RNNs
refuse double backward, so torch.nn runs with cuDNN disabled (its native kernels), as a
user of torch.nn must.

A shape is HIDDENxBATCH (input_size = hidden). The cells (lstmcell, ...) run the sequence one
cell call per step, as step-by-step code does. One step: y = rnn(x); g = d(sum y^2)/dx with
create_graph=True; then the backward of |g|^2 + sum y into the weights (a gradient of a
gradient: fusedrnn recomputes each layer with the reference there, fusedrnn/double_backward.py).
Same weights and inputs for both; interleaved rounds of blocks of steps, median per step.
Speedup = torch.nn / fusedrnn.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fusedrnn  # noqa: E402
from bench import side_by_side  # noqa: E402
from bench.env import describe_device, device_info  # noqa: E402
from bench.timing import interleaved_blocks, time_block  # noqa: E402

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


def torch_nn_context(device: torch.device):
    """cuDNN off for torch.nn on CUDA: its RNNs refuse double backward."""
    return torch.backends.cudnn.flags(enabled=False) if device.type == "cuda" else contextlib.nullcontext()


def bench(cell: str, H: int, B: int, T: int, rounds: int, block_s: float, device: torch.device,
          backend: str) -> tuple[float, float, str]:
    """(torch.nn's and fusedrnn's median seconds per step, the backend fusedrnn ran)."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, CLASSES[cell])(H, H).to(device)
    mine = getattr(fusedrnn, CLASSES[cell])(H, H, backend=backend).to(device)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, H, device=device, requires_grad=True)
    leaves = [x] + list(ref.parameters()) + list(mine.parameters())
    ref_step, mine_step = penalty_step(ref, x), penalty_step(mine, x)

    def ref_in_context():
        with torch_nn_context(device):
            ref_step()
    steps = {"ref": ref_in_context, "mine": mine_step}
    grads = {}
    for k, f in steps.items():  # the benchmark must compare equal computations
        time_block(f, 1, leaves, device)
        grads[k] = [p.grad.clone() for p in (ref if k == "ref" else mine).parameters()]
    for a, b in zip(grads["ref"], grads["mine"]):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), f"{cell} H={H} B={B}: gradients differ"
    return (*interleaved_blocks(steps["ref"], steps["mine"], leaves, rounds=rounds, block_s=block_s, device=device),
            mine.last_backend)


def main():
    p = side_by_side.parser(__doc__, cells="lstm,gru,rnn,lstmcell,grucell,rnncell", shapes="64x8,128x16,256x32",
                            block_ms=100.0)
    p.add_argument("--seq", type=int, default=32)
    a = p.parse_args()
    device, backend = side_by_side.device_and_backend(a)
    print(f"device: {describe_device(device_info(device))}, torch {torch.__version__}; gradient-penalty step, "
          f"float32, seq_len {a.seq}, median of {a.rounds} interleaved rounds; fusedrnn backend {backend!r}"
          + ("; torch.nn with cuDNN off (cuDNN refuses double backward)" if device.type == "cuda" else ""))
    print(f"{'cell':8s} {'hidden':>6s} {'batch':>5s} {'torch.nn ms':>12s} {'fusedrnn ms':>12s} {'speedup':>8s} ran")
    for cell in a.cells.split(","):
        for H, B in side_by_side.shapes(a.shapes):
            t_ref, t_mine, ran = bench(cell, H, B, a.seq, a.rounds, a.block_ms / 1e3, device, backend)
            print(f"{CLASSES[cell]:8s} {H:6d} {B:5d} {t_ref * 1e3:12.2f} {t_mine * 1e3:12.2f} {t_ref / t_mine:7.2f}x "
                  f"{ran}", flush=True)

if __name__ == "__main__":
    main()
