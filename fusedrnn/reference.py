"""Reference recurrences: the spec every backend is tested against.

Plain PyTorch, one function per (cell, direction of autograd). Each function
implements exactly the op contract of DESIGN.md ("The recurrence ops"):

    lstm_forward(gx[T,B,4H], h0[B,P], c0[B,H], w_hh[4H,P], w_hr?[P,H],
                 lengths?[B], reverse, train=True) -> y[T,B,P], h_n[B,P], c_n[B,H], gates[T,B,4H], cells[T,B,H]
    lstm_backward(grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr?, lengths?, reverse,
                  y, gates, cells) -> grad_gx, grad_h0, grad_c0, grad_w_hh, grad_w_hr
    gru_forward(gx[T,B,3H], h0[B,H], w_hh[3H,H], b_hh?[3H], lengths?, reverse, train=True)
                 -> y[T,B,H], h_n[B,H], gates[T,B,3H], hn[T,B,H]
    gru_backward(grad_y, grad_h_n, h0, w_hh, b_hh?, lengths?, reverse, y, gates, hn)
                 -> grad_gx, grad_h0, grad_w_hh, grad_b_hh
    rnn_forward(gx[T,B,H], h0[B,H], w_hh[H,H], lengths?, reverse, relu) -> y, h_n
    rnn_backward(grad_y, grad_h_n, h0, w_hh, lengths?, reverse, relu, y)
                 -> grad_gx, grad_h0, grad_w_hh

(The backward functions also take weights=True; False leaves the weight and bias
gradients empty, for a create_graph backward asked for none: fusedrnn/double_backward.py.)

Semantics shared by all cells:
  * gx is the input projection for every step, computed outside the op. For
    LSTM and RNN it already holds both biases; for GRU it holds b_ih only and
    b_hh is applied inside (PyTorch's n = tanh(gx_n + r * (W_hn h + b_hn))).
  * Gate order and equations are PyTorch's: LSTM (i, f, g, o), GRU (r, z, n)
    with h' = (1 - z) * n + z * h.
  * lengths (int64, on gx's device, values in [0, T], any order; fusedrnn/contract.py
    checks the arguments): sequence b is
    active for its first lengths[b] time steps. Past that its state is frozen
    (h_n is the state after its last valid step) and its output is 0. With
    reverse=True each sequence starts at its own last valid step, lengths[b]-1,
    and runs down to 0. lengths=None means every sequence has length T.
  * Saved tensors (gates, cells, hn): LSTM gates are post-activation
    (sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)); cells are c_t; GRU gates are
    (r, z, n) post-activation and hn is W_hn h_{t-1} + b_hn. At padded steps they
    are 0. A backend may save something else, as long as its own backward reads it.
  * train=False (inference: nothing will be differentiated) returns the saved
    tensors as empty tensors (shape [0]), so that a backend need not write or even
    allocate them; y, h_n, c_n are the same as with train=True. The backward op
    rejects such empty saved tensors.
  * Half precision (fp16/bf16) inputs are computed in fp32 (fp32 cell state and
    accumulation); y, h_n, c_n come back in the input dtype, saved tensors stay fp32.
  * grad_w_hr / grad_b_hh are empty tensors (shape [0]) when w_hr / b_hh is None.
  * The backward's weight gradients are one GEMM over all time steps after the
    sequential part: grad_w_hh = sum_t dpre_t^T h_{t-1}.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .contract import check_forward

HALF_DTYPES = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the recurrence math runs in: fp32 for half inputs."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def _up(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(compute_dtype(t.dtype))


def active_mask(lengths: Tensor | None, T: int, B: int, device) -> Tensor:
    """[T, B] bool: True where step t of sequence b is a real (non-padded) step."""
    if lengths is None:
        return torch.ones(T, B, dtype=torch.bool, device=device)
    return torch.arange(T, device=device)[:, None] < lengths.to(device)[None, :]


def flip_within_lengths(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse each sequence within its own length (padded steps stay where they are).

    Running the forward recurrence on flip(x) and flipping its per-step results
    back is exactly the reverse direction, so the reference needs one loop only.
    The flip is its own inverse.
    """
    T, B = x.shape[0], x.shape[1]
    if lengths is None:
        return x.flip(0)
    t = torch.arange(T, device=x.device)[:, None]
    L = lengths.to(x.device)[None, :]
    src = torch.where(t < L, L - 1 - t, t)  # [T, B]
    idx = src.reshape(T, B, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.gather(x, 0, idx)


def previous_states(seq: Tensor, init: Tensor) -> Tensor:
    """[T,B,*]: the state each (forward-ordered) step started from: init, seq[0], ..., seq[T-2]."""
    return torch.cat([init.unsqueeze(0), seq[:-1]], 0)[: seq.shape[0]]  # (T = 0: empty)


def _orient(reverse: bool, lengths: Tensor | None, *xs: Tensor):
    return [flip_within_lengths(x, lengths) if reverse else x for x in xs]


def _matmul_t(a: Tensor, b: Tensor) -> Tensor:
    """sum over (t, b) of a[t,b,:]^T b[t,b,:]: the weight-gradient GEMM over all steps."""
    return a.reshape(-1, a.shape[-1]).t() @ b.reshape(-1, b.shape[-1])


# ----------------------------------------------------------------------------- LSTM
class _StackRows(torch.autograd.Function):
    """torch.stack(rows) whose backward is one unbind of the gradient. torch.stack's backward
    selects each row, and under a double backward each select's own backward fills a whole
    [T, B, width] gradient: O(T^2) work."""

    @staticmethod
    def forward(ctx, *rows):
        return torch.stack(rows)

    @staticmethod
    def backward(ctx, grad):
        return grad.unbind(0)


def dsigmoid(y: Tensor, g: Tensor) -> Tensor:
    """The gradient through sigmoid from its output y and the incoming gradient g, g y (1 - y),
    as cells/derivatives.inc's dsigmoid_; one ATen op (sigmoid_backward), which the create_graph
    backward (fusedrnn/double_backward.py) records as one node instead of four."""
    return torch.ops.aten.sigmoid_backward(g, y)


def dtanh(y: Tensor, g: Tensor) -> Tensor:
    """The gradient through tanh from its output y: g (1 - y^2), as dtanh_ (see dsigmoid)."""
    return torch.ops.aten.tanh_backward(g, y)


def _stack(rows: list[Tensor], like: Tensor, width: int) -> Tensor:
    """[T, B, width] from the per-step rows (T = 0: empty). Rows collected and stacked rather
    than written into a preallocated tensor (and the inputs' rows taken by unbind, not
    x[t]): autograd differentiates this reference (the cpu backend's double backward,
    fusedrnn/double_backward.py), and the backward of each row write or x[t] fills a
    whole [T, B, width] gradient (O(T^2) work; bench/MEASUREMENTS.md, "Double backward")."""
    return _StackRows.apply(*rows) if rows else like.new_zeros(0, like.shape[1], width)


def _step_masks(lengths: Tensor | None, T: int, B: int, device) -> list:
    """Each step's mask [B, 1] of real rows, for _where; all None without lengths."""
    if lengths is None:
        return [None] * T
    return [m[:, None] for m in active_mask(lengths, T, B, device).unbind(0)]


def _where(m: Tensor | None, new, old):
    """new at the real steps (mask m [B, 1]), old at the padded ones; m None: all real (no
    op for autograd to differentiate: see _stack)."""
    return new if m is None else torch.where(m, new, old)


def _results(reverse, lengths, train: bool, ys: Tensor, *saved: Tensor) -> tuple[Tensor, ...]:
    """y and the saved tensors in the caller's time order; the saved ones empty when not train."""
    y, *saved = _orient(reverse, lengths, ys, *(saved if train else ()))
    return (y, *saved) if train else (y, ys.new_empty(0), ys.new_empty(0))


def lstm_gates(a: Tensor, H: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(i, f, g, o), post-activation, from the pre-activations a [..., 4H] (gx + W_hh h)."""
    i, f, _, o = torch.sigmoid(a).split(H, dim=-1)
    return i, f, torch.tanh(a[..., 2 * H:3 * H]), o


def lstm_forward(gx, h0, c0, w_hh, w_hr, lengths, reverse, train=True):
    check_forward("lstm", gx, h0, w_hh, lengths, c0=c0, w_hr=w_hr)
    out_dtype = gx.dtype
    gx, h0, c0, w_hh, w_hr = map(_up, (gx, h0, c0, w_hh, w_hr))
    T, B, G = gx.shape
    H = G // 4
    (gx,) = _orient(reverse, lengths, gx)
    mask = active_mask(lengths, T, B, gx.device)
    h, c = h0, c0
    ys, gates, cells = [], [], []
    # (Few ops per step: autograd differentiates this loop in the double backward, where
    # each op's overhead counts. unbind, not gx[t]: see _stack.)
    for t, gx_t in enumerate(gx.unbind(0)):
        i, f, g, o = lstm_gates(torch.addmm(gx_t, h, w_hh.t()), H)
        c_new = f * c + i * g
        h_new = o * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        m = None if lengths is None else mask[t, :, None]
        h = _where(m, h_new, h)
        c = _where(m, c_new, c)
        ys.append(_where(m, h_new, 0))
        if train:
            gates.append(_where(m, torch.cat([i, f, g, o], 1), 0))
            cells.append(_where(m, c_new, 0))
    y, gates, cells = _results(reverse, lengths, train, _stack(ys, gx, h0.shape[1]), _stack(gates, gx, G),
                               _stack(cells, gx, H))
    return y.to(out_dtype), h.to(out_dtype), c.to(out_dtype), gates, cells


def lstm_backward(grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, lengths, reverse, y, gates, cells, weights=True):
    out_dtype = h0.dtype
    grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, y = map(
        _up, (grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, y))
    T, B, G = gates.shape
    H = G // 4
    grad_y, y, gates, cells = _orient(reverse, lengths, grad_y, y, gates, cells)
    masks = _step_masks(lengths, T, B, gates.device)
    # After orienting, each sequence's real steps are a prefix 0..L-1, so the
    # state step t started from is simply the previous step's (or the initial one).
    c_prev = previous_states(cells, c0)
    dh, dc = grad_h_n, grad_c_n
    # (Rows collected and stacked, inputs' rows taken by unbind: the create_graph backward
    # differentiates this function, fusedrnn/double_backward.py; see _stack.)
    dpre, dhs = [], []  # dL/d(pre-activations), dL/dh_t (projected, for grad_w_hr only); last step first
    for m, gt, ct, cp, gy in reversed(list(zip(masks, gates.unbind(0), cells.unbind(0), c_prev.unbind(0),
                                               grad_y.unbind(0)))):
        i, f, g, o = gt.split(H, dim=1)
        tc = torch.tanh(ct)
        dh_t = dh + gy
        if w_hr is not None:
            dhs.append(_where(m, dh_t, 0))
        dhr = dh_t @ w_hr if w_hr is not None else dh_t
        dc_t = dc + dtanh(tc, dhr * o)
        da = torch.cat([dsigmoid(i, dc_t * g), dsigmoid(f, dc_t * cp), dtanh(g, dc_t * i), dsigmoid(o, dhr * tc)], 1)
        da = _where(m, da, 0)
        dpre.append(da)
        dh = _where(m, da @ w_hh, dh)
        dc = _where(m, dc_t * f, dc)
    dpre = _stack(dpre[::-1], gates, G)
    # Weight gradients: one GEMM each over all steps (padded steps have dpre = 0); empty
    # without `weights` (a create_graph backward asked for none: fusedrnn/double_backward.py).
    grad_w_hh = _matmul_t(dpre, previous_states(y, h0)) if weights else y.new_zeros(0)
    if w_hr is not None and weights:
        o = gates[..., 3 * H:]
        hr = o * torch.tanh(cells)  # unprojected h_t, 0 at padded steps
        grad_w_hr = _matmul_t(_stack(dhs[::-1], y, y.shape[2]), hr)
    else:
        grad_w_hr = grad_y.new_zeros(0)
    (dpre,) = _orient(reverse, lengths, dpre)
    return (dpre.to(out_dtype), dh.to(out_dtype), dc.to(out_dtype),
            grad_w_hh.to(out_dtype), grad_w_hr.to(out_dtype))


# ----------------------------------------------------------------------------- GRU
def gru_gates(gx: Tensor, gh: Tensor, H: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(r, z, n, hn) from gx [..., 3H] and gh = W_hh h + b_hh [..., 3H]; hn = gh's n part."""
    r, z = torch.sigmoid(gx[..., :2 * H] + gh[..., :2 * H]).split(H, dim=-1)
    hn = gh[..., 2 * H:]
    return r, z, torch.tanh(gx[..., 2 * H:] + r * hn), hn


def gru_forward(gx, h0, w_hh, b_hh, lengths, reverse, train=True):
    check_forward("gru", gx, h0, w_hh, lengths, b_hh=b_hh)
    out_dtype = gx.dtype
    gx, h0, w_hh, b_hh = map(_up, (gx, h0, w_hh, b_hh))
    T, B, G = gx.shape
    H = G // 3
    (gx,) = _orient(reverse, lengths, gx)
    mask = active_mask(lengths, T, B, gx.device)
    h = h0
    ys, gates, hns = [], [], []
    for t, gx_t in enumerate(gx.unbind(0)):  # (few ops per step: see lstm_forward)
        gh = h @ w_hh.t() if b_hh is None else torch.addmm(b_hh, h, w_hh.t())
        r, z, n, hn = gru_gates(gx_t, gh, H)
        h_new = n + z * (h - n)  # = (1 - z) * n + z * h
        m = None if lengths is None else mask[t, :, None]
        h = _where(m, h_new, h)
        ys.append(_where(m, h_new, 0))
        if train:
            gates.append(_where(m, torch.cat([r, z, n], 1), 0))
            hns.append(_where(m, hn, 0))
    y, gates, hns = _results(reverse, lengths, train, _stack(ys, gx, H), _stack(gates, gx, G), _stack(hns, gx, H))
    return y.to(out_dtype), h.to(out_dtype), gates, hns


def gru_backward(grad_y, grad_h_n, h0, w_hh, b_hh, lengths, reverse, y, gates, hn, weights=True):
    out_dtype = h0.dtype
    grad_y, grad_h_n, h0, w_hh, y = map(_up, (grad_y, grad_h_n, h0, w_hh, y))
    T, B, G = gates.shape
    H = G // 3
    grad_y, y, gates, hn = _orient(reverse, lengths, grad_y, y, gates, hn)
    masks = _step_masks(lengths, T, B, gates.device)
    h_prev = previous_states(y, h0)
    r, z, n = gates.split(H, dim=2)
    # (What does not depend on the recurrence, for all steps at once: fewer ops in the loop,
    # which the create_graph backward records step by step.) dgh = dgx * [1, 1, r].
    one_z, hp_n, to_dgh = 1 - z, h_prev - n, torch.cat([torch.ones_like(r), torch.ones_like(r), r], 2)
    dh = grad_h_n
    dgx, dgh = [], []  # gradients w.r.t. gx and W_hh h + b_hh, last step first (see lstm_backward)
    for m, r, z, n, hnt, oz, hpn, tg, gy in reversed(list(zip(
            masks, *(t.unbind(0) for t in (r, z, n, hn, one_z, hp_n, to_dgh, grad_y))))):
        dh_t = dh + gy
        dan = dtanh(n, dh_t * oz)
        daz = dsigmoid(z, dh_t * hpn)
        dar = dsigmoid(r, dan * hnt)
        dgx.append(_where(m, torch.cat([dar, daz, dan], 1), 0))
        dgh.append(dgx[-1] * tg)
        dh = _where(m, dh_t * z + dgh[-1] @ w_hh, dh)
    dgx, dgh = _stack(dgx[::-1], gates, G), _stack(dgh[::-1], gates, G)
    grad_w_hh = _matmul_t(dgh, h_prev) if weights else y.new_zeros(0)  # (weights: see lstm_backward)
    grad_b_hh = dgh.sum((0, 1)) if b_hh is not None and weights else grad_y.new_zeros(0)
    (dgx,) = _orient(reverse, lengths, dgx)
    return dgx.to(out_dtype), dh.to(out_dtype), grad_w_hh.to(out_dtype), grad_b_hh.to(out_dtype)


# ----------------------------------------------------------------------------- RNN
def rnn_forward(gx, h0, w_hh, lengths, reverse, relu):
    check_forward("rnn", gx, h0, w_hh, lengths)
    out_dtype = gx.dtype
    gx, h0, w_hh = map(_up, (gx, h0, w_hh))
    T, B, H = gx.shape
    (gx,) = _orient(reverse, lengths, gx)
    mask = active_mask(lengths, T, B, gx.device)
    act = torch.relu if relu else torch.tanh
    h = h0
    ys = []
    for t, gx_t in enumerate(gx.unbind(0)):
        h_new = act(torch.addmm(gx_t, h, w_hh.t()))
        m = None if lengths is None else mask[t, :, None]
        h = _where(m, h_new, h)
        ys.append(_where(m, h_new, 0))
    (y,) = _orient(reverse, lengths, _stack(ys, gx, H))
    return y.to(out_dtype), h.to(out_dtype)


def _activation_backward(g: Tensor, y: Tensor, relu: bool) -> Tensor:
    """dL/da from dL/dh = g and the activation's output y (0 at padded steps; masked anyway).
    ReLU's as ATen's threshold_backward: differentiated again (the create_graph backward,
    fusedrnn/double_backward.py), its result stays connected to y, with zero derivative, as
    torch.nn's, instead of a constant."""
    return torch.ops.aten.threshold_backward(g, y, 0) if relu else dtanh(y, g)


def rnn_backward(grad_y, grad_h_n, h0, w_hh, lengths, reverse, relu, y, weights=True):
    out_dtype = h0.dtype
    grad_y, grad_h_n, h0, w_hh, y = map(_up, (grad_y, grad_h_n, h0, w_hh, y))
    T, B, H = y.shape
    grad_y, y = _orient(reverse, lengths, grad_y, y)
    masks = _step_masks(lengths, T, B, y.device)
    dh = grad_h_n
    das = []  # last step first (see lstm_backward)
    for m, yt, gy in reversed(list(zip(masks, y.unbind(0), grad_y.unbind(0)))):
        da = _where(m, _activation_backward(dh + gy, yt, relu), 0)
        das.append(da)
        dh = _where(m, da @ w_hh, dh)
    da_all = _stack(das[::-1], y, H)
    grad_w_hh = _matmul_t(da_all, previous_states(y, h0)) if weights else y.new_zeros(0)  # (see lstm_backward)
    (da_all,) = _orient(reverse, lengths, da_all)
    return da_all.to(out_dtype), dh.to(out_dtype), grad_w_hh.to(out_dtype)
