"""Benchmark of variable-length batches: fusedrnn's sequence modules on a PackedSequence
against torch.nn's, as NLP models feed them.

    python bench/packed.py [--cells lstm,gru,rnn] [--shapes 256x8,256x32,512x32,512x64] [--seq 64]
                           [--min-frac 0.25] [--modes inference,training] [--rounds 7] [--device cpu]
                           [--backend NAME]

A shape is HIDDENxBATCH (input_size = hidden). The lengths are uniform in
[min-frac * seq, seq] (one sequence of full length), fixed per case, the batch packed
unsorted (enforce_sorted=False); the timed call includes pack_padded_sequence, as in a
model. "inference" is the forward under torch.no_grad(); "training" the forward and the
backward of the packed output's sum. --backend defaults to "cpu" on the CPU and "auto"
elsewhere. Same weights and inputs for both; interleaved rounds of blocks of calls,
median per call. Speedup = torch.nn / fusedrnn.

torch.nn's packed path runs each step on the sequences still running (batch_sizes), and
on the CPU without oneDNN; fusedrnn's cpu kernels skip the ended rows' GEMM work too
(Seq::active in csrc/cpu/kernels.h) and, in inference, project only the rows holding data.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch
from torch.nn.utils.rnn import pack_padded_sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fusedrnn  # noqa: E402
from bench import side_by_side  # noqa: E402
from bench.env import describe_device, device_info  # noqa: E402
from bench.timing import interleaved_blocks  # noqa: E402

CLASSES = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


def bench(cell: str, H: int, B: int, T: int, min_frac: float, train: bool, rounds: int, block_s: float,
          device: torch.device, backend: str) -> tuple[float, float, str]:
    """(torch.nn's and fusedrnn's median seconds per call, the backend fusedrnn ran)."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, CLASSES[cell])(H, H).to(device)
    mine = getattr(fusedrnn, CLASSES[cell])(H, H, backend=backend).to(device)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, H, device=device, requires_grad=train)
    lengths = torch.randint(max(1, int(min_frac * T)), T + 1, (B,))
    lengths[0] = T

    def step(model):
        def run():
            y = model(pack_padded_sequence(x, lengths, enforce_sorted=False))[0].data
            if train:
                y.sum().backward()
            return y
        return run
    steps = {"ref": step(ref), "mine": step(mine)}
    leaves = [x] + list(ref.parameters()) + list(mine.parameters())
    with contextlib.nullcontext() if train else torch.no_grad():
        got = {k: f() for k, f in steps.items()}  # the benchmark must compare equal computations
        assert torch.allclose(got["ref"], got["mine"], atol=1e-4, rtol=1e-4), f"{cell} H={H} B={B}: outputs differ"
        if train:
            for a, b in zip(ref.parameters(), mine.parameters()):
                assert torch.allclose(a.grad, b.grad, atol=1e-3, rtol=1e-3), f"{cell} H={H} B={B}: gradients differ"
        t_ref, t_mine = interleaved_blocks(steps["ref"], steps["mine"], leaves, rounds=rounds, block_s=block_s,
                                           device=device)
    return t_ref, t_mine, mine.last_backend


def main():
    p = side_by_side.parser(__doc__, cells="lstm,gru,rnn", shapes="256x8,256x32,512x32,512x64", block_ms=100.0)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--min-frac", type=float, default=0.25, help="shortest length as a fraction of --seq")
    p.add_argument("--modes", default="inference,training")
    a = p.parse_args()
    device, backend = side_by_side.device_and_backend(a)
    print(f"device: {describe_device(device_info(device))}, torch {torch.__version__}; PackedSequence, float32, "
          f"seq_len {a.seq}, lengths uniform in [{max(1, int(a.min_frac * a.seq))}, {a.seq}], median of {a.rounds} "
          f"interleaved rounds; fusedrnn backend {backend!r}")
    print(f"{'cell':5s} {'mode':9s} {'hidden':>6s} {'batch':>5s} {'torch.nn ms':>12s} {'fusedrnn ms':>12s} "
          f"{'speedup':>8s} ran")
    for cell in a.cells.split(","):
        for mode in a.modes.split(","):
            for H, B in side_by_side.shapes(a.shapes):
                t_ref, t_mine, ran = bench(cell, H, B, a.seq, a.min_frac, mode == "training", a.rounds,
                                           a.block_ms / 1e3, device, backend)
                print(f"{CLASSES[cell]:5s} {mode:9s} {H:6d} {B:5d} {t_ref * 1e3:12.2f} {t_mine * 1e3:12.2f} "
                      f"{t_ref / t_mine:7.2f}x {ran}", flush=True)


if __name__ == "__main__":
    main()
