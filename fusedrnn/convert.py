"""fusedrnn.convert: swap fusedrnn modules into an existing model; fusedrnn.revert: swap
torch.nn's back (e.g. to save a model that loads without fusedrnn installed)."""
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


# nn.Module's hook registries: the new module takes over the old one's dict objects, so
# hooks keep firing and their handles' remove() still works.
_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
          "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook",
          "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _rebuild(m: nn.Module, cls: type, extra: dict) -> nn.Module:
    """A `cls` with `m`'s constructor arguments (plus `extra`), Parameter objects, training
    mode and hooks."""
    params = dict(m.named_parameters(recurse=False))
    w = next(iter(params.values()))
    with torch.device("meta"):  # built empty, then given the original Parameter objects
        new = cls(**_constructor_kwargs(m), dtype=w.dtype, **extra)
    for name, p in params.items():
        setattr(new, name, p)  # same Parameter objects: optimizers keep working
    new.train(m.training)
    for hooks in _HOOKS:
        if hooks in m.__dict__:
            new.__dict__[hooks] = m.__dict__[hooks]
    return new


def _convert_module(m: nn.Module, backend: str) -> nn.Module:
    return _rebuild(m, _REPLACEMENTS[type(m)], {"backend": backend})


def torch_nn_twin(m: nn.Module) -> nn.Module:
    """torch.nn's module in place of fusedrnn's `m`: the same constructor arguments, the same
    Parameter objects, training mode and hooks (torch.jit.script's replacement,
    modules.BackendChoice.__prepare_scriptable__, and revert's). A module with parametrized
    weights is returned as is: torch.nn cannot script those either."""
    torch_cls = next((t for t, f in _REPLACEMENTS.items() if isinstance(m, f)), None)
    if torch_cls is None or nn.utils.parametrize.is_parametrized(m):
        return m
    return _rebuild(m, torch_cls, {})


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every torch.nn LSTM/GRU/RNN (and cell) in `model` by its fusedrnn twin.

    Works in place and returns the model (or the converted module if `model`
    itself is one). Parameters are shared, not copied, so weights, device,
    dtype, state_dict keys and optimizer references are unchanged; training
    mode and hooks (forward, backward, state_dict) are kept.
    """
    if type(model) in _REPLACEMENTS:
        return _convert_module(model, backend)
    for name, child in model.named_children():
        converted = convert(child, backend)
        if converted is not child:
            setattr(model, name, converted)
    return model


def revert(model: nn.Module) -> nn.Module:
    """The inverse of convert: every fusedrnn LSTM/GRU/RNN (and cell) in `model` replaced in
    place by torch.nn's twin (torch_nn_twin: the same Parameter objects, training mode and
    forward hooks), e.g. before torch.save(model), so that the file loads without fusedrnn.
    Returns the model (or the twin if `model` itself is one). Modules with parametrized
    weights stay fusedrnn's (their class is made by torch.nn.utils.parametrize)."""
    if isinstance(model, tuple(_REPLACEMENTS.values())):
        return torch_nn_twin(model)
    for name, child in model.named_children():
        reverted = revert(child)
        if reverted is not child:
            setattr(model, name, reverted)
    return model
