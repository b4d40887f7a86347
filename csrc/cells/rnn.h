// Vanilla RNN pointwise math for one hidden unit: h = act(gx_t + W_hh h_{t-1}),
// act = tanh or relu; the derivative is taken from the output h. Used by every RNN kernel.
#pragma once
#include "cells/common.h"

namespace fusedrnn {

template <typename T>
FRNN_HD T rnn_forward_unit(T a, bool relu) {
  return relu ? (a > T(0) ? a : T(0)) : tanh_(a);
}

// dL/da from dL/dh and the forward output h.
template <typename T>
FRNN_HD T rnn_backward_unit(T h, T dh, bool relu) {
  return relu ? (h > T(0) ? dh : T(0)) : dh * (T(1) - h * h);
}

}  // namespace fusedrnn
