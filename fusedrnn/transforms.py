"""What fusedrnn's ops cannot take part in, where the modules run torch.nn's forward:
differentiation by torch.func's grad-type transforms (grad, vjp, jacrev, jacfwd, hessian,
jvp) and forward-mode AD (dual tensors), and ONNX export (`onnx_export`, at the end).

Every backend's ops are torch.library custom ops with a backward formula
(fusedrnn/ops.py; for CPU tensors, C++ autograd Functions in csrc/cpu/autograd.cpp).
torch.func cannot run either kind: torch.library's generated autograd.Function has no
setup_context / vmap rule, and C++ Functions are refused outright; neither has a
forward-mode (jvp) formula. Measured on torch 2.14: `grad` raised on every backend, and
`torch.func.jvp` through the reference backend returned a wrong tangent without an error
(the recurrence's tangent was dropped; the ops called directly still do that: zero
tangents from torch.library custom ops under functorch's jvp, a PyTorch limitation).
torch.nn's own modules support all of these, so the modules run torch.nn's forward there
with backend "auto" and refuse a forced backend with an error that says why. A plain `vmap` is not in this list: the ops run under it
(torch's batching fallback, one call per sample), where torch.nn's LSTM has no batching
rule and fails.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.autograd.forward_ad as fwAD

_DIFFERENTIATING = {torch._C._functorch.TransformType.Grad: "torch.func.grad, vjp, jacrev or hessian",
                    torch._C._functorch.TransformType.Jvp: "torch.func.jvp or jacfwd"}


def differentiating_transform(tensors: Callable[[], Iterable[Optional[torch.Tensor]]]) -> Optional[str]:
    """What, if anything, differentiates this call in a way fusedrnn's ops cannot
    (e.g. "torch.func.grad, vjp, jacrev or hessian"); None if nothing. `tensors()` gives
    the call's tensors (input, states, weights), asked for only under forward-mode AD.
    Costs ~0.1 us when neither torch.func nor forward-mode AD is active."""
    if torch._C._functorch.peek_interpreter_stack() is not None and not torch.compiler.is_compiling():
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
        for interp in retrieve_all_functorch_interpreters():
            name = _DIFFERENTIATING.get(interp.key())
            if name is not None:
                return name
    if fwAD._current_level >= 0:  # inside fwAD.dual_level(): any dual tensor among the call's?
        if any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors()):
            return "forward-mode AD (a dual tensor from torch.autograd.forward_ad)"
    return None


def onnx_export() -> Optional[str]:
    """"torch.onnx.export" while it captures the module (its TorchScript-based exporter traces,
    its torch.export-based one compiles); else None. ONNX has no fusedrnn operators, and
    torch.nn's forward exports as ONNX's own LSTM / GRU / RNN operators (measured on torch
    2.14: the ops failed with "unrecognized namespace fusedrnn"). Asked only while tracing or
    compiling, so an eager call pays two C calls."""
    if torch._C._get_tracing_state() is None and not torch.compiler.is_compiling():
        return None  # (~0.2 us: the C call first, for eager calls of the small cells)
    return "torch.onnx.export" if torch.onnx.is_in_onnx_export() else None


def refuse(backend: str, what: str) -> RuntimeError:
    """The error of a module whose forced backend cannot run under `what` (a transform, or
    ONNX export)."""
    return RuntimeError(
        f"fusedrnn: backend {backend!r} cannot run under {what}: fusedrnn's ops have no rules for "
        "torch.func's differentiating transforms or forward-mode AD, and no ONNX operators. Use "
        "backend='auto', which runs torch.nn's own forward there, or backend='torch.nn'.")
