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

The other backends' ops have Python autograd (fusedrnn/ops.py); sequence_grads below is
the same mechanism for them: their modules' input projection (projection.input_projection,
F.linear) leaves x, w and b on gx, where gx_source finds them.

A layer whose x, w_ih and biases all need no gradient has no projection node: there the
projection notes its inputs (C++: FrozenProjection in csrc/cpu/autograd.cpp; Python: the
same attribute on gx), rather than the op keeping gx itself, which would cost its memory
in every training step. Where gx did not come from a projection (a direct op call with a
computed gx; a layer traced by torch.jit.trace or torch.compile on a backend with Python
autograd), double backward still raises (ops._no_double_backward).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import projection, reference

SCHEMA = ("(str cell, bool relu, bool reverse, Tensor gx, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? w_hr,"
          " Tensor? b_hh, Tensor? lengths) -> Tensor[]")


def define() -> None:
    """Declare fusedrnn::recurrence_recompute with its implementation (idempotent). The
    implementation is registered as CompositeImplicitAutograd: it runs above autograd, so
    autograd records the reference's ops and the results are differentiable."""
    from . import ops  # (ops imports this module)
    if not ops.define_schemas("recurrence_recompute", {"recurrence_recompute": SCHEMA}):
        return
    ops._LIB.impl("recurrence_recompute", recurrence_recompute, "CompositeImplicitAutograd")


def recurrence_recompute(cell: str, relu: bool, reverse: bool, gx: Tensor, h0: Tensor, c0: Optional[Tensor],
                         w_hh: Tensor, w_hr: Optional[Tensor], b_hh: Optional[Tensor],
                         lengths: Optional[Tensor]) -> list[Tensor]:
    """[y, h_n] (LSTM: [y, h_n, c_n]) of the reference recurrence of `cell` on gx (b_hh:
    GRU's recurrent bias), in differentiable ops. A bfloat16 w_hh (the bfloat16 kernels'
    path: float32 gx and states) is cast to float32: its products are exact there, as in
    the kernels' dot products."""
    w_hh = w_hh.to(gx.dtype)
    if cell == "lstm":
        return list(reference.lstm_forward(gx, h0, c0, w_hh, w_hr, lengths, reverse, False)[:3])
    if cell == "gru":
        return list(reference.gru_forward(gx, h0, w_hh, b_hh, lengths, reverse, False)[:2])
    return list(reference.rnn_forward(gx, h0, w_hh, lengths, reverse, relu))


# ----------------------------------------------------------------------------- Python autograd
# The ops of the backends registered in Python (fusedrnn/ops.py) take the same path as the
# cpu backend's C++ (csrc/cpu/autograd.cpp: gx_source, aliases, double_backward).
_NO_SOURCE = (None, None, None, None)


def gx_source(gx: Tensor) -> tuple:
    """What a sequence op keeps to recompute gx in a create_graph backward: (x, w, b, None)
    when gx is input_projection's F.linear output, whether or not it needs a gradient
    (references: w and b are parameters or a bias sum, and x, the layer's input, is kept by
    F.linear's node or the previous layer's op), (None, None, None, gx) when gx is a leaf
    that needs a gradient; nothing (all None) otherwise."""
    src = projection.projection_inputs(gx)
    if gx.requires_grad and gx.grad_fn is None:
        return None, None, None, gx
    return _NO_SOURCE if src is None else (*src, None)


def has_source(src: Sequence[Optional[Tensor]]) -> bool:
    return src[0] is not None or src[3] is not None


def _aliases(ts):
    # Fresh views: the nested grad then stops at nodes only the recomputation reaches (on the
    # tensors themselves it would run every upstream node leading to their grad_fns, each
    # with its own nested grad: 2^T recomputations for a loop over x.unbind(0)).
    return [None if t is None else t.view_as(t) for t in ts]


def sequence_grads(cell: str, relu: bool, reverse: bool, src: Sequence[Optional[Tensor]],
                   inputs: Sequence[Optional[Tensor]], lengths: Optional[Tensor],
                   grads: Sequence[Optional[Tensor]], needs: Sequence[bool]) -> list[Optional[Tensor]]:
    """A sequence op's create_graph backward: the gradients of (gx, h0, c0, w_hh, w_hr, b_hh)
    where `needs` (None elsewhere; zeros for one the results do not depend on), as
    differentiable functions of the op's inputs and of `grads` (those of y, h_n[, c_n];
    None: unused). `src` is gx_source(gx); `inputs` are (h0, c0, w_hh, w_hr, b_hh)."""
    x, w, b, leaf = _aliases(src)
    gx = leaf if x is None else F.linear(x, w, b)
    h0, c0, w_hh, w_hr, b_hh = wrt = _aliases(inputs)
    outs = recurrence_recompute(cell, relu, reverse, gx, h0, c0, w_hh, w_hr, b_hh, lengths)
    return _create_graph_grads(outs, grads, [gx, *wrt], needs)


def _create_graph_grads(outs, grads, wrt, needs):
    used = [(o, g) for o, g in zip(outs, grads) if g is not None]
    idx = [k for k, n in enumerate(needs) if n]
    res: list[Optional[Tensor]] = [None] * len(wrt)
    if not used or not idx:
        return res
    got = torch.autograd.grad([o for o, _ in used], [wrt[k] for k in idx], [g for _, g in used],
                              create_graph=True, allow_unused=True)
    for k, g in zip(idx, got):
        res[k] = torch.zeros_like(wrt[k]) if g is None else g
    return res
