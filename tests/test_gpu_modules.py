"""On a CUDA device (skipped without one): every GPU backend's modules against torch.nn (cuDNN),
forward and backward, in fp32 (TF32 off on both sides) and in bf16/fp16 at dtype tolerance."""
import pytest
import torch

from fusedrnn.backends import registry
from module_harness import compare_modules

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ["cuda", "triton", "reference"]
CFGS = {
    "lstm": [dict(input_size=17, hidden_size=96, num_layers=2, bidirectional=True),
             dict(input_size=17, hidden_size=96, proj_size=40, batch_first=True)],
    "gru": [dict(input_size=17, hidden_size=96, num_layers=2, bidirectional=True)],
    "rnn": [dict(input_size=17, hidden_size=96, nonlinearity="relu"), dict(input_size=17, hidden_size=96)],
}
TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 3e-2), torch.float16: (1e-2, 1e-2)}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("input_kind", ["batched", "packed_unsorted"])
@pytest.mark.parametrize("cell,cfg", [(c, cfg) for c, cfgs in CFGS.items() for cfg in cfgs])
def test_gpu_backend_matches_cudnn(backend, dtype, input_kind, cell, cfg):
    why = registry()[backend].refuses(_call(cell, cfg, dtype)) if backend in registry() else "not registered"
    if why:
        pytest.skip(f"{backend}: {why}")
    atol, rtol = TOL[dtype]
    compare_modules(cell, backend, cfg, input_kind, True, dtype=dtype, device="cuda", atol=atol, rtol=rtol,
                    T=33, B=7, init_range=None)


def _call(cell, cfg, dtype):
    from fusedrnn.backends import Call
    return Call(cell=cell, device=torch.device("cuda"), dtype=dtype, hidden_size=cfg["hidden_size"],
                proj_size=cfg.get("proj_size", 0), batch=7)


DOUBLE_BACKWARD_CASES = [("LSTM", dict(num_layers=2, bidirectional=True)), ("LSTM", dict(proj_size=40)),
                         ("GRU", dict(batch_first=True)), ("RNN", dict(nonlinearity="relu")), ("GRUCell", {})]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind,kw", DOUBLE_BACKWARD_CASES, ids=[f"{k}-{'-'.join(kw) or 'plain'}"
                                                                for k, kw in DOUBLE_BACKWARD_CASES])
def test_gpu_double_backward_matches_torch_nn(backend, kind, kw, device="cuda"):
    """A gradient penalty (fusedrnn/double_backward.py) against torch.nn with cuDNN off:
    torch.nn's cuDNN RNNs refuse double backward."""
    import fusedrnn
    cfg = dict(hidden_size=96, proj_size=kw.get("proj_size", 0))
    why = registry()[backend].refuses(_call(kind.replace("Cell", "").lower(), cfg, torch.float32).
                                      _replace(device=torch.device(device)))
    if why:
        pytest.skip(f"{backend}: {why}")
    torch.manual_seed(0)
    ours = getattr(fusedrnn, kind)(17, 96, backend=backend, **kw).to(device)
    ref = getattr(torch.nn, kind)(17, 96, **kw).to(device)
    ref.load_state_dict(ours.state_dict())
    shape = (7, 17) if kind.endswith("Cell") else (7, 33, 17) if kw.get("batch_first") else (33, 7, 17)
    x = torch.randn(*shape, device=device, requires_grad=True)

    def penalty(m):
        out = m(x)
        y = out[0] if isinstance(out, tuple) else out
        (g,) = torch.autograd.grad((y * y.sin()).sum(), x, create_graph=True)
        return torch.autograd.grad(g.square().sum(), [x, *m.parameters()])
    with torch.backends.cudnn.flags(enabled=False):
        want = penalty(ref)
    for a, b in zip(penalty(ours), want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    assert ours.last_backend == backend
