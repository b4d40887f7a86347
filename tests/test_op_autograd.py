"""Autograd of the forward ops when only some results are used (fusedrnn/ops.py).

The setups turn off autograd's zero-filling of unused output gradients (it allocated a
zero gradient for the large saved tensors on every backward), so a backward op's
grad_y / grad_h_n / grad_c_n arrive as None when nothing used that result. Each case
uses a single differentiable result and checks every input gradient against the float64
reference forward (fusedrnn/reference.py) differentiated by autograd itself, not through
any op's backward, under the same loss, on every backend that runs on CPU tensors; and the saved
tensors returned as results (gates, cells, hn) are not differentiable."""
import pytest
import torch

from op_harness import TOL, _f64, arg_names, assert_close, backend_or_skip, make_inputs

from fusedrnn import reference

BACKENDS = ["reference", "cpu", "emulated", "triton"]
RESULTS = {"lstm": ["y", "h_n", "c_n"], "gru": ["y", "h_n"], "rnn": ["y", "h_n"]}



def _cases():
    for cell in RESULTS:
        for used in RESULTS[cell]:
            yield cell, used


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell,used", list(_cases()))
def test_backward_through_one_result(backend, cell, used):
    be = backend_or_skip(backend, cell)
    torch.manual_seed(hash((backend, cell, used)) % 2**31)
    # lengths + reverse: padded steps, whose gradients the zero-filled inputs must reach too
    args = make_inputs(cell, 9, 3, 16, lengths=True, reverse=True)
    test_args = tuple(a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                      else a for a in args)
    ref_args = tuple(_f64(a) for a in args)
    k = RESULTS[cell].index(used)
    outs = be.op(cell, "forward")(*test_args)
    ref_out = getattr(reference, f"{cell}_forward")(*ref_args)[k]  # plain torch ops: autograd's own gradient
    for name, o in zip(RESULTS[cell], outs):
        assert o.requires_grad, f"{backend} {cell}: result {name} does not require grad"
    for o in outs[len(RESULTS[cell]):]:  # gates, cells / hn: saved state, not results to differentiate
        assert not o.requires_grad, f"{backend} {cell}: a saved tensor requires grad"
    g = torch.randn(ref_out.shape, dtype=torch.float64)
    inputs = [a for a in test_args if isinstance(a, torch.Tensor) and a.requires_grad]
    ref_inputs = [a for a in ref_args if isinstance(a, torch.Tensor) and a.requires_grad]
    got = torch.autograd.grad(outs[k], inputs, g.float())
    want = torch.autograd.grad(ref_out, ref_inputs, g)
    names = [n for n, a in zip(arg_names(cell), test_args) if isinstance(a, torch.Tensor) and a.requires_grad]
    for name, a, w in zip(names, got, want):
        assert_close(a, w, TOL[torch.float32], f"{backend} {cell} (loss on {used}) grad {name}")


def test_cpu_tensors_take_the_cpp_autograd():
    """The native ops' autograd on CPU tensors is csrc/cpu/autograd.cpp's (AutogradCPU,
    ahead of the Python registration for the alias Autograd): a training step's Python
    wrapper per op was ~50-60 us."""
    backend_or_skip("cpu")
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for op in ("lstm_forward", "gru_forward", "rnn_forward", "projection"):
        assert has(f"fusedrnn::{op}", "AutogradCPU"), f"{op}: no C++ autograd kernel for CPU tensors"
    args = tuple(a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in make_inputs("lstm", 3, 2, 4))
    y = torch.ops.fusedrnn.lstm_forward(*args)[0]
    assert type(y.grad_fn).__name__ == "CppFunction", type(y.grad_fn).__name__


@pytest.mark.parametrize("backend", ["reference", "emulated"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_double_backward_raises(backend, cell):
    """A gradient of a gradient through an LSTM or GRU forward op whose gx is neither a leaf
    nor the input projection's output (here 2 * a leaf) raises instead of being silently
    wrong: the backward ops are not differentiable, and there is nothing to recompute gx
    (the gates) from. (Where there is, double backward works, and the RNN's needs only its
    output: tests/test_double_backward.py.)"""
    be = backend_or_skip(backend, cell)
    args = tuple(a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in make_inputs(cell, 4, 2, 5))
    y = be.op(cell, "forward")(args[0] * 2, *args[1:])[0]
    (g,) = torch.autograd.grad(y.pow(2).sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()
