"""Module-level comparison of fusedrnn.X(backend=...) against torch.nn.X with shared weights.

Used by the module tests of every backend: forward outputs and states, then the
gradients of every parameter, of the input and of hx after one backward.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn

TORCH = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
FUSED = {"lstm": fusedrnn.LSTM, "gru": fusedrnn.GRU, "rnn": fusedrnn.RNN}
INPUT_KINDS = ("batched", "unbatched", "packed_sorted", "packed_unsorted")


def make_pair(cell, backend, *, dtype=torch.float64, device="cpu", init_range=0.6, **cfg):
    """(torch.nn module, fusedrnn module) with identical weights, both in eval mode.

    init_range: weights uniform in +-init_range (larger than torch's default at
    tiny sizes, so every gate is exercised); None keeps torch's init (1/sqrt(H)),
    which keeps long low-precision runs well conditioned.
    """
    ref = TORCH[cell](**cfg).to(device=device, dtype=dtype)
    if init_range is not None:
        with torch.no_grad():
            for p in ref.parameters():
                p.uniform_(-init_range, init_range)
    ours = FUSED[cell](**cfg, backend=backend).to(device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref.eval(), ours.eval()


def make_input(kind, cfg, *, T=5, B=3, dtype=torch.float64, device="cpu"):
    """(input for the module, leaf tensor whose gradient is compared, batch size)."""
    I, bf = cfg["input_size"], cfg.get("batch_first", False)
    if kind == "unbatched":
        x = torch.randn(T, I, dtype=dtype, device=device, requires_grad=True)
        return x, x, None
    x = torch.randn(*((B, T) if bf else (T, B)), I, dtype=dtype, device=device, requires_grad=True)
    if kind == "batched":
        return x, x, B
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    if kind == "packed_sorted":
        lengths = lengths.sort(descending=True).values
    packed = pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=(kind == "packed_sorted"))
    return packed, x, B


def make_hx(cell, cfg, B, *, dtype=torch.float64, device="cpu"):
    D = 2 if cfg.get("bidirectional") else 1
    L = cfg.get("num_layers", 1)
    H = cfg["hidden_size"]
    P = cfg.get("proj_size", 0) or H
    lead = (L * D,) if B is None else (L * D, B)
    h = torch.randn(*lead, P, dtype=dtype, device=device, requires_grad=True)
    if cell == "lstm":
        return (h, torch.randn(*lead, H, dtype=dtype, device=device, requires_grad=True))
    return h


def _flat(out):
    """Output tensors of a module call, in order (output data, h_n[, c_n])."""
    y, st = out
    y = y.data if isinstance(y, nn.utils.rnn.PackedSequence) else y
    return [y] + (list(st) if isinstance(st, tuple) else [st])


def compare_modules(cell, backend, cfg, input_kind, hx_given, *, dtype=torch.float64, atol=1e-10, rtol=1e-10,
                    device="cpu", T=5, B=3, init_range=0.6):
    ref, ours = make_pair(cell, backend, dtype=dtype, device=device, init_range=init_range, **cfg)
    inp, leaf, b = make_input(input_kind, cfg, T=T, B=B, dtype=dtype, device=device)
    hx = make_hx(cell, cfg, b, dtype=dtype, device=device) if hx_given else None
    want = _flat(ref(inp, hx))
    got = _flat(ours(inp, hx))
    assert ours.last_backend == backend or backend == "auto", (ours.last_backend, ours.last_backend_reason)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, (i, g.shape, w.shape, g.dtype, w.dtype)
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"output {i}: {m}")
    # One backward with random output gradients; compare every gradient.
    seeds = [torch.randn_like(w) for w in want]
    hx_leaves = [] if hx is None else (list(hx) if isinstance(hx, tuple) else [hx])
    leaves_ref = [leaf] + hx_leaves + list(ref.parameters())
    leaves_ours = [leaf] + hx_leaves + list(ours.parameters())
    g_ref = torch.autograd.grad(want, leaves_ref, seeds, allow_unused=True, retain_graph=True)
    g_ours = torch.autograd.grad(got, leaves_ours, seeds, allow_unused=True)
    names = ["input"] + [f"hx[{i}]" for i in range(len(hx_leaves))] + [n for n, _ in ref.named_parameters()]
    for n, a, b_ in zip(names, g_ours, g_ref):
        assert (a is None) == (b_ is None), n
        if a is not None:
            torch.testing.assert_close(a, b_, atol=atol, rtol=rtol, msg=lambda m: f"grad {n}: {m}")
