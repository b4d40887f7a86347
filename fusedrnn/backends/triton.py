"""The `triton` backend: the Triton kernels of triton_kernels/ as torch.library ops.

Each op (fusedrnn::{cell}_{forward|backward}_triton, schemas from fusedrnn/schema.py)
is a torch.library.triton_op whose body launches its kernels through wrap_triton,
so torch.compile can see the kernels on a GPU; the fake kernels and autograd are
the ones shared by every backend (fusedrnn/ops.py).

Usable on CUDA tensors when triton imports. On CPU tensors only under the Triton
interpreter (TRITON_INTERPRET=1, set before triton is first imported): that is how
CI runs every kernel. Never chosen by "auto" on CPU (AUTO_ORDER has no triton there).
Not supported: float64 (refused with the reason). LSTM projection runs as two launches per step.
"""
from __future__ import annotations

import os

import torch

from .. import ops
from ..contract import check_forward
from ..schema import SCHEMAS
from . import Backend, Call, register

def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _define_ops() -> None:
    from torch.library import triton_op, wrap_triton

    from ..triton_kernels import launch as L

    def op(name):
        return triton_op(f"fusedrnn::{name}_triton", mutates_args=(), schema=SCHEMAS[name])

    @op("lstm_forward")
    def lstm_forward(gx, h0, c0, w_hh, w_hr, lengths, reverse, train=True):
        check_forward("lstm", gx, h0, w_hh, lengths, c0=c0, w_hr=w_hr)
        return L.lstm_forward(gx, h0, c0, w_hh, w_hr, lengths, reverse, train, wrap=wrap_triton)

    @op("lstm_backward")
    def lstm_backward(grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, lengths, reverse, y, gates, cells):
        return L.lstm_backward(grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, lengths, reverse, y, gates, cells,
                               wrap=wrap_triton)

    @op("gru_forward")
    def gru_forward(gx, h0, w_hh, b_hh, lengths, reverse, train=True):
        check_forward("gru", gx, h0, w_hh, lengths, b_hh=b_hh)
        return L.gru_forward(gx, h0, w_hh, b_hh, lengths, reverse, train, wrap=wrap_triton)

    @op("gru_backward")
    def gru_backward(grad_y, grad_h_n, h0, w_hh, b_hh, lengths, reverse, y, gates, hn):
        return L.gru_backward(grad_y, grad_h_n, h0, w_hh, b_hh, lengths, reverse, y, gates, hn, wrap=wrap_triton)

    @op("rnn_forward")
    def rnn_forward(gx, h0, w_hh, lengths, reverse, relu):
        check_forward("rnn", gx, h0, w_hh, lengths)
        return L.rnn_forward(gx, h0, w_hh, lengths, reverse, relu, wrap=wrap_triton)

    @op("rnn_backward")
    def rnn_backward(grad_y, grad_h_n, h0, w_hh, lengths, reverse, relu, y):
        return L.rnn_backward(grad_y, grad_h_n, h0, w_hh, lengths, reverse, relu, y, wrap=wrap_triton)

    ops.register_fake_and_autograd("triton")


def _load():
    if not torch.cuda.is_available() and not interpreting():
        return "needs a CUDA device (or TRITON_INTERPRET=1 to run CPU tensors under the Triton interpreter)"
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    _define_ops()
    return None


def _limits(call: Call):
    if call.device.type == "cpu" and not interpreting():
        return "runs CPU tensors only under the Triton interpreter (TRITON_INTERPRET=1)"
    return None


register(Backend(
    name="triton", ops_backend="triton",
    device_types=("cuda", "cpu") if interpreting() else ("cuda",),
    dtypes=(torch.float32, torch.float16, torch.bfloat16), load=_load, limits=_limits, verify_on_device=True))
