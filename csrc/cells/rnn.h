// Vanilla RNN pointwise math for one hidden unit: h = act(gx_t + W_hh h_{t-1}),
// act = tanh or relu; the derivative is taken from the output h. Used by every RNN kernel.
#pragma once
#include "cells/common.h"

namespace fusedrnn {
#include "cells/rnn_unit.inc"
}  // namespace fusedrnn
