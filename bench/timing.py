"""Measurement: wall/event timing of interleaved runs, the device's matmul rate, peak memory.

How a case is timed (`time_interleaved`):
  * every implementation is warmed up first (lazy loading, oneDNN primitive / cuDNN plan
    caches, allocator growth), and its warm-up time sizes the number of timed rounds to
    the case's budget (clamped to [min_runs, max_runs]);
  * each round runs every implementation once, in an order rotated from round to round,
    so slow drifts of a shared machine (other processes, clocks) hit all of them alike;
  * every run gets fresh inputs (a new random input, and output gradient in training),
    made before its clock starts; gradients are cleared outside the clock too;
  * CPU: time.perf_counter_ns around the call, Python's GC off while timing;
    CUDA: the device is synchronized, then CUDA events are recorded around the call
    (launch overhead, which is real for a recurrence, is included);
  * the reported time is the median over rounds (with the interquartile range).
"""
from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(step: Callable[[], object], n: int, leaves: Sequence[torch.Tensor],
               device: torch.device = torch.device("cpu")) -> float:
    """Seconds per call of `step` over a block of n calls (gradients of `leaves` cleared
    first; the device synchronized around the block). For the scripts that interleave
    blocks of two implementations (bench/cells.py, double_backward.py, packed.py)."""
    for t in leaves:
        t.grad = None
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - t0) / n


def interleaved_blocks(ref: Callable[[], object], mine: Callable[[], object], leaves: Sequence[torch.Tensor], *,
                       rounds: int, block_s: float, min_calls: int = 1,
                       device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """(ref's, mine's) median seconds per call over `rounds` rounds of one block each, the
    order alternating from round to round; a block is about block_s seconds of calls (sized
    on ref, at least min_calls)."""
    n = max(min_calls, int(block_s / time_block(ref, min_calls, leaves, device)))
    times: dict = {ref: [], mine: []}
    for r in range(rounds):
        for f in (ref, mine)[:: 1 if r % 2 == 0 else -1]:
            times[f].append(time_block(f, n, leaves, device))
    return statistics.median(times[ref]), statistics.median(times[mine])


class _Clock:
    """Times one call in milliseconds on `device`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - t0) / 1e6


@contextlib.contextmanager
def _no_gc():
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def summarize(ms: Sequence[float]) -> dict:
    s = sorted(ms)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
    return {"median_ms": statistics.median(s), "q1_ms": q[0], "q3_ms": q[2], "min_ms": s[0], "runs": len(s)}


def time_interleaved(calls: dict, device: torch.device, *, budget_s: float, min_runs: int, max_runs: int,
                     warmup: int, wrap_first_warmup: Optional[Callable] = None) -> dict:
    """calls: name -> (prepare, run); prepare() makes fresh inputs (untimed), run(inputs) is timed.

    wrap_first_warmup(name, call) runs each implementation's first warm-up call (used to
    measure peak memory without an extra call). Returns name -> summarize(times) for the
    implementations that ran, and name -> {"error": msg, "status": ...} for one that raised.
    """
    clock = _Clock(device)
    names = list(calls)
    errors: dict[str, str] = {}
    est: dict[str, float] = {}
    for name in names:
        prepare, run = calls[name]
        try:
            for w in range(max(1, warmup)):
                args = prepare()
                if w == 0 and wrap_first_warmup is not None:
                    est[name] = clock(lambda: wrap_first_warmup(name, lambda: run(args)))
                else:
                    est[name] = clock(lambda: run(args))
                del args
        except Exception as e:  # noqa: BLE001 - reported in the table
            errors[name] = f"{type(e).__name__}: {e}"
    live = [n for n in names if n not in errors]
    per_round_s = sum(est[n] for n in live) / 1e3
    rounds = int(budget_s / per_round_s) if per_round_s > 0 else max_runs
    rounds = max(min_runs, min(max_runs, rounds))
    times: dict[str, list[float]] = {n: [] for n in live}
    with _no_gc():
        for r in range(rounds):
            k = r % len(live) if live else 0
            for name in live[k:] + live[:k]:
                if name in errors:
                    continue
                prepare, run = calls[name]
                try:
                    args = prepare()
                    times[name].append(clock(lambda: run(args)))
                    del args
                except Exception as e:  # noqa: BLE001
                    errors[name] = f"{type(e).__name__}: {e}"
    out = {n: summarize(t) for n, t in times.items() if n not in errors and t}
    out.update({n: {"error": msg, "status": "oom" if "OutOfMemoryError" in msg else "error"}
                for n, msg in errors.items()})
    return out


def matmul_rate(device: torch.device, dtype: torch.dtype, *, n: Optional[int] = None, runs: int = 10) -> dict:
    """GFLOP/s of one square n x n matmul in `dtype` on `device` (median of `runs` after warm-up)."""
    clock = _Clock(device)
    if n is None and device.type == "cuda":
        n = 8192
    elif n is None and dtype in (torch.float32, torch.float64):
        n = 1024
    elif n is None:
        # bf16/fp16 on a CPU without native support can be ~100x slower than fp32: size n
        # so that one product takes roughly 30 ms.
        a = torch.randn(256, 256).to(dtype)
        clock(lambda: torch.mm(a, a))
        t = min(clock(lambda: torch.mm(a, a)) for _ in range(3)) / 1e3
        n = int(256 * (0.03 / max(t, 1e-6)) ** (1 / 3)) // 128 * 128
        n = max(256, min(1024, n))
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        clock(lambda: torch.mm(a, b))
    ms = [clock(lambda: torch.mm(a, b)) for _ in range(runs)]
    flop = 2.0 * n ** 3
    med, best = statistics.median(ms), min(ms)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "median_ms": med,
            "gflops": flop / med / 1e6, "best_gflops": flop / best / 1e6}


# ---------------------------------------------------------------- peak memory
@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side logs to fd 2; keep the terminal clean while it runs."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


class _CallFailed(Exception):
    pass


def _cpu_memory_events(fn) -> list:
    """(start_ns, nbytes) of every allocation (+) and free (-) through PyTorch's CPU allocator during fn()."""
    from torch.autograd import (ProfilerActivity, ProfilerConfig, ProfilerState, _disable_profiler,
                                _enable_profiler, _prepare_profiler)
    from torch._C._profiler import _ExperimentalConfig
    cfg = ProfilerConfig(ProfilerState.KINETO, False, True, False, False, False, _ExperimentalConfig())
    acts = {ProfilerActivity.CPU}
    with _quiet_stderr():
        _prepare_profiler(cfg, acts)
        _enable_profiler(cfg, acts)
        try:
            fn()
        except Exception as e:  # the implementation's failure, not the profiler's
            raise _CallFailed() from e
        finally:
            res = _disable_profiler()
    return [(e.start_ns(), e.nbytes()) for e in res.events() if e.name() == "[memory]"]


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated by PyTorch's allocator during one fn() beyond what was allocated before.

    CUDA: torch.cuda.max_memory_allocated after a reset. CPU: the running sum of the CPU
    allocator's allocation/free events recorded by the profiler (memory that a library
    allocates with its own malloc, e.g. oneDNN's scratchpad, is not seen). None if it
    cannot be measured.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    if device.type != "cpu":
        return None
    try:
        events = sorted(_cpu_memory_events(fn))
    except _CallFailed as e:
        raise e.__cause__
    except Exception:  # noqa: BLE001 - private profiler API; memory is then reported as unknown
        return None
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak
