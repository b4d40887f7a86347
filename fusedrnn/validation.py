"""Input checks of the drop-in modules: torch.nn's checks, in torch.nn's order,
with its exception types and messages.

Where torch.nn itself fails with an obscure error from deep inside (an
IndexError for an LSTM hx that is not a pair, 'get_mkldnn_dtype' for an hx of
the wrong dtype, an AttributeError for a non-tensor), we raise the same
exception type with a message that says what was expected; for non-tensor
arguments the class also derives TypeError.
"""
from __future__ import annotations

import torch
from torch import Tensor


class NotATensorError(TypeError, AttributeError):
    """An argument that must be a tensor is not one (torch.nn raises AttributeError)."""


class HiddenStatePairError(TypeError, IndexError):
    """An LSTM hx that is not a pair (h_0, c_0) (torch.nn raises IndexError or RuntimeError)."""


class InputDtypeError(ValueError, RuntimeError):
    """Input dtype differs from the weights' (torch.nn raises ValueError, or RuntimeError for packed LSTM input)."""


def check_input_dtype(module: torch.nn.Module, input: Tensor) -> None:
    """torch.nn's RNNBase.check_input dtype check and message (skipped under autocast, as there)."""
    w = module._flat_weights[0]
    if input.dtype != w.dtype and not torch._C._is_any_autocast_enabled():
        raise InputDtypeError(
            f"RNN input dtype ({input.dtype}) does not match weight dtype ({w.dtype}). "
            f"Convert input: input.to({w.dtype}), or convert model: model.to({input.dtype})")


def require_tensor(x, name: str, arg: str) -> None:
    """x must be a tensor: `{name}: {arg} must be a torch.Tensor` (the message is built only on failure)."""
    if not isinstance(x, Tensor):
        raise NotATensorError(f"{name}: {arg} must be a torch.Tensor, got {type(x).__name__}")


def lstm_hidden_pair(hx, name: str = "LSTM"):
    """torch.nn accepts any 2-sequence (tuple or list) of tensors as an LSTM hx."""
    if isinstance(hx, Tensor) or not isinstance(hx, (tuple, list)):
        raise HiddenStatePairError(
            f"{name}: hx must be a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}")
    if len(hx) != 2:
        raise RuntimeError(f"lstm expects two hidden states, got {len(hx)}")
    for i, t in enumerate(hx):
        require_tensor(t, name, f"hx[{i}]")
    return hx[0], hx[1]


def check_bidirectional(name: str, bidirectional) -> None:
    """torch.nn's forward hands `bidirectional` to its C++ kernel, which takes a Python bool
    only (1, numpy's True and tensors raise a TypeError there); the same error here, rather
    than running a module that torch.nn would refuse."""
    if not isinstance(bidirectional, bool):
        raise TypeError(f"{name}: bidirectional must be a bool (True or False), got {type(bidirectional).__name__} "
                        f"{bidirectional!r} (torch.nn.{name}'s forward raises a TypeError for it too)")


def check_input_dim(name: str, input: Tensor) -> None:
    if input.dim() not in (2, 3):
        # torch.nn.RNN says "2D tensor", LSTM/GRU say "2D": keep each one's words.
        tensor = " tensor" if name == "RNN" else ""
        raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D{tensor} instead")


def check_hidden_dims(is_batched: bool, hs: list[Tensor], lstm: bool) -> None:
    want = 3 if is_batched else 2
    if all(h.dim() == want for h in hs):
        return
    kind = "batched 3-D" if is_batched else "unbatched 2-D"
    if lstm:
        dims = ", ".join(f"{h.dim()}-D" for h in hs)
        raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got ({dims}) tensors")
    raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {hs[0].dim()}-D tensor")


def check_sequence_length(T: int) -> None:
    if T == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")


def check_hidden_like_input(input: Tensor, hs: list[Tensor], names: list[str]) -> None:
    """hx must share the input's dtype (unless autocast casts both) and device
    (torch.nn fails later, and obscurely)."""
    for h, n in zip(hs, names):
        if h.dtype != input.dtype and not torch.is_autocast_enabled(input.device.type):
            raise RuntimeError(f"Expected {n} to have dtype {input.dtype} like the input, got {h.dtype}")
        if h.device != input.device:
            raise RuntimeError(f"Expected {n} to be on device {input.device} like the input, got {h.device}")


def check_device(w: Tensor, input: Tensor) -> None:
    """The module's weight `w` and the input must be on one device."""
    if w.device != input.device:
        raise RuntimeError(f"Input is on {input.device} but the module's parameters are on {w.device}; "
                           f"move one of them (e.g. input.to({str(w.device)!r}))")


# ----------------------------------------------------------------------------- cells
def check_cell_input(name: str, input: Tensor, hs: list[Tensor | None], input_size: int,
                     hidden_size: int, weight: Tensor) -> None:
    """torch.nn.XCell's checks (its forward's and _VF.x_cell's), same order and words."""
    require_tensor(input, name, "input")
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    for i, h in enumerate(hs):
        if h is None:
            continue
        if not isinstance(h, Tensor):
            require_tensor(h, name, "hx" + (f"[{i}]" if len(hs) > 1 else ""))
        if h.dim() not in (1, 2):
            which = f"hx[{i}]" if len(hs) > 1 else "hidden"
            raise ValueError(f"{name}: Expected {which} to be 1D or 2D, got {h.dim()}D instead")
    if input.size(-1) != input_size:
        raise RuntimeError(f"input has inconsistent input_size: got {input.size(-1)} expected {input_size}")
    # Autocast casts input, hx and weights alike: asked only on a dtype mismatch (it costs a call).
    dtype = input.dtype
    if dtype != weight.dtype and not torch.is_autocast_enabled(input.device.type):
        raise RuntimeError(f"{name}: input dtype ({dtype}) does not match weight dtype ({weight.dtype})")
    batched = input.dim() == 2
    for i, h in enumerate(hs):
        if h is None:
            continue
        if h.size(-1) != hidden_size:
            raise RuntimeError(f"hidden{i} has inconsistent hidden_size: got {h.size(-1)}, expected {hidden_size}")
        if (h.dim() == 2) != batched:
            raise RuntimeError(f"{name}: hx[{i}] must be {'2' if batched else '1'}-D for "
                               f"{'batched 2-D' if batched else 'unbatched 1-D'} input, got {h.dim()}-D")
        if batched and h.size(0) != input.size(0):
            raise RuntimeError(f"Input batch size {input.size(0)} doesn't match hidden{i} batch size {h.size(0)}")
        if h.dtype != dtype and not torch.is_autocast_enabled(input.device.type):
            raise RuntimeError(f"{name}: hx dtype ({h.dtype}) does not match input dtype ({dtype})")
        if h.device != input.device:
            raise RuntimeError(f"{name}: hx is on {h.device} but the input is on {input.device}")
