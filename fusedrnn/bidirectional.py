"""A bidirectional layer's two directions in one op call, in inference (the cpu backend).

The modules run a layer's directions one after the other (modules.py, _layers). Where a
step has too little work to split over threads (below 2 x min_work multiply-adds: small
hidden sizes, small batches), each direction then runs on one thread while the others
wait. fusedrnn::{lstm,gru,rnn}_forward_pair (csrc/cpu/register.cpp) run the two at once,
one per thread, and otherwise one after the other; the same kernels, the same results
(bit for bit, except an LSTM with projection: its h @ w_hr^T is BLAS's, whose sums depend
on BLAS's thread count, one inside the pair's parallel region).
Inference only (train=False: no saved tensors, no autograd): where a gradient is
recorded the modules call the sequence ops per direction. And only where the two run at
once (at_once): one after the other, the pair (both projections, then both recurrences)
measured 0.94-1.02x the per-direction path (projection, recurrence, projection,
recurrence: each gx read while still in cache).

Measured in-process (modules in inference, the pair on and off in 9 interleaved rounds,
T=32, 2 threads, Zen 4 VM, 2026-11-30): where the directions run at once (from 2^20
multiply-adds a direction) 1.25-1.45x: LSTM H=64 B=4 1.32x, H=128 B=1 1.43x, H=32 B=16
1.31x; GRU 1.30-1.43x; RNN H=256 B=1 1.45x, H=128 B=4 1.30x, H=64 B=16 1.27x (0.97x in a
noisier minute). Smaller layers keep the per-direction path (csrc/cpu/register.cpp,
kPairMinWork).
"""
from __future__ import annotations

import importlib

import torch

from . import ops

SCHEMAS = {
    "lstm_forward_pair": "(Tensor gx0, Tensor gx1, Tensor h00, Tensor h01, Tensor c00, Tensor c01, Tensor w_hh0,"
                         " Tensor w_hh1, Tensor? w_hr0, Tensor? w_hr1, Tensor? lengths)"
                         " -> (Tensor y0, Tensor y1, Tensor h_n0, Tensor h_n1, Tensor c_n0, Tensor c_n1)",
    "gru_forward_pair": "(Tensor gx0, Tensor gx1, Tensor h00, Tensor h01, Tensor w_hh0, Tensor w_hh1, Tensor? b_hh0,"
                        " Tensor? b_hh1, Tensor? lengths) -> (Tensor y0, Tensor y1, Tensor h_n0, Tensor h_n1)",
    "rnn_forward_pair": "(Tensor gx0, Tensor gx1, Tensor h00, Tensor h01, Tensor w_hh0, Tensor w_hh1, Tensor? lengths,"
                        " bool relu) -> (Tensor y0, Tensor y1, Tensor h_n0, Tensor h_n1)",
}


def define() -> None:
    """Declare the three ops (the cpu backend's C++ implements them) with fake kernels (idempotent)."""
    if not ops.define_schemas("bidirectional", SCHEMAS):
        return
    torch.library.register_fake("fusedrnn::lstm_forward_pair", _fake_lstm, lib=ops._LIB)
    for cell in ("gru", "rnn"):
        torch.library.register_fake(f"fusedrnn::{cell}_forward_pair", _fake, lib=ops._LIB)


def _fake(gx0, gx1, h00, h01, *_):
    """(y0, y1, h_n0, h_n1): y [T, B, the state's width] per direction, h_n as h0."""
    return (gx0.new_empty(*gx0.shape[:2], h00.shape[-1]), gx1.new_empty(*gx1.shape[:2], h01.shape[-1]),
            h00.new_empty(h00.shape), h01.new_empty(h01.shape))


def _fake_lstm(gx0, gx1, h00, h01, c00, c01, *_):
    y0, y1, h0, h1 = _fake(gx0, gx1, h00, h01)
    return y0, y1, h0, h1, c00.new_empty(c00.shape), c01.new_empty(c01.shape)


_at_once = None


def at_once(steps: int, batch: int, w_hh: torch.Tensor) -> bool:
    """Whether the pair op runs the two directions at once for this sequence length, batch
    and recurrent weight (the C++ rule: 2+ threads, steps too small to split, and enough
    work in all to pay for waking the other thread)."""
    global _at_once
    if _at_once is None:
        _at_once = importlib.import_module("fusedrnn._C").directions_at_once
    return _at_once(batch * w_hh.shape[0] * w_hh.shape[1], steps)


def forward_pair(cell: str, relu: bool, gx, states, weights, lengths):
    """(y0, y1, [final states of direction 0], [of direction 1]) of the fused pair op.
    gx: the two directions' input projections; states: per direction [h0] or [h0, c0];
    weights: per direction (w_ih, w_hh, b_ih, b_hh, w_hr)."""
    (_, w0, _, b0, r0), (_, w1, _, b1, r1) = weights
    (s0, s1) = states
    if cell == "lstm":
        y0, y1, h0, h1, c0, c1 = torch.ops.fusedrnn.lstm_forward_pair.default(
            gx[0], gx[1], s0[0], s1[0], s0[1], s1[1], w0, w1, r0, r1, lengths)
        return y0, y1, [h0, c0], [h1, c1]
    if cell == "gru":
        y0, y1, h0, h1 = torch.ops.fusedrnn.gru_forward_pair.default(gx[0], gx[1], s0[0], s1[0], w0, w1, b0, b1,
                                                                      lengths)
    else:
        y0, y1, h0, h1 = torch.ops.fusedrnn.rnn_forward_pair.default(gx[0], gx[1], s0[0], s1[0], w0, w1, lengths,
                                                                     relu)
    return y0, y1, [h0], [h1]
