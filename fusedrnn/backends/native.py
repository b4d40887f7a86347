"""The `cpu` and `cuda` backends: C++ kernels (csrc/cpu -> fusedrnn._C) and CUDA
kernels (csrc/cuda -> fusedrnn._C_cuda).

Both implement the same ops (no suffix); the dispatcher picks the CPU or CUDA
kernel by the tensors' device. Each backend is usable only if its extension was built.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from .. import bidirectional, cell_ops, double_backward, ops, packed, projection
from . import Backend, Call, register
from .. import backends


def _load_extension(module: str):
    ops.define("cpu")  # the schemas the C++ kernels implement (TORCH_LIBRARY_IMPL only)
    cell_ops.define()
    projection.define()
    packed.define()
    bidirectional.define()
    double_backward.define()  # (called by the C++ autograd's create_graph backward)
    return importlib.import_module(module)


def _has_kernel(dispatch_key: str) -> bool:
    name = ops.qualname("lstm", "forward", "cpu")
    return torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)


def _load_for(dispatch_key: str, module: str):
    def load():
        try:
            _load_extension(module)
        except ImportError as e:
            return f"the compiled extension {module} is not built ({e})"
        if not _has_kernel(dispatch_key):
            return f"{module} registers no {dispatch_key} kernel"
        if dispatch_key == "CUDA" and not torch.cuda.is_available():
            return "no CUDA device"
        return None
    return load


# Whether the CPU kernels run a bfloat16 w_hh on AVX512-BF16 dot products, asked once when
# the extension loads (torch.compile's Dynamo cannot trace the call). They need 8+ steps
# (kernels.h: bf16_kernels_run; shorter sequences cast w_hh to float32 there).
_BF16_MIN_STEPS = 8
_bf16_kernels = False


def _load_cpu():
    global _bf16_kernels
    why = _load_for("CPU", "fusedrnn._C")()
    if why is None:
        C = importlib.import_module("fusedrnn._C")
        _bf16_kernels = C.bf16_kernels_run(_BF16_MIN_STEPS)
        backends.CPU_ZMM = C._set_options(-1, 0)[0] == 3  # (the tiled mode; -1, 0: unchanged)
    return why


def _bf16_recurrence(steps: int) -> bool:
    return _bf16_kernels and steps >= _BF16_MIN_STEPS


register(Backend(name="cpu", ops_backend="cpu", device_types=("cpu",),
                 dtypes=(torch.float64, torch.float32), load=_load_cpu,
                 cell_ops=True, projection_op=True, direction_pairs=True, float32_for=(torch.float16, torch.bfloat16),
                 bf16_recurrence=_bf16_recurrence))
# Per CUDA device: why fusedrnn._C_cuda cannot run there ("" if it can), asked once. The
# build holds kernel code for TORCH_CUDA_ARCH_LIST's architectures (setup.py); on an older
# GPU (e.g. a T4, 7.5, under the default list of an install without a GPU) the first launch
# would fail with "no kernel image is available": the backend refuses the call instead, so
# that auto goes on to the next backend.
_KERNEL_IMAGE: dict[int, str] = {}


def _cuda_refuses(call: Call) -> Optional[str]:
    index = call.device.index if call.device.index is not None else torch.cuda.current_device()
    why = _KERNEL_IMAGE.get(index)
    if why is None:
        why = _KERNEL_IMAGE[index] = importlib.import_module("fusedrnn._C_cuda").kernel_image_missing(index)
    return why or None


register(Backend(name="cuda", ops_backend="cuda", device_types=("cuda",),
                 dtypes=(torch.float32, torch.float16, torch.bfloat16), load=_load_for("CUDA", "fusedrnn._C_cuda"),
                 limits=_cuda_refuses, verify_on_device=True, kernel_choice=lambda: last_cuda_algo()))


# The CUDA backend's algorithm switch (csrc/cuda/api.h, csrc/cuda/PERSISTENT.md):
# "auto" (persistent kernels when the recurrent weights fit on chip for the current device,
# per-step kernels otherwise), "per_step" or "persistent" (raises when a call cannot run it).
def set_cuda_algo(algo: str) -> str:
    """Set the CUDA kernels' algorithm for this process; returns the previous setting."""
    mod = importlib.import_module("fusedrnn._C_cuda")
    prev = mod.get_algo()
    mod.set_algo(algo)
    return prev


def last_cuda_algo() -> str:
    """Which algorithm the latest CUDA recurrence call ran, and why (e.g. 'lstm forward:
    persistent (auto: W_hh slice 6 units x 4 x 768 = ... B per block on chip, ...)')."""
    return importlib.import_module("fusedrnn._C_cuda").last_algo()
