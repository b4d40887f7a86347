// Shared by every compiled kernel (CPU, CUDA, CUDA-under-emulation): qualifiers
// and the scalar math the cells' pointwise functions are written with.
// Kept free of torch headers so kernel translation units stay cheap to compile.
#pragma once
#include <math.h>

#if defined(__CUDACC__)
#define FRNN_HD __host__ __device__ __forceinline__
#else
#define FRNN_HD inline
#endif

namespace fusedrnn {

FRNN_HD float exp_(float x) { return expf(x); }
FRNN_HD double exp_(double x) { return exp(x); }
FRNN_HD float tanh_(float x) { return tanhf(x); }
FRNN_HD double tanh_(double x) { return tanh(x); }

template <typename T>
FRNN_HD T sigmoid_(T x) { return T(1) / (T(1) + exp_(-x)); }

#include "cells/derivatives.inc"

// max(x, 0) that keeps NaN, as torch.relu does (x > 0 ? x : 0 would map NaN to 0).
template <typename T>
FRNN_HD T relu_(T x) { return x < T(0) ? T(0) : x; }

}  // namespace fusedrnn
