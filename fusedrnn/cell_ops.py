"""The one-step cell ops: one op per cell step for fusedrnn.LSTMCell / GRUCell / RNNCell.

    lstm_cell(x, h, c, w_ih, w_hh, b_ih?, b_hh?, train) -> (h1, c1, gates)
    gru_cell(x, h, w_ih, w_hh, b_ih?, b_hh?, train)     -> (h1, gates, hn)
    rnn_cell(x, h, w_ih, w_hh, b_ih?, b_hh?, relu)       -> h1

Shapes: x [B, I], h/c/h1/c1/hn [B, H], w_ih [G, I], w_hh [G, H], biases [G] (both or
neither), gates [B, G]; G = 4H (LSTM), 3H (GRU), H (RNN). The result is torch.nn's cell
step: the recurrence op contract (fusedrnn/reference.py) with T = 1 and
gx = x @ w_ih^T + b_ih (+ b_hh for LSTM and RNN). gates/hn are the saved tensors of that
contract (empty with train=False); they are not differentiable results.

Why these exist next to the sequence ops: a cell step is small, and the generic path
(F.linear, a bias add, the sequence op with T = 1) spends most of a step in per-op
overhead. Only the cpu backend implements them (csrc/cpu/cell_ops.cpp); the other
backends' cells keep the generic path. Each backward op takes need_h / need_x / need_w
(the state's, the input's and the weights' gradients) and returns empty tensors for what
was not needed: each skipped one is a GEMM saved. Their autograd is in C++
(csrc/cpu/autograd.cpp); this file holds the schemas and fake kernels.
"""
from __future__ import annotations

import torch

from . import ops
from .ops import _no_double_backward, _no_setup

SCHEMAS = {
    "lstm_cell": "(Tensor x, Tensor h, Tensor c, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh,"
                 " bool train=True) -> (Tensor h1, Tensor c1, Tensor gates)",
    "lstm_cell_backward": "(Tensor grad_h1, Tensor grad_c1, Tensor x, Tensor h, Tensor c, Tensor w_ih, Tensor w_hh,"
                          " bool has_bias, Tensor gates, Tensor c1, bool need_h, bool need_x, bool need_w)"
                          " -> (Tensor grad_x, Tensor grad_h, Tensor grad_c, Tensor grad_w_ih, Tensor grad_w_hh,"
                          " Tensor grad_b)",
    "gru_cell": "(Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, bool train=True)"
                " -> (Tensor h1, Tensor gates, Tensor hn)",
    "gru_cell_backward": "(Tensor grad_h1, Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, bool has_bias, Tensor h1,"
                         " Tensor gates, Tensor hn, bool need_h, bool need_x, bool need_w)"
                         " -> (Tensor grad_x, Tensor grad_h, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih,"
                         " Tensor grad_b_hh)",
    "rnn_cell": "(Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, bool relu) -> Tensor h1",
    "rnn_cell_backward": "(Tensor grad_h1, Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, bool has_bias, bool relu,"
                         " Tensor h1, bool need_h, bool need_x, bool need_w)"
                         " -> (Tensor grad_x, Tensor grad_h, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b)",
}


def define() -> None:
    """Declare the cell ops and their fake kernels; the backward ops refuse double backward
    (idempotent). The forward ops' autograd is registered by csrc/cpu/autograd.cpp."""
    if not ops.define_schemas("cell ops", SCHEMAS):
        return
    for cell, (fake, fake_bwd) in _FAKES.items():
        fwd = ops.qualname(cell, "cell", "cpu")
        bwd = fwd + "_backward"
        torch.library.register_fake(fwd, fake, lib=ops._LIB)
        torch.library.register_fake(bwd, fake_bwd, lib=ops._LIB)
        # The forward ops' autograd is C++ (csrc/cpu/autograd.cpp: the Python wrapper
        # cost ~60 us per step). The backward ops have none: refuse double backward.
        torch.library.register_autograd(bwd, _no_double_backward, setup_context=_no_setup, lib=ops._LIB)


def get(cell: str):
    """The forward OpOverload of `cell`'s cell op (define() must have run). The cells get it
    through Backend.cell_op, which caches it."""
    return ops.get_op(cell, "cell", "cpu")


# ----------------------------------------------------------------------------- fake kernels
def _hidden(x, w_ih, ng):
    return x.new_empty(x.shape[0], w_ih.shape[0] // ng)


def _saved(x, train, *shape):
    return x.new_empty(shape if train else (0,))


def _like_if(need, t):
    return torch.empty_like(t) if need else t.new_empty(0)


def _weight_grads(need_w, *ws):
    return [_like_if(need_w, w) for w in ws]


def _lstm_cell_fake(x, h, c, w_ih, w_hh, b_ih, b_hh, train=True):
    return _hidden(x, w_ih, 4), _hidden(x, w_ih, 4), _saved(x, train, x.shape[0], w_ih.shape[0])


def _lstm_cell_backward_fake(grad_h1, grad_c1, x, h, c, w_ih, w_hh, has_bias, gates, c1, need_h, need_x, need_w):
    g_b = x.new_empty(w_ih.shape[0]) if (need_w and has_bias) else x.new_empty(0)
    return (_like_if(need_x, x), _like_if(need_h, h), torch.empty_like(c), *_weight_grads(need_w, w_ih, w_hh), g_b)


def _gru_cell_fake(x, h, w_ih, w_hh, b_ih, b_hh, train=True):
    B, G = x.shape[0], w_ih.shape[0]
    return _hidden(x, w_ih, 3), _saved(x, train, B, G), _saved(x, train, B, G // 3)


def _gru_cell_backward_fake(grad_h1, x, h, w_ih, w_hh, has_bias, h1, gates, hn, need_h, need_x, need_w):
    g_b = [x.new_empty(w_ih.shape[0]) if (need_w and has_bias) else x.new_empty(0) for _ in range(2)]
    return (_like_if(need_x, x), _like_if(need_h, h), *_weight_grads(need_w, w_ih, w_hh), *g_b)


def _rnn_cell_fake(x, h, w_ih, w_hh, b_ih, b_hh, relu):
    return _hidden(x, w_ih, 1)


def _rnn_cell_backward_fake(grad_h1, x, h, w_ih, w_hh, has_bias, relu, h1, need_h, need_x, need_w):
    g_b = x.new_empty(w_ih.shape[0]) if (need_w and has_bias) else x.new_empty(0)
    return (_like_if(need_x, x), _like_if(need_h, h), *_weight_grads(need_w, w_ih, w_hh), g_b)


_FAKES = {
    "lstm": (_lstm_cell_fake, _lstm_cell_backward_fake),
    "gru": (_gru_cell_fake, _gru_cell_backward_fake),
    "rnn": (_rnn_cell_fake, _rnn_cell_backward_fake),
}
