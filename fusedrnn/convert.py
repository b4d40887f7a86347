"""fusedrnn.convert: swap fusedrnn modules into an existing model."""
from __future__ import annotations

import torch
from torch import nn

from . import cells, modules

# Exact types only: a user's own subclass of nn.LSTM may override forward, and
# replacing it would silently drop that behaviour.
_REPLACEMENTS = {
    nn.LSTM: modules.LSTM, nn.GRU: modules.GRU, nn.RNN: modules.RNN,
    nn.LSTMCell: cells.LSTMCell, nn.GRUCell: cells.GRUCell, nn.RNNCell: cells.RNNCell,
}
_SEQ_ARGS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")


def _constructor_kwargs(m: nn.Module) -> dict:
    if isinstance(m, nn.RNNBase):
        kw = {k: getattr(m, k) for k in _SEQ_ARGS}
        if isinstance(m, nn.LSTM):
            kw["proj_size"] = m.proj_size
    else:
        kw = {k: getattr(m, k) for k in ("input_size", "hidden_size", "bias")}
    if isinstance(m, (nn.RNN, nn.RNNCell)):
        kw["nonlinearity"] = m.nonlinearity
    return kw


def _convert_module(m: nn.Module, backend: str) -> nn.Module:
    cls = _REPLACEMENTS[type(m)]
    params = dict(m.named_parameters(recurse=False))
    w = next(iter(params.values()))
    with torch.device("meta"):  # built empty, then given the original Parameter objects
        new = cls(**_constructor_kwargs(m), dtype=w.dtype, backend=backend)
    for name, p in params.items():
        setattr(new, name, p)  # same Parameter objects: optimizers keep working
    new.train(m.training)
    return new


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every torch.nn LSTM/GRU/RNN (and cell) in `model` by its fusedrnn twin.

    Works in place and returns the model (or the converted module if `model`
    itself is one). Parameters are shared, not copied, so weights, device,
    dtype, state_dict keys and optimizer references are unchanged; training
    mode is kept.
    """
    if type(model) in _REPLACEMENTS:
        return _convert_module(model, backend)
    for name, child in model.named_children():
        converted = convert(child, backend)
        if converted is not child:
            setattr(model, name, converted)
    return model
