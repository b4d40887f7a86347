"""Pointwise math of each cell, written once and used by every Triton kernel of that cell.

The Triton twin of csrc/cells/*.h: PyTorch's equations and gate orders
(LSTM i, f, g, o; GRU r, z, n with h = (1 - z) * n + z * h_prev; RNN tanh/relu).
All arguments and results are fp32 tiles (half inputs are upcast by the caller).

tanh is written with exp instead of libdevice.tanh, which has no implementation
under the Triton interpreter (TRITON_INTERPRET=1); the same code then runs in CI
and on the GPU. The form used, sign(x) * (1 - e) / (1 + e) with e = exp(-2|x|),
never overflows and is accurate to a few fp32 ulps.
"""
import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


# ----------------------------------------------------------------------------- LSTM
@triton.jit
def lstm_forward_unit(ai, af, ag, ao, c_prev):
    """Pre-activations (gx_t + W_hh h_{t-1}, both biases inside) -> gates, c_t, h_t."""
    i = sigmoid(ai)
    f = sigmoid(af)
    g = tanh(ag)
    o = sigmoid(ao)
    c = f * c_prev + i * g
    h = o * tanh(c)
    return i, f, g, o, c, h


@triton.jit
def lstm_backward_unit(i, f, g, o, c, c_prev, dh, dc):
    """dh: dL/dh_t (output gradient + next step's); dc: dL/dc_t from the next step.
    Returns the pre-activation gradients and dL/dc_{t-1}."""
    tc = tanh(c)
    dct = dc + dh * o * (1.0 - tc * tc)
    dai = dct * g * i * (1.0 - i)
    daf = dct * c_prev * f * (1.0 - f)
    dag = dct * i * (1.0 - g * g)
    dao = dh * tc * o * (1.0 - o)
    return dai, daf, dag, dao, dct * f


# ----------------------------------------------------------------------------- GRU
@triton.jit
def gru_forward_unit(xr, xz, xn, hr, hz, hn, h_prev):
    """x = gx_t (holds b_ih); h_* = W_h* h_{t-1} + b_h*. Returns r, z, n, h_t."""
    r = sigmoid(xr + hr)
    z = sigmoid(xz + hz)
    n = tanh(xn + r * hn)
    h = (1.0 - z) * n + z * h_prev
    return r, z, n, h


@triton.jit
def gru_backward_unit(r, z, n, hn, h_prev, dh):
    """dh: dL/dh_t. Returns the gx gradients (dxr, dxz, dxn), the gradient of the
    hidden-side n pre-activation (dhn; dhr == dxr, dhz == dxz) and the direct part
    of dL/dh_{t-1} (z * dh; the rest is dgh @ W_hh)."""
    dxn = dh * (1.0 - z) * (1.0 - n * n)
    dxz = dh * (h_prev - n) * z * (1.0 - z)
    dxr = dxn * hn * r * (1.0 - r)
    return dxr, dxz, dxn, dxn * r, dh * z


# ----------------------------------------------------------------------------- RNN
@triton.jit
def rnn_forward_unit(a, RELU: tl.constexpr):
    if RELU:
        return tl.where(a < 0, 0.0, a)  # keeps NaN, as torch.relu (tl.maximum may return 0 for it)
    else:
        return tanh(a)


@triton.jit
def rnn_backward_unit(h, dh, RELU: tl.constexpr):
    """Derivative of the nonlinearity from its output h, applied to dh."""
    if RELU:
        return tl.where(h > 0, dh, 0.0)
    else:
        return dh * (1.0 - h * h)
