"""torch.library registration of the recurrence ops: schemas, fake (meta) kernels, autograd.

`define(backend)` declares the six ops of one backend (see fusedrnn/schema.py)
and registers, once for all backends:
  * a fake implementation (shapes/dtypes only), so torch.compile can trace the ops;
  * autograd: the forward op's backward calls the same backend's backward op. (For CPU
    tensors the native ops' autograd is C++, csrc/cpu/autograd.cpp, with the same
    contract: it takes precedence over this one for the AutogradCPU key.)
Device kernels are registered by each backend (C++ TORCH_LIBRARY_IMPL, Triton's
triton_op, or torch.library.impl for the Python reference).
"""
from __future__ import annotations

import torch

from . import double_backward as DB
from .reference import compute_dtype
from .schema import CELLS, SCHEMAS, SUFFIX, op_name

_LIB = torch.library.Library("fusedrnn", "FRAGMENT")  # noqa: TOR901 (kept alive for the process)
_DEFINED: set[str] = set()


def qualname(cell: str, direction: str, backend: str) -> str:
    return f"fusedrnn::{op_name(cell, direction, backend)}"


def get_op(cell: str, direction: str, backend: str):
    """The OpOverload of one backend's op (define(backend) must have run)."""
    return getattr(torch.ops.fusedrnn, op_name(cell, direction, backend)).default


def records_grad(*tensors) -> bool:
    """Whether autograd records an op on these inputs. If not, the forward ops run with
    train=False: they keep no saved tensors (gates, cells) for a backward. Under
    torch.jit.trace always True: a traced graph holds the flag as a constant, which must
    not depend on the grad mode of the tracing call (trace's own check re-runs the module
    under another one, and a graph traced for inference would refuse a backward)."""
    if torch.jit.is_tracing():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def define_schemas(key: str, schemas: dict[str, str], suffix: str = "") -> bool:
    """Declare the ops `schemas` (name -> schema, each name + `suffix`) in the fusedrnn
    namespace, once per process and `key`: True when this call declared them."""
    if key in _DEFINED:
        return False
    _DEFINED.add(key)
    for name, schema in schemas.items():
        _LIB.define(f"{name}{suffix}{schema}")
    return True


def define(backend: str) -> None:
    """Declare the ops of `backend` with their fake and autograd registrations (idempotent)."""
    suffix = SUFFIX[backend]
    if define_schemas(suffix, SCHEMAS, suffix):  # (cpu and cuda share their ops: one suffix)
        register_fake_and_autograd(backend)


def register_fake_and_autograd(backend: str) -> None:
    """The fake kernels and autograd of `backend`'s six ops, once they exist: called by
    define(), or directly by a backend that defines its ops itself (Triton's triton_op)."""
    for cell in CELLS:
        fwd, bwd = qualname(cell, "forward", backend), qualname(cell, "backward", backend)
        torch.library.register_fake(fwd, _FAKE_FORWARD[cell], lib=_LIB)
        torch.library.register_fake(bwd, _FAKE_BACKWARD[cell], lib=_LIB)
        setup, backward = _AUTOGRAD[cell]
        torch.library.register_autograd(
            fwd, _bind_backward(backward, get_op(cell, "backward", backend), backend not in _TAKES_STRIDED),
            setup_context=setup, lib=_LIB)
        # Without this, differentiating the backward (create_graph=True, then a
        # second backward) would silently give wrong second derivatives.
        torch.library.register_autograd(bwd, _no_double_backward, setup_context=_no_setup, lib=_LIB)


# Backends whose C++ takes non-contiguous tensors (it makes them contiguous itself: the cpu
# kernels with memory from their output pool, which saves fresh memory's page faults on
# every training step; see contiguous_pooled in csrc/cpu/op_utils.h).
_TAKES_STRIDED = ("cpu", "cuda", "emulated")


def _bind_backward(backward, bwd_op, contiguous=True):
    def fn(ctx, *grads):
        if contiguous:
            grads = [g if g is None else g.contiguous() for g in grads]
        return backward(ctx, bwd_op, *grads)
    return fn


def _grad_or_zeros(grad, like: torch.Tensor) -> torch.Tensor:
    """The incoming gradient of a forward result, or zeros when nothing used that result:
    the setups turn off autograd's materialization of unused gradients, which would
    otherwise allocate and zero-fill one for every output, the large saved tensors included."""
    return torch.zeros_like(like) if grad is None else grad


def _setup_outputs(ctx, *saved_outputs) -> None:
    # Saved tensors returned as outputs (gates, cells, hn) are not differentiable results.
    ctx.mark_non_differentiable(*saved_outputs)
    ctx.set_materialize_grads(False)


def _no_setup(ctx, inputs, output):
    pass


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fusedrnn: double backward (a gradient of a gradient through an RNN, e.g. "
                       "autograd.grad(..., create_graph=True) then backward) is not supported here: an LSTM or "
                       "GRU layer needs its gx, recomputed from its input projection's inputs or gx itself "
                       "(fusedrnn/double_backward.py), and this call has neither: "
                       "a layer run under torch.jit.trace or torch.compile, or a sequence op called with a gx that is "
                       "neither a leaf nor fusedrnn's input projection's output; for that computation set the "
                       "module's backend to 'torch.nn' (module.backend = 'torch.nn', or "
                       "fusedrnn.convert(model, backend='torch.nn')), which runs torch.nn's own forward")


def _empty(ref: torch.Tensor) -> torch.Tensor:
    return ref.new_empty(0)


def _saved(x: torch.Tensor, train: bool, *shape: int) -> torch.Tensor:
    """A forward op's saved tensor: `shape`, or empty with train=False (inference)."""
    return x.new_empty(shape if train else (0,), dtype=compute_dtype(x.dtype))


# ----------------------------------------------------------------------------- fake kernels
def _lstm_forward_fake(gx, h0, c0, w_hh, w_hr, lengths, reverse, train=True):
    T, B, G = gx.shape
    return (gx.new_empty(T, B, h0.shape[1]), torch.empty_like(h0), torch.empty_like(c0),
            _saved(gx, train, T, B, G), _saved(gx, train, T, B, G // 4))


def _lstm_backward_fake(grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, lengths, reverse, y, gates, cells):
    return (grad_y.new_empty(gates.shape, dtype=h0.dtype), torch.empty_like(h0), torch.empty_like(c0),
            torch.empty_like(w_hh), torch.empty_like(w_hr) if w_hr is not None else _empty(w_hh))


def _gru_forward_fake(gx, h0, w_hh, b_hh, lengths, reverse, train=True):
    T, B, G = gx.shape
    return (gx.new_empty(T, B, G // 3), torch.empty_like(h0),
            _saved(gx, train, T, B, G), _saved(gx, train, T, B, G // 3))


def _gru_backward_fake(grad_y, grad_h_n, h0, w_hh, b_hh, lengths, reverse, y, gates, hn):
    return (grad_y.new_empty(gates.shape, dtype=h0.dtype), torch.empty_like(h0), torch.empty_like(w_hh),
            torch.empty_like(b_hh) if b_hh is not None else _empty(w_hh))


def _rnn_forward_fake(gx, h0, w_hh, lengths, reverse, relu):
    return torch.empty_like(gx), torch.empty_like(h0)


def _rnn_backward_fake(grad_y, grad_h_n, h0, w_hh, lengths, reverse, relu, y):
    return torch.empty_like(y), torch.empty_like(h0), torch.empty_like(w_hh)


_FAKE_FORWARD = {"lstm": _lstm_forward_fake, "gru": _gru_forward_fake, "rnn": _rnn_forward_fake}
_FAKE_BACKWARD = {"lstm": _lstm_backward_fake, "gru": _gru_backward_fake, "rnn": _rnn_backward_fake}


# ----------------------------------------------------------------------------- autograd
# Each setup saves what the backward op takes; each backward maps the backward
# op's results onto the forward op's inputs (None for lengths/reverse/relu and
# for absent optional weights). Gradients of the saved outputs (gates, cells,
# hn) are ignored: they are not differentiable results.
def _check_trained(ctx, op: str) -> None:
    if not ctx.train:
        raise RuntimeError(f"fusedrnn: backward through {op} called with train=False, which keeps no saved "
                           "state for the backward; call it with train=True when a gradient is needed")


def _lstm_setup(ctx, inputs, output):
    gx, h0, c0, w_hh, w_hr, lengths, reverse, train = inputs  # (torch.library fills in defaults)
    y, _, _, gates, cells = output
    ctx.save_for_backward(h0, c0, w_hh, w_hr, lengths, y, gates, cells, *DB.gx_source(gx))
    ctx.reverse, ctx.train = reverse, train
    _setup_outputs(ctx, gates, cells)


def _lstm_backward(ctx, bwd_op, grad_y, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    _check_trained(ctx, "lstm_forward")
    h0, c0, w_hh, w_hr, lengths, y, gates, cells, *src = ctx.saved_tensors
    if torch.is_grad_enabled() and DB.has_source(src):  # create_graph (fusedrnn/double_backward.py)
        n = ctx.needs_input_grad
        g = DB.sequence_grads("lstm", False, ctx.reverse, src, (h0, c0, w_hh, w_hr, None), lengths, y,
                              (grad_y, grad_h_n, grad_c_n), (*n[:5], False))
        return (*g[:5], None, None, None)
    grad_y, grad_h_n, grad_c_n = (_grad_or_zeros(g, like) for g, like in
                                  ((grad_y, y), (grad_h_n, h0), (grad_c_n, c0)))
    g_gx, g_h0, g_c0, g_whh, g_whr = bwd_op(grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, lengths,
                                           ctx.reverse, y, gates, cells)
    return g_gx, g_h0, g_c0, g_whh, (g_whr if w_hr is not None else None), None, None, None


def _gru_setup(ctx, inputs, output):
    gx, h0, w_hh, b_hh, lengths, reverse, train = inputs
    y, _, gates, hn = output
    ctx.save_for_backward(h0, w_hh, b_hh, lengths, y, gates, hn, *DB.gx_source(gx))
    ctx.reverse, ctx.train = reverse, train
    _setup_outputs(ctx, gates, hn)


def _gru_backward(ctx, bwd_op, grad_y, grad_h_n, _grad_gates, _grad_hn):
    _check_trained(ctx, "gru_forward")
    h0, w_hh, b_hh, lengths, y, gates, hn, *src = ctx.saved_tensors
    if torch.is_grad_enabled() and DB.has_source(src):
        n = ctx.needs_input_grad
        g = DB.sequence_grads("gru", False, ctx.reverse, src, (h0, None, w_hh, None, b_hh), lengths, y,
                              (grad_y, grad_h_n), (n[0], n[1], False, n[2], False, n[3]))
        return g[0], g[1], g[3], g[5], None, None, None
    grad_y, grad_h_n = _grad_or_zeros(grad_y, y), _grad_or_zeros(grad_h_n, h0)
    g_gx, g_h0, g_whh, g_bhh = bwd_op(grad_y, grad_h_n, h0, w_hh, b_hh, lengths, ctx.reverse, y, gates, hn)
    return g_gx, g_h0, g_whh, (g_bhh if b_hh is not None else None), None, None, None


def _rnn_setup(ctx, inputs, output):
    gx, h0, w_hh, lengths, reverse, relu = inputs
    y, _ = output
    ctx.save_for_backward(h0, w_hh, lengths, y, *DB.gx_source(gx))
    ctx.reverse, ctx.relu = reverse, relu
    _setup_outputs(ctx)


def _rnn_backward(ctx, bwd_op, grad_y, grad_h_n):
    h0, w_hh, lengths, y, *src = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: from y alone (fusedrnn/double_backward.py)
        n = ctx.needs_input_grad
        g = DB.sequence_grads("rnn", ctx.relu, ctx.reverse, src, (h0, None, w_hh, None, None), lengths, y,
                              (grad_y, grad_h_n), (n[0], n[1], False, n[2], False, False))
        return g[0], g[1], g[3], None, None, None
    grad_y, grad_h_n = _grad_or_zeros(grad_y, y), _grad_or_zeros(grad_h_n, h0)
    g_gx, g_h0, g_whh = bwd_op(grad_y, grad_h_n, h0, w_hh, lengths, ctx.reverse, ctx.relu, y)
    return g_gx, g_h0, g_whh, None, None, None


_AUTOGRAD = {"lstm": (_lstm_setup, _lstm_backward), "gru": (_gru_setup, _gru_backward),
             "rnn": (_rnn_setup, _rnn_backward)}
