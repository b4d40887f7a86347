"""Per-timestep Triton kernels of the LSTM / GRU / RNN recurrences (forward and backward).

Work split (see DESIGN.md next to this file): a launch computes one time step of
the whole batch. Program (pid_h, pid_b) owns hidden units
[pid_h*BLOCK_H, +BLOCK_H) -- all gate rows of those units -- for batch rows
[pid_b*BLOCK_B, +BLOCK_B). It reads the full previous state h_{t-1}[rows, :]
(written by every program of the previous launch) and its own slice of W_hh,
does the recurrent matmul with tl.dot (fp32 accumulation) and the fused
pointwise update (triton_kernels/cells.py). Its pointwise state (c, the
previous h of its own units) is local, so nothing but h crosses programs, and
the launch boundary is the barrier.

Backward launch s fuses two halves that have different cross-program reads:
  MATMUL:    dh[rows, own units] += dpre_{s+1}[rows, :] @ W_hh[:, own units]
             (dpre_{s+1}: every program's result of the previous launch)
  POINTWISE: the cell derivative at step s on the own units -> dpre_s, dc
The first launch (s = T-1) has no MATMUL half, an extra last launch has only it
(it produces grad_h0). Weight gradients are one GEMM over all steps on the host.

Time indexing (lengths / reverse): launch s is the s-th step of every sequence
in its own direction. Row b is active iff s < L[b]; it then works on time index
L[b]-1-s (reverse) or s (forward). An inactive row writes its padded outputs
(zeros) at time index s and leaves its state unchanged, so every (t, b) of the
outputs is written exactly once over the T launches.

Dot precision: the recurrent operand h (or dpre) is kept in fp32 and the weight
tile is upcast to fp32 (exact for fp16/bf16), so every dot is an fp32 dot with
input_precision PREC: "ieee" (exact fp32 products) or "tf32" (tensor cores; h
rounded to a 10-bit mantissa, the weights of half inputs stay exact). The
interpreter computes both exactly.

Interpreter twin: the interpreter can cast fp32 -> bf16 but truncates, where the
GPU rounds to nearest even. RTNE_BF16 (set only under the interpreter for bf16
outputs) rounds with integer ops first, so CI sees the GPU's rounding.
"""
import triton
import triton.language as tl

from . import cells


@triton.jit
def _tile(B, N, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's batch rows and units: grid axis 0 tiles the N units, axis 1 the B rows.
    Returns (rows, rows < B, units, units < N)."""
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rb, rb < B, rn, rn < N


@triton.jit
def _at(t, rb, rn, B, N):
    """Offsets of elements (t[b], b, n) of a [T, B, N] row-major tensor: rows rb, columns rn."""
    return t[:, None] * B * N + rb[:, None] * N + rn[None, :]


@triton.jit
def _rows(s, lengths, rb, mb, T, HAS_LEN: tl.constexpr, REVERSE: tl.constexpr):
    """(active[BLOCK_B], t[BLOCK_B] int64) of logical step s for batch rows rb."""
    if HAS_LEN:
        L = tl.load(lengths + rb, mask=mb, other=0).to(tl.int64)
    else:
        L = tl.zeros_like(rb).to(tl.int64) + T
    active = (s < L) & mb
    if REVERSE:
        t = tl.where(active, L - 1 - s, s)
    else:
        t = tl.zeros_like(L) + s
    return active, t


@triton.jit
def _sync(sync, phase, GRID_SYNC: tl.constexpr):
    """End of a phase (a time step) inside one launch.

    GRID_SYNC False: one program owns all hidden units of its rows, so the program's own
    barrier (__syncthreads) orders a step's writes before the next step's reads.
    GRID_SYNC True: the programs of one batch tile (grid axis 0) exchange h through global
    memory; each adds 1 to the tile's counter (release: its stores are visible first) and
    waits until all have (acquire) -- a barrier across programs, which must all be resident
    at once (launch.py sizes the grid to the SM count). Counters start at 0; phase p waits
    for (p + 1) * programs."""
    tl.debug_barrier()
    if GRID_SYNC:
        n = tl.num_programs(0)
        counter = sync + tl.program_id(1)
        tl.atomic_add(counter, 1, sem="release", scope="gpu")
        while tl.atomic_add(counter, 0, sem="acquire", scope="gpu") < (phase + 1) * n:
            pass
        tl.debug_barrier()


@triton.jit
def _round_bf16(x):
    """fp32 -> the nearest-even bf16 value, kept in fp32. Integer ops only: the
    interpreter's own fp32 -> bf16 cast truncates (the GPU's rounds to nearest even)."""
    u = x.to(tl.uint32, bitcast=True)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _cast_out(x, dtype, RTNE_BF16: tl.constexpr):
    """fp32 tile -> output dtype, rounding to nearest even also under the interpreter."""
    if RTNE_BF16:
        x = _round_bf16(x)
    return x.to(dtype)


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b: a an fp32 tile, b a tile in the weight dtype, upcast (exactly) to fp32."""
    return tl.dot(a, b.to(tl.float32), acc, input_precision=PREC)


@triton.jit
def _w_rows(w, row0, rh, mh, rk, mk, K):
    """[BLOCK_K, BLOCK_H] tile W[row0 + rh, rk]^T of a row-major [*, K] matrix."""
    return tl.load(w + (row0 + rh[None, :]).to(tl.int64) * K + rk[:, None],
                   mask=mh[None, :] & mk[:, None], other=0.0)


# ============================================================================ forward
@triton.jit
def lstm_forward_step(gx, h_in, h_out, c, w, y, gates, cells_out, hr_buf, lengths, s, T, B, H, P,
                      HAS_PROJ: tl.constexpr, HAS_LEN: tl.constexpr, REVERSE: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                      PREC: tl.constexpr, RTNE_BF16: tl.constexpr, SAVE: tl.constexpr):
    rb, mb, rh, mh = _tile(B, H, BLOCK_B, BLOCK_H)
    active, t = _rows(s, lengths, rb, mb, T, HAS_LEN, REVERSE)

    acc_i = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    for k0 in range(0, P, BLOCK_K):  # h_{t-1} is [B, P] (P == H without projection)
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < P
        hk = tl.load(h_in + rb[:, None] * P + rk[None, :], mask=mb[:, None] & mk[None, :], other=0.0,
                     cache_modifier=".cg")  # other programs' h: L2, not a stale L1 line
        acc_i = _dot(hk, _w_rows(w, 0 * H, rh, mh, rk, mk, P), acc_i, PREC)
        acc_f = _dot(hk, _w_rows(w, 1 * H, rh, mh, rk, mk, P), acc_f, PREC)
        acc_g = _dot(hk, _w_rows(w, 2 * H, rh, mh, rk, mk, P), acc_g, PREC)
        acc_o = _dot(hk, _w_rows(w, 3 * H, rh, mh, rk, mk, P), acc_o, PREC)

    m2 = mb[:, None] & mh[None, :]
    act = active[:, None] & mh[None, :]
    G = 4 * H
    row_g = _at(t, rb, rh, B, G)
    row_h = _at(t, rb, rh, B, H)
    st = rb[:, None] * H + rh[None, :]
    ai = acc_i + tl.load(gx + row_g, mask=act, other=0.0).to(tl.float32)
    af = acc_f + tl.load(gx + row_g + H, mask=act, other=0.0).to(tl.float32)
    ag = acc_g + tl.load(gx + row_g + 2 * H, mask=act, other=0.0).to(tl.float32)
    ao = acc_o + tl.load(gx + row_g + 3 * H, mask=act, other=0.0).to(tl.float32)
    c_prev = tl.load(c + st, mask=m2, other=0.0)
    i, f, g, o, c_new, h_new = cells.lstm_forward_unit(ai, af, ag, ao, c_prev)

    if HAS_PROJ:  # unprojected h for lstm_project_step, which writes h_t and y
        tl.store(hr_buf + st, h_new, mask=m2)
    else:
        h_prev = tl.load(h_in + st, mask=m2, other=0.0)
        tl.store(h_out + st, tl.where(act, h_new, h_prev), mask=m2)
        tl.store(y + row_h, _cast_out(tl.where(act, h_new, 0.0), y.dtype.element_ty, RTNE_BF16), mask=m2)
    tl.store(c + st, tl.where(act, c_new, c_prev), mask=m2)
    if SAVE:  # the backward's saved tensors; not in inference (train=False)
        tl.store(gates + row_g, tl.where(act, i, 0.0), mask=m2)
        tl.store(gates + row_g + H, tl.where(act, f, 0.0), mask=m2)
        tl.store(gates + row_g + 2 * H, tl.where(act, g, 0.0), mask=m2)
        tl.store(gates + row_g + 3 * H, tl.where(act, o, 0.0), mask=m2)
        tl.store(cells_out + row_h, tl.where(act, c_new, 0.0), mask=m2)


@triton.jit
def gru_forward_step(gx, h_in, h_out, w, b_hh, y, gates, hn_out, lengths, s, T, B, H,
                     HAS_BIAS: tl.constexpr, HAS_LEN: tl.constexpr, REVERSE: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                     PREC: tl.constexpr, RTNE_BF16: tl.constexpr, SAVE: tl.constexpr):
    rb, mb, rh, mh = _tile(B, H, BLOCK_B, BLOCK_H)
    active, t = _rows(s, lengths, rb, mb, T, HAS_LEN, REVERSE)

    acc_r = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc_z = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    acc_n = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < H
        hk = tl.load(h_in + rb[:, None] * H + rk[None, :], mask=mb[:, None] & mk[None, :], other=0.0,
                     cache_modifier=".cg")  # other programs' h: L2, not a stale L1 line
        acc_r = _dot(hk, _w_rows(w, 0 * H, rh, mh, rk, mk, H), acc_r, PREC)
        acc_z = _dot(hk, _w_rows(w, 1 * H, rh, mh, rk, mk, H), acc_z, PREC)
        acc_n = _dot(hk, _w_rows(w, 2 * H, rh, mh, rk, mk, H), acc_n, PREC)
    if HAS_BIAS:
        acc_r += tl.load(b_hh + rh, mask=mh, other=0.0).to(tl.float32)[None, :]
        acc_z += tl.load(b_hh + H + rh, mask=mh, other=0.0).to(tl.float32)[None, :]
        acc_n += tl.load(b_hh + 2 * H + rh, mask=mh, other=0.0).to(tl.float32)[None, :]

    m2 = mb[:, None] & mh[None, :]
    act = active[:, None] & mh[None, :]
    G = 3 * H
    row_g = _at(t, rb, rh, B, G)
    row_h = _at(t, rb, rh, B, H)
    st = rb[:, None] * H + rh[None, :]
    xr = tl.load(gx + row_g, mask=act, other=0.0).to(tl.float32)
    xz = tl.load(gx + row_g + H, mask=act, other=0.0).to(tl.float32)
    xn = tl.load(gx + row_g + 2 * H, mask=act, other=0.0).to(tl.float32)
    h_prev = tl.load(h_in + st, mask=m2, other=0.0)
    r, z, n, h_new = cells.gru_forward_unit(xr, xz, xn, acc_r, acc_z, acc_n, h_prev)

    tl.store(h_out + st, tl.where(act, h_new, h_prev), mask=m2)
    tl.store(y + row_h, _cast_out(tl.where(act, h_new, 0.0), y.dtype.element_ty, RTNE_BF16), mask=m2)
    if SAVE:  # not in inference (train=False)
        tl.store(gates + row_g, tl.where(act, r, 0.0), mask=m2)
        tl.store(gates + row_g + H, tl.where(act, z, 0.0), mask=m2)
        tl.store(gates + row_g + 2 * H, tl.where(act, n, 0.0), mask=m2)
        tl.store(hn_out + row_h, tl.where(act, acc_n, 0.0), mask=m2)


@triton.jit
def rnn_forward_step(gx, h_in, h_out, w, y, lengths, s, T, B, H,
                     RELU: tl.constexpr, HAS_LEN: tl.constexpr, REVERSE: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                     PREC: tl.constexpr, RTNE_BF16: tl.constexpr):
    rb, mb, rh, mh = _tile(B, H, BLOCK_B, BLOCK_H)
    active, t = _rows(s, lengths, rb, mb, T, HAS_LEN, REVERSE)

    acc = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < H
        hk = tl.load(h_in + rb[:, None] * H + rk[None, :], mask=mb[:, None] & mk[None, :], other=0.0,
                     cache_modifier=".cg")  # other programs' h: L2, not a stale L1 line
        acc = _dot(hk, _w_rows(w, 0, rh, mh, rk, mk, H), acc, PREC)

    m2 = mb[:, None] & mh[None, :]
    act = active[:, None] & mh[None, :]
    row_h = _at(t, rb, rh, B, H)
    st = rb[:, None] * H + rh[None, :]
    h_new = cells.rnn_forward_unit(acc + tl.load(gx + row_h, mask=act, other=0.0).to(tl.float32), RELU)
    h_prev = tl.load(h_in + st, mask=m2, other=0.0)
    tl.store(h_out + st, tl.where(act, h_new, h_prev), mask=m2)
    tl.store(y + row_h, _cast_out(tl.where(act, h_new, 0.0), y.dtype.element_ty, RTNE_BF16), mask=m2)


# ============================================================================ backward
@triton.jit
def _dh_in(dh, d, w, lengths, s, T, B, H, G, rb, mb, rh, mh, MATMUL: tl.constexpr,
           HAS_LEN: tl.constexpr, REVERSE: tl.constexpr,
           BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
           PREC: tl.constexpr):
    """dh[rows, own units], plus (MATMUL half) d_{s+1}[rows, :G] @ W_hh[:G, own units]
    (zero for rows inactive at step s+1: their d is masked out)."""
    dh_own = tl.load(dh + rb[:, None] * H + rh[None, :], mask=mb[:, None] & mh[None, :], other=0.0)
    if not MATMUL:
        return dh_own
    active1, t1 = _rows(s + 1, lengths, rb, mb, T, HAS_LEN, REVERSE)
    acc = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    for k0 in range(0, G, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < G
        dk = tl.load(d + _at(t1, rb, rk, B, G), mask=active1[:, None] & mk[None, :], other=0.0,
                     cache_modifier=".cg")
        wt = tl.load(w + rk[:, None].to(tl.int64) * H + rh[None, :], mask=mk[:, None] & mh[None, :],
                     other=0.0)
        acc = _dot(dk, wt, acc, PREC)
    return dh_own + acc


@triton.jit
def _prev_state(init, seq, t, active, s, B, H, rb, rh, m2, REVERSE: tl.constexpr):
    """The state step s of each active row started from: init (s == 0) or seq at its previous step."""
    if REVERSE:
        tp = t + 1
    else:
        tp = t - 1
    from_seq = tl.load(seq + _at(tp, rb, rh, B, H),
                       mask=m2 & active[:, None] & (s > 0), other=0.0).to(tl.float32)
    from_init = tl.load(init + rb[:, None] * H + rh[None, :], mask=m2 & (s == 0), other=0.0).to(tl.float32)
    return tl.where(s > 0, from_seq, from_init)


@triton.jit
def lstm_backward_step(grad_y, dh, dc, dpre, w, gates, cells_in, c0, lengths, s, T, B, H,
                       MATMUL: tl.constexpr, POINTWISE: tl.constexpr,
                       HAS_LEN: tl.constexpr, REVERSE: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                       PREC: tl.constexpr, RTNE_BF16: tl.constexpr):
    rb, mb, rh, mh = _tile(B, H, BLOCK_B, BLOCK_H)
    m2 = mb[:, None] & mh[None, :]
    st = rb[:, None] * H + rh[None, :]
    G = 4 * H
    dh_cur = _dh_in(dh, dpre, w, lengths, s, T, B, H, G, rb, mb, rh, mh, MATMUL,
                    HAS_LEN, REVERSE, BLOCK_B, BLOCK_H, BLOCK_K, PREC)
    if POINTWISE:
        active, t = _rows(s, lengths, rb, mb, T, HAS_LEN, REVERSE)
        act = active[:, None] & mh[None, :]
        row_g = _at(t, rb, rh, B, G)
        row_h = _at(t, rb, rh, B, H)
        dh_t = dh_cur + tl.load(grad_y + row_h, mask=act, other=0.0).to(tl.float32)
        i = tl.load(gates + row_g, mask=act, other=0.0)
        f = tl.load(gates + row_g + H, mask=act, other=0.0)
        g = tl.load(gates + row_g + 2 * H, mask=act, other=0.0)
        o = tl.load(gates + row_g + 3 * H, mask=act, other=0.0)
        c = tl.load(cells_in + row_h, mask=act, other=0.0)
        c_prev = _prev_state(c0, cells_in, t, active, s, B, H, rb, rh, m2, REVERSE)
        dc_in = tl.load(dc + st, mask=m2, other=0.0)
        dai, daf, dag, dao, dc_prev = cells.lstm_backward_unit(i, f, g, o, c, c_prev, dh_t, dc_in)
        tl.store(dpre + row_g, tl.where(act, dai, 0.0), mask=m2)
        tl.store(dpre + row_g + H, tl.where(act, daf, 0.0), mask=m2)
        tl.store(dpre + row_g + 2 * H, tl.where(act, dag, 0.0), mask=m2)
        tl.store(dpre + row_g + 3 * H, tl.where(act, dao, 0.0), mask=m2)
        tl.store(dc + st, tl.where(act, dc_prev, dc_in), mask=m2)
        # active rows: dh_{t-1} is dpre_s @ W_hh, added by the next launch's MATMUL half
        dh_cur = tl.where(act, 0.0, dh_cur)
    tl.store(dh + st, dh_cur, mask=m2)


@triton.jit
def gru_backward_step(grad_y, dh, dgx, dgh, w, gates, hn, h0, y, lengths, s, T, B, H,
                      MATMUL: tl.constexpr, POINTWISE: tl.constexpr,
                      HAS_LEN: tl.constexpr, REVERSE: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                      PREC: tl.constexpr, RTNE_BF16: tl.constexpr):
    rb, mb, rh, mh = _tile(B, H, BLOCK_B, BLOCK_H)
    m2 = mb[:, None] & mh[None, :]
    st = rb[:, None] * H + rh[None, :]
    G = 3 * H
    dh_cur = _dh_in(dh, dgh, w, lengths, s, T, B, H, G, rb, mb, rh, mh, MATMUL,
                    HAS_LEN, REVERSE, BLOCK_B, BLOCK_H, BLOCK_K, PREC)
    if POINTWISE:
        active, t = _rows(s, lengths, rb, mb, T, HAS_LEN, REVERSE)
        act = active[:, None] & mh[None, :]
        row_g = _at(t, rb, rh, B, G)
        row_h = _at(t, rb, rh, B, H)
        dh_t = dh_cur + tl.load(grad_y + row_h, mask=act, other=0.0).to(tl.float32)
        r = tl.load(gates + row_g, mask=act, other=0.0)
        z = tl.load(gates + row_g + H, mask=act, other=0.0)
        n = tl.load(gates + row_g + 2 * H, mask=act, other=0.0)
        hn_t = tl.load(hn + row_h, mask=act, other=0.0)
        h_prev = _prev_state(h0, y, t, active, s, B, H, rb, rh, m2, REVERSE)
        dxr, dxz, dxn, dhn, dh_direct = cells.gru_backward_unit(r, z, n, hn_t, h_prev, dh_t)
        tl.store(dgx + row_g, tl.where(act, dxr, 0.0), mask=m2)
        tl.store(dgx + row_g + H, tl.where(act, dxz, 0.0), mask=m2)
        tl.store(dgx + row_g + 2 * H, tl.where(act, dxn, 0.0), mask=m2)
        tl.store(dgh + row_g, tl.where(act, dxr, 0.0), mask=m2)
        tl.store(dgh + row_g + H, tl.where(act, dxz, 0.0), mask=m2)
        tl.store(dgh + row_g + 2 * H, tl.where(act, dhn, 0.0), mask=m2)
        # active rows: dh_{t-1} = z * dh_t here, + dgh_s @ W_hh in the next launch
        dh_cur = tl.where(act, dh_direct, dh_cur)
    tl.store(dh + st, dh_cur, mask=m2)


@triton.jit
def rnn_backward_step(grad_y, dh, dpre, w, y, lengths, s, T, B, H,
                      RELU: tl.constexpr, MATMUL: tl.constexpr, POINTWISE: tl.constexpr,
                      HAS_LEN: tl.constexpr, REVERSE: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                      PREC: tl.constexpr, RTNE_BF16: tl.constexpr):
    rb, mb, rh, mh = _tile(B, H, BLOCK_B, BLOCK_H)
    m2 = mb[:, None] & mh[None, :]
    st = rb[:, None] * H + rh[None, :]
    dh_cur = _dh_in(dh, dpre, w, lengths, s, T, B, H, H, rb, mb, rh, mh, MATMUL,
                    HAS_LEN, REVERSE, BLOCK_B, BLOCK_H, BLOCK_K, PREC)
    if POINTWISE:
        active, t = _rows(s, lengths, rb, mb, T, HAS_LEN, REVERSE)
        act = active[:, None] & mh[None, :]
        row_h = _at(t, rb, rh, B, H)
        dh_t = dh_cur + tl.load(grad_y + row_h, mask=act, other=0.0).to(tl.float32)
        h = tl.load(y + row_h, mask=act, other=0.0).to(tl.float32)
        da = cells.rnn_backward_unit(h, dh_t, RELU)
        tl.store(dpre + row_h, tl.where(act, da, 0.0), mask=m2)
        dh_cur = tl.where(act, 0.0, dh_cur)
    tl.store(dh + st, dh_cur, mask=m2)


# ============================================================================ kernels
# The *_step kernels above are launched once per time step (the launch boundary is the
# grid-wide barrier; any hidden size, any number of programs); the *_seq kernels below
# call them as functions inside one launch.


# Time-loop kernels: the whole sequence in one launch, each step the *_step function above
# followed by _sync. GRID_SYNC False: only with one hidden tile per batch tile (grid
# (1, cdiv(B, BLOCK_B))): no other program reads what a program writes, and the program's
# own barrier (tl.debug_barrier, __syncthreads) orders each step. GRID_SYNC True (the
# persistent kernels): any hidden split, programs of a batch tile meet at a grid barrier
# per step; all programs must be resident at once (launch.py), `sync` holds one zeroed
# int32 counter per batch tile. Batch tiles are independent sequences either way.


@triton.jit
def lstm_forward_seq(gx, hbuf, c, w, y, gates, cells_out, lengths, sync, T, B, H,
                     HAS_LEN: tl.constexpr, REVERSE: tl.constexpr, GRID_SYNC: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                     PREC: tl.constexpr, RTNE_BF16: tl.constexpr, SAVE: tl.constexpr):
    for s in range(0, T):
        h_in = hbuf + (s % 2) * (B * H)
        h_out = hbuf + ((s + 1) % 2) * (B * H)
        lstm_forward_step(gx, h_in, h_out, c, w, y, gates, cells_out, gx, lengths, s, T, B, H, H, False,
                          HAS_LEN, REVERSE, BLOCK_B, BLOCK_H, BLOCK_K, PREC, RTNE_BF16, SAVE)
        _sync(sync, s, GRID_SYNC)


@triton.jit
def gru_forward_seq(gx, hbuf, w, b_hh, y, gates, hn_out, lengths, sync, T, B, H,
                    HAS_BIAS: tl.constexpr, HAS_LEN: tl.constexpr, REVERSE: tl.constexpr, GRID_SYNC: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                    PREC: tl.constexpr, RTNE_BF16: tl.constexpr, SAVE: tl.constexpr):
    for s in range(0, T):
        h_in = hbuf + (s % 2) * (B * H)
        h_out = hbuf + ((s + 1) % 2) * (B * H)
        gru_forward_step(gx, h_in, h_out, w, b_hh, y, gates, hn_out, lengths, s, T, B, H, HAS_BIAS, HAS_LEN,
                         REVERSE, BLOCK_B, BLOCK_H, BLOCK_K, PREC, RTNE_BF16, SAVE)
        _sync(sync, s, GRID_SYNC)


@triton.jit
def rnn_forward_seq(gx, hbuf, w, y, lengths, sync, T, B, H,
                    RELU: tl.constexpr, HAS_LEN: tl.constexpr, REVERSE: tl.constexpr, GRID_SYNC: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                    PREC: tl.constexpr, RTNE_BF16: tl.constexpr):
    for s in range(0, T):
        h_in = hbuf + (s % 2) * (B * H)
        h_out = hbuf + ((s + 1) % 2) * (B * H)
        rnn_forward_step(gx, h_in, h_out, w, y, lengths, s, T, B, H, RELU, HAS_LEN, REVERSE, BLOCK_B,
                         BLOCK_H, BLOCK_K, PREC, RTNE_BF16)
        _sync(sync, s, GRID_SYNC)


# Backward, phase by phase as the per-step launches: step T-1 (POINTWISE only), steps
# T-2..0 (MATMUL + POINTWISE), then the MATMUL half alone (grad_h0), a _sync between phases.
@triton.jit
def lstm_backward_seq(grad_y, dh, dc, dpre, w, gates, cells_in, c0, lengths, sync, T, B, H,
                      HAS_LEN: tl.constexpr, REVERSE: tl.constexpr, GRID_SYNC: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                      PREC: tl.constexpr, RTNE_BF16: tl.constexpr):
    lstm_backward_step(grad_y, dh, dc, dpre, w, gates, cells_in, c0, lengths, T - 1, T, B, H, False, True,
                       HAS_LEN, REVERSE, BLOCK_B, BLOCK_H, BLOCK_K, PREC, RTNE_BF16)
    _sync(sync, 0, GRID_SYNC)
    for i in range(0, T - 1):
        lstm_backward_step(grad_y, dh, dc, dpre, w, gates, cells_in, c0, lengths, T - 2 - i, T, B, H, True,
                           True, HAS_LEN, REVERSE, BLOCK_B, BLOCK_H, BLOCK_K, PREC, RTNE_BF16)
        _sync(sync, i + 1, GRID_SYNC)
    lstm_backward_step(grad_y, dh, dc, dpre, w, gates, cells_in, c0, lengths, -1, T, B, H, True, False,
                       HAS_LEN, REVERSE, BLOCK_B, BLOCK_H, BLOCK_K, PREC, RTNE_BF16)


@triton.jit
def gru_backward_seq(grad_y, dh, dgx, dgh, w, gates, hn, h0, y, lengths, sync, T, B, H,
                     HAS_LEN: tl.constexpr, REVERSE: tl.constexpr, GRID_SYNC: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                     PREC: tl.constexpr, RTNE_BF16: tl.constexpr):
    gru_backward_step(grad_y, dh, dgx, dgh, w, gates, hn, h0, y, lengths, T - 1, T, B, H, False, True,
                      HAS_LEN, REVERSE, BLOCK_B, BLOCK_H, BLOCK_K, PREC, RTNE_BF16)
    _sync(sync, 0, GRID_SYNC)
    for i in range(0, T - 1):
        gru_backward_step(grad_y, dh, dgx, dgh, w, gates, hn, h0, y, lengths, T - 2 - i, T, B, H, True,
                          True, HAS_LEN, REVERSE, BLOCK_B, BLOCK_H, BLOCK_K, PREC, RTNE_BF16)
        _sync(sync, i + 1, GRID_SYNC)
    gru_backward_step(grad_y, dh, dgx, dgh, w, gates, hn, h0, y, lengths, -1, T, B, H, True, False, HAS_LEN,
                      REVERSE, BLOCK_B, BLOCK_H, BLOCK_K, PREC, RTNE_BF16)


@triton.jit
def rnn_backward_seq(grad_y, dh, dpre, w, y, lengths, sync, T, B, H,
                     RELU: tl.constexpr, HAS_LEN: tl.constexpr, REVERSE: tl.constexpr, GRID_SYNC: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                     PREC: tl.constexpr, RTNE_BF16: tl.constexpr):
    rnn_backward_step(grad_y, dh, dpre, w, y, lengths, T - 1, T, B, H, RELU, False, True, HAS_LEN, REVERSE,
                      BLOCK_B, BLOCK_H, BLOCK_K, PREC, RTNE_BF16)
    _sync(sync, 0, GRID_SYNC)
    for i in range(0, T - 1):
        rnn_backward_step(grad_y, dh, dpre, w, y, lengths, T - 2 - i, T, B, H, RELU, True, True, HAS_LEN,
                          REVERSE, BLOCK_B, BLOCK_H, BLOCK_K, PREC, RTNE_BF16)
        _sync(sync, i + 1, GRID_SYNC)
    rnn_backward_step(grad_y, dh, dpre, w, y, lengths, -1, T, B, H, RELU, True, False, HAS_LEN, REVERSE,
                      BLOCK_B, BLOCK_H, BLOCK_K, PREC, RTNE_BF16)


# ============================================================================ LSTM projection
# proj_size P > 0: h_t = W_hr (o * tanh(c_t)) is a second matmul across all H units, so a
# step takes two launches: lstm_forward_step (HAS_PROJ: gates, c and the unprojected hr over
# hidden-unit tiles) then lstm_project_step (h_t over tiles of the P outputs). Backward:
# lstm_proj_dh_step (over P tiles: dh += dpre_{s+1} @ W_hh, dh_t = dh + grad_y) then
# lstm_proj_cell_backward_step (over H tiles: dhr = dh_t @ W_hr, cell derivative).
# Always per-step launches (no time-loop variant).
@triton.jit
def lstm_project_step(hr_buf, w_hr, h_in, h_out, y, lengths, s, T, B, H, P,
                      HAS_LEN: tl.constexpr, REVERSE: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                      PREC: tl.constexpr, RTNE_BF16: tl.constexpr):
    rb, mb, rp, mp = _tile(B, P, BLOCK_B, BLOCK_H)
    active, t = _rows(s, lengths, rb, mb, T, HAS_LEN, REVERSE)
    acc = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < H
        hk = tl.load(hr_buf + rb[:, None] * H + rk[None, :], mask=mb[:, None] & mk[None, :], other=0.0)
        acc = _dot(hk, _w_rows(w_hr, 0, rp, mp, rk, mk, H), acc, PREC)
    m2 = mb[:, None] & mp[None, :]
    act = active[:, None] & mp[None, :]
    st = rb[:, None] * P + rp[None, :]
    h_prev = tl.load(h_in + st, mask=m2, other=0.0)
    tl.store(h_out + st, tl.where(act, acc, h_prev), mask=m2)
    row_p = _at(t, rb, rp, B, P)
    tl.store(y + row_p, _cast_out(tl.where(act, acc, 0.0), y.dtype.element_ty, RTNE_BF16), mask=m2)


@triton.jit
def lstm_proj_dh_step(grad_y, dh, dhs, dpre, w_hh, lengths, s, T, B, H, P,
                      MATMUL: tl.constexpr, POINTWISE: tl.constexpr,
                      HAS_LEN: tl.constexpr, REVERSE: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                      PREC: tl.constexpr):
    """Over P tiles. dh: [B, P] state; dhs[t]: dL/dh_t (projected; 0 at padded steps)."""
    rb, mb, rp, mp = _tile(B, P, BLOCK_B, BLOCK_H)
    m2 = mb[:, None] & mp[None, :]
    st = rb[:, None] * P + rp[None, :]
    # W_hh is [4H, P]: its "H" (row stride, dh stride) is P here
    dh_cur = _dh_in(dh, dpre, w_hh, lengths, s, T, B, P, 4 * H, rb, mb, rp, mp, MATMUL,
                    HAS_LEN, REVERSE, BLOCK_B, BLOCK_H, BLOCK_K, PREC)
    if POINTWISE:
        active, t = _rows(s, lengths, rb, mb, T, HAS_LEN, REVERSE)
        act = active[:, None] & mp[None, :]
        row_p = _at(t, rb, rp, B, P)
        dh_t = dh_cur + tl.load(grad_y + row_p, mask=act, other=0.0).to(tl.float32)
        tl.store(dhs + row_p, tl.where(act, dh_t, 0.0), mask=m2)
        dh_cur = tl.where(act, 0.0, dh_cur)
    tl.store(dh + st, dh_cur, mask=m2)


@triton.jit
def lstm_proj_cell_backward_step(dhs, w_hr, dc, dpre, gates, cells_in, c0, lengths, s, T, B, H, P,
                                 HAS_LEN: tl.constexpr, REVERSE: tl.constexpr,
                                 BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                                 PREC: tl.constexpr):
    """Over H tiles: dhr = dhs[t] @ W_hr[:, own units] (W_hr is [P, H]), then the cell derivative."""
    rb, mb, rh, mh = _tile(B, H, BLOCK_B, BLOCK_H)
    m2 = mb[:, None] & mh[None, :]
    st = rb[:, None] * H + rh[None, :]
    active, t = _rows(s, lengths, rb, mb, T, HAS_LEN, REVERSE)
    act = active[:, None] & mh[None, :]
    acc = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
    for k0 in range(0, P, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < P
        dk = tl.load(dhs + _at(t, rb, rk, B, P),
                     mask=active[:, None] & mk[None, :], other=0.0)
        wt = tl.load(w_hr + rk[:, None].to(tl.int64) * H + rh[None, :], mask=mk[:, None] & mh[None, :],
                     other=0.0)
        acc = _dot(dk, wt, acc, PREC)
    G = 4 * H
    row_g = _at(t, rb, rh, B, G)
    row_h = _at(t, rb, rh, B, H)
    i = tl.load(gates + row_g, mask=act, other=0.0)
    f = tl.load(gates + row_g + H, mask=act, other=0.0)
    g = tl.load(gates + row_g + 2 * H, mask=act, other=0.0)
    o = tl.load(gates + row_g + 3 * H, mask=act, other=0.0)
    c = tl.load(cells_in + row_h, mask=act, other=0.0)
    c_prev = _prev_state(c0, cells_in, t, active, s, B, H, rb, rh, m2, REVERSE)
    dc_in = tl.load(dc + st, mask=m2, other=0.0)
    dai, daf, dag, dao, dc_prev = cells.lstm_backward_unit(i, f, g, o, c, c_prev, acc, dc_in)
    tl.store(dpre + row_g, tl.where(act, dai, 0.0), mask=m2)
    tl.store(dpre + row_g + H, tl.where(act, daf, 0.0), mask=m2)
    tl.store(dpre + row_g + 2 * H, tl.where(act, dag, 0.0), mask=m2)
    tl.store(dpre + row_g + 3 * H, tl.where(act, dao, 0.0), mask=m2)
    tl.store(dc + st, tl.where(act, dc_prev, dc_in), mask=m2)
