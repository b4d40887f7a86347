"""The recurrence op contract as torch.library schemas: written once, used by every backend.

Every backend registers the same schemas under its own op name:
    fusedrnn::{cell}_{forward|backward}{suffix}
where the suffix is "" for the compiled native ops (one op, a CPU kernel and a
CUDA kernel registered per dispatch key from csrc/), "_reference" for the plain
PyTorch spec, "_triton" for Triton and "_emulated" for the CUDA sources run on
the CPU. The semantics are documented in fusedrnn/reference.py.

The C++ side only registers implementations (TORCH_LIBRARY_IMPL): the schemas
live here so the four backends cannot drift apart.

One extension, the cpu kernels' only: their sequence ops also take a bfloat16 w_hh with
everything else float32 (the modules' bfloat16 path and float32 under matmul precision
"medium"; csrc/cpu/register.cpp): the recurrent products then run on bfloat16 dot products,
with h (forward) and the pre-activation gradients (backward) rounded to bfloat16, within
bfloat16's tolerance of the reference on the same weight; w_hh's gradient is bfloat16.
"""
from __future__ import annotations

CELLS = ("lstm", "gru", "rnn")

SCHEMAS = {
    "lstm_forward": "(Tensor gx, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hr, Tensor? lengths, bool reverse,"
                    " bool train=True)"
                    " -> (Tensor y, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)",
    "lstm_backward": "(Tensor grad_y, Tensor grad_h_n, Tensor grad_c_n, Tensor h0, Tensor c0, Tensor w_hh,"
                     " Tensor? w_hr, Tensor? lengths, bool reverse, Tensor y, Tensor gates, Tensor cells)"
                     " -> (Tensor grad_gx, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_hh, Tensor grad_w_hr)",
    "gru_forward": "(Tensor gx, Tensor h0, Tensor w_hh, Tensor? b_hh, Tensor? lengths, bool reverse, bool train=True)"
                   " -> (Tensor y, Tensor h_n, Tensor gates, Tensor hn)",
    "gru_backward": "(Tensor grad_y, Tensor grad_h_n, Tensor h0, Tensor w_hh, Tensor? b_hh, Tensor? lengths,"
                    " bool reverse, Tensor y, Tensor gates, Tensor hn)"
                    " -> (Tensor grad_gx, Tensor grad_h0, Tensor grad_w_hh, Tensor grad_b_hh)",
    "rnn_forward": "(Tensor gx, Tensor h0, Tensor w_hh, Tensor? lengths, bool reverse, bool relu)"
                   " -> (Tensor y, Tensor h_n)",
    "rnn_backward": "(Tensor grad_y, Tensor grad_h_n, Tensor h0, Tensor w_hh, Tensor? lengths, bool reverse,"
                    " bool relu, Tensor y) -> (Tensor grad_gx, Tensor grad_h0, Tensor grad_w_hh)",
}

# Op-name suffix of each backend (see the module docstring).
SUFFIX = {"cpu": "", "cuda": "", "reference": "_reference", "triton": "_triton", "emulated": "_emulated"}


def op_name(cell: str, direction: str, backend: str) -> str:
    """Unqualified op name, e.g. op_name('lstm', 'forward', 'triton') == 'lstm_forward_triton'.
    direction "cell": the one-step cell op of fusedrnn/cell_ops.py (cpu only: 'lstm_cell')."""
    return f"{cell}_{direction}{SUFFIX[backend]}"
