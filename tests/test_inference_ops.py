"""train=False on the LSTM and GRU forward ops (inference: no saved tensors for a backward),
on every backend that runs on CPU tensors: y, h_n (and c_n) are exactly those of
train=True, the saved tensors come back empty, and a backward through such a call
raises instead of reading state that was never kept."""
import pytest
import torch

from op_harness import backend_or_skip, make_inputs


BACKENDS = ["reference", "cpu", "emulated", "triton"]
N_OUT = {"lstm": 3, "gru": 2}  # differentiable outputs; the rest are saved tensors



def _cases():
    # (cell, P, lengths, reverse, T): T >= 8 takes the cpu backend's packed-weight path.
    for cell, P in [("lstm", 0), ("lstm", 3), ("gru", 0)]:
        for lengths, reverse, T in [(False, False, 5), (True, True, 9), (True, False, 9)]:
            yield cell, P, lengths, reverse, T


# triton: by default the one-launch time loop (SEQ) under the interpreter, "triton-step" the
# per-step kernels; emulated: by default the per-step kernels, "emulated-persistent" the
# persistent (cooperative) ones.
@pytest.mark.parametrize("backend", BACKENDS + ["triton-step", "emulated-persistent"])
@pytest.mark.parametrize("cell,P,lengths,reverse,T", list(_cases()))
def test_inference_outputs_equal_training_outputs(backend, cell, P, lengths, reverse, T, monkeypatch, request):
    be = backend_or_skip(backend.split("-")[0])
    if backend == "triton-step":
        from fusedrnn.triton_kernels import launch
        monkeypatch.setattr(launch, "choose_mode", lambda *args: launch.STEP)
    if backend == "emulated-persistent":
        if P:
            pytest.skip("no persistent LSTM kernel with projection")
        from fusedrnn import _emulated
        old = _emulated.get_algo()
        _emulated.set_algo("persistent")
        request.addfinalizer(lambda: _emulated.set_algo(old))
    if backend == "triton" and P:
        pytest.skip("the projection runs per step: covered by triton-step")
    args = make_inputs(cell, T, 3, 16, P=P, lengths=lengths, reverse=reverse)
    fwd = be.op(cell, "forward")
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with torch.no_grad():
        trained = fwd(*args, True)
        inferred = fwd(*args, False)
    for a, b in zip(args, before):  # e.g. the triton kernels get gx as the unwritten placeholder
        assert not isinstance(a, torch.Tensor) or torch.equal(a, b), f"{backend} {cell}: an input was modified"
    n = N_OUT[cell]
    for name, a, b in zip(["y", "h_n", "c_n"], trained[:n], inferred[:n]):
        assert torch.isfinite(b).all(), f"{backend} {cell} {name}: unwritten values"
        assert torch.equal(a, b), f"{backend} {cell} {name}: train=False differs from train=True"
    for saved in trained[n:]:
        assert saved.shape[0] == T, "train=True keeps the [T, ...] saved tensors"
    for saved in inferred[n:]:
        assert saved.shape == (0,), f"{backend} {cell}: train=False returned a saved tensor of {tuple(saved.shape)}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_backward_through_inference_call_raises(backend, cell):
    be = backend_or_skip(backend)
    args = [a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in make_inputs(cell, 4, 2, 8)]
    y = be.op(cell, "forward")(*args, False)[0]
    with pytest.raises(RuntimeError, match="train=False"):
        y.sum().backward()


@pytest.mark.parametrize("backend", ["reference", "cpu", "emulated"])  # opcheck fails under the Triton interpreter
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_opcheck_inference(backend, cell):
    be = backend_or_skip(backend)
    # Inputs that do not require grad: a backward through train=False raises (tested above).
    args = make_inputs(cell, 4, 3, 5, lengths=True, reverse=True) + (False,)
    torch.library.opcheck(be.op(cell, "forward"), args)
