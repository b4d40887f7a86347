"""Bad input: fusedrnn raises what torch.nn raises.

"same": same exception type and the same message.
"clear": torch.nn's error there is an accident of its internals (IndexError,
AttributeError, 'get_mkldnn_dtype', 'mat1 and mat2'); ours is an instance of
the same exception type with a message that says what was expected.
"""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import fusedrnn

T, B, I, H = 5, 2, 3, 4
X = torch.randn(T, B, I)
PK = pack_sequence([torch.randn(4, I), torch.randn(2, I)])


def h(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# (id, cell, constructor kwargs, call(module), mode, regex for ours in "clear" mode)
CASES = [
    ("input_4d", "lstm", {}, lambda m: m(torch.randn(T, B, I, 1)), "same", None),
    ("input_4d_gru", "gru", {}, lambda m: m(torch.randn(T, B, I, 1)), "same", None),
    ("input_4d_rnn", "rnn", {}, lambda m: m(torch.randn(T, B, I, 1)), "same", None),
    ("input_1d", "lstm", {}, lambda m: m(torch.randn(I)), "same", None),
    ("input_size", "lstm", {}, lambda m: m(torch.randn(T, B, I + 1)), "same", None),
    ("input_size_gru", "gru", {}, lambda m: m(torch.randn(T, B, I + 1)), "same", None),
    ("input_dtype_int", "lstm", {}, lambda m: m(torch.ones(T, B, I, dtype=torch.long)), "same", None),
    ("input_dtype_f64", "rnn", {}, lambda m: m(X.double()), "same", None),
    ("batched_2d_hx", "gru", {}, lambda m: m(X, h(B, H)), "same", None),
    ("unbatched_3d_hx", "gru", {}, lambda m: m(X[:, 0], h(1, 1, H)), "same", None),
    ("batched_2d_hx_lstm", "lstm", {}, lambda m: m(X, (h(B, H), h(B, H))), "same", None),
    ("unbatched_3d_hx_lstm", "lstm", {}, lambda m: m(X[:, 0], (h(1, 1, H), h(1, 1, H))), "same", None),
    ("hidden_size", "gru", {}, lambda m: m(X, h(1, B, H + 1)), "same", None),
    ("hidden_batch", "rnn", {}, lambda m: m(X, h(1, B + 1, H)), "same", None),
    ("hidden_layers", "gru", {"num_layers": 2}, lambda m: m(X, h(1, B, H)), "same", None),
    ("hidden_directions", "lstm", {"bidirectional": True}, lambda m: m(X, (h(1, B, H), h(1, B, H))), "same", None),
    ("cell_size", "lstm", {}, lambda m: m(X, (h(1, B, H), h(1, B, H + 1))), "same", None),
    ("proj_hidden_size", "lstm", {"proj_size": 2}, lambda m: m(X, (h(1, B, H), h(1, B, H))), "same", None),
    ("seq_len_0", "lstm", {}, lambda m: m(torch.randn(0, B, I)), "same", None),
    ("seq_len_0_gru", "gru", {}, lambda m: m(torch.randn(0, B, I)), "same", None),
    ("packed_hidden_size", "gru", {}, lambda m: m(PK, h(1, 3, H)), "same", None),
    ("lstm_hx_tensor", "lstm", {}, lambda m: m(X, h(1, B, H)), "clear", r"hx must be a tuple \(h_0, c_0\)"),
    ("lstm_hx_three", "lstm", {}, lambda m: m(X, (h(1, B, H),) * 3), "clear", "lstm expects two hidden states"),
    ("lstm_hx_dtype", "lstm", {}, lambda m: m(X, (h(1, B, H, dtype=torch.float64), h(1, B, H))), "clear",
     r"Expected hx\[0\] to have dtype torch.float32"),
    ("gru_hx_dtype", "gru", {}, lambda m: m(X, h(1, B, H, dtype=torch.float64)), "clear", "Expected hx to have dtype"),
    ("gru_hx_tuple", "gru", {}, lambda m: m(X, (h(1, B, H),)), "clear", "hx must be a torch.Tensor, got tuple"),
    ("input_list", "lstm", {}, lambda m: m([1.0, 2.0]), "clear", "input must be a torch.Tensor, got list"),
    ("packed_input_size", "lstm", {}, lambda m: m(pack_sequence([torch.randn(4, I + 2), torch.randn(2, I + 2)])),
     "clear",
     "input.size\\(-1\\) must be equal to input_size"),
    ("packed_dtype_lstm", "lstm", {}, lambda m: m(pack_sequence([torch.randn(4, I).double()])), "clear",
     "does not match weight dtype"),
    ("packed_hidden_lstm", "lstm", {}, lambda m: m(PK, (h(1, 3, H), h(1, 3, H))), "clear",
     r"Expected hidden\[0\] size \(1, 2, 4\), got \[1, 3, 4\]"),
    # torch.nn's C++ kernel takes a Python bool only: its TypeError lists the overloads
    ("bidirectional_int", "lstm", {"bidirectional": 1}, lambda m: m(X), "clear",
     "bidirectional must be a bool .* got int 1"),
    ("bidirectional_int0_gru", "gru", {"bidirectional": 0}, lambda m: m(X), "clear",
     "bidirectional must be a bool .* got int 0"),
    ("bidirectional_packed_rnn", "rnn", {"bidirectional": 1}, lambda m: m(PK), "clear",
     "bidirectional must be a bool"),
]
CLASSES = {"lstm": (nn.LSTM, fusedrnn.LSTM), "gru": (nn.GRU, fusedrnn.GRU), "rnn": (nn.RNN, fusedrnn.RNN)}


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - we compare whatever was raised
        return e
    return None


@pytest.mark.parametrize("cid,cell,kw,call,mode,regex", CASES, ids=[c[0] for c in CASES])
def test_forward_errors_match_torch_nn(cid, cell, kw, call, mode, regex):
    torch_cls, fused_cls = CLASSES[cell]
    want = _raised(lambda: call(torch_cls(I, H, **kw)))
    got = _raised(lambda: call(fused_cls(I, H, **kw)))
    assert want is not None, "torch.nn accepted this input; the case is wrong"
    assert got is not None, f"fusedrnn accepted input torch.nn rejects with {want!r}"
    assert isinstance(got, type(want)), f"torch.nn raised {type(want).__name__}, fusedrnn {type(got).__name__}: {got}"
    if mode == "same":
        assert str(got) == str(want)
    else:
        assert pytest.importorskip("re").search(regex, str(got)), str(got)


def test_packed_wrong_input_size_rejected_even_where_torch_nn_accepts_it():
    # torch 2.14's CPU nn.LSTM returns a result for a one-sequence packed input
    # with the wrong feature size (its oneDNN path does not check). We refuse it.
    bad = pack_sequence([torch.randn(4, I + 2)])
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        fusedrnn.LSTM(I, H)(bad)


CTOR_CASES = [
    ("dropout_range", "lstm", dict(dropout=1.5)), ("dropout_type", "gru", dict(dropout="x")),
    ("proj_on_gru", "gru", dict(proj_size=2)), ("proj_too_big", "lstm", dict(proj_size=H)),
    ("proj_negative", "lstm", dict(proj_size=-1)), ("hidden_zero", "rnn", dict(hidden_size=0)),
    ("nonlinearity", "rnn", dict(nonlinearity="gelu")), ("layers_zero", "lstm", dict(num_layers=0)),
    ("hidden_float", "gru", dict(hidden_size=4.0)),
]


@pytest.mark.parametrize("cid,cell,kw", CTOR_CASES, ids=[c[0] for c in CTOR_CASES])
def test_constructor_errors_match_torch_nn(cid, cell, kw):
    torch_cls, fused_cls = CLASSES[cell]
    args = {"input_size": I, "hidden_size": H, **kw}
    want = _raised(lambda: torch_cls(**args))
    got = _raised(lambda: fused_cls(**args))
    assert want is not None and got is not None
    assert type(got) is type(want) and str(got) == str(want)


CELL_CASES = [
    ("cell_3d", "lstm", lambda m: m(torch.randn(2, 2, I)), "same", None),
    ("cell_3d_gru", "gru", lambda m: m(torch.randn(2, 2, I)), "same", None),
    ("cell_3d_rnn", "rnn", lambda m: m(torch.randn(2, 2, I)), "same", None),
    ("cell_input_size", "lstm", lambda m: m(torch.randn(2, I + 2)), "same", None),
    ("cell_input_size_gru", "gru", lambda m: m(torch.randn(2, I + 2)), "same", None),
    ("cell_hidden_size", "lstm", lambda m: m(torch.randn(2, I), (h(2, H + 1), h(2, H))), "same", None),
    ("cell_hidden_size_gru", "gru", lambda m: m(torch.randn(2, I), h(2, H + 1)), "same", None),
    ("cell_hidden_batch", "lstm", lambda m: m(torch.randn(2, I), (h(3, H), h(3, H))), "same", None),
    ("cell_hidden_batch_rnn", "rnn", lambda m: m(torch.randn(2, I), h(3, H)), "same", None),
    ("cell_hx_3d", "lstm", lambda m: m(torch.randn(2, I), (h(1, 2, H), h(2, H))), "same", None),
    ("cell_dtype", "lstm", lambda m: m(torch.randn(2, I).double()), "clear", "does not match weight dtype"),
    ("cell_hx_dtype", "gru", lambda m: m(torch.randn(2, I), h(2, H, dtype=torch.float64)), "clear",
     "hx dtype"),
]
CELL_CLASSES = {"lstm": (nn.LSTMCell, fusedrnn.LSTMCell), "gru": (nn.GRUCell, fusedrnn.GRUCell),
                "rnn": (nn.RNNCell, fusedrnn.RNNCell)}


@pytest.mark.parametrize("cid,cell,call,mode,regex", CELL_CASES, ids=[c[0] for c in CELL_CASES])
def test_cell_errors_match_torch_nn(cid, cell, call, mode, regex):
    torch_cls, fused_cls = CELL_CLASSES[cell]
    want = _raised(lambda: call(torch_cls(I, H)))
    got = _raised(lambda: call(fused_cls(I, H)))
    assert want is not None and got is not None, (want, got)
    assert isinstance(got, type(want)), f"torch.nn raised {type(want).__name__}, fusedrnn {type(got).__name__}: {got}"
    if mode == "same":
        assert str(got) == str(want)
    else:
        import re
        assert re.search(regex, str(got)), str(got)
