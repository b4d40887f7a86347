"""The input projection of a sequence layer, gx = x @ w_ih^T + b: one GEMM over all
timesteps before the recurrence (as large as the recurrent GEMMs of the whole sequence).

Every backend's op takes gx (fusedrnn/schema.py); this picks the GEMM that computes it.
F.linear runs MKL on CPUs. On AVX-512 CPUs oneDNN's linear (the kernel torch.nn's own
LSTM uses there) is faster: measured on a 2-core AMD EPYC (Zen 4) VM, 2026-11-29,
[2048 x 256] @ [256 x 1024] 220 against 203 GFLOP/s, [2048 x 512] @ [512 x 2048] 216
against 180 (FMA peak 232); module inference (T = 32, backend "cpu", in-process
interleaved A/B) 1.10x at hidden 512-1024 (LSTM B=8, GRU B=8) and 0.97-1.07x at hidden
256 (LSTM B=8, GRU B=32/64, RNN B=64; median 1.03x). Only where autograd records
nothing: in training the forward's projection is one GEMM of six, and an
autograd.Function around oneDNN's linear (backward on torch.mm; oneDNN was no faster for
the gradients' shapes, 0.7-1.0x) measured 0.98-1.02x. Elsewhere (training, AVX2-only
CPUs, other dtypes, GPUs, tracing) it is F.linear.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import onednn_avx512

# Below this many multiply-adds (T=32, B=1, H=256 is 2^23) the GEMM is a small part of a
# forward and the two were within noise.
MIN_MACS = 1 << 24

_LINEAR = None  # torch.ops.mkldnn._linear_pointwise, or False when this torch lacks it


def _onednn_linear():
    global _LINEAR
    if _LINEAR is None:
        try:
            _LINEAR = torch.ops.mkldnn._linear_pointwise.default
        except (AttributeError, RuntimeError):
            _LINEAR = False
    return _LINEAR


def input_projection(x: Tensor, w: Tensor, b: Optional[Tensor], recorded: bool) -> Tensor:
    """x [T, B, I] @ w [G, I]^T + b [G] -> [T, B, G], like F.linear. `recorded`: whether
    autograd records the call (modules.records_grad of x, w and the biases)."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and (b is None or b.dtype == torch.float32) and x.dim() == 3 and w.is_contiguous()
            and x.numel() * w.shape[0] >= MIN_MACS and not recorded and onednn_avx512()
            and _onednn_linear() and not torch.compiler.is_compiling()):
        T, B, I = x.shape
        return _LINEAR(x.reshape(T * B, I), w, b, "none", [], "").view(T, B, w.shape[0])
    return F.linear(x, w, b)
