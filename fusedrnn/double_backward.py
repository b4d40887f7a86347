"""Double backward (a gradient of a gradient: autograd.grad(..., create_graph=True), then a
backward through its result, as in gradient penalties, MAML or Hessian-vector products)
for the cpu backend's sequence ops. (Its cell ops recompute torch.nn's own cell in C++
instead: cell_double_backward in csrc/cpu/autograd.cpp.)

The fused backward kernels compute first derivatives only. When a backward runs with
create_graph=True, the C++ autograd of the cpu ops (csrc/cpu/autograd.cpp) calls
fusedrnn::recurrence_vjp instead: it recomputes the layer with the reference
(fusedrnn/reference.py, plain differentiable PyTorch ops) from the op's inputs and
returns its vector-Jacobian product with create_graph=True, so the result can be
differentiated again, to any order. The sequence op's input gx is recomputed from the
input projection's inputs (x, w_ih, b), which its autograd node already keeps: nothing
more is saved for this, and a backward without create_graph is unchanged.

Where gx did not come from fusedrnn::projection (the bfloat16 path, other backends, a
direct op call with a computed gx) or needs no gradient (a layer whose x, w_ih and biases
all need none: keeping gx for a double backward would cost its memory in every training
step), double backward still raises (ops._no_double_backward).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops, reference

SCHEMA = ("(str cell, bool[] needs, bool relu, bool reverse, Tensor? x, Tensor? w_ih, Tensor? b, Tensor? gx, Tensor h0,"
          " Tensor? c0, Tensor w_hh, Tensor? w_hr, Tensor? b_hh, Tensor? lengths, Tensor? grad_y,"
          " Tensor? grad_h_n, Tensor? grad_c_n) -> Tensor[]")
# The order of recurrence_vjp's results and of its `needs`: the gradient of each input where
# needed (zeros where the input does not reach the outputs), else an empty tensor. Only the
# needed ones are computed: a penalty's grad(y, x, create_graph=True) needs no weight gradient.
GRAD_ORDER = ("gx", "h0", "c0", "w_hh", "w_hr", "b_hh")


def define() -> None:
    """Declare fusedrnn::recurrence_vjp with its implementation (idempotent). The
    implementation is registered as CompositeImplicitAutograd: it runs above autograd, so
    autograd records the reference's ops and the results are differentiable."""
    if not ops.define_schemas("recurrence_vjp", {"recurrence_vjp": SCHEMA}):
        return
    ops._LIB.impl("recurrence_vjp", recurrence_vjp, "CompositeImplicitAutograd")


def recurrence_vjp(cell: str, needs: list[bool], relu: bool, reverse: bool, x: Optional[Tensor], w_ih: Optional[Tensor],
                   b: Optional[Tensor], gx: Optional[Tensor], h0: Tensor, c0: Optional[Tensor], w_hh: Tensor,
                   w_hr: Optional[Tensor], b_hh: Optional[Tensor], lengths: Optional[Tensor],
                   grad_y: Optional[Tensor], grad_h_n: Optional[Tensor],
                   grad_c_n: Optional[Tensor]) -> list[Tensor]:
    """The gradients (GRAD_ORDER) of <grad_y, y> + <grad_h_n, h_n> + <grad_c_n, c_n> for one
    layer: gx = x @ w_ih^T + b (x [T, B, I]) or gx itself, then the reference recurrence of
    `cell` (b_hh: GRU's recurrent bias). Differentiable (create_graph=True)."""
    with torch.enable_grad():
        # Fresh aliases of the inputs: the nested autograd.grad below then stops at nodes only
        # this recomputation reaches. On the inputs themselves it would also run every node
        # upstream that leads to one of their grad_fns (e.g. earlier chunks of a sequence
        # split from one tensor, carrying the state), each running its own create_graph
        # recomputation: exponential work.
        x, w_ih, b, gx, h0, c0, w_hh, w_hr, b_hh = (None if t is None else t.view_as(t) for t in
                                                    (x, w_ih, b, gx, h0, c0, w_hh, w_hr, b_hh))
        if x is not None:
            # (gx recomputed: a graph from x, w_ih and b, which the second backward follows)
            gx = F.linear(x, w_ih, b)
        if cell == "lstm":
            outs = reference.lstm_forward(gx, h0, c0, w_hh, w_hr, lengths, reverse, False)[:3]
        elif cell == "gru":
            outs = reference.gru_forward(gx, h0, w_hh, b_hh, lengths, reverse, False)[:2]
        else:
            outs = reference.rnn_forward(gx, h0, w_hh, lengths, reverse, relu)
        grads = (grad_y, grad_h_n, grad_c_n)[:len(outs)]
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
        named = dict(zip(GRAD_ORDER, (gx, h0, c0, w_hh, w_hr, b_hh)))
        wrt = [k for k, need in zip(GRAD_ORDER, needs) if need and named[k] is not None and named[k].requires_grad]
        got = dict.fromkeys(wrt)
        if pairs and wrt:
            got = dict(zip(wrt, torch.autograd.grad([o for o, _ in pairs], [named[k] for k in wrt],
                                                    [g for _, g in pairs], create_graph=True, allow_unused=True)))
    return [h0.new_empty(0) if k not in got else torch.zeros_like(named[k]) if got[k] is None else got[k]
            for k in GRAD_ORDER]
