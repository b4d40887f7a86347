"""Double backward (a gradient of a gradient: autograd.grad(..., create_graph=True), then a
backward through its result, as in gradient penalties, MAML or Hessian-vector products)
for the cpu backend's ops: the reference recurrence as an op the C++ autograd can call.

The fused backward kernels compute first derivatives only. When a backward runs with
create_graph=True, the C++ autograd of the cpu ops (csrc/cpu/autograd.cpp, double_backward)
recomputes instead, in differentiable ops, from aliases of the op's inputs, and
differentiates that with create_graph=True, so the result can be differentiated again, to
any order. The cell ops recompute torch.nn's own cell (ATen's lstm_cell etc.); the
sequence ops recompute gx = x @ w_ih^T + b from the input projection's inputs, which its
autograd node already keeps (nothing more is saved for this, and a backward without
create_graph is unchanged), then call fusedrnn::recurrence_recompute below: the reference
recurrence (fusedrnn/reference.py, plain differentiable PyTorch ops).

Where gx did not come from fusedrnn::projection (the bfloat16 path, other backends, a
direct op call with a computed gx) or needs no gradient (a layer whose x, w_ih and biases
all need none: keeping gx for a double backward would cost its memory in every training
step), double backward still raises (ops._no_double_backward).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import ops, reference

SCHEMA = ("(str cell, bool relu, bool reverse, Tensor gx, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? w_hr,"
          " Tensor? b_hh, Tensor? lengths) -> Tensor[]")


def define() -> None:
    """Declare fusedrnn::recurrence_recompute with its implementation (idempotent). The
    implementation is registered as CompositeImplicitAutograd: it runs above autograd, so
    autograd records the reference's ops and the results are differentiable."""
    if not ops.define_schemas("recurrence_recompute", {"recurrence_recompute": SCHEMA}):
        return
    ops._LIB.impl("recurrence_recompute", recurrence_recompute, "CompositeImplicitAutograd")


def recurrence_recompute(cell: str, relu: bool, reverse: bool, gx: Tensor, h0: Tensor, c0: Optional[Tensor],
                         w_hh: Tensor, w_hr: Optional[Tensor], b_hh: Optional[Tensor],
                         lengths: Optional[Tensor]) -> list[Tensor]:
    """[y, h_n] (LSTM: [y, h_n, c_n]) of the reference recurrence of `cell` on gx (b_hh:
    GRU's recurrent bias), in differentiable ops."""
    if cell == "lstm":
        return list(reference.lstm_forward(gx, h0, c0, w_hh, w_hr, lengths, reverse, False)[:3])
    if cell == "gru":
        return list(reference.gru_forward(gx, h0, w_hh, b_hh, lengths, reverse, False)[:2])
    return list(reference.rnn_forward(gx, h0, w_hh, lengths, reverse, relu))
