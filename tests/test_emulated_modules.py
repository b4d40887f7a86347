"""fusedrnn modules forced onto the emulated backend (the CUDA kernel sources under the
CPU emulation) against torch.nn on the CPU, float32: the kernels behind the modules'
layer/direction/packing logic, forward and backward."""
import pytest
import torch

from module_harness import compare_modules

pytestmark = pytest.mark.emulated


@pytest.mark.parametrize("cell,extra", [("lstm", {}), ("lstm", {"proj_size": 3}), ("gru", {}),
                                        ("rnn", {"nonlinearity": "tanh"}), ("rnn", {"nonlinearity": "relu"})])
@pytest.mark.parametrize("input_kind", ["batched", "packed_unsorted", "unbatched"])
def test_modules_match_torch_nn(cell, extra, input_kind):
    cfg = dict(input_size=5, hidden_size=37, num_layers=2, bidirectional=True, **extra)
    compare_modules(cell, "emulated", cfg, input_kind, True, dtype=torch.float32, atol=2e-5, rtol=1e-4,
                    T=6, B=5, init_range=None)


def test_module_reports_the_kernels_choice():
    """last_backend_reason carries what the CUDA kernels chose (persistent or per-step) and why."""
    import fusedrnn
    m = fusedrnn.GRU(4, 8, backend="emulated")
    m(torch.randn(3, 2, 4))
    assert m.last_backend == "emulated"
    assert "; kernels: gru forward: " in m.last_backend_reason, m.last_backend_reason
    assert any(a in m.last_backend_reason for a in ("persistent", "per_step")), m.last_backend_reason
