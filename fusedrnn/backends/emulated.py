"""The `emulated` backend: the CUDA kernel sources (csrc/cuda/kernels/) compiled by the
host compiler against a CPU emulation of the CUDA execution model (csrc/emulation/),
run on CPU tensors. It exists to test the CUDA kernels where there is no GPU (CI); it is
slow and never chosen by "auto".
"""
from __future__ import annotations

import importlib

import torch

from .. import ops
from . import Backend, register


def _load():
    ops.define("emulated")  # the schemas the C++ registers kernels for (TORCH_LIBRARY_IMPL only)
    try:
        importlib.import_module("fusedrnn._emulated")
    except ImportError as e:
        return f"the compiled extension fusedrnn._emulated is not built ({e})"
    name = ops.qualname("lstm", "forward", "emulated")
    if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"):
        return "fusedrnn._emulated registers no CPU kernel"
    return None


register(Backend(name="emulated", ops_backend="emulated", device_types=("cpu",),
                 dtypes=(torch.float32, torch.float16, torch.bfloat16), load=_load,
                 kernel_choice=lambda: importlib.import_module("fusedrnn._emulated").last_algo()))
