// Persistent recurrence kernels (issue 7; design, footprint and timing model in
// csrc/cuda/PERSISTENT.md): the whole time loop runs inside ONE cooperative launch.
//
//   * Work split: block x owns hidden units [x*U, x*U + U) for all batch rows (the hidden
//     units are split over the SMs, not the batch, so small batches still use every SM).
//   * At kernel start the block copies its slice of W_hh into shared memory, in the input
//     dtype, and keeps it for all steps: forward, the NG gate rows of each owned unit
//     (NG x U x H); backward, the NG*H-long columns of W_hh for each owned unit (the rows of
//     W_hh^T), so dh_{t-1}[b, j] = sum_k da[b, k] W_hh[k, j] needs no other block's weights.
//   * Per step, each block stages the previous step's state vector (h forward, the gate
//     gradients backward; fp32, [B, K]) from global memory (L2; loaded with __ldcg so no stale
//     L1 line is read) in batch chunks, computes its outputs with tensor cores (fp16/bf16:
//     mma.sync m16n8k16, fp32 accumulate, the fp32 state split into hi + lo parts) or
//     SIMT fp32 FMAs (fp32, or when only the smaller SIMT layout fits), the K dimension split
//     over threads/warps and the partial sums reduced through shared memory,
//     runs the cell's pointwise math (csrc/cells/*.h, through the cell's `point`), writes its
//     slice of the new state to global memory and waits at the grid barrier (one per step;
//     the state is double-buffered by step parity, so one barrier suffices).
//
// A cell/direction is a parameter struct C (defined in the cell's .cuh) providing
//   T, NA (accumulators per output: the gates forward, 1 backward), kTransposed (W slice
//   is columns of W_hh), w (W_hh, [G, H] row-major), B, H, iters (time iterations),
//   g (PGeom, filled by the driver), and device functions
//   gemm_src(it): the fp32 [B, K] vector to multiply at iteration it (null: none; acc = 0)
//   prefetch(it, b, j, pre): load the NP inputs of (b, j) that do not depend on the state
//   point(it, b, j, acc, pre, use_pre): the pointwise part for batch row b, hidden unit j
//     (pre holds prefetch's values for it when use_pre).
// Sizes are run-time values: one compiled kernel per cell, direction and dtype serves
// every batch and hidden size (no recompilation, no per-size register pressure).
#pragma once
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>

#ifndef FRNN_EMULATION
#include <cooperative_groups.h>
#endif
#include "cuda/kernels/common.cuh"

namespace fusedrnn {
namespace cuda {

constexpr int kPThreads = 256;  // threads of a persistent block (one block per SM)
constexpr int kMaxKSplit = 32;  // threads sharing one output's K loop

struct PGeom {
  int U;    // hidden units per block
  int bch;  // batch rows staged per chunk
  int K;    // length of the inner products (H forward, NG*H backward)
};

FRNN_HD size_t align16(size_t x) { return (x + 15) & ~size_t(15); }

// Dynamic shared memory of a block. SIMT: W slice (input dtype) | staged state chunk (fp32) |
// partial sums (fp32); the tensor-core layout is persistent_smem_mma.
inline size_t persistent_smem_mma(int NA, int K, int U, int bch);
inline size_t persistent_smem(int NA, int K, int U, int bch, int elem, bool mma) {
  if (mma) return persistent_smem_mma(NA, K, U, bch);  // tensor-core layout (below)
  return align16(size_t(NA) * U * K * elem) + align16(size_t(bch) * K * 4) +
         size_t(NA) * std::max(kPThreads, bch * U) * 4;
}

struct DeviceLimits {
  int sms;             // streaming multiprocessors
  int smem_per_block;  // opt-in dynamic shared memory per block, bytes
  bool cooperative;    // cooperative launches supported
  bool tensor_cores;   // mma.m16n8k16 with fp16/bf16 inputs: compute capability 8.0+
};

#ifdef FRNN_EMULATION
inline DeviceLimits device_limits() {
  std::lock_guard<std::mutex> l(algo_state().m);
  return {algo_state().pretend_sms, algo_state().pretend_smem, true, algo_state().pretend_cc_major >= 8};
}
#else
// Queried at run time for the current device (cached per device ordinal).
inline DeviceLimits device_limits() {
  static DeviceLimits cache[64];
  static bool have[64] = {};
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev >= 0 && dev < 64 && have[dev]) return cache[dev];
  int sms = 0, smem = 0, coop = 0, major = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  const DeviceLimits d{sms, smem, coop != 0, major >= 8};
  if (dev >= 0 && dev < 64) {
    cache[dev] = d;
    have[dev] = true;
  }
  return d;
}
#endif

struct PersistentPlan {
  bool ok = false;
  int U = 0, nblk = 0, bch = 0;
  bool mma = false;  // tensor-core kernel (fp16/bf16) or SIMT
  size_t smem = 0;
  std::string why;
};

inline PersistentPlan plan_persistent_layout(int NA, int K, int H, int B, int elem, const DeviceLimits& d, bool mma) {
  PersistentPlan p;
  char buf[400];
  if (!d.cooperative) {
    p.why = "the device does not support cooperative launches";
    return p;
  }
  p.U = (H + d.sms - 1) / d.sms;
  p.nblk = (H + p.U - 1) / p.U;
  const size_t w = size_t(NA) * p.U * K * elem;
  for (p.bch = B; p.bch >= 1; --p.bch)
    if (persistent_smem(NA, K, p.U, p.bch, elem, mma) <= size_t(d.smem_per_block)) break;
  if (p.bch < 1) {
    std::snprintf(buf, sizeof buf,
                  "W_hh slice of %d units x %d x %d (%zu B) + one staged row + partial sums = %zu B "
                  "> %d B shared memory per block (%d SMs)",
                  p.U, NA, K, w, persistent_smem(NA, K, p.U, 1, elem, mma), d.smem_per_block, d.sms);
    p.why = buf;
    return p;
  }
  p.mma = mma;
  p.smem = persistent_smem(NA, K, p.U, p.bch, elem, mma);
  p.ok = true;
  std::snprintf(buf, sizeof buf,
                "W_hh slice %d units x %d x %d = %zu B per block on chip, %d blocks <= %d SMs, "
                "batch chunk %d of %d, %zu of %d B shared memory, %s",
                p.U, NA, K, w, p.nblk, d.sms, p.bch, B, p.smem, d.smem_per_block,
                mma ? "tensor cores (mma.m16n8k16, fp32 accumulate)" : "SIMT fp32 FMAs");
  p.why = buf;
  return p;
}

// The largest grid the device holds co-resident at one block per SM: U = ceil(H / SMs)
// units per block; then the largest batch chunk that fits next to the W slice. fp16/bf16
// use the tensor-core kernel, or the SIMT one when only its (smaller) layout fits or the
// device has no mma.m16n8k16 (compute capability below 8.0).
inline PersistentPlan plan_persistent(int NA, int K, int H, int B, int elem, const DeviceLimits& d) {
  if (elem == 2 && !d.tensor_cores) {
    PersistentPlan q = plan_persistent_layout(NA, K, H, B, elem, d, false);
    if (q.ok) q.why += " (tensor cores: mma.m16n8k16 needs compute capability 8.0+)";
    return q;
  }
  if (elem == 2) {
    PersistentPlan p = plan_persistent_layout(NA, K, H, B, elem, d, true);
    if (p.ok) return p;
    PersistentPlan q = plan_persistent_layout(NA, K, H, B, elem, d, false);
    if (!q.ok) return p;
    q.why += " (the tensor-core layout does not fit)";
    return q;
  }
  return plan_persistent_layout(NA, K, H, B, elem, d, false);
}

// ---------------------------------------------------------------- tensor cores (fp16/bf16)
// D (batch rows x W-slice rows) += S (state, batch x K) W_slice^T with mma.sync m16n8k16
// (fp32 accumulate): A = the staged state as hi + lo parts in the input dtype (two products;
// rows padded to 16), B = the W
// slice as stored ([rows][K]: exactly the "col" operand; rows padded to 8). Shared-memory rows
// are K rounded up to 16 plus 8 elements, which makes the fragment loads bank-conflict free.
constexpr int kWarps = kPThreads / 32;
FRNN_HD int round_up(int x, int m) { return (x + m - 1) / m * m; }
FRNN_HD int mma_stride(int K) { return round_up(K, 16) + 8; }

__device__ __forceinline__ uint32_t ld_pair(const void* p) {
#ifdef FRNN_EMULATION
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
#else
  return *reinterpret_cast<const uint32_t*>(p);
#endif
}

template <class T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef FRNN_EMULATION
  emu::mma_m16n8k16(d, a, b, sizeof(T) == 2 && !std::is_same<T, __half>::value);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // (compiled for an older GPU: plan_persistent never picks tensor cores there)
#else
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// Shared memory of the tensor-core layout: W slice | staged state | partial sums (fp32).
inline size_t persistent_smem_mma(int NA, int K, int U, int bch) {
  const size_t ks = mma_stride(K), rp = round_up(NA * U, 8), bp = round_up(bch, 16);
  return align16(rp * ks * 2) + 2 * align16(bp * ks * 2) + size_t(4) * std::max<size_t>(bp * rp, 128 * kWarps);
}

template <class C, bool kMma>  // kMma: tensor cores (fp16/bf16 only); else SIMT FMAs
__global__ void __launch_bounds__(kPThreads, 1) persistent_kernel(C p) {
  using T = typename C::T;
  constexpr int NA = C::NA;
  static_assert(!kMma || sizeof(T) == 2, "tensor cores: fp16/bf16 only");
  FRNN_DYN_SMEM(unsigned char, smem);
  const int U = p.g.U, bch = p.g.bch, K = p.g.K, H = p.H, B = p.B;
  const int j0 = blockIdx.x * U, nu = imin(U, H - j0);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // SIMT layout: Ws [NA*U][K], hs [bch][K] fp32. mma layout: Ws [Rp][Ks], hs [Bp][Ks] (T).
  const int Ks = kMma ? mma_stride(K) : K, Rp = kMma ? round_up(NA * U, 8) : NA * U;
  const int Bpmax = kMma ? round_up(bch, 16) : bch;
  T* Ws = reinterpret_cast<T*>(smem);
  unsigned char* hs_raw = smem + align16(size_t(Rp) * Ks * sizeof(T));
  float* hs = reinterpret_cast<float*>(hs_raw);
  // mma: the fp32 state is staged as hi + lo parts in the input dtype (hi = rn(h), lo =
  // rn(h - hi)), two products per K step: as precise as an fp32 state (~2^-16 relative for
  // bf16) instead of rounding the state to bf16/fp16.
  T* hs_t = reinterpret_cast<T*>(hs_raw);
  T* hs_lo = reinterpret_cast<T*>(hs_raw + align16(size_t(Bpmax) * Ks * sizeof(T)));
  float* part = reinterpret_cast<float*>(hs_raw + (kMma ? 2 * align16(size_t(Bpmax) * Ks * sizeof(T))
                                                        : align16(size_t(Bpmax) * Ks * 4)));

  // This block's slice of W_hh, kept on chip for the whole sequence (zero padding).
  for (int i = tid; i < Rp * Ks; i += kPThreads) {
    const int k = i % Ks, r = i / Ks, u = r % U, a = r / U;
    T w = from_f<T>(0.f);
    if (r < NA * U && u < nu && k < K)
      w = C::kTransposed ? p.w[static_cast<size_t>(k) * H + j0 + u]
                         : p.w[(static_cast<size_t>(a) * H + j0 + u) * K + k];
    Ws[i] = w;
  }

  for (int it = 0; it < p.iters; ++it) {
    const float* src = p.gemm_src(it);
    for (int b0 = 0; b0 < B; b0 += bch) {
      const int nb = imin(bch, B - b0), items = nb * nu;
      const int Bp = kMma ? round_up(nb, 16) : nb;
      // This thread's first output of the chunk: its inputs that do not depend on the state
      // (gx) are loaded now, so their latency hides behind the staging and the product.
      float pre[C::NP];
      if (tid < items) p.prefetch(it, b0 + tid / nu, j0 + tid % nu, pre);
      // Stage rows [b0, b0 + nb) of the state other blocks wrote before the grid barrier.
      if (src) {
        if (kMma) {
          for (int i = tid; i < Bp * Ks; i += kPThreads) {
            const int k = i % Ks, r = i / Ks;
            const float v = r < nb && k < K ? __ldcg(src + static_cast<size_t>(b0 + r) * K + k) : 0.f;
            const T hi = from_f<T>(v);
            hs_t[i] = hi;
            hs_lo[i] = from_f<T>(v - to_f(hi));
          }
        } else {
          for (int i = tid; i < nb * K; i += kPThreads) hs[i] = __ldcg(src + static_cast<size_t>(b0) * K + i);
        }
      }
      __syncthreads();
      int KS = 0;  // partial sums per output (K split)
      if constexpr (kMma) {
        const int tiles = (Bp / 16) * (Rp / 8), ksteps = Ks / 16;  // (the +8 pad is < 16)
        KS = src ? (tiles >= kWarps ? 1 : kWarps / tiles) : 0;
        const int g = lane >> 2, t = lane & 3;
        for (int wi = warp; wi < tiles * KS; wi += kWarps) {  // warp-uniform
          const int tile = wi % tiles, ks = wi / tiles;
          const int m0 = (tile / (Rp / 8)) * 16, n0 = (tile % (Rp / 8)) * 8;
          float d[4] = {0.f, 0.f, 0.f, 0.f}, dl[4] = {0.f, 0.f, 0.f, 0.f};  // two independent chains
          for (int kk = ks; kk < ksteps; kk += KS) {
            const int k0 = kk * 16 + 2 * t;
            const T* ar = hs_t + (m0 + g) * Ks + k0;
            const T* al = hs_lo + (m0 + g) * Ks + k0;
            const T* br = Ws + (n0 + g) * Ks + k0;
            const uint32_t b[2] = {ld_pair(br), ld_pair(br + 8)};
            const uint32_t a[4] = {ld_pair(ar), ld_pair(ar + 8 * Ks), ld_pair(ar + 8), ld_pair(ar + 8 * Ks + 8)};
            mma16816<T>(d, a, b);
            const uint32_t l[4] = {ld_pair(al), ld_pair(al + 8 * Ks), ld_pair(al + 8), ld_pair(al + 8 * Ks + 8)};
            mma16816<T>(dl, l, b);
          }
#pragma unroll
          for (int q = 0; q < 4; ++q) d[q] += dl[q];
          float* out = part + (static_cast<size_t>(ks) * Bp + m0 + g) * Rp + n0 + 2 * t;
          out[0] = d[0];
          out[1] = d[1];
          out[8 * Rp] = d[2];
          out[8 * Rp + 1] = d[3];
        }
      } else {
        KS = src ? imin(kMaxKSplit, items >= kPThreads ? 1 : kPThreads / items) : 0;
        for (int i = tid; i < KS * items; i += kPThreads) {
          const int ks = i % KS, item = i / KS, bb = item / nu, u = item % nu;
          const float* hrow = hs + static_cast<size_t>(bb) * K;
          float acc[NA];
#pragma unroll
          for (int a = 0; a < NA; ++a) acc[a] = 0.f;
          for (int k = ks; k < K; k += KS) {
            const float h = hrow[k];
#pragma unroll
            for (int a = 0; a < NA; ++a) acc[a] += h * to_f(Ws[(a * U + u) * K + k]);
          }
#pragma unroll
          for (int a = 0; a < NA; ++a) part[(a * KS + ks) * items + item] = acc[a];
        }
      }
      __syncthreads();
      for (int item = tid; item < items; item += kPThreads) {
        const int bb = item / nu, u = item % nu;
        float acc[NA];
#pragma unroll
        for (int a = 0; a < NA; ++a) {
          acc[a] = 0.f;
          for (int ks = 0; ks < KS; ++ks)
            acc[a] += kMma ? part[(static_cast<size_t>(ks) * Bp + bb) * Rp + a * U + u]
                           : part[(a * KS + ks) * items + item];
        }
        p.point(it, b0 + bb, j0 + u, acc, pre, item == tid);
      }
    }
    // The new state slice is in global memory: one grid-wide barrier per step (it also
    // orders this step's reads of the other parity buffer before anyone overwrites it).
    if (it + 1 < p.iters) cooperative_groups::this_grid().sync();
  }
}

#ifndef FRNN_EMULATION
inline void frnn_cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("fusedrnn persistent kernel: ") + what + ": " + cudaGetErrorString(e));
}
#endif

// The kernel a plan runs (the tensor-core instantiation exists for fp16/bf16 only).
template <class C>
const void* persistent_kernel_ptr(bool mma) {
  if constexpr (sizeof(typename C::T) == 2)
    if (mma) return reinterpret_cast<const void*>(&persistent_kernel<C, true>);
  return reinterpret_cast<const void*>(&persistent_kernel<C, false>);
}

// Decide per_step / persistent for one call (see Algo in api.h), record why, fill `plan`.
// `unsupported`: why this call can never run persistent (null if it can).
template <class C>
bool choose_persistent(const char* what, int K, int H, int B, int T, const char* unsupported, PersistentPlan& plan) {
  const Algo algo = get_algo();
  std::string why;
  bool ok = false;
  if (T == 0 || B == 0 || H == 0) {
    why = "empty sequence or batch: nothing to keep on chip";
  } else if (algo == Algo::PerStep) {
    why = "forced by set_algo('per_step')";
  } else if (unsupported) {
    why = unsupported;
  } else {
    const DeviceLimits d = device_limits();
    plan = plan_persistent(C::NA, K, H, B, sizeof(typename C::T), d);
    ok = plan.ok;
    why = plan.why;
#ifndef FRNN_EMULATION
    if (ok) {  // the grid must be co-resident: ask the occupancy calculator at this size
      const void* k = persistent_kernel_ptr<C>(plan.mma);
      frnn_cuda_check(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem)),
                      "cudaFuncSetAttribute");
      int per_sm = 0;
      frnn_cuda_check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k, kPThreads, plan.smem),
                      "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
      if (per_sm * d.sms < plan.nblk) {
        ok = false;
        why = "occupancy calculator: " + std::to_string(per_sm) + " block(s) per SM cannot hold " +
              std::to_string(plan.nblk) + " blocks (" + why + ")";
      }
    }
#endif
  }
  set_last_algo(std::string(what) + ": " + (ok ? "persistent" : "per_step") + " (" +
                (algo == Algo::Auto ? "auto: " : "") + why + ")");
  if (!ok && algo == Algo::Persistent && T > 0 && B > 0 && H > 0)
    throw std::runtime_error(std::string("fusedrnn: set_algo('persistent') but ") + what + " cannot run persistent: " + why);
  return ok;
}

template <class C>
void launch_persistent(C p, const PersistentPlan& plan, cudaStream_t st) {
#ifdef FRNN_EMULATION
  if constexpr (sizeof(typename C::T) == 2)
    if (plan.mma) {
      FRNN_LAUNCH_COOPERATIVE((persistent_kernel<C, true>), dim3(plan.nblk), dim3(kPThreads), plan.smem, st, p);
      return;
    }
  FRNN_LAUNCH_COOPERATIVE((persistent_kernel<C, false>), dim3(plan.nblk), dim3(kPThreads), plan.smem, st, p);
#else
  void* args[] = {&p};
  frnn_cuda_check(cudaLaunchCooperativeKernel(persistent_kernel_ptr<C>(plan.mma), dim3(plan.nblk), dim3(kPThreads),
                                              args, plan.smem, st),
                  "cudaLaunchCooperativeKernel");
#endif
}

}  // namespace cuda
}  // namespace fusedrnn
