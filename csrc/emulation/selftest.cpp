// Small kernels that exercise the emulator itself (tests/test_emulated_runtime.py):
// a shared-memory exchange with optional barriers, warp shuffles and votes, atomics, a
// cooperative grid barrier, index builtins. Written as CUDA code. No torch headers.
#include "emulation/cuda_emu.h"
#include "emulation/selftest.h"

namespace {

// Each thread publishes its value in shared memory and adds its right neighbour's, `iters`
// times: x <- x + x[(i+1) % n]. Barrier A separates the write from the neighbour's read
// (read-after-write); barrier B separates that read from the next iteration's write
// (write-after-read).
__global__ void neighbor_kernel(const float* in, float* out, int iters, bool barrier_a, bool barrier_b) {
  FRNN_DYN_SMEM(float, s);
  const int i = threadIdx.x, n = blockDim.x;
  const int g = blockIdx.x * n + i;
  float x = in[g];
  for (int it = 0; it < iters; ++it) {
    s[i] = x;
    if (barrier_a) __syncthreads();
    x = x + s[(i + 1) % n];
    if (barrier_b) __syncthreads();
  }
  out[g] = x;
}

// Per warp: xor-butterfly sum, down-shuffle sum (lane 0), broadcast of lane 5, up-shuffle
// (inclusive prefix sum), ballot of x > 0, all/any.
__global__ void warp_kernel(const float* in, float* xor_sum, float* down_sum, float* bcast, float* prefix,
                            unsigned* ballot, int* all_any) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned lane = threadIdx.x % 32;
  const float x = in[g];
  float v = x;
  for (int d = 16; d >= 1; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
  xor_sum[g] = v;
  float w = x;
  for (int d = 16; d >= 1; d /= 2) w += __shfl_down_sync(0xffffffffu, w, d);
  down_sum[g] = lane == 0 ? w : 0.f;
  bcast[g] = __shfl_sync(0xffffffffu, x, 5);
  float p = x;
  for (int d = 1; d < 32; d *= 2) {
    const float o = __shfl_up_sync(0xffffffffu, p, d);
    if (lane >= static_cast<unsigned>(d)) p += o;
  }
  prefix[g] = p;
  const unsigned b = __ballot_sync(0xffffffffu, x > 0.f);
  if (lane == 0) ballot[g / 32] = b;
  all_any[2 * g] = __all_sync(0xffffffffu, x > -100.f);
  all_any[2 * g + 1] = __any_sync(0xffffffffu, x > 100.f);
}

__global__ void atomic_kernel(const int* bins_in, const float* vals, int n, int* hist, float* total, int* max_out,
                              int* cas_counter) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= n) return;
  atomicAdd(&hist[bins_in[g]], 1);
  atomicAdd(total, vals[g]);
  atomicMax(max_out, bins_in[g] * 1000 + (g % 1000));
  // increment through a CAS loop
  int old = *cas_counter, assumed;
  do {
    assumed = old;
    old = atomicCAS(cas_counter, assumed, assumed + 1);
  } while (old != assumed);
}

// Phase 1: every block writes its partial sum. Grid barrier. Phase 2: every block reads
// all partials. Without the barrier, a block that runs first sees poison/zeros.
__global__ void grid_kernel(const float* in, float* partial, float* out, bool grid_barrier) {
  FRNN_DYN_SMEM(float, s);
  const int i = threadIdx.x, n = blockDim.x, blk = blockIdx.x;
  s[i] = in[blk * n + i];
  __syncthreads();
  if (i == 0) {
    float acc = 0.f;
    for (int k = 0; k < n; ++k) acc += s[k];
    partial[blk] = acc;
  }
  if (grid_barrier) cooperative_groups::this_grid().sync();
  float total = 0.f;
  for (int k = 0; k < static_cast<int>(gridDim.x); ++k) total += partial[k];
  out[blk * n + i] = total;
}

__global__ void index_kernel(int* out) {
  const int tpb = blockDim.x * blockDim.y * blockDim.z;
  const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  out[b * tpb + t] = b * 100000 + t;
}

__global__ void convert_kernel(const float* in, uint16_t* half_out, uint16_t* bf16_out, float* half_back,
                               float* bf16_back, int n) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= n) return;
  const __half h = __float2half_rn(in[g]);
  const __nv_bfloat16 b = __float2bfloat16_rn(in[g]);
  half_out[g] = h.x;
  bf16_out[g] = b.x;
  half_back[g] = __half2float(h);
  bf16_back[g] = __bfloat162float(b);
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16) __syncthreads();  // not every thread reaches it: a deadlock
  out[threadIdx.x] = 1.f;
}

}  // namespace

namespace emu_selftest {

void neighbor(const float* in, float* out, int blocks, int threads, int iters, bool a, bool b) {
  FRNN_LAUNCH(neighbor_kernel, dim3(blocks), dim3(threads), threads * sizeof(float), nullptr, in, out, iters, a, b);
}
void warp(const float* in, int n, float* xs, float* ds, float* bc, float* pre, unsigned* ballot, int* all_any) {
  FRNN_LAUNCH(warp_kernel, dim3(n / 64), dim3(64), 0, nullptr, in, xs, ds, bc, pre, ballot, all_any);
}
void atomics(const int* bins, const float* vals, int n, int* hist, float* total, int* max_out, int* cas) {
  FRNN_LAUNCH(atomic_kernel, dim3((n + 127) / 128), dim3(128), 0, nullptr, bins, vals, n, hist, total, max_out, cas);
}
void grid(const float* in, float* partial, float* out, int blocks, int threads, bool barrier) {
  FRNN_LAUNCH_COOPERATIVE(grid_kernel, dim3(blocks), dim3(threads), threads * sizeof(float), nullptr, in, partial,
                          out, barrier);
}
void index(int* out, const unsigned* g, const unsigned* b) {
  FRNN_LAUNCH(index_kernel, dim3(g[0], g[1], g[2]), dim3(b[0], b[1], b[2]), 0, nullptr, out);
}
void convert(const float* in, uint16_t* h, uint16_t* bf, float* hb, float* bb, int n) {
  FRNN_LAUNCH(convert_kernel, dim3((n + 255) / 256), dim3(256), 0, nullptr, in, h, bf, hb, bb, n);
}
void divergent_barrier(float* out) { FRNN_LAUNCH(divergent_barrier_kernel, dim3(1), dim3(32), 0, nullptr, out); }
void set_schedule(int mode, unsigned seed) { emu::set_schedule(mode, seed); }
void get_schedule(int* mode, unsigned* seed) { emu::get_schedule(mode, seed); }
void set_drop_barrier(const char* site) { emu::set_drop_barrier(site); }
int barrier_site_count() { return emu::barrier_site_count(); }
const char* barrier_site(int i) { return emu::barrier_site(i); }
void set_drop_grid_sync(bool drop) { emu::set_drop_grid_sync(drop); }

}  // namespace emu_selftest
