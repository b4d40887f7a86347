"""torch.autocast for the drop-in modules: which dtype the recurrence runs in, as torch.nn.

Under CUDA autocast torch.nn's RNNs run in the autocast dtype (cuDNN's RNN op is on
autocast's lower-precision list; the cells' ops too), and so do their outputs. On the
CPU (torch 2.14) it depends on the module: LSTM (oneDNN's RNN op) and RNN / RNNCell
(built from autocast-eligible matmuls) run in the autocast dtype; GRU, LSTMCell and
GRUCell stay in float32. The modules cast their input, states and weights to that dtype
and compute with autocast off, so every backend sees one dtype, as the op contract wants.
"""
from __future__ import annotations

import torch

# torch.nn modules that run in float32 under CPU autocast (measured with torch 2.14).
_CPU_STAYS_FP32 = {"GRU", "LSTMCell", "GRUCell"}


def run_dtype(torch_name: str, x: torch.Tensor) -> torch.dtype | None:
    """The dtype `torch_name` ("LSTM", "GRUCell", ...) computes in for input x under autocast,
    or None when autocast is off for x's device (then nothing is cast)."""
    if not torch._C._is_any_autocast_enabled():  # one cheap call in the common case
        return None
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return None
    if x.dtype == torch.float64:
        return torch.float64  # not eligible for autocast
    if device == "cpu" and torch_name in _CPU_STAYS_FP32:
        return torch.float32
    return torch.get_autocast_dtype(device)


def autocast_off(device_type: str):
    return torch.autocast(device_type, enabled=False)
