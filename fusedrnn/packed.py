"""A PackedSequence in the layout the sequence ops take: padded, time-major [T, B, *].

The batch stays in the packed order (longest first), as torch.nn's packed path runs it:
the lengths do not increase, so the cpu kernels skip the rows that have ended
(Seq::active in csrc/cpu/kernels.h), and the output packs again with one gather of
`rows`, the padded row t * B + b of each packed row (step t holds the packed rows
sum(batch_sizes[:t]) .. + batch_sizes[t]).

`layout_torch` is the spec; the cpu backend's C++ op fusedrnn::packed_layout
(csrc/cpu/register.cpp) computes the same in one call, where the torch version takes
about ten ops: ~25-45 us of a ~130 us call of a small packed RNN's inference.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops

SCHEMAS = {"packed_layout": "(Tensor batch_sizes) -> (Tensor lengths, Tensor rows)"}


def define() -> None:
    """Declare fusedrnn::packed_layout (the cpu backend's C++ implements it) with its fake
    kernel (idempotent)."""
    if ops.define_schemas("packed", SCHEMAS):
        torch.library.register_fake("fusedrnn::packed_layout", _layout_fake, lib=ops._LIB)


def _layout_fake(batch_sizes):
    ctx = torch.library.get_ctx()  # both sizes depend on batch_sizes' values
    return batch_sizes.new_empty(ctx.new_dynamic_size()), batch_sizes.new_empty(ctx.new_dynamic_size())


def _bad_batch_sizes(detail: str) -> RuntimeError:
    return RuntimeError("fusedrnn: a PackedSequence's batch_sizes must be non-negative and non-increasing (as "
                        f"pack_padded_sequence and pack_sequence make them), got {detail}")


def layout_torch(batch_sizes: Tensor) -> tuple[Tensor, Tensor]:
    """(lengths [B], rows [N]) of batch_sizes [T] (int64, CPU), B = batch_sizes[0], N its
    sum, in torch ops: the spec of fusedrnn::packed_layout. Rejects what
    pack_padded_sequence never makes (torch.nn reads some such batch_sizes without an error,
    and the padded layout would be a wrong result)."""
    T = batch_sizes.numel()
    B = int(batch_sizes[0]) if T else 0
    if bool((batch_sizes < 0).any()) or bool((batch_sizes[1:] > batch_sizes[:-1]).any()):
        raise _bad_batch_sizes(str(batch_sizes.tolist()))
    valid = torch.arange(B).unsqueeze(0) < batch_sizes.unsqueeze(1)  # [T, B]: step t of sequence b
    return valid.sum(0), torch.arange(T * B).view(T, B)[valid]


_cpp_layout = False  # whether the C++ op has its kernel (the extension fusedrnn._C is loaded)


def layout(batch_sizes: Tensor) -> tuple[Tensor, Tensor]:
    """layout_torch's result, from the C++ op where the cpu backend's extension is loaded
    (not under torch.compile: the op's output sizes depend on batch_sizes' values)."""
    global _cpp_layout
    if not _cpp_layout:
        define()
        _cpp_layout = torch._C._dispatch_has_kernel_for_dispatch_key("fusedrnn::packed_layout", "CPU")
    if not _cpp_layout or torch.compiler.is_compiling():
        return layout_torch(batch_sizes)
    if batch_sizes.device.type != "cpu" or batch_sizes.dtype != torch.int64 or batch_sizes.dim() != 1:
        raise RuntimeError(f"fusedrnn: a PackedSequence's batch_sizes must be a 1-D int64 CPU tensor, got "
                           f"{batch_sizes.dtype} {tuple(batch_sizes.shape)} on {batch_sizes.device}")
    return torch.ops.fusedrnn.packed_layout.default(batch_sizes)


def pad(data: Tensor, batch_sizes: Tensor) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """A PackedSequence's data [N, I] as x [T, B, I] in the packed order, with the lengths
    (int64, CPU) and rows (on data's device); both None when every sequence runs all T steps
    (then x is data itself, viewed). One index_copy (its backward: one index_select), where
    pad_packed_sequence copies step by step: autograd then records T slice copies, and its
    backward clones the whole padded gradient at each (57 ms at T = B = 64, I = 512,
    against 0.44 ms for its forward)."""
    lengths, rows = layout(batch_sizes)
    T, B, N = batch_sizes.numel(), lengths.numel(), rows.numel()
    if N != data.shape[0]:
        raise RuntimeError(f"fusedrnn: a PackedSequence's data has {data.shape[0]} rows, its batch_sizes sum to {N}")
    if N == T * B:  # every sequence full length: data is x already
        return data.view(T, B, data.shape[-1]), None, None
    rows = rows.to(data.device)
    x = data.new_zeros(T * B, data.shape[-1]).index_copy(0, rows, data).view(T, B, data.shape[-1])
    return x, lengths, rows
