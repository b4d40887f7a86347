"""CPU training (or inference) loop of ONE model per process: fusedrnn (backend="cpu") or torch.nn.

    python bench/train_loop.py [--cell lstm] [--batch 64] [--hidden 256] [--seq 32] [--iters 20] [--rounds 3]
                               [--mode training|inference]

bench/cpu_ops.py interleaves torch.nn and fusedrnn calls in one process, which is fair for
the kernels but hides what a real training loop of one model pays to the memory allocator:
there the other model's allocations keep glibc from returning freed memory to the kernel.
Here each implementation runs alone in its own process (alternating, `--rounds` times), and
the report gives wall time, kernel (sys) time and minor page faults per iteration.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time


def run_one(impl, cell, B, H, T, iters, mode):
    import torch
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import fusedrnn
    cls = {"lstm": (torch.nn.LSTM, fusedrnn.LSTM), "gru": (torch.nn.GRU, fusedrnn.GRU),
           "rnn": (torch.nn.RNN, fusedrnn.RNN)}[cell]
    m = cls[0](H, H) if impl == "torch.nn" else cls[1](H, H, backend="cpu")
    train = mode == "training"
    x = torch.randn(T, B, H, requires_grad=train)

    def step():
        if not train:
            with torch.no_grad():
                m(x)
            return
        x.grad = None
        m.zero_grad(set_to_none=True)
        m(x)[0].sum().backward()

    for _ in range(3):
        step()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(iters):
        step()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    print(f"{(t1 - t0) / iters * 1e3} {(r1.ru_stime - r0.ru_stime) / iters * 1e3} "
          f"{(r1.ru_minflt - r0.ru_minflt) / iters}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell", default="lstm", choices=["lstm", "gru", "rnn"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mode", default="training", choices=["training", "inference"])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return run_one(a.child, a.cell, a.batch, a.hidden, a.seq, a.iters, a.mode)
    from bench.env import cpu_name
    what = "forward+backward" if a.mode == "training" else "forward under no_grad"
    print(f"device: {cpu_name()}; {a.cell} B={a.batch} H={a.hidden} T={a.seq}, {what}, "
          f"one model per process, {a.rounds} alternating rounds of {a.iters} iterations")
    res = {"torch.nn": [], "fusedrnn:cpu": []}
    for _ in range(a.rounds):
        for impl in res:
            out = subprocess.run([sys.executable, __file__, "--child", impl] + sys.argv[1:],
                                 check=True, capture_output=True, text=True).stdout.split()
            res[impl].append([float(v) for v in out])
    for impl, rows in res.items():
        wall, sys_ms, faults = (statistics.median(c) for c in zip(*rows))
        print(f"{impl:13s} {wall:9.2f} ms/iter   kernel {sys_ms:6.2f} ms/iter   {faults:7.0f} minor faults/iter")
    ref, mine = (statistics.median(r[0] for r in res[k]) for k in res)
    print(f"speedup (torch.nn / fusedrnn): {ref / mine:.2f}x")


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    main()
