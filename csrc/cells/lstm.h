// LSTM pointwise math for one hidden unit, PyTorch's equations and gate order (i, f, g, o):
//   i = s(a_i)  f = s(a_f)  g = tanh(a_g)  o = s(a_o)
//   c = f * c_prev + i * g       h = o * tanh(c)      (h then projected by w_hr if proj_size > 0)
// where a = gx_t + W_hh h_{t-1} holds both biases. Used by every LSTM kernel.
#pragma once
#include "cells/common.h"

namespace fusedrnn {
#include "cells/lstm_unit.inc"
}  // namespace fusedrnn
