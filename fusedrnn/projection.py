"""The input projection of a sequence layer, gx = x @ w_ih^T + b: one GEMM over all
timesteps before the recurrence (as large as the recurrent GEMMs of the whole sequence).

Every backend's op takes gx (fusedrnn/schema.py); this picks the GEMM that computes it.
Layers the cpu backend runs in float32 or float64 use the op fusedrnn::projection: its
kernel (csrc/cpu/register.cpp, cpu::gemm) runs the recurrent micro-kernel blocked for
cache, forward and backward (dx = grad @ w, dw = grad^T @ x), and its autograd is C++
(csrc/cpu/autograd.cpp). Measured on a 2-core AMD
EPYC (Zen 4) VM, 2026-11-29, at T*B x H shapes (T=32, B 8-64, H 256-512): 212-219
GFLOP/s of the 232 peak for x @ w^T + b, as fast as oneDNN's linear (which torch.nn's LSTM
runs there, and which this module used in inference before) and faster than MKL's sgemm,
which F.linear runs (193-205); the weight gradient 1.0-1.15x and dx 0.98-1.08x MKL's.
Modules (in-process A/B against oneDNN in inference and F.linear in training, T=32):
LSTM, GRU and RNN 1.02-1.09x at B 8-64, H 256-1024; 0.98-1.19x at B 1-4. Small layers
too since the autograd moved to C++ (2026-11-30, against F.linear, interleaved, the op
alone with autograd): forward + backward 1.12-1.26x from 2^8 to 2^25 multiply-adds
(e.g. T=32 B=1 H=256: 485 against 560 us), forward under no_grad 1.0-1.15x. (Before,
torch.library's Python autograd wrapper made F.linear faster below 2^24.)
Elsewhere (other backends, dtypes and devices): F.linear.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops


# float64 too: its GEMM is ours on AVX-512 CPUs (TiledD, csrc/cpu/tiled_f64.h), BLAS's as in
# F.linear elsewhere, and the sequence ops' double backward recomputes gx from this op's
# inputs (fusedrnn/double_backward.py).
_NATIVE_DTYPES = (torch.float32, torch.float64)


def input_projection(x: Tensor, w: Tensor, b: Optional[Tensor], native: bool = False,
                     rows: Optional[Tensor] = None) -> Tensor:
    """x [T, B, I] @ w [G, I]^T + b [G] -> [T, B, G], like F.linear. `native`: the layer's
    backend implements fusedrnn::projection (Backend.projection_op: the cpu backend).
    `rows`: the rows of x (as [T * B, I]) that hold data, a PackedSequence's (the sequence
    ops never read gx elsewhere): only those are computed, the others are 0. (Except where
    F.linear runs with a gradient recorded: a double backward finds its inputs on gx.)"""
    if (native and x.device.type == "cpu" and x.dtype in _NATIVE_DTYPES and w.dtype == x.dtype
            and (b is None or b.dtype == x.dtype)):
        if rows is not None:
            return torch.ops.fusedrnn.projection_rows(x, w, b, rows)
        return torch.ops.fusedrnn.projection(x, w, b)
    if rows is not None and not ops.records_grad(x, w, b):
        M = math.prod(x.shape[:-1])
        packed = F.linear(x.reshape(M, x.shape[-1]).index_select(0, rows), w, b)
        gx = packed.new_zeros(M, packed.shape[-1]).index_copy_(0, rows, packed).view(*x.shape[:-1], -1)
    else:
        gx = F.linear(x, w, b)
    if torch.is_grad_enabled() and not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
        # For the backends whose ops have Python autograd (fusedrnn/ops.py: reference,
        # Triton, CUDA, emulated): a sequence op's double backward recomputes gx from these
        # (projection_inputs), as the cpu backend does from fusedrnn::projection's C++ node,
        # so that gx itself is not kept (fusedrnn/double_backward.py). Also where gx needs no
        # gradient (x, w and b frozen) while the recurrence may (w_hh, h0): references only,
        # x being the layer's input (the cpu backend's C++ notes them: FrozenProjection). (With
        # rows, gx is 0 at the other rows; the recomputation's F.linear is not, but the
        # sequence ops never read them.) An attribute of the tensor, not an
        # autograd.Function of our own: that cost ~60 us per call (a cell step).
        setattr(gx, _INPUTS, (x, w, b))
    return gx


_INPUTS = "_fusedrnn_projection_inputs"


def projection_inputs(gx: Tensor) -> Optional[tuple]:
    """(x, w, b) when gx is input_projection's F.linear output, else None."""
    return getattr(gx, _INPUTS, None)


# ----------------------------------------------------------------------------- the op
SCHEMAS = {
    "projection": "(Tensor x, Tensor w, Tensor? b) -> Tensor",
    "projection_backward": "(Tensor grad, Tensor x, Tensor w, bool need_x, bool need_w, bool need_b)"
                           " -> (Tensor grad_x, Tensor grad_w, Tensor grad_b)",
    # bfloat16 x and w, float32 b -> float32 (the bfloat16 path of the modules)
    "projection_bf16": "(Tensor x, Tensor w, Tensor? b) -> Tensor",
    # only the rows `rows` of x (as [M, I]), the others 0: a PackedSequence's rows that hold data
    "projection_rows": "(Tensor x, Tensor w, Tensor? b, Tensor rows) -> Tensor",
}


def define() -> None:
    """Declare fusedrnn::projection and its backward (the cpu backend's C++ implements them),
    with fake kernels and autograd (idempotent)."""
    if not ops.define_schemas("projection", SCHEMAS):
        return
    torch.library.register_fake("fusedrnn::projection", _projection_fake, lib=ops._LIB)
    torch.library.register_fake("fusedrnn::projection_backward", _projection_backward_fake, lib=ops._LIB)
    torch.library.register_fake("fusedrnn::projection_bf16", _projection_bf16_fake, lib=ops._LIB)
    torch.library.register_fake("fusedrnn::projection_rows", _projection_rows_fake, lib=ops._LIB)
    torch.library.register_autograd("fusedrnn::projection", _backward, setup_context=_setup, lib=ops._LIB)
    torch.library.register_autograd("fusedrnn::projection_backward", ops._no_double_backward,
                                    setup_context=ops._no_setup, lib=ops._LIB)


def _projection_fake(x, w, b):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _projection_rows_fake(x, w, b, rows):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _projection_bf16_fake(x, w, b):
    return x.new_empty(*x.shape[:-1], w.shape[0], dtype=torch.float32)


def _projection_backward_fake(grad, x, w, need_x, need_w, need_b):
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(w) if need_w else x.new_empty(0),
            x.new_empty(w.shape[0]) if need_b else x.new_empty(0))


def _setup(ctx, inputs, output):
    x, w, b = inputs
    ctx.save_for_backward(x, w)
    ctx.has_b = b is not None


def _backward(ctx, grad):
    x, w = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    need_b = need_b and ctx.has_b
    # (grad may be strided: the C++ makes it contiguous, in pooled memory)
    gx, gw, gb = torch.ops.fusedrnn.projection_backward(grad, x, w, need_x, need_w, need_b)
    return gx if need_x else None, gw if need_w else None, gb if need_b else None
