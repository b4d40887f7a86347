// GRU pointwise math for one hidden unit, PyTorch's equations and gate order (r, z, n):
//   r = s(x_r + h_r)   z = s(x_z + h_z)   n = tanh(x_n + r * h_n)   h = (1 - z) * n + z * h_prev
// where x = gx_t (holds b_ih) and h_* = W_h* h_{t-1} + b_h* (b_hh applied inside, as PyTorch does).
// Used by every GRU kernel.
#pragma once
#include "cells/common.h"

namespace fusedrnn {
#include "cells/gru_unit.inc"
}  // namespace fusedrnn
