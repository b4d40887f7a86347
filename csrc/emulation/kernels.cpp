// The project's CUDA kernel sources (csrc/cuda/kernels/*.cuh), unchanged, compiled by the
// host C++ compiler against the CPU emulation of the CUDA execution model (cuda_emu.h).
// Defines the drivers of csrc/cuda/api.h for the `emulated` backend. No torch headers.
#include "emulation/cuda_emu.h"

#include "cuda/kernels/gru.cuh"
#include "cuda/kernels/lstm.cuh"
#include "cuda/kernels/rnn.cuh"
