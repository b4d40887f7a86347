// Building blocks of the fused recurrence kernels, written against CUDA builtins only
// (threadIdx, blockIdx, __syncthreads, dynamic shared memory, __half/__nv_bfloat16).
// Compiled by nvcc (csrc/cuda/*.cu) and, after csrc/emulation/cuda_emu.h, by the host
// compiler for the CPU emulation (csrc/emulation/kernels.cpp).
//
// Thread/tile layout shared by every step kernel: a block of TN x TB threads owns a tile
// of TN output columns (hidden units) x TB batch rows; threadIdx.x = column in the tile,
// threadIdx.y = row. Grid = (ceil(N / TN), ceil(B / TB)). The recurrent matmul of the
// tile is computed in K-chunks of KC staged through shared memory (fp32), then the
// cell's pointwise math runs on the accumulators in registers (the fusion).
#pragma once
#include <stdint.h>

#ifndef FRNN_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define FRNN_DYN_SMEM(T, name)                                      \
  extern __shared__ __align__(16) unsigned char frnn_dyn_smem_[]; \
  T* name = reinterpret_cast<T*>(frnn_dyn_smem_)
#define FRNN_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#include <stdexcept>
#include <string>
// Launch errors (bad configuration) surface here; no synchronization with the device.
inline void frnn_check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("fusedrnn CUDA launch failed in ") + what + ": " + cudaGetErrorString(e));
}
#else
inline void frnn_check_launch(const char*) {}  // the emulator throws from the launch itself
#endif

#include "cells/common.h"
#include "cuda/api.h"

namespace fusedrnn {
namespace cuda {

constexpr int TN = 32;  // tile columns (threadIdx.x)
constexpr int TB = 4;   // tile batch rows (threadIdx.y)
constexpr int KC = 32;  // K-chunk staged in shared memory
constexpr int kThreads = TN * TB;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// Step s of the oriented recurrence for sequence b: is it a real step, and which time
// index t does it touch? Real steps of a reversed sequence run t = L-1 .. 0; a padded
// step (s >= L) touches t = s (a padded position), where outputs/saved values are 0.
__device__ __forceinline__ int seq_len(const int64_t* lengths, int b, int T) {
  return lengths ? static_cast<int>(lengths[b]) : T;
}
__device__ __forceinline__ bool step_time(int L, int s, bool reverse, int& t) {
  if (s < L) {
    t = reverse ? L - 1 - s : s;
    return true;
  }
  t = s;
  return false;
}

// Shared-memory floats used by the tile GEMMs.
constexpr int smem_nt_floats(int NG) { return TB * (KC + 1) + NG * TN * (KC + 1); }
constexpr int smem_nn_floats() { return TB * (KC + 1) + KC * (TN + 1); }

// Stage the tile's A rows [b0, b0+TB) x [k0, k0+KC) (fp32, zero-padded).
__device__ __forceinline__ void load_a_tile(float* As, const float* __restrict__ A, int lda, int M, int K, int b0,
                                            int k0, int tid) {
  for (int i = tid; i < TB * KC; i += kThreads) {
    const int r = i / KC, c = i % KC;
    As[r * (KC + 1) + c] = (b0 + r < M && k0 + c < K) ? A[static_cast<size_t>(b0 + r) * lda + k0 + c] : 0.f;
  }
}

// acc[g] += sum_k A[b][k] * W[g*gstride + n][k]   ("A W^T", W row-major [rows, ldw])
// for this thread's row b = blockIdx.y*TB + threadIdx.y and column n = blockIdx.x*TN + threadIdx.x.
// Every thread of the block must call it (it holds barriers).
template <int NG, class TW>
__device__ __forceinline__ void tile_gemm_nt(float (&acc)[NG], const float* __restrict__ A, int lda, int M,
                                             const TW* __restrict__ W, int ldw, int gstride, int N, int K,
                                             float* smem) {
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * TN + tx;
  const int b0 = blockIdx.y * TB, n0 = blockIdx.x * TN;
  float* As = smem;
  float* Ws = smem + TB * (KC + 1);
  for (int k0 = 0; k0 < K; k0 += KC) {
    load_a_tile(As, A, lda, M, K, b0, k0, tid);
    for (int i = tid; i < NG * TN * KC; i += kThreads) {
      const int g = i / (TN * KC), r = (i / KC) % TN, c = i % KC;
      Ws[(g * TN + r) * (KC + 1) + c] =
          (n0 + r < N && k0 + c < K) ? to_f(W[static_cast<size_t>(g * gstride + n0 + r) * ldw + k0 + c]) : 0.f;
    }
    __syncthreads();
    const int kn = imin(KC, K - k0);
    for (int c = 0; c < kn; ++c) {
      const float a = As[ty * (KC + 1) + c];
#pragma unroll
      for (int g = 0; g < NG; ++g) acc[g] += a * Ws[(g * TN + tx) * (KC + 1) + c];
    }
    __syncthreads();
  }
}

// acc += sum_k A[b][k] * W[k][n]   ("A W", W row-major [K, ldw]); same tiling and rules.
template <class TW>
__device__ __forceinline__ void tile_gemm_nn(float& acc, const float* __restrict__ A, int lda, int M,
                                             const TW* __restrict__ W, int ldw, int N, int K, float* smem) {
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * TN + tx;
  const int b0 = blockIdx.y * TB, n0 = blockIdx.x * TN;
  float* As = smem;
  float* Ws = smem + TB * (KC + 1);
  for (int k0 = 0; k0 < K; k0 += KC) {
    load_a_tile(As, A, lda, M, K, b0, k0, tid);
    for (int i = tid; i < KC * TN; i += kThreads) {
      const int r = i / TN, c = i % TN;
      Ws[r * (TN + 1) + c] = (k0 + r < K && n0 + c < N) ? to_f(W[static_cast<size_t>(k0 + r) * ldw + n0 + c]) : 0.f;
    }
    __syncthreads();
    const int kn = imin(KC, K - k0);
    for (int c = 0; c < kn; ++c) acc += As[ty * (KC + 1) + c] * Ws[c * (TN + 1) + tx];
    __syncthreads();
  }
}

// Elementwise dtype conversions (state init / final outputs).
template <class T>
__global__ void __launch_bounds__(256) to_float_kernel(const T* __restrict__ in, float* __restrict__ out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = to_f(in[i]);
}
template <class T>
__global__ void __launch_bounds__(256) from_float_kernel(const float* __restrict__ in, T* __restrict__ out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = from_f<T>(in[i]);
}

inline dim3 step_grid(int N, int B) { return dim3((N + TN - 1) / TN, (B + TB - 1) / TB); }
inline dim3 step_block() { return dim3(TN, TB); }

template <class T>
inline void launch_to_float(const void* in, float* out, int n, cudaStream_t st) {
  if (n <= 0) return;
  FRNN_LAUNCH(to_float_kernel<T>, dim3((n + 255) / 256), dim3(256), 0, st, static_cast<const T*>(in), out, n);
}
template <class T>
inline void launch_from_float(const float* in, void* out, int n, cudaStream_t st) {
  if (n <= 0) return;
  FRNN_LAUNCH(from_float_kernel<T>, dim3((n + 255) / 256), dim3(256), 0, st, in, static_cast<T*>(out), n);
}

}  // namespace cuda
}  // namespace fusedrnn

// Instantiate a templated driver for the dtype of `a.dt`.
#define FRNN_DISPATCH_DTYPE(fn, a, st)                               \
  switch ((a).dt) {                                                  \
    case ::fusedrnn::cuda::DType::F32: fn<float>(a, st); break;     \
    case ::fusedrnn::cuda::DType::F16: fn<__half>(a, st); break;    \
    case ::fusedrnn::cuda::DType::BF16: fn<__nv_bfloat16>(a, st); break; \
  }
