// nvcc translation unit of the lstm kernels (csrc/cuda/kernels/lstm.cuh). No torch headers.
#include "cuda/kernels/lstm.cuh"
