"""Op-level comparison of any backend against the reference backend.

Used by every backend's tests: random inputs (never zeros), forward outputs and
all gradients compared to the reference, which runs in float64 on the same
inputs, with a tolerance that fits the backend's dtype.
"""
from __future__ import annotations

import torch

from fusedrnn import ops
from fusedrnn.backends import Call, registry
from fusedrnn.contract import GATES  # noqa: F401 (for the tests)
from fusedrnn.verify import arg_names, make_inputs  # noqa: F401 (make_inputs: for the tests)

# (atol, rtol) per dtype of the backend under test, against a float64 reference.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 1e-5),
    "tf32": (2e-3, 1e-3),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (3e-2, 2e-2),
}


def backend_or_skip(name: str, cell: str = "lstm"):
    """The backend `name`, or a pytest skip saying why it cannot run `cell` on CPU float32."""
    import pytest
    be = registry().get(name)
    why = be.refuses(Call(cell, torch.device("cpu"), torch.float32, 5)) if be else "not built"
    if why:
        pytest.skip(f"{name}: {why}")
    return be


def _f64(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().double().requires_grad_(True)
    return x


def _diff_outputs(cell, outs):
    return outs[:3] if cell == "lstm" else outs[:2]


def assert_close(got, want, tol, what):
    atol, rtol = tol
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got64 = got.detach().double()
    assert torch.isfinite(got64).all(), f"{what}: non-finite values (unwritten output?)"
    torch.testing.assert_close(got64, want.detach().double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def check_against_reference(backend: str, cell: str, args: tuple, *, tol=None, backward=True):
    """Run `backend`'s forward op (and backward through autograd) on `args` and compare
    every output and gradient with the float64 reference on the same inputs.

    float16/bfloat16 inputs: the forward against the float64 reference, the gradients
    against the reference run at the same dtype (the spec for half inputs: the same
    rounded inputs, y and output gradients, fp32 math), with the dtype's tolerance.
    Measured: against float64 the reference itself misses the bfloat16 tolerance on
    grad_w_hh (a sum over all T*B steps of products of rounded values, with cancellation)
    by up to 3.8x (T=5, B=37, H=129); the kernels' error is the reference's."""
    be = registry()[backend]
    assert be.unavailable() is None, be.unavailable()
    ref = registry()["reference"]
    assert ref.unavailable() is None
    dtype = args[0].dtype
    tol = tol or TOL[dtype]

    test_args = tuple(a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                      else a for a in args)
    ref_args = tuple(_f64(a) for a in args)
    outs = _diff_outputs(cell, be.op(cell, "forward")(*test_args))
    ref_outs = _diff_outputs(cell, ref.op(cell, "forward")(*ref_args))
    names = ["y", "h_n", "c_n"]
    for name, o, r in zip(names, outs, ref_outs):
        assert o.dtype == dtype, f"{name}: dtype {o.dtype} != input dtype {dtype}"
        assert_close(o, r, tol, f"{backend} {cell} forward {name}")
    if not backward:
        return
    if dtype in (torch.float16, torch.bfloat16):
        return _check_half_gradients(be, ref, cell, args, tol)
    grads = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
    inputs = [a for a in test_args if isinstance(a, torch.Tensor) and a.requires_grad]
    ref_inputs = [a for a in ref_args if isinstance(a, torch.Tensor) and a.requires_grad]
    got = torch.autograd.grad(outs, inputs, [g.to(dtype=dtype, device=o.device) for g, o in zip(grads, outs)])
    want = torch.autograd.grad(ref_outs, ref_inputs, [g.to(r.device) for g, r in zip(grads, ref_outs)])
    wrt_names = [n for n, a in zip(arg_names(cell), test_args) if isinstance(a, torch.Tensor) and a.requires_grad]
    for name, g, w in zip(wrt_names, got, want):
        assert_close(g, w, tol, f"{backend} {cell} grad {name}")


def _check_half_gradients(be, ref, cell, args, tol):
    dtype = args[0].dtype

    def run(backend):
        a = tuple(x.detach().clone().requires_grad_(True) if isinstance(x, torch.Tensor) and x.is_floating_point()
                  else x for x in args)
        return _diff_outputs(cell, backend.op(cell, "forward")(*a)), a

    outs, a = run(be)
    ref_outs, ra = run(ref)
    seeds = [torch.randn(o.shape, dtype=torch.float64).to(dtype=dtype, device=o.device) for o in outs]
    leaves = [x for x in a if isinstance(x, torch.Tensor) and x.requires_grad]
    got = torch.autograd.grad(outs, leaves, seeds)
    want = torch.autograd.grad(ref_outs, [x for x in ra if isinstance(x, torch.Tensor) and x.requires_grad], seeds)
    names = [n for n, x in zip(arg_names(cell), a) if isinstance(x, torch.Tensor) and x.requires_grad]
    assert len(got) == len(names) >= 3
    for name, g, w in zip(names, got, want):
        assert g.dtype == dtype, f"grad {name}: dtype {g.dtype}"
        assert_close(g, w, tol, f"{be.name} {cell} grad {name} (vs the reference at {dtype})")


def gradcheck_backend(backend: str, cell: str, args: tuple):
    """torch.autograd.gradcheck of one backend's forward op in float64."""
    op = registry()[backend].op(cell, "forward")
    args = tuple(_f64(a) for a in args)
    n = 3 if cell == "lstm" else 2
    return torch.autograd.gradcheck(lambda *a: op(*a)[:n], args, atol=1e-7, rtol=1e-5)


def opcheck_backend(backend: str, cell: str, args: tuple):
    """torch.library.opcheck (schema, fake kernel, autograd registration) of one backend's forward op."""
    op = registry()[backend].op(cell, "forward")
    args = tuple(a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                 else a for a in args)
    torch.library.opcheck(op, args)
