"""Drop-in fusedrnn.LSTMCell / GRUCell / RNNCell (one step, for step-by-step decoding).

Subclasses of the torch.nn cells (constructor, parameters, state_dict are
torch.nn's); one step is the recurrence op of the chosen backend with T = 1.
"""
from __future__ import annotations

import contextlib

import torch.nn.functional as F
from torch import nn

from . import autocast as AC
from . import validation as V
from .backends import Call, select
from .modules import BackendChoice, below_autograd_if_no_grad, records_grad


class _FusedCellBase(BackendChoice):
    _cell: str
    _torch_name: str

    def _step(self, input, hx):
        lstm = self._cell == "lstm"
        hs = list(V.lstm_hidden_pair(hx, self._torch_name)) if (lstm and hx is not None) else [hx]
        V.check_cell_input(self._torch_name, input, hs, self.input_size, self.hidden_size, self.weight_ih)
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if hx is None:
            hs = [x.new_zeros(x.shape[0], self.hidden_size) for _ in range(2 if lstm else 1)]
        elif not batched:
            hs = [h.unsqueeze(0) for h in hs]
        V.check_device(self.weight_ih, x)
        w_ih, w_hh = self.weight_ih, self.weight_hh
        b_ih, b_hh = (self.bias_ih, self.bias_hh) if self.bias else (None, None)
        cast = AC.run_dtype(self._torch_name, x)
        if cast is not None:  # autocast: everything in the dtype torch.nn's cell computes in
            x, hs = x.to(cast), [h.to(cast) for h in hs]
            w_ih, w_hh, b_ih, b_hh = (w if w is None else w.to(cast) for w in (w_ih, w_hh, b_ih, b_hh))
        backend, why = select(self.backend, Call(cell=self._cell, device=x.device, dtype=x.dtype,
                                                 hidden_size=self.hidden_size, batch=x.shape[0]))
        self._record_choice(backend.name, why)
        fwd = backend.op(self._cell, "forward")
        with below_autograd_if_no_grad(), (AC.autocast_off(x.device.type) if cast else contextlib.nullcontext()):
            if self._cell == "gru":
                gx = F.linear(x, w_ih, b_ih).unsqueeze(0)
                out = [fwd(gx, hs[0], w_hh, b_hh, None, False, records_grad(gx, hs[0], w_hh, b_hh))[1]]
            else:
                gx = F.linear(x, w_ih, None if b_ih is None else b_ih + b_hh).unsqueeze(0)
                if lstm:
                    train = records_grad(gx, hs[0], hs[1], w_hh)
                    out = list(fwd(gx, hs[0], hs[1], w_hh, None, None, False, train)[1:3])
                else:
                    out = [fwd(gx, hs[0], w_hh, None, False, self.nonlinearity == "relu")[1]]
        if not batched:
            out = [o.squeeze(0) for o in out]
        return tuple(out) if lstm else out[0]

    def forward(self, input, hx=None):
        return self._step(input, hx)


class LSTMCell(_FusedCellBase, nn.LSTMCell):
    """Drop-in torch.nn.LSTMCell; extra keyword: backend."""
    _cell, _torch_name = "lstm", "LSTMCell"

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_backend(backend)


class GRUCell(_FusedCellBase, nn.GRUCell):
    """Drop-in torch.nn.GRUCell; extra keyword: backend."""
    _cell, _torch_name = "gru", "GRUCell"

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_backend(backend)


class RNNCell(_FusedCellBase, nn.RNNCell):
    """Drop-in torch.nn.RNNCell (tanh or relu); extra keyword: backend."""
    _cell, _torch_name = "rnn", "RNNCell"

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_backend(backend)
