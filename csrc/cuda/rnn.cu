// nvcc translation unit of the rnn kernels (csrc/cuda/kernels/rnn.cuh). No torch headers.
#include "cuda/kernels/rnn.cuh"
