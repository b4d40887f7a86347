"""The CPU emulation of the CUDA execution model itself (csrc/emulation/): its barriers
catch a missing __syncthreads deterministically, and its warp collectives, atomics, grid
barrier, index builtins and half/bfloat16 conversions behave like CUDA's."""
import pytest
import torch

pytestmark = pytest.mark.emulated

E = pytest.importorskip("fusedrnn._emulated", reason="fusedrnn._emulated is not built")

SCHEDULES = [(0, 12345), (1, 0), (2, 0), (3, 7)]  # alternate, reversed, forward, random


@pytest.fixture(autouse=True)
def _restore_schedule():
    saved = E.get_schedule()
    yield
    E.set_schedule(*saved)


def _neighbor_ref(x, n, iters):
    x = x.view(-1, n).clone()
    for _ in range(iters):
        x = x + x.roll(-1, 1)
    return x.flatten()


@pytest.mark.parametrize("mode,seed", SCHEDULES)
def test_barriers_give_the_right_answer_in_every_schedule(mode, seed):
    E.set_schedule(mode, seed)
    x = torch.randn(3 * 96)
    torch.testing.assert_close(E.selftest_neighbor(x, 3, 96, 4, True, True), _neighbor_ref(x, 96, 4))


@pytest.mark.parametrize("mode,seed", SCHEDULES)
@pytest.mark.parametrize("missing", ["read_after_write", "write_after_read"])
def test_a_missing_barrier_gives_a_wrong_answer_deterministically(mode, seed, missing):
    E.set_schedule(mode, seed)
    x = torch.randn(2 * 64)
    a, b = missing != "read_after_write", missing != "write_after_read"
    out = E.selftest_neighbor(x, 2, 64, 3, a, b)
    want = _neighbor_ref(x, 64, 3)
    assert not torch.allclose(out, want, equal_nan=False), "the race went unnoticed"
    # deterministic: the same schedule gives the same (wrong) bits again
    assert torch.equal(out.nan_to_num(123.0), E.selftest_neighbor(x, 2, 64, 3, a, b).nan_to_num(123.0))


def test_warp_shuffles_and_votes():
    x = torch.randn(4 * 64)
    x[5] = 200.0  # one lane makes __any_sync(x > 100) true in its warp (warp 0)
    xs, ds, bc, pre, ballot, all_any = E.selftest_warp(x)
    w = x.view(-1, 32)
    torch.testing.assert_close(xs.view(-1, 32), w.sum(1, keepdim=True).expand(-1, 32))
    torch.testing.assert_close(ds.view(-1, 32)[:, 0], w.sum(1))
    assert (ds.view(-1, 32)[:, 1:] == 0).all()
    assert torch.equal(bc.view(-1, 32), w[:, 5:6].expand(-1, 32))
    torch.testing.assert_close(pre.view(-1, 32), w.cumsum(1))
    bits = (w > 0).to(torch.int64) << torch.arange(32)
    assert torch.equal(ballot.to(torch.int64) & 0xFFFFFFFF, bits.sum(1) & 0xFFFFFFFF)
    assert (all_any[:, 0] == 1).all()
    assert torch.equal(all_any[:, 1].view(-1, 32)[:, 0], torch.tensor([1, 0, 0, 0, 0, 0, 0, 0], dtype=torch.int32))


def test_atomics():
    n, nbins = 1000, 7
    bins = torch.randint(0, nbins, (n,), dtype=torch.int32)
    vals = torch.randn(n)
    hist, total, mx, cas = E.selftest_atomics(bins, vals, nbins)
    assert torch.equal(hist, torch.bincount(bins, minlength=nbins).to(torch.int32))
    torch.testing.assert_close(total[0], vals.sum(), atol=1e-4, rtol=1e-5)
    assert mx.item() == (bins.to(torch.int64) * 1000 + torch.arange(n) % 1000).max().item()
    assert cas.item() == n


@pytest.mark.parametrize("mode,seed", SCHEDULES)
def test_grid_barrier(mode, seed):
    E.set_schedule(mode, seed)
    x = torch.randn(5 * 32)
    out = E.selftest_grid(x, 5, 32, True)
    torch.testing.assert_close(out, x.sum().expand(160), atol=1e-4, rtol=1e-5)
    wrong = E.selftest_grid(x, 5, 32, False)  # blocks see partials that are not written yet
    assert not torch.allclose(wrong, x.sum().expand(160), equal_nan=False)


def test_index_builtins():
    g, b = [3, 2, 2], [4, 3, 2]
    out = E.selftest_index(g, b)
    nb, nt = 12, 24
    want = (torch.arange(nb)[:, None] * 100000 + torch.arange(nt)[None, :]).flatten().to(torch.int32)
    assert torch.equal(out, want)


def test_half_and_bfloat16_conversions_match_torch():
    x = torch.cat([torch.randn(5000) * 10.0 ** torch.randint(-9, 6, (5000,)).float(),
                   torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e-8, 6e-8, 3e38, float("inf"), -float("inf")])])
    h, bf, hb, bb = E.selftest_convert(x)
    assert torch.equal(h, x.half().view(torch.int16))
    assert torch.equal(bf, x.bfloat16().view(torch.int16))
    assert torch.equal(hb, x.half().float())
    assert torch.equal(bb, x.bfloat16().float())


def test_divergent_barrier_is_reported_not_hung():
    with pytest.raises(RuntimeError, match="deadlock"):
        E.selftest_divergent_barrier()
