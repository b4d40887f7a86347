"""CPU benchmark: fusedrnn modules with backend="cpu" (csrc/cpu kernels) against torch.nn on the CPU.

    python bench/cpu_ops.py [--cells lstm,gru,rnn] [--batch 1,8,32,64] [--hidden 256,512,1024]
                            [--seq 32] [--reps 7] [--dtype float32|float64|bfloat16|float16]

Same weights and inputs for both; the two implementations alternate call by call
(interleaved, so machine noise hits both alike) and each case reports the median.
"inference" is a forward under torch.no_grad(); "training" is forward + backward of
y.sum() (gradients of the input and all weights); "training-frozen-input" (not in the
default --modes) the same with an input that does not require grad, as a first layer fed
raw features: fusedrnn then skips the input gradient's GEMM, torch.nn (oneDNN) does not.
Speedup = torch.nn time / fusedrnn time.
Standalone script (the general bench CLI is `python -m bench`).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fusedrnn  # noqa: E402
from fusedrnn.backends import registry  # noqa: E402
from bench.env import cpu_name  # noqa: E402


# fusedrnn._C._set_options' tiled mode (FUSEDRNN_CPU_TILED), as the header reports it.
_TILED_MODES = {0: "BLAS", 1: "packed-panel (16 registers)", 2: "packed-panel (recurrent steps in AVX-512's 32 registers)",
                3: "packed-panel (16-float zmm vectors)"}
# Its split mode (FUSEDRNN_CPU_SPLIT): how threads share a time loop (csrc/cpu/kernels.cpp, make_split).
_SPLIT_MODES = {0: "by rows or units, chosen per call", 1: "by hidden units", 2: "by batch rows where possible"}


def make_pair(cell: str, H: int, dtype, I: int = 0):
    """(torch.nn module, fusedrnn module with the same weights); input_size I (0: = H)."""
    cls_t = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell]
    cls_f = {"lstm": fusedrnn.LSTM, "gru": fusedrnn.GRU, "rnn": fusedrnn.RNN}[cell]
    ref = cls_t(I or H, H).to(dtype)
    mine = cls_f(I or H, H, backend="cpu").to(dtype)
    mine.load_state_dict(ref.state_dict())
    return ref, mine


def run_once(model, x, train: bool) -> float:
    if train:
        x.grad = None
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        y, _ = model(x)
        y.sum().backward()
        return time.perf_counter() - t0
    with torch.no_grad():
        t0 = time.perf_counter()
        model(x)
        return time.perf_counter() - t0


def bench_case(cell, B, H, T, reps, dtype, train, input_grad=True, I=0):
    torch.manual_seed(0)
    ref, mine = make_pair(cell, H, dtype, I)
    x = torch.randn(T, B, I or H, dtype=dtype, requires_grad=train and input_grad)
    # correctness guard: the benchmark must compare equal computations
    with torch.no_grad():
        a, b = ref(x)[0], mine(x)[0]
    tol = {torch.float64: 1e-8, torch.float32: 1e-3, torch.bfloat16: 1e-1, torch.float16: 2e-2}[dtype]
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "medium":
        tol = 3e-2  # (bfloat16 products, both sides)
    assert torch.allclose(a, b, atol=tol, rtol=tol), f"{cell} B={B} H={H}: outputs differ"
    assert mine.last_backend == "cpu", mine.last_backend_reason
    for _ in range(2):  # warm-up (oneDNN primitive caches, allocator, thread pool)
        run_once(ref, x, train)
        run_once(mine, x, train)
    t_ref, t_mine = [], []
    for i in range(reps):
        # alternate which goes first, so neither always sees a warm cache from the other
        if i % 2 == 0:
            t_ref.append(run_once(ref, x, train))
            t_mine.append(run_once(mine, x, train))
        else:
            t_mine.append(run_once(mine, x, train))
            t_ref.append(run_once(ref, x, train))
    # Each rep is a back-to-back pair: its ratio sees the same machine state for both.
    pairs = sorted(r / m for r, m in zip(t_ref, t_mine))
    return statistics.median(t_ref), statistics.median(t_mine), quartiles(pairs)


def quartiles(xs):
    """(first, third) quartile of a sorted list (its ends when it is shorter than 4)."""
    if len(xs) < 4:
        return xs[0], xs[-1]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default="lstm,gru,rnn")
    p.add_argument("--batch", default="1,8,32,64")
    p.add_argument("--hidden", default="256,512,1024")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--input-size", default="0",
                   help="comma-separated input sizes; 0 (the default): input_size = hidden")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"],
                   help="bfloat16 / float16: backend 'cpu' computes in float32, torch.nn runs its own kernels "
                        "(float16 training at batch 64, hidden 1024 takes torch.nn ~60 s a call)")
    p.add_argument("--modes", default="inference,training")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--matmul-precision", default="highest", choices=["highest", "high", "medium"],
                   help="torch.set_float32_matmul_precision for the run: 'medium' lets float32 matmuls (torch's, "
                        "and fusedrnn's recurrences on CPUs with AVX512-BF16) use bfloat16 products")
    a = p.parse_args(argv)
    torch.set_float32_matmul_precision(a.matmul_precision)
    modes = ("inference", "training", "training-frozen-input")
    for mode in a.modes.split(","):
        if mode not in modes:
            p.error(f"--modes: unknown mode {mode!r}; expected a comma-separated list of {', '.join(modes)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    be = registry()["cpu"]
    if be.unavailable():
        sys.exit(f"cpu backend unavailable: {be.unavailable()} (build it: "
                 "FUSEDRNN_EXTENSIONS=_C python setup.py build_ext --inplace)")
    from fusedrnn import _C
    print(f"device: {cpu_name()} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}), "
          f"torch {torch.__version__}, mkldnn {'on' if torch.backends.mkldnn.is_available() else 'off'}, "
          f"fusedrnn elementwise path {_C.simd_path()}, GEMM kernels "
          f"{_TILED_MODES.get(_C._set_options(-1, 0)[0], '?')}, time loops split "
          f"{_SPLIT_MODES.get(_C._set_options(-1, 0)[2], '?')}")
    print("load average at start: %.2f %.2f %.2f (timings are only meaningful on an otherwise idle machine)"
          % os.getloadavg())
    inputs = [int(i) for i in a.input_size.split(",")]
    print(f"seq_len {a.seq}, input_size {'= hidden' if inputs == [0] else a.input_size}, {a.dtype}, float32 matmul precision {a.matmul_precision}, "
          f"median of {a.reps} interleaved runs; "
          f"speedup = torch.nn / fusedrnn(backend='cpu')")
    print("pair q1-q3: quartiles of the speedups of the back-to-back pairs (the noise band)")
    print(f"{'cell':5} {'mode':10} {'batch':>5} {'hidden':>6} {'input':>5} {'torch.nn ms':>12} {'fusedrnn ms':>12} {'speedup':>8}"
          f" {'pair q1-q3':>12}")
    results, bands = {}, {}
    for mode in a.modes.split(","):
        for cell in a.cells.split(","):
            for H in map(int, a.hidden.split(",")):
                for I in inputs:
                    for B in map(int, a.batch.split(",")):
                        t_ref, t_mine, band = bench_case(cell, B, H, a.seq, a.reps, dtype, mode.startswith("training"),
                                                         input_grad=mode != "training-frozen-input", I=I)
                        s = t_ref / t_mine
                        key = (mode, cell, B, H) if inputs == [0] else (mode, cell, B, H, I or H)
                        results[key], bands[key] = s, band
                        print(f"{cell:5} {mode:10} {B:5d} {H:6d} {I or H:5d} {t_ref * 1e3:12.3f} {t_mine * 1e3:12.3f}"
                              f" {s:7.2f}x {band[0]:5.2f}-{band[1]:.2f}", flush=True)
    print()
    for mode in a.modes.split(","):
        for cell in a.cells.split(","):
            xs = [v for k, v in results.items() if k[0] == mode and k[1] == cell]
            print(f"geomean speedup {cell:5} {mode:10}: {geomean(xs):.2f}x  (min {min(xs):.2f}x)")
        xs = [v for k, v in results.items() if k[0] == mode]
        print(f"geomean speedup all   {mode:10}: {geomean(xs):.2f}x  (min {min(xs):.2f}x)")
    small = [v for k, v in results.items() if k[0] == "inference" and k[2] <= 8]
    if small:
        print(f"inference, batch <= 8: geomean {geomean(small):.2f}x, min {min(small):.2f}x")
    print("load average at end: %.2f %.2f %.2f" % os.getloadavg())
    def names(keys):
        return ", ".join(f"{k[0]} {k[1]} B={k[2]} H={k[3]}" + (f" I={k[4]}" if len(k) > 4 else "")
                         for k in keys) or "none"
    slower = [k for k, v in results.items() if v < 1.0]
    print("cases slower than torch.nn (median): " + names(slower))
    print("  of which slower in 3 of 4 pairs (pair q3 < 1): " + names(k for k in slower if bands[k][1] < 1.0))


if __name__ == "__main__":
    main()
