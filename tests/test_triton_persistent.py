"""The persistent Triton kernels (the time-loop kernels with a grid barrier per step across
hidden tiles, triton_kernels/recurrence.py `_sync`) under the interpreter, with the programs
of each launch running concurrently (tests/triton_concurrency.py): every cell, forward and
backward, against the reference; and without the barrier they must fail."""
import pytest
import torch

from op_harness import check_against_reference, make_inputs

pytestmark = pytest.mark.interpreter
triton = pytest.importorskip("triton")

from triton_concurrency import concurrent_programs  # noqa: E402

from fusedrnn.triton_kernels import launch, recurrence  # noqa: E402

VARIANTS = [("lstm", {}), ("gru", {"bias": True}), ("rnn", {"relu": False}), ("rnn", {"relu": True})]
IDS = ["lstm", "gru", "rnn-tanh", "rnn-relu"]


@pytest.fixture
def tiles(monkeypatch):
    """Force tiles (so the grid has several hidden tiles) and record the modes chosen."""
    chosen = []
    real = launch.choose_mode

    def record(*args):
        chosen.append(real(*args))
        return chosen[-1]
    monkeypatch.setattr(launch, "choose_mode", record)

    def set_tiles(bb, bh, bk):
        monkeypatch.setattr(launch, "default_blocks", lambda B, H: launch.Blocks(bb, bh, bk))
        return chosen
    return set_tiles


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("grid", ["3x1", "2x2"])
def test_persistent_matches_reference(tiles, order, variant, grid):
    cell, kw = variant
    # H=40: 3 hidden tiles of 16 (the last partial); B=20: 1 batch tile of 32 or 2 of 16
    chosen = tiles(32 if grid == "3x1" else 16, 16 if grid == "3x1" else 32, 16)
    with concurrent_programs(order):
        check_against_reference("triton", cell, make_inputs(cell, 4, 20, 40, lengths=True, reverse=True, **kw))
    assert chosen and all(m == launch.PERSISTENT for m in chosen), chosen


@pytest.mark.parametrize("variant", VARIANTS[:3], ids=IDS[:3])
def test_without_the_grid_barrier_results_are_wrong(tiles, monkeypatch, variant):
    """Mutation check: the same kernels with _sync's cross-program wait removed."""
    cell, kw = variant
    tiles(32, 16, 16)

    @triton.jit
    def no_grid_sync(sync, phase, GRID_SYNC: triton.language.constexpr):
        triton.language.debug_barrier()

    monkeypatch.setattr(recurrence, "_sync", no_grid_sync)
    with concurrent_programs("forward"), pytest.raises(AssertionError):
        check_against_reference("triton", cell, make_inputs(cell, 4, 20, 40, reverse=True, **kw))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("B,H", [(1, 200), (16, 768), (64, 1024)])
def test_persistent_on_gpu(monkeypatch, variant, B, H):
    """On a device: auto picks the persistent kernels for these sizes (grid <= SM count), and
    they match the reference forward and backward."""
    cell, kw = variant
    chosen = []
    real = launch.choose_mode
    monkeypatch.setattr(launch, "choose_mode", lambda *a: chosen.append(real(*a)) or chosen[-1])
    check_against_reference("triton", cell, make_inputs(cell, 6, B, H, device="cuda", lengths=True, **kw))
    assert launch.PERSISTENT in chosen, chosen
