// GRU pointwise math for one hidden unit, PyTorch's equations and gate order (r, z, n):
//   r = s(x_r + h_r)   z = s(x_z + h_z)   n = tanh(x_n + r * h_n)   h = (1 - z) * n + z * h_prev
// where x = gx_t (holds b_ih) and h_* = W_h* h_{t-1} + b_h* (b_hh applied inside, as PyTorch does).
// Used by every GRU kernel.
#pragma once
#include "cells/common.h"

namespace fusedrnn {

template <typename T>
FRNN_HD void gru_forward_unit(T xr, T xz, T xn, T hr, T hz, T hn, T h_prev,
                              T& r, T& z, T& n, T& h) {
  r = sigmoid_(xr + hr);
  z = sigmoid_(xz + hz);
  n = tanh_(xn + r * hn);
  h = (T(1) - z) * n + z * h_prev;
}

// Backward of one unit. dh: dL/dh_t (output gradient + next step's). hn: the saved
// W_hn h_{t-1} + b_hn. Returns the gradients of gx (dxr, dxz, dxn), of the
// hidden-side pre-activations (dhr == dxr, dhz == dxz, dhn) and the direct part
// of dL/dh_{t-1} (z * dh; the rest is dgh @ W_hh).
template <typename T>
FRNN_HD void gru_backward_unit(T r, T z, T n, T hn, T h_prev, T dh,
                               T& dxr, T& dxz, T& dxn, T& dhn, T& dh_prev_direct) {
  dxn = dh * (T(1) - z) * (T(1) - n * n);
  dxz = dh * (h_prev - n) * z * (T(1) - z);
  dxr = dxn * hn * r * (T(1) - r);
  dhn = dxn * r;
  dh_prev_direct = dh * z;
}

}  // namespace fusedrnn
