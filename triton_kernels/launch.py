"""Host side of the Triton recurrences: buffers, grid, one launch per time step.

Each function implements one op of the contract in fusedrnn/reference.py (same
arguments, same results, same saved tensors) with the kernels of recurrence.py.
`wrap` is applied to every kernel before launch: torch.library.wrap_triton inside
the registered triton_op (so torch.compile sees the kernels), identity otherwise.
`blocks` overrides the tile sizes (tests use it to exercise several grid shapes).

All recurrent state lives in fp32 buffers (h ping-pong pair, c, dh, dc);
half inputs give half y / h_n / c_n / grads and fp32 saved tensors, like the reference.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fusedrnn._debug import new_output
from fusedrnn.reference import flip_within_lengths, previous_states

from . import recurrence as K

HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Blocks:
    BLOCK_B: int   # batch rows per program (>= 16: tl.dot's minimum tile)
    BLOCK_H: int   # hidden units per program (all gate rows of each unit)
    BLOCK_K: int   # reduction chunk of the recurrent matmul


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# Programs wanted per launch so that a small batch still spreads over the GPU
# (an H100 has 132 SMs; more than one program per SM hides load latency).
TARGET_PROGRAMS = 256


# Up to this hidden size one program owns all hidden units of its batch rows and the
# whole time loop runs inside one launch (the *_seq kernels); see DESIGN.md.
SEQ_MAX_H = 64


def default_blocks(B: int, H: int) -> Blocks:
    """Tile sizes.

    H <= SEQ_MAX_H: one hidden tile (grid (1, cdiv(B, 16))), so the time-loop kernels apply.
    Otherwise: batch tile as small as tl.dot allows for small batches (the weights are
    re-read once per batch tile, so larger batches get larger tiles, up to 64), then the
    largest hidden tile (16..64) that still gives about TARGET_PROGRAMS programs."""
    if H <= SEQ_MAX_H:
        h = max(16, _pow2(H))
        return Blocks(16, h, h)
    bb = min(64, max(16, _pow2(B)))
    nb = -(-B // bb)
    bh = 64
    while bh > 16 and nb * -(-H // bh) < TARGET_PROGRAMS:
        bh //= 2
    return Blocks(bb, bh, 64)


# How a call runs: "step" (one launch per time step), "seq" (one launch, one hidden tile
# per batch tile, the *_seq kernels) or "persistent" (one launch, the *_seq kernels with a
# grid barrier per step across the hidden tiles; needs every program resident at once).
STEP, SEQ, PERSISTENT = "step", "seq", "persistent"

# Set by tests/triton_concurrency.py while the interpreter runs a launch's programs
# concurrently; the sequential interpreter would spin forever in a grid barrier.
CONCURRENT_INTERPRETER = False


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def persistent_blocks(B: int, H: int, n_sm: int) -> Blocks | None:
    """Tiles for the persistent kernels: as default_blocks, but at most one program per SM
    (all must be resident for the grid barrier); None if even 64-unit tiles need more."""
    bb = min(64, max(16, _pow2(B)))
    nb = -(-B // bb)
    bh = 16
    while bh < 64 and nb * -(-H // bh) > n_sm:
        bh *= 2
    return Blocks(bb, bh, 64) if nb * -(-H // bh) <= n_sm else None


def choose_mode(T: int, grid: tuple, device: torch.device, time_loop: bool | None) -> str:
    """STEP, SEQ or PERSISTENT for a call on `grid`. time_loop None: the fastest possible;
    True: a one-launch mode (raises if impossible); False: STEP."""
    if time_loop is False or T == 0:
        return STEP
    if grid[0] == 1:
        return SEQ
    if interpreting():
        possible = CONCURRENT_INTERPRETER
        why = "the interpreter runs programs one after the other (tests/triton_concurrency.py runs them concurrently)"
    else:
        possible = device.type == "cuda" and grid[0] * grid[1] <= _sm_count(device)
        why = f"{grid[0] * grid[1]} programs exceed the device's SM count"
    if possible and time_loop:
        return PERSISTENT
    if time_loop:
        raise ValueError(f"fusedrnn triton: no one-launch mode for {grid[0]} hidden tiles: {why}")
    return PERSISTENT if possible else STEP


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_TF32: dict = {}


def tf32_tensor_cores(device: torch.device) -> bool:
    """Whether the CUDA device has TF32 tensor cores (compute capability 8.0+), asked once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _TF32:
        _TF32[index] = torch.cuda.get_device_capability(index)[0] >= 8
    return _TF32[index]


def dot_flags(dtype: torch.dtype, device: torch.device, precision: str | None = None) -> dict:
    """PREC / RTNE_BF16 of the kernels for one call (see recurrence.py).

    PREC: fp32 inputs use "ieee" (exact fp32 products, parity with the reference)
    unless torch allows TF32 matmuls (torch.get_float32_matmul_precision() !=
    "highest"): the GPU's own setting. Half inputs use "tf32" on the GPU: their
    weights are exact in tf32, only the fp32 state operand is rounded to 10 bits,
    far below the half dtype's own error. `precision` overrides.
    RTNE_BF16: the interpreter twin of the GPU's rounding of bf16 outputs.
    TF32 needs Ampere's tensor cores: "ieee" on older GPUs (e.g. a T4)."""
    if precision is None:
        tf32_ok = dtype in HALF or torch.get_float32_matmul_precision() != "highest"
        precision = "tf32" if device.type == "cuda" and tf32_ok and tf32_tensor_cores(device) else "ieee"
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"fusedrnn triton: precision must be 'ieee' or 'tf32', not {precision!r}")
    return dict(PREC=precision, RTNE_BF16=dtype == torch.bfloat16 and interpreting())


def _identity(kernel):
    return kernel


def _setup(gx, h0, w_hh, lengths, gates_per_unit, blocks, precision, time_loop, P=None):
    """(T, B, H, grid, meta, mode, sync): sizes, tiles, kernel flags, how to run (STEP, SEQ,
    PERSISTENT; LSTM projection: always STEP) and the zeroed grid-barrier counters."""
    T, B, G = gx.shape
    H = G // gates_per_unit
    Pd = P or H
    if h0.shape[1] != Pd or w_hh.shape != (G, Pd):
        raise ValueError(f"fusedrnn triton: expected h0 [B,{Pd}] and w_hh [{G},{Pd}], "
                         f"got {tuple(h0.shape)} and {tuple(w_hh.shape)}")
    blk = blocks
    if blk is None and P is None and H > SEQ_MAX_H and time_loop is not False and gx.is_cuda and not interpreting():
        blk = persistent_blocks(B, H, _sm_count(gx.device))
    blk = blk or default_blocks(B, H)
    grid = (triton_cdiv(H, blk.BLOCK_H), triton_cdiv(B, blk.BLOCK_B))
    meta = dict(HAS_LEN=lengths is not None, BLOCK_B=blk.BLOCK_B, BLOCK_H=blk.BLOCK_H, BLOCK_K=blk.BLOCK_K,
                **dot_flags(gx.dtype, gx.device, precision))
    mode = STEP if P is not None else choose_mode(T, grid, gx.device, time_loop)
    sync = torch.zeros(grid[1] if mode == PERSISTENT else 1, dtype=torch.int32, device=gx.device)
    return T, B, H, grid, meta, mode, sync


def _proj_grid(P, grid, meta):
    """Grid of the kernels that split the P projected outputs (same tiles as the hidden split)."""
    return (triton_cdiv(P, meta["BLOCK_H"]), grid[1])


def _no_rounding(meta):
    return {k: v for k, v in meta.items() if k != "RTNE_BF16"}


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _shaped(like, *shape):
    """A [shape] tensor of like's dtype and device holding one element (expanded): what
    _setup reads from gx (shape, dtype, device) when the backward has no gx."""
    return like.new_empty((1,) * len(shape)).expand(*shape)


def _c(x):
    return None if x is None else x.contiguous()


def _len_arg(lengths, ref):
    # The kernels need a pointer even when HAS_LEN is False (never dereferenced).
    return lengths.contiguous() if lengths is not None else ref


def _f32_state(x):
    return x.detach().to(torch.float32, copy=True).contiguous()


def _hbuf(h0):
    """[2, B, H] fp32 ping-pong state of the time-loop kernels, h0 in slot 0."""
    buf = new_output(2, *h0.shape, dtype=torch.float32, device=h0.device)  # slot 1: written before read
    buf[0] = h0
    return buf


# ============================================================================ forward
def _saved_outputs(train, gx, *shapes):
    """The saved tensors of a forward launch (fp32), and the pointers its kernels get for
    them: without train (inference) empty tensors, and gx as a placeholder that SAVE=False
    kernels never write."""
    if train:
        out = [new_output(*s, dtype=torch.float32, device=gx.device) for s in shapes]
        return out, out
    return [gx.new_empty(0, dtype=torch.float32) for _ in shapes], [gx for _ in shapes]


def lstm_forward(gx, h0, c0, w_hh, w_hr, lengths, reverse, train=True, *, blocks=None, precision=None,
                 time_loop=None, wrap=_identity):
    gx, h0, c0, w_hh, w_hr = _c(gx), _c(h0), _c(c0), _c(w_hh), _c(w_hr)
    P = w_hr.shape[0] if w_hr is not None else None
    T, B, H, grid, meta, mode, sync = _setup(gx, h0, w_hh, lengths, 4, blocks, precision, time_loop, P)
    Pd = P or H
    dev, dt = gx.device, gx.dtype
    y = new_output(T, B, Pd, dtype=dt, device=dev)
    (gates, cells), (gates_p, cells_p) = _saved_outputs(train, gx, (T, B, 4 * H), (T, B, H))
    c = _f32_state(c0)
    L = _len_arg(lengths, gx)
    if mode != STEP:
        hbuf = _hbuf(h0)
        wrap(K.lstm_forward_seq)[grid](gx, hbuf, c, w_hh, y, gates_p, cells_p, L, sync, T, B, H, REVERSE=reverse,
                                       GRID_SYNC=mode == PERSISTENT, SAVE=train, **meta)
        return y, hbuf[T % 2].to(dt, copy=True), c.to(dt), gates, cells
    h_a, h_b = _f32_state(h0), torch.empty(B, Pd, dtype=torch.float32, device=dev)
    hr = torch.empty(B, H, dtype=torch.float32, device=dev) if P else gx  # unprojected h (scratch)
    kernel = wrap(K.lstm_forward_step)
    project = wrap(K.lstm_project_step)
    for s in range(T):
        kernel[grid](gx, h_a, h_b, c, w_hh, y, gates_p, cells_p, hr, L, s, T, B, H, Pd, HAS_PROJ=P is not None,
                     REVERSE=reverse, SAVE=train, **meta)
        if P:
            project[_proj_grid(P, grid, meta)](hr, w_hr, h_a, h_b, y, L, s, T, B, H, P, REVERSE=reverse, **meta)
        h_a, h_b = h_b, h_a
    return y, h_a.to(dt), c.to(dt), gates, cells


def gru_forward(gx, h0, w_hh, b_hh, lengths, reverse, train=True, *, blocks=None, precision=None, time_loop=None,
                wrap=_identity):
    gx, h0, w_hh, b_hh = _c(gx), _c(h0), _c(w_hh), _c(b_hh)
    T, B, H, grid, meta, mode, sync = _setup(gx, h0, w_hh, lengths, 3, blocks, precision, time_loop)
    dev, dt = gx.device, gx.dtype
    y = new_output(T, B, H, dtype=dt, device=dev)
    (gates, hn), (gates_p, hn_p) = _saved_outputs(train, gx, (T, B, 3 * H), (T, B, H))
    L = _len_arg(lengths, gx)
    if mode != STEP:
        hbuf = _hbuf(h0)
        wrap(K.gru_forward_seq)[grid](gx, hbuf, w_hh, b_hh if b_hh is not None else gx, y, gates_p, hn_p, L, sync,
                                      T, B, H, HAS_BIAS=b_hh is not None, REVERSE=reverse,
                                      GRID_SYNC=mode == PERSISTENT, SAVE=train, **meta)
        return y, hbuf[T % 2].to(dt, copy=True), gates, hn
    h_a, h_b = _f32_state(h0), torch.empty(B, H, dtype=torch.float32, device=dev)
    kernel = wrap(K.gru_forward_step)
    for s in range(T):
        kernel[grid](gx, h_a, h_b, w_hh, b_hh if b_hh is not None else gx, y, gates_p, hn_p, L, s, T, B, H,
                     HAS_BIAS=b_hh is not None, REVERSE=reverse, SAVE=train, **meta)
        h_a, h_b = h_b, h_a
    return y, h_a.to(dt), gates, hn


def rnn_forward(gx, h0, w_hh, lengths, reverse, relu, *, blocks=None, precision=None, time_loop=None,
                 wrap=_identity):
    gx, h0, w_hh = _c(gx), _c(h0), _c(w_hh)
    T, B, H, grid, meta, mode, sync = _setup(gx, h0, w_hh, lengths, 1, blocks, precision, time_loop)
    dev, dt = gx.device, gx.dtype
    y = new_output(T, B, H, dtype=dt, device=dev)
    L = _len_arg(lengths, gx)
    if mode != STEP:
        hbuf = _hbuf(h0)
        wrap(K.rnn_forward_seq)[grid](gx, hbuf, w_hh, y, L, sync, T, B, H, RELU=relu, REVERSE=reverse,
                                      GRID_SYNC=mode == PERSISTENT, **meta)
        return y, hbuf[T % 2].to(dt, copy=True)
    h_a, h_b = _f32_state(h0), torch.empty(B, H, dtype=torch.float32, device=dev)
    kernel = wrap(K.rnn_forward_step)
    for s in range(T):
        kernel[grid](gx, h_a, h_b, w_hh, y, L, s, T, B, H, RELU=relu, REVERSE=reverse, **meta)
        h_a, h_b = h_b, h_a
    return y, h_a.to(dt)


# ============================================================================ backward
def _backward_launches(kernel, seq_kernel, grid, T, mode, wrap, run):
    """Time-loop kernel (one launch: SEQ, PERSISTENT), or per-step kernels: launch
    s = T-1 .. 0 (POINTWISE, and MATMUL for s < T-1), then the MATMUL-only launch
    s = -1 that turns dpre_0 into grad_h0."""
    if mode != STEP:
        run(wrap(seq_kernel)[grid], None, GRID_SYNC=mode == PERSISTENT)
        return
    k = wrap(kernel)[grid]
    for s in range(T - 1, -2, -1):
        run(k, s, MATMUL=s < T - 1, POINTWISE=s >= 0)


def _args(s, T, sync):
    """The kernels' (step, T) arguments; the time-loop kernels take (grid-barrier counters, T)."""
    return (sync, T) if s is None else (s, T)


def _h_prev_all(y, h0, lengths, reverse):
    """[T,B,H] fp32: the state each (original-time) step started from, for the weight GEMM."""
    y = y.to(torch.float32)
    h0 = h0.to(torch.float32)
    if not reverse:
        return previous_states(y, h0)
    return flip_within_lengths(previous_states(flip_within_lengths(y, lengths), h0), lengths)


def _weight_grad(d, h_prev):
    """sum over (t, b) of d[t,b,:]^T h_prev[t,b,:] (padded steps have d = 0)."""
    if d.shape[0] == 0:
        return d.new_zeros(d.shape[-1], h_prev.shape[-1])
    return d.reshape(-1, d.shape[-1]).t() @ h_prev.reshape(-1, h_prev.shape[-1])


def lstm_backward(grad_y, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, lengths, reverse, y, gates, cells,
                  *, blocks=None, precision=None, time_loop=None, wrap=_identity):
    grad_y, h0, c0, w_hh, w_hr, y, gates, cells = map(_c, (grad_y, h0, c0, w_hh, w_hr, y, gates, cells))
    T, B, G = gates.shape
    H = G // 4
    P = w_hr.shape[0] if w_hr is not None else None
    _, _, _, grid, meta, mode, sync = _setup(_shaped(h0, T, B, G), h0, w_hh, lengths, 4,
                                             blocks, precision, time_loop, P)
    dt = h0.dtype
    dh, dc = _f32_state(grad_h_n), _f32_state(grad_c_n)
    dpre = new_output(T, B, G, dtype=torch.float32, device=gates.device)
    L = _len_arg(lengths, gates)
    if P is None:
        _backward_launches(K.lstm_backward_step, K.lstm_backward_seq, grid, T, mode, wrap, lambda k, s, **f: k(
            grad_y, dh, dc, dpre, w_hh, gates, cells, c0, L, *_args(s, T, sync), B, H, REVERSE=reverse, **f,
            **meta))
        grad_w_hr = w_hh.new_zeros(0)
    else:
        dhs = new_output(T, B, P, dtype=torch.float32, device=gates.device)  # dL/dh_t (projected)
        m = _no_rounding(meta)
        k_dh = wrap(K.lstm_proj_dh_step)[_proj_grid(P, grid, meta)]
        k_cell = wrap(K.lstm_proj_cell_backward_step)[grid]
        for s in range(T - 1, -2, -1):
            k_dh(grad_y, dh, dhs, dpre, w_hh, L, s, T, B, H, P, MATMUL=s < T - 1, POINTWISE=s >= 0,
                 REVERSE=reverse, **m)
            if s >= 0:
                k_cell(dhs, w_hr, dc, dpre, gates, cells, c0, L, s, T, B, H, P, REVERSE=reverse, **m)
        hr = gates[..., 3 * H:] * torch.tanh(cells)  # unprojected h_t, 0 at padded steps
        grad_w_hr = _weight_grad(dhs, hr).to(dt)
    grad_w_hh = _weight_grad(dpre, _h_prev_all(y, h0, lengths, reverse))
    return dpre.to(dt), dh.to(dt), dc.to(dt), grad_w_hh.to(dt), grad_w_hr


def gru_backward(grad_y, grad_h_n, h0, w_hh, b_hh, lengths, reverse, y, gates, hn,
                 *, blocks=None, precision=None, time_loop=None,
                 wrap=_identity):
    grad_y, h0, w_hh, y, gates, hn = map(_c, (grad_y, h0, w_hh, y, gates, hn))
    T, B, G = gates.shape
    H = G // 3
    _, _, _, grid, meta, mode, sync = _setup(_shaped(h0, T, B, G), h0, w_hh, lengths, 3,
                                             blocks, precision, time_loop)
    dt = h0.dtype
    dh = _f32_state(grad_h_n)
    dgx = new_output(T, B, G, dtype=torch.float32, device=gates.device)
    dgh = new_output(T, B, G, dtype=torch.float32, device=gates.device)
    L = _len_arg(lengths, gates)
    _backward_launches(K.gru_backward_step, K.gru_backward_seq, grid, T, mode, wrap, lambda k, s, **f: k(
        grad_y, dh, dgx, dgh, w_hh, gates, hn, h0, y, L, *_args(s, T, sync), B, H, REVERSE=reverse, **f, **meta))
    grad_w_hh = _weight_grad(dgh, _h_prev_all(y, h0, lengths, reverse))
    grad_b_hh = dgh.sum((0, 1)).to(dt) if b_hh is not None else w_hh.new_zeros(0)
    return dgx.to(dt), dh.to(dt), grad_w_hh.to(dt), grad_b_hh


def rnn_backward(grad_y, grad_h_n, h0, w_hh, lengths, reverse, relu, y,
                 *, blocks=None, precision=None, time_loop=None,
                 wrap=_identity):
    grad_y, h0, w_hh, y = map(_c, (grad_y, h0, w_hh, y))
    T, B, H = y.shape
    _, _, _, grid, meta, mode, sync = _setup(_shaped(h0, T, B, H), h0, w_hh, lengths, 1, blocks, precision,
                                             time_loop)
    dt = h0.dtype
    dh = _f32_state(grad_h_n)
    dpre = new_output(T, B, H, dtype=torch.float32, device=y.device)
    L = _len_arg(lengths, y)
    _backward_launches(K.rnn_backward_step, K.rnn_backward_seq, grid, T, mode, wrap, lambda k, s, **f: k(
        grad_y, dh, dpre, w_hh, y, L, *_args(s, T, sync), B, H, RELU=relu, REVERSE=reverse, **f, **meta))
    grad_w_hh = _weight_grad(dpre, _h_prev_all(y, h0, lengths, reverse))
    return dpre.to(dt), dh.to(dt), grad_w_hh.to(dt)
