"""Argument checks of the forward recurrence ops, for the backends written in Python.

The ops are public (torch.ops.fusedrnn.*), so a wrong shape must raise, not read
past a buffer: the Triton kernels would, and the reference would quietly broadcast.
The C++ backends check the same things in C++ (csrc/cpu/register.cpp, csrc/cuda/glue.h).
Backward ops are fed by their forward (saved tensors), so only forwards are checked.
"""
from __future__ import annotations

import torch
from torch import Tensor

GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _fail(op: str, msg: str, exc=RuntimeError):
    raise exc(f"fusedrnn::{op}: {msg}")


def check_forward(cell: str, gx: Tensor, h0: Tensor, w_hh: Tensor, lengths: Tensor | None, *,
                  c0: Tensor | None = None, w_hr: Tensor | None = None, b_hh: Tensor | None = None) -> None:
    """gx [T,B,G*H]; h0 [B,P]; c0 [B,H] (LSTM); w_hh [G*H,P]; w_hr [P,H] (LSTM, optional);
    b_hh [3H] (GRU, optional); lengths int64 [B] on gx's device with values in [0, T].
    Every floating-point argument has gx's dtype and device."""
    op = f"{cell}_forward"
    if gx.dim() != 3:
        _fail(op, f"gx must be 3-D [T, B, {GATES[cell]}*H], got shape {tuple(gx.shape)}")
    T, B, G = gx.shape
    if G % GATES[cell]:
        _fail(op, f"gx's last dimension ({G}) must be {GATES[cell]} * hidden_size")
    H = G // GATES[cell]
    P = w_hr.shape[0] if w_hr is not None and w_hr.dim() == 2 else H
    want = {"h0": (h0, (B, P)), "w_hh": (w_hh, (G, P))}
    if c0 is not None:
        want["c0"] = (c0, (B, H))
    if w_hr is not None:
        want["w_hr"] = (w_hr, (P, H))
    if b_hh is not None:
        want["b_hh"] = (b_hh, (G,))
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            _fail(op, f"{name} must have shape {list(shape)} (gx is {list(gx.shape)}), got {list(t.shape)}")
        if t.dtype != gx.dtype:
            _fail(op, f"{name} has dtype {t.dtype} but gx has {gx.dtype}; all floating-point arguments must match")
        if t.device != gx.device:
            _fail(op, f"{name} is on {t.device} but gx is on {gx.device}")
    if lengths is None:
        return
    if lengths.dtype != torch.int64 or lengths.shape != (B,):
        _fail(op, f"lengths must be an int64 tensor of shape [{B}], got {lengths.dtype} {list(lengths.shape)}")
    if lengths.device != gx.device:
        _fail(op, f"lengths is on {lengths.device} but gx is on {gx.device}")
    valid = ((lengths >= 0) & (lengths <= T)).all()
    if lengths.device.type == "cpu":
        if not bool(valid):
            _fail(op, f"lengths must lie in [0, {T}] (T = gx.shape[0]), got {lengths.tolist()}")
    else:
        # No host synchronization on the GPU: a device-side assert, before any kernel reads lengths.
        torch._assert_async(valid, f"fusedrnn::{op}: lengths must lie in [0, T = {T}]")
