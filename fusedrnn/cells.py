"""Drop-in fusedrnn.LSTMCell / GRUCell / RNNCell (one step, for step-by-step decoding).

Subclasses of the torch.nn cells (constructor, parameters, state_dict are
torch.nn's). One step is the backend's cell op (fusedrnn/cell_ops.py: one op call,
cpu backend) or else the input projection plus the backend's sequence op with T = 1.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.fx import Proxy

from . import autocast as AC
from . import validation as V
from .backends import Call, select, torch_nn_faster_low_precision, torch_nn_instead_of_reference
from .modules import BackendChoice, below_autograd_if_no_grad, fast_step_applies, fast_step_states
from .ops import records_grad
from .projection import input_projection


_NO_CONTEXT = contextlib.nullcontext()  # reusable


def _to(dtype, x, hs, weights):
    """x, the states and the weights (None stays None) in `dtype`."""
    return x.to(dtype), [h.to(dtype) for h in hs], tuple(w if w is None else w.to(dtype) for w in weights)


class _FusedCellBase(BackendChoice):
    _cell: str
    _torch_name: str

    def forward(self, input, hx=None):
        # Written for a small per-step cost: at small sizes this glue is a good part of a step.
        out = self._cached_fast_step(input, hx)
        if out is not None:
            return out
        # (a Proxy has no truth value: no `or`)
        out = self._fx_leaf(input, hx) if isinstance(input, Proxy) else self._forward_without_fused_ops(input, hx)
        if out is not None:
            return out
        lstm = self._cell == "lstm"
        hs = list(V.lstm_hidden_pair(hx, self._torch_name)) if (lstm and hx is not None) else [hx]
        w_ih, w_hh, b_ih, b_hh = self._weights()
        V.check_cell_input(self._torch_name, input, hs, self.input_size, self.hidden_size, w_ih)
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if hx is None:
            hs = [x.new_zeros(x.shape[0], self.hidden_size) for _ in range(2 if lstm else 1)]
        elif not batched:
            hs = [h.unsqueeze(0) for h in hs]
        device = x.device
        if w_ih.device != device:
            V.check_device(w_ih, x)
        cast = AC.run_dtype(self._torch_name, x)
        if cast is not None:  # autocast: everything in the dtype torch.nn's cell computes in
            x, hs, (w_ih, w_hh, b_ih, b_hh) = _to(cast, x, hs, (w_ih, w_hh, b_ih, b_hh))
        call = Call(self._cell, device, x.dtype, self.hidden_size, 0, x.shape[0])
        out = self._device_forward(call, input, hx)
        if out is not None:
            return out
        backend, why = select(self.backend, call)
        if self.backend == "auto":
            nn_why = torch_nn_faster_low_precision(call, backend, records_grad(x, hs[0], w_ih, w_hh), False)
            if nn_why is None:  # (under autocast too: torch.nn's forward then autocasts itself)
                nn_why = torch_nn_instead_of_reference(call, backend.name, why)
            out = self._torch_nn_forward(nn_why, backend, call, input, hx) if nn_why else None
            if out is not None:
                return out
        out_dtype = None
        if call.dtype in backend.float32_for:  # computed in float32, the results cast back
            out_dtype, cast = call.dtype, torch.float32
            x, hs, (w_ih, w_hh, b_ih, b_hh) = _to(cast, x, hs, (w_ih, w_hh, b_ih, b_hh))
            why += "; computed in float32"
        self._record_choice(backend.name, why)
        with below_autograd_if_no_grad(), (_NO_CONTEXT if cast is None else AC.autocast_off(device.type)):
            op = backend.cell_op(self._cell)
            if op is not None:
                out = self._cell_op_step(op, x, hs, w_ih, w_hh, b_ih, b_hh)
            else:
                out = self._sequence_op_step(backend.op(self._cell, "forward"), x, hs, w_ih, w_hh, b_ih, b_hh)
        if op is not None and cast is None and batched and not torch.is_grad_enabled():
            # (an inference step that ran the cell op as it is: the next such call may take
            # _fast_step; `select` answers for the device, dtype and batch, as here)
            self.__dict__["_fused_fast"] = (self.backend, x.dtype, device, backend, why, op)
        if out_dtype is not None:
            out = [o.to(out_dtype) for o in out]
        if not batched:
            out = [o.squeeze(0) for o in out]
        return tuple(out) if lstm else out[0]

    def _fast_step(self, fast, input, hx):
        """The forward's result for an inference call like the last one that ran the cell op
        (batched input, no autocast, no transform, the same backend setting, dtype, device and
        batch size, and `select` still choosing that backend), with the checks reduced to what
        such a call can get wrong: input and states of the expected shapes, dtype and device
        (anything else goes the long way, which raises torch.nn's errors). None where it does
        not apply. A decoding loop of small steps (RNNCell H=64 B=1) spent more time in the
        forward's Python than in the op."""
        setting, dtype, device, backend, why, op = fast
        if not fast_step_applies(self, setting, dtype, device, input, 2):
            return None
        B, H = input.shape[0], self.hidden_size
        w_ih, w_hh, b_ih, b_hh = self._weights()
        if input.shape[1] != self.input_size or w_ih.dtype != dtype or w_ih.device != device:
            return None
        lstm = self._cell == "lstm"
        hs = fast_step_states(hx, input, (B, H), lstm)
        if hs is None:
            return None
        if select(self.backend, Call(self._cell, device, dtype, H, 0, B))[0] is not backend:
            return None
        self._record_choice(backend.name, why)
        with torch._C._AutoDispatchBelowAutograd():
            out = self._cell_op_step(op, input, hs, w_ih, w_hh, b_ih, b_hh)
        return tuple(out) if lstm else out[0]

    def _weight_tensors(self):
        return self._weights()

    def _weights(self):
        """(w_ih, w_hh, b_ih, b_hh), the biases None without bias."""
        p, bias = self._param, self.bias
        return p("weight_ih"), p("weight_hh"), p("bias_ih") if bias else None, p("bias_hh") if bias else None

    def _sequence_op_step(self, fwd, x, hs, w_ih, w_hh, b_ih, b_hh):
        """The input projection, then the backend's sequence op with T = 1."""
        x = x.unsqueeze(0)  # (projected as [1, B, I]: the op's double backward finds gx's source, projection.py)
        if self._cell == "gru":
            gx = input_projection(x, w_ih, b_ih)
            return [fwd(gx, hs[0], w_hh, b_hh, None, False, records_grad(gx, hs[0], w_hh, b_hh))[1]]
        gx = input_projection(x, w_ih, None if b_ih is None else b_ih + b_hh)
        if self._cell == "lstm":
            train = records_grad(gx, hs[0], hs[1], w_hh)
            return list(fwd(gx, hs[0], hs[1], w_hh, None, None, False, train)[1:3])
        return [fwd(gx, hs[0], w_hh, None, False, self.nonlinearity == "relu")[1]]


# The cells spell out torch.nn's constructor signatures (torch.nn's sequence modules take
# *args, **kwargs): code that inspects them, e.g. torch.nn.utils.skip_init (which needs a
# `device` parameter), treats fusedrnn's cells as torch.nn's.
class LSTMCell(_FusedCellBase, nn.LSTMCell):
    """Drop-in torch.nn.LSTMCell; extra keyword: backend."""
    _cell, _torch_name = "lstm", "LSTMCell"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 backend: str = "auto"):
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self._init_backend(backend)


class GRUCell(_FusedCellBase, nn.GRUCell):
    """Drop-in torch.nn.GRUCell; extra keyword: backend."""
    _cell, _torch_name = "gru", "GRUCell"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 backend: str = "auto"):
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self._init_backend(backend)


class RNNCell(_FusedCellBase, nn.RNNCell):
    """Drop-in torch.nn.RNNCell (tanh or relu); extra keyword: backend."""
    _cell, _torch_name = "rnn", "RNNCell"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None, *, backend: str = "auto"):
        super().__init__(input_size, hidden_size, bias, nonlinearity, device=device, dtype=dtype)
        self._init_backend(backend)
