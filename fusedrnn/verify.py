"""Checking a backend's kernels against the reference on the device they run on.

The CUDA and Triton kernels are tested in CI on the CPU only (CUDA C++ under an emulation
of the CUDA execution model, Triton under its interpreter), which models neither races nor
a real GPU's memory ordering. So on a GPU, before "auto" first runs such a backend for a
configuration (cell, dtype, batch, hidden and projection sizes, device: backends.Call), it
runs that backend's forward and backward ops on a few short random sequences of the same
configuration (T = CHECK_STEPS; with and without lengths, forward and reverse, training and
inference forwards) next to the reference (fusedrnn/reference.py, the spec) in float64 on
the same device, and goes on to the next backend if any output or gradient is off
(backends.select; a warning says what was off and how to report it). A forced backend is
checked too: it still runs, with a warning. FUSEDRNN_VERIFY=0 turns the check off.

The check costs a few short calls once per configuration. It waits (for a later call) while
torch.compile traces, a CUDA graph is captured or a torch.func transform runs (deferred).

`python -m fusedrnn.verify [--device cuda]` runs the same comparison over a grid of cells,
dtypes and sizes for every backend usable on the device and prints each one's errors.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import warnings
from typing import Optional

import torch

from .contract import GATES

# The largest error allowed in each output and gradient, relative to its largest |value|
# (against the float64 reference on the same inputs). Generous: the check is there for
# broken kernels (a race, a wrong index: errors of the order of the values), not for
# rounding. float32 allows for TF32 products (Triton's tl.dot on a GPU).
LIMIT = {torch.float64: 1e-8, torch.float32: 1e-2, torch.float16: 1e-1, torch.bfloat16: 1e-1}
CHECK_STEPS = 4
# Device types on which "auto" and a forced backend check a backend whose
# Backend.verify_on_device is set. On the CPU those backends run only as CI's emulation and
# interpreter, which the test suite itself checks (tests/test_verify.py adds "cpu").
DEVICE_TYPES = {"cuda"}


# A ReLU RNN's gx below float64 is moved away from ReLU's kink: where a step's
# pre-activation (in float64) is within this fraction of gx's largest value of 0, gx moves
# it that far to its own side. Nearer, rounding decides ReLU's derivative (0 or 1), and a
# gradient then differs by a whole upstream value, from torch.nn's as from the reference's,
# without any kernel being wrong (float32, B=12, H=64, T=9: grad gx off by 1.44).
# float16 / bfloat16: a larger margin than their rounding of gx.
RELU_MARGIN = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def make_inputs(cell, T, B, H, *, P=0, dtype=torch.float32, device="cpu", lengths=False,
                reverse=False, bias=True, relu=False, train=None, generator=None):
    """Forward-op arguments (a tuple in schema order, fusedrnn/schema.py) for one random case
    (never zeros). lengths: False (none), True (random, one of length T) or "sorted"
    (non-increasing, all below T). train: LSTM and GRU's flag (None: the schema's default).
    generator: a CPU torch.Generator (None: the global one). ReLU: see RELU_MARGIN."""
    args = _draw(cell, T, B, H, P, dtype, device, lengths, reverse, bias, relu, train, generator)
    if cell == "rnn" and relu and dtype in RELU_MARGIN:
        args = (away_from_relu_kink(*args[:4], reverse, RELU_MARGIN[dtype]), *args[1:])
    return args


def away_from_relu_kink(gx, h0, w_hh, lengths, reverse, margin: float):
    """gx, moved where needed so that every real step's pre-activation of the ReLU
    recurrence is at least margin * max|gx| from 0 (in float64, step by step)."""
    from . import reference as R
    T, B = gx.shape[:2]
    h, w = h0.double(), w_hh.double()
    (g,) = R._orient(reverse, lengths, gx.double())
    g = g.clone()
    real = R.active_mask(lengths, T, B, gx.device)[:, :, None]
    m = margin * float(g.abs().max()) if g.numel() else 0.0
    for t in range(T):
        pre = g[t] + h @ w.t()
        near = (pre.abs() < m) & real[t]
        g[t] += torch.where(near, torch.where(pre >= 0, 2 * m, -2 * m), 0.0)
        h = torch.where(real[t], (g[t] + h @ w.t()).relu(), h)
    (g,) = R._orient(reverse, lengths, g)
    return g.to(gx.dtype)


def _draw(cell, T, B, H, P, dtype, device, lengths, reverse, bias, relu, train, generator):
    G = GATES[cell] * H
    Pd = P or H
    scale = 1.0 / (Pd ** 0.5)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, dtype=torch.float64, generator=generator) * s).to(dtype=dtype, device=device)

    gx = rnd(T, B, G)
    h0 = rnd(B, Pd, s=0.5)
    w_hh = rnd(G, Pd, s=scale)
    L = None
    if lengths == "sorted":
        # Non-increasing, as a PackedSequence's (the cpu kernels then skip the rows that have
        # ended, Seq::active): below T, the longest T - 1 and (B >= 2) one of length 0, so
        # the last step has no row running.
        L = torch.randint(0, T, (B,), generator=generator)
        L[0] = T - 1
        if B > 1:
            L[-1] = 0
        L = L.sort(descending=True).values.to(device)
    elif lengths:
        L = torch.randint(1, T + 1, (B,), generator=generator)
        L[torch.randint(0, B, (1,), generator=generator)] = T  # at least one full-length sequence
        L = L.to(device)
    flag = () if train is None else (train,)
    if cell == "lstm":
        w_hr = rnd(P, H, s=1.0 / H ** 0.5) if P else None
        return (gx, h0, rnd(B, H, s=0.5), w_hh, w_hr, L, reverse, *flag)
    if cell == "gru":
        return (gx, h0, w_hh, rnd(G, s=0.3) if bias else None, L, reverse, *flag)
    return (gx, h0, w_hh, L, reverse, relu)


def arg_names(cell: str) -> list[str]:
    from .schema import SCHEMAS
    sig = SCHEMAS[f"{cell}_forward"].split("->")[0].strip("() ")
    return [p.split()[-1].split("=")[0] for p in sig.split(",")]


def _outputs(cell, outs):
    return outs[:3] if cell == "lstm" else outs[:2]


def errors(backend, cell: str, args: tuple, backward: bool = True, generator=None) -> dict[str, float]:
    """{output or gradient name: max |backend - reference| / max |reference|} of `backend`'s
    forward op on `args` (and its backward, through autograd, for random output gradients)
    against the reference's in float64 on the same (rounded) inputs and output gradients.
    A non-finite value counts as inf."""
    from .backends import registry
    ref = registry()["reference"]

    def leaves(dtype):
        return tuple(a.detach().to(dtype).requires_grad_(backward) if isinstance(a, torch.Tensor)
                     and a.is_floating_point() else a for a in args)

    got_args, ref_args = leaves(args[0].dtype), leaves(torch.float64)
    got = _outputs(cell, backend.op(cell, "forward")(*got_args))
    want = _outputs(cell, ref.op(cell, "forward")(*ref_args))
    names = ["y", "h_n", "c_n"]
    res = {n: _error(g, w) for n, g, w in zip(names, got, want)}
    if backward:
        seeds = [torch.randn(w.shape, dtype=torch.float64, generator=generator).to(w.device) for w in want]
        wrt = [(n, a, r) for n, a, r in zip(arg_names(cell), got_args, ref_args)
               if isinstance(a, torch.Tensor) and a.requires_grad]
        g_got = torch.autograd.grad(got, [a for _, a, _ in wrt], [s.to(g.dtype) for s, g in zip(seeds, got)])
        g_want = torch.autograd.grad(want, [r for _, _, r in wrt], [s.to(g.dtype).double() for s, g in zip(seeds, got)])
        res.update({f"grad {n}": _error(g, w) for (n, _, _), g, w in zip(wrt, g_got, g_want)})
    return res


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape:
        return float("inf")
    if want.numel() == 0:
        return 0.0
    got, want = got.detach().double(), want.detach()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def cases(call) -> list[dict]:
    """The short sequences checked for one configuration: plain, training; with lengths,
    reverse, training; with lengths, inference (the forwards without saved tensors). For
    RNN the second runs relu."""
    both = call.cell != "rnn"
    return [dict(lengths=False, reverse=False, train=True if both else None, backward=True),
            dict(lengths=True, reverse=True, train=True if both else None, backward=True,
                 relu=call.cell == "rnn"),
            dict(lengths=True, reverse=False, train=False if both else None, backward=False)]


def measure(backend, call) -> list[tuple[str, str, float]]:
    """(case, output or gradient, error) of the worst output or gradient of each case:
    `backend`'s ops against the reference on `call`'s configuration. Fixed seeds (a failure
    repeats) from its own generator (the caller's random state is untouched); with grad
    on, autocast off."""
    gen = torch.Generator().manual_seed(20261130)
    worst = []
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(call.device.type, enabled=False):
        for case in cases(call):
            backward = case.pop("backward")
            args = make_inputs(call.cell, CHECK_STEPS, call.batch, call.hidden_size, P=call.proj_size,
                               dtype=call.dtype, device=call.device, generator=gen, **case)
            errs = errors(backend, call.cell, args, backward, generator=gen)
            opts = ", ".join(k for k, v in case.items() if v is True) or "plain"
            worst.append((opts, *max(errs.items(), key=lambda kv: kv[1])))
    return worst


def check(backend, call, measured=None) -> Optional[str]:
    """None if `backend`'s ops agree with the reference on `call`'s configuration (within
    LIMIT), else what was off."""
    off = [f"{name} off by {err:.3g} of its largest value ({opts})"
           for opts, name, err in measured or measure(backend, call) if not err <= LIMIT[call.dtype]]
    return "; ".join(off) or None


# (backend name, Call) -> None (passed) or what was off.
_RESULTS: dict = {}
_LOCK = threading.Lock()


def enabled() -> bool:
    return os.environ.get("FUSEDRNN_VERIFY", "1") != "0"


def deferred(call) -> bool:
    """Whether a check for `call` (on a device of DEVICE_TYPES, not turned off) cannot run
    now: torch.compile tracing or a CUDA graph being captured (no kernel runs eagerly), or
    inside a torch.func transform (vmap, grad: the check's own autograd would run under it).
    (False elsewhere, so that select keeps its choice.)"""
    if call.device.type not in DEVICE_TYPES or not enabled():
        return False
    if torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None:
        return True
    return call.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def on_device(backend, call) -> Optional[str]:
    """backends.select's check: None if `backend` needs no check for `call` (see
    DEVICE_TYPES, FUSEDRNN_VERIFY) or passed it, else what was off (with a warning, once).
    The caller must not call it when deferred(call)."""
    if not (backend.verify_on_device and call.device.type in DEVICE_TYPES and enabled()):
        return None
    key = (backend.name, call)
    if key in _RESULTS:
        return _RESULTS[key]
    with _LOCK:
        if key not in _RESULTS:
            why = check(backend, call)
            if why:
                why = (f"failed its check against the reference on {_device_name(call.device)} "
                       f"({call.cell.upper()}, {str(call.dtype).replace('torch.', '')}, batch {call.batch}, "
                       f"hidden {call.hidden_size}{f', proj {call.proj_size}' if call.proj_size else ''}): {why}")
                warnings.warn(f"fusedrnn: backend {backend.name!r} {why}. Please report this with the output "
                              f"of `python -m fusedrnn.verify --device {call.device.type}`.", RuntimeWarning,
                              stacklevel=4)
            _RESULTS[key] = why
    return _RESULTS[key]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return str(device)


# ----------------------------------------------------------------------------- command line
SIZES = ((1, 1), (3, 33), (8, 256), (64, 512))  # (batch, hidden): tails, one block, many


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusedrnn.verify", description=(
        "Compare every fusedrnn backend usable on a device with the reference (float64, same device) "
        f"on short random sequences (T={CHECK_STEPS}); exit status 1 if any is off."))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", help="comma-separated (default: every usable one but the reference)")
    p.add_argument("--sizes", help="batch x hidden pairs, e.g. 1x1,8x256 (default: %s)"
                   % ",".join(f"{b}x{h}" for b, h in SIZES))
    a = p.parse_args(argv)
    from .backends import Call, available_backends, registry
    device = torch.device(a.device)
    names = a.backends.split(",") if a.backends else [n for n in available_backends(device) if n != "reference"]
    sizes = [tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",")] if a.sizes else SIZES
    print(f"fusedrnn.verify on {_device_name(device)}, torch {torch.__version__}; limits (relative to each "
          f"output's largest value): " + ", ".join(f"{str(d).replace('torch.', '')} {v:g}" for d, v in LIMIT.items()))
    failed = 0
    for name in names:
        be = registry().get(name)
        if be is None:
            print(f"{name}: unknown backend; known: {sorted(registry())}")
            failed += 1
            continue
        for cell in GATES:
            for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
                for B, H in sizes:
                    for P in ((0, max(1, H // 2)) if cell == "lstm" and H > 1 else (0,)):
                        call = Call(cell, device, dtype, H, P, B)
                        why = be.refuses(call)
                        if why or dtype not in be.dtypes:
                            continue
                        measured = measure(be, call)
                        why = check(be, call, measured)
                        failed += why is not None
                        _, what, err = max(measured, key=lambda m: m[2])
                        print(f"{name:9} {cell:4} {str(dtype).replace('torch.', ''):8} B={B:<3} H={H:<4} "
                              f"P={P:<4} {f'ok (worst: {what} {err:.1e})' if why is None else 'OFF: ' + why}",
                              flush=True)
    print("all agree with the reference" if not failed else f"{failed} configuration(s) off")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
