"""Double backward (a gradient of a gradient: autograd.grad(..., create_graph=True), then a
backward through its result, as in gradient penalties, MAML or Hessian-vector products)
of the sequence ops: the reference backward (the spec) in differentiable ops.

The fused backward kernels compute first derivatives only. When a sequence op's backward
runs with create_graph=True (C++ autograd of the cpu backend, csrc/cpu/autograd.cpp; the
Python autograd of the others, fusedrnn/ops.py), it calls sequence_grads below instead:
the reference backward (fusedrnn/reference.py, plain differentiable PyTorch ops) on the
op's saved output y, which is differentiable through the op's own node (so the result
can be differentiated again, to any order: a gradient through y runs that node's
backward again), and on the saved tensors it also needs (the gates; the LSTM's cells,
GRU's W_hn h + b_hn), recomputed in differentiable ops from gx and y: one GEMM over all
steps (the previous states are y's rows), then the pointwise math over all steps at once;
only the LSTM's cell state takes a loop of two ops a step. There is no per-step forward to
replay and no nested autograd.grad.

gx itself is recomputed, gx = x @ w_ih^T + b, from the input projection's inputs, which
its autograd node already keeps (nothing more is saved for this, and a backward without
create_graph is unchanged); the RNN's backward needs only y, not gx. A layer whose x, w_ih
and biases all need no gradient has no projection node: there the projection notes its
inputs (C++: FrozenProjection in csrc/cpu/autograd.cpp; Python: the same attribute on
gx), rather than the op keeping gx itself, which would cost its memory in every training
step. Where an LSTM or GRU's gx did not come from a projection (a direct op call with a
computed gx; a layer traced by torch.jit.trace or torch.compile on a backend with Python
autograd), double backward still raises (ops._no_double_backward).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import projection, reference

SCHEMA = ("(str cell, bool relu, bool reverse, Tensor? gx, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? w_hr,"
          " Tensor? b_hh, Tensor? lengths, Tensor y, Tensor grad_y, Tensor grad_h_n, Tensor? grad_c_n,"
          " bool weights=True) -> Tensor[]")


def define() -> None:
    """Declare fusedrnn::sequence_grads with its implementation (idempotent), for the C++
    autograd. Registered as CompositeImplicitAutograd: it runs above autograd, so autograd
    records the reference's ops and the results are differentiable."""
    from . import ops  # (ops imports this module)
    if not ops.define_schemas("sequence_grads", {"sequence_grads": SCHEMA}):
        return
    ops._LIB.impl("sequence_grads", grads_from_outputs, "CompositeImplicitAutograd")


def grads_from_outputs(cell: str, relu: bool, reverse: bool, gx: Optional[Tensor], h0: Tensor, c0: Optional[Tensor],
                       w_hh: Tensor, w_hr: Optional[Tensor], b_hh: Optional[Tensor], lengths: Optional[Tensor],
                       y: Tensor, grad_y: Tensor, grad_h_n: Tensor, grad_c_n: Optional[Tensor],
                       weights: bool = True) -> list[Tensor]:
    """The reference backward's results (reference.lstm_backward etc.: grad_gx, grad_h0[,
    grad_c0], grad_w_hh[, grad_w_hr or grad_b_hh]) from the forward's output y and its
    inputs, in differentiable ops; empty tensors for the LSTM's grad_w_hr without w_hr and
    GRU's grad_b_hh without b_hh, and for all the weights' and biases' without `weights` (a
    gradient penalty's grad(y, x) needs none: one GEMM over all steps fewer). gx: the input
    projection (not read for the RNN). A bfloat16
    w_hh (the bfloat16 kernels' path: float32 gx and states) is taken in float32: its products
    are exact there, as in the kernels' dot products."""
    if cell == "rnn":
        return list(reference.rnn_backward(grad_y, grad_h_n, h0, w_hh, lengths, reverse, relu, y, weights))
    dtype = reference.compute_dtype(gx.dtype)
    w = w_hh.to(dtype)
    T, B, G = gx.shape
    mask = reference.active_mask(lengths, T, B, gx.device)[..., None]
    gxo, yo = reference._orient(reverse, lengths, gx.to(dtype), y.to(dtype))
    # every step's W_hh h_{t-1}, on fusedrnn's projection GEMM where it runs (as gx's below)
    pre = projection.input_projection(reference.previous_states(yo, h0.to(dtype)), w, None, native=_projection_kernel())
    if cell == "gru":
        r, z, n, hn = reference.gru_gates(gxo, pre if b_hh is None else pre + b_hh.to(dtype), G // 3)
        gates, hn = (torch.where(mask, t, 0) for t in (torch.cat([r, z, n], -1), hn))
        gates, hn = reference._orient(reverse, lengths, gates, hn)
        return list(reference.gru_backward(grad_y, grad_h_n, h0, w_hh, b_hh, lengths, reverse, y, gates, hn,
                                           weights))
    H = G // 4
    i, f, g, o = reference.lstm_gates(gxo + pre, H)
    ig = i * g
    c, cells = c0.to(dtype), []
    for f_t, ig_t in zip(f.unbind(0), ig.unbind(0)):  # (each sequence's real steps are a prefix here)
        c = f_t * c + ig_t
        cells.append(c)
    cells = reference._stack(cells, gx, H)
    gates, cells = (torch.where(mask, t, 0) for t in (torch.cat([i, f, g, o], -1), cells))
    gates, cells = reference._orient(reverse, lengths, gates, cells)
    return list(reference.lstm_backward(grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, lengths, reverse, y,
                                        gates, cells, weights))


def _projection_kernel() -> bool:
    """Whether fusedrnn::projection has its CPU kernel (the cpu backend's extension is loaded;
    without it input_projection runs F.linear)."""
    return (hasattr(torch.ops.fusedrnn, "projection")
            and torch._C._dispatch_has_kernel_for_dispatch_key("fusedrnn::projection", "CPU"))


# ----------------------------------------------------------------------------- Python autograd
# The ops of the backends registered in Python (fusedrnn/ops.py) take the same path as the
# cpu backend's C++ (csrc/cpu/autograd.cpp: gx_source, sequence_grads).
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


def sequence_grads(cell: str, relu: bool, reverse: bool, src: Sequence[Optional[Tensor]],
                   inputs: Sequence[Optional[Tensor]], lengths: Optional[Tensor], y: Tensor,
                   grads: Sequence[Optional[Tensor]], needs: Sequence[bool]) -> list[Optional[Tensor]]:
    """A sequence op's create_graph backward: the gradients of (gx, h0, c0, w_hh, w_hr, b_hh)
    where `needs` (None elsewhere), as differentiable functions of the op's inputs, its
    output y and `grads` (those of y, h_n[, c_n]; None: unused). `src` is gx_source(gx)
    (not read for the RNN); `inputs` are (h0, c0, w_hh, w_hr, b_hh)."""
    x, w, b, leaf = src
    # (gx, as the gates' hidden side in grads_from_outputs, on fusedrnn::projection where it
    # runs, CPU float32 and float64: about twice MKL's F.linear there; the C++ autograd's
    # sequence_grads does the same)
    gx = None if cell == "rnn" else leaf if x is None else projection.input_projection(x, w, b,
                                                                                      native=_projection_kernel())
    h0, c0, w_hh, w_hr, b_hh = inputs
    zeros = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (y, h0, c0))]
    got = grads_from_outputs(cell, relu, reverse, gx, h0, c0, w_hh, w_hr, b_hh, lengths, y, *zeros[:2],
                             zeros[2] if cell == "lstm" else None, any(needs[3:]))
    # got: (gx, h0, c0, w_hh, w_hr) for the LSTM, (gx, h0, w_hh, b_hh) for GRU, (gx, h0, w_hh) for RNN
    slots = {"lstm": (0, 1, 2, 3, 4), "gru": (0, 1, 3, 5), "rnn": (0, 1, 3)}[cell]
    res: list[Optional[Tensor]] = [None] * 6
    for k, g in zip(slots, got):
        res[k] = g if needs[k] else None
    return res
