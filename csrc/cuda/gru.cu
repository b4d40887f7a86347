// nvcc translation unit of the gru kernels (csrc/cuda/kernels/gru.cuh). No torch headers.
#include "cuda/kernels/gru.cuh"
