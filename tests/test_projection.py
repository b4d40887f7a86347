"""fusedrnn/projection.py: the input projection (oneDNN's linear in inference on AVX-512
CPUs, else F.linear) against F.linear, and which path ran."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedrnn
from fusedrnn import backends, projection

pytestmark = pytest.mark.skipif(not projection._onednn_linear() or not torch.backends.mkldnn.is_available(),
                                reason="this torch has no oneDNN linear")


@pytest.fixture
def counted(monkeypatch):
    """Forces the AVX-512 answer to `yes` and counts the oneDNN linear's calls."""
    calls = []
    real = projection._onednn_linear()

    def linear(*args):
        calls.append(args[0].shape)
        return real(*args)

    def force(yes: bool):
        monkeypatch.setattr(backends, "_AVX512", yes)
        monkeypatch.setattr(projection, "_LINEAR", linear)
        return calls
    return force


def _args(T, B, I, G, bias=True, batch_first=False):
    x = torch.randn(B, T, I).transpose(0, 1) if batch_first else torch.randn(T, B, I)
    return x, torch.randn(G, I) / I ** 0.5, torch.randn(G) if bias else None


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])  # a non-contiguous x
def test_onednn_path_matches_f_linear(counted, bias, batch_first):
    calls = counted(True)
    x, w, b = _args(32, 24, 96, 384, bias, batch_first)
    assert x.numel() * w.shape[0] >= projection.MIN_MACS
    out = projection.input_projection(x, w, b, recorded=False)
    assert calls == [(32 * 24, 96)]
    assert out.shape == (32, 24, 384)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_f_linear_elsewhere(counted):
    calls = counted(True)
    x, w, b = _args(32, 24, 96, 384)
    small = _args(4, 2, 8, 32)
    for args in ((x, w, b, True),                                  # autograd records it
                 (*small, False),                                  # too small to gain
                 (x.double(), w.double(), b.double(), False)):     # not float32
        assert torch.equal(projection.input_projection(*args), F.linear(*args[:3]))
    assert calls == []
    counted(False)  # AVX2-only CPU
    assert torch.equal(projection.input_projection(x, w, b, False), F.linear(x, w, b))
    assert calls == []


@pytest.mark.parametrize("cls", ["GRU", "RNN", "LSTM"])
def test_modules_in_inference_use_it(counted, cls):
    """Inference through the modules takes the oneDNN path and still matches torch.nn
    (LSTM at batch < 32: batch >= 32 would go to torch.nn's own LSTM)."""
    calls = counted(True)
    ref = getattr(nn, cls)(96, 96, num_layers=2)
    ours = getattr(fusedrnn, cls)(96, 96, num_layers=2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(96, 24, 96)  # every projection >= MIN_MACS (RNN: 96*24 * 96*96)
    with torch.no_grad():
        a, b = ref(x), ours(x)
    assert len(calls) == 2, calls  # one per layer
    assert ours.last_backend != backends.TORCH_NN
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-5)
