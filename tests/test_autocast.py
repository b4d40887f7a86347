"""torch.autocast: fusedrnn modules compute in the dtype torch.nn's do (fusedrnn/autocast.py),
return that dtype, and match torch.nn under autocast within the low-precision tolerance,
forward and backward (gradients reach the float32 parameters). CPU autocast runs here;
the CUDA case (cuDNN runs every RNN in the autocast dtype) is marked gpu."""
import pytest
import torch
from torch import nn

import fusedrnn

KINDS = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_autocast_matches_torch_nn(kind, dtype, device):
    ref = getattr(nn, kind)(4, 6, device=device)
    ours = getattr(fusedrnn, kind)(4, 6, device=device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, device=device) if kind.endswith("Cell") else torch.randn(5, 2, 4, device=device)
    with torch.autocast(device, dtype=dtype):
        got = _first(ours(x))
        try:
            want = _first(ref(x))
        except RuntimeError as e:  # oneDNN's LSTM has no low-precision kernel on some CPUs
            want = None
            why = str(e)
    if want is None:
        # torch.nn cannot run it here: the dtype torch.nn's LSTM computes in, against float32.
        assert got.dtype == dtype, why
        torch.testing.assert_close(got.float(), _first(ref(x)), atol=3e-2, rtol=3e-2)
        return
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    g = torch.randn_like(got, dtype=torch.float32)
    (got.float() * g).sum().backward()
    (want.float() * g).sum().backward()
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        torch.testing.assert_close(p.grad, q.grad, atol=6e-2, rtol=6e-2, msg=name)


def test_float64_modules_ignore_autocast():
    m = fusedrnn.GRU(3, 5).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = m(x)
    assert y.dtype == h.dtype == torch.float64
    torch.testing.assert_close(y, m(x)[0], rtol=0, atol=0)
