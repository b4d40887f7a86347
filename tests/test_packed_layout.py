"""A PackedSequence's padded layout (fusedrnn/packed.py): the C++ op fusedrnn::packed_layout
against its torch spec (layout_torch) and against pack_padded_sequence's own packing, opcheck,
and the batch_sizes both reject, which torch.nn reads without an error or with an accidental
one. (The modules' packed results against torch.nn: test_modules.py, test_random_configs.py.)"""
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fusedrnn
from fusedrnn import packed
from op_harness import backend_or_skip


@pytest.fixture
def cpp():
    backend_or_skip("cpu")  # the op's kernel is in the cpu backend's extension
    return lambda bs: torch.ops.fusedrnn.packed_layout.default(bs)


def _random_lengths(B, T):
    lengths = torch.randint(1, T + 1, (B,))
    lengths[torch.randint(B, ())] = T
    return lengths


@pytest.mark.parametrize("B,T", [(1, 1), (1, 9), (5, 1), (7, 6), (33, 40), (64, 3)])
def test_layout_is_pack_padded_sequences_packing(B, T, cpp):
    """pad(data) puts each packed row where pack_padded_sequence took it from (in the packed
    order, sorted_indices), zeros elsewhere; lengths are the sorted lengths; the C++ op and
    the torch spec agree exactly."""
    lengths = _random_lengths(B, T)
    x = torch.randn(T, B, 3)
    p = pack_padded_sequence(x, lengths, enforce_sorted=False)
    got_c, got_t = cpp(p.batch_sizes), packed.layout_torch(p.batch_sizes)
    for a, b in zip(got_c, got_t):
        assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b)
    xp, L, rows = packed.pad(p.data, p.batch_sizes)
    want_x = x[:, p.sorted_indices]
    sorted_lengths = lengths[p.sorted_indices]
    if bool((lengths == T).all()):
        assert L is None and rows is None
    else:
        assert torch.equal(L, sorted_lengths)
        assert torch.equal(rows, got_c[1])
        assert torch.equal(p.data, xp.reshape(T * B, -1)[rows])
    running = torch.arange(T).unsqueeze(1) < sorted_lengths  # [T, B]
    assert torch.equal(xp, torch.where(running.unsqueeze(-1), want_x, 0.0))


@pytest.mark.parametrize("bs,B,N", [([], 0, 0), ([0], 0, 0), ([3, 3, 3], 3, 9), ([2, 0], 2, 2), ([4, 2, 2, 1], 4, 9)])
def test_layout_edge_cases(bs, B, N, cpp):
    bs = torch.tensor(bs, dtype=torch.int64)
    for lengths, rows in (cpp(bs), packed.layout_torch(bs)):
        assert lengths.shape == (B,) and rows.shape == (N,)
        assert int(lengths.sum()) == N  # each packed row is one step of one sequence
        assert torch.equal(rows.unique(), rows)  # distinct, ascending


BAD = [[2, 3], [3, 1, 2], [2, -1], [2, 0, 1], [-1]]


@pytest.mark.parametrize("bs", BAD, ids=str)
def test_layout_rejects_what_packing_never_makes(bs, cpp):
    for f in (cpp, packed.layout_torch):
        with pytest.raises(RuntimeError, match="batch_sizes must be non-negative and non-increasing"):
            f(torch.tensor(bs))


def test_layout_op_opcheck_and_argument_errors(cpp):
    torch.library.opcheck(torch.ops.fusedrnn.packed_layout.default, (torch.tensor([5, 4, 4, 2, 1]),))
    for bad in (torch.tensor([3.0, 2.0]), torch.tensor([[3, 2]]), torch.tensor([3, 2], dtype=torch.int32)):
        with pytest.raises(RuntimeError, match="batch_sizes must be a 1-D int64 CPU tensor"):
            packed.layout(bad)
        with pytest.raises(RuntimeError, match="batch_sizes must be a 1-D int64 CPU tensor"):
            cpp(bad)


MODULE_BACKENDS = ["cpu", "reference"]


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
@pytest.mark.parametrize("bs", BAD[:4], ids=str)
def test_modules_reject_malformed_batch_sizes(bs, backend):
    """torch.nn raises an accident of its internals for some of these and returns a result
    for [2, 0, 1]; fusedrnn says what is wrong, never a wrong result."""
    backend_or_skip(backend)
    data = torch.randn(max(sum(bs), 1), 3)
    for cls in (fusedrnn.LSTM, fusedrnn.GRU, fusedrnn.RNN):
        with pytest.raises(RuntimeError, match="batch_sizes must be non-negative and non-increasing"):
            cls(3, 4, backend=backend)(PackedSequence(data[:max(sum(bs), 0)], torch.tensor(bs)))


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
def test_modules_reject_data_batch_sizes_mismatch(backend):
    backend_or_skip(backend)
    with pytest.raises(RuntimeError, match="data has 5 rows, its batch_sizes sum to 6"):
        fusedrnn.GRU(3, 4, backend=backend)(PackedSequence(torch.randn(5, 3), torch.tensor([3, 2, 1])))


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
def test_empty_batch_as_torch_nn(backend):
    """batch_sizes [0] (a batch of no sequences) runs in torch.nn: an empty output and
    empty states; [] raises torch.nn's own IndexError."""
    backend_or_skip(backend)
    for cls in ("LSTM", "GRU", "RNN"):
        ref, mine = getattr(torch.nn, cls)(3, 4), getattr(fusedrnn, cls)(3, 4, backend=backend)
        p = PackedSequence(torch.randn(0, 3), torch.tensor([0]))
        (y, h), (y_ref, h_ref) = mine(p), ref(p)
        assert y.data.shape == y_ref.data.shape == (0, 4)
        for a, b in zip(*((s,) if torch.is_tensor(s) else s for s in (h, h_ref))):
            assert a.shape == b.shape
        with pytest.raises(IndexError) as want:
            ref(PackedSequence(torch.randn(0, 3), torch.tensor([], dtype=torch.int64)))
        with pytest.raises(IndexError) as got:
            mine(PackedSequence(torch.randn(0, 3), torch.tensor([], dtype=torch.int64)))
        assert str(got.value) == str(want.value)


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_torch_layout_runs_the_modules_alike(cell, monkeypatch):
    """Where the C++ op does not run (no extension, or under torch.compile), the torch spec
    lays out the batch: the same outputs and gradients, bit for bit."""
    backend_or_skip("cpu")
    m = getattr(fusedrnn, cell)(5, 6, num_layers=2, bidirectional=True, backend="cpu").double()
    x = torch.randn(7, 4, 5, dtype=torch.float64, requires_grad=True)

    def run():
        y, _ = m(pack_padded_sequence(x, torch.tensor([3, 7, 1, 5]), enforce_sorted=False))
        return [y.data] + list(torch.autograd.grad(y.data.square().sum(), [x, *m.parameters()]))

    with_op = run()
    monkeypatch.setattr(packed, "layout", packed.layout_torch)
    for a, b in zip(with_op, run()):
        assert torch.equal(a, b)
