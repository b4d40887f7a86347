// LSTM pointwise math for one hidden unit, PyTorch's equations and gate order (i, f, g, o):
//   i = s(a_i)  f = s(a_f)  g = tanh(a_g)  o = s(a_o)
//   c = f * c_prev + i * g       h = o * tanh(c)      (h then projected by w_hr if proj_size > 0)
// where a = gx_t + W_hh h_{t-1} holds both biases. Used by every LSTM kernel.
#pragma once
#include "cells/common.h"

namespace fusedrnn {

// Forward of one unit: pre-activations -> post-activation gates, c_t and (unprojected) h_t.
template <typename T>
FRNN_HD void lstm_forward_unit(T ai, T af, T ag, T ao, T c_prev,
                               T& i, T& f, T& g, T& o, T& c, T& h) {
  i = sigmoid_(ai);
  f = sigmoid_(af);
  g = tanh_(ag);
  o = sigmoid_(ao);
  c = f * c_prev + i * g;
  h = o * tanh_(c);
}

// Backward of one unit. dh: dL/d(unprojected h_t), everything that reaches it (the
// output's gradient and the next step's); dc: dL/dc_t from the next step.
// Returns the pre-activation gradients and dL/dc_{t-1}.
template <typename T>
FRNN_HD void lstm_backward_unit(T i, T f, T g, T o, T c, T c_prev, T dh, T dc,
                                T& dai, T& daf, T& dag, T& dao, T& dc_prev) {
  const T tc = tanh_(c);
  const T dct = dc + dh * o * (T(1) - tc * tc);
  dai = dct * g * i * (T(1) - i);
  daf = dct * c_prev * f * (T(1) - f);
  dag = dct * i * (T(1) - g * g);
  dao = dh * tc * o * (T(1) - o);
  dc_prev = dct * f;
}

}  // namespace fusedrnn
