// CPU emulation of the CUDA execution model, for running the project's CUDA kernel
// sources (csrc/cuda/kernels/*.cuh) with the host C++ compiler on CPU memory.
//
// Include this header FIRST in a translation unit (after the standard headers it
// needs), then the kernel headers. It provides what the kernels use of CUDA:
//   __global__/__device__/__host__/__forceinline__/__restrict__/__launch_bounds__
//   dim3, threadIdx, blockIdx, blockDim, gridDim, warpSize
//   dynamic shared memory (FRNN_DYN_SMEM, see below), __syncthreads, __syncwarp
//   warp shuffles (__shfl_sync/_up/_down/_xor) and votes (__ballot/__all/__any_sync)
//   a grid-wide barrier (cooperative_groups::this_grid().sync(), cooperative launches)
//   atomics (atomicAdd/Sub/Max/Min/Exch/CAS), __half and __nv_bfloat16 with their
//   conversions, the fast-math intrinsics (__expf, __fdividef, ...).
//
// Execution model (runtime.cpp): every CUDA thread of a block is a fiber (ucontext)
// with its own stack, all run on the calling OS thread. A fiber runs until it reaches
// a synchronization point (__syncthreads, a warp collective, grid.sync) or exits, then
// the scheduler picks the next one. At every "pass" the runnable fibers are run in an
// adversarial order (reversed, forward or seeded-random; by default alternating
// reversed / random), and blocks of a grid run in a permuted order. Dynamic shared
// memory is filled with 0xFF bytes (NaN for float, -1 for int) at block start.
// Consequences, all deterministic:
//   * a read of another thread's shared-memory write with no barrier in between sees
//     poison (the writer has not run yet) or, across a missing end-of-loop barrier, the
//     writer's *next* value (one thread runs all the way to the next barrier first);
//   * warps get no implicit lock-step (as with Volta's independent thread scheduling):
//     only the *_sync collectives synchronize lanes, and they require every lane in the
//     mask to arrive (a deadlock is reported as an error, not hung);
//   * __syncthreads in divergent code / mismatched barriers end in a reported deadlock.
#pragma once
#define FRNN_EMULATION 1

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace emu {

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

// The CUDA-visible state of the running fiber (one CUDA thread).
struct ThreadState {
  uint3 tid;
  uint3 bid;
  unsigned char* smem;  // the block's dynamic shared memory
};

extern thread_local ThreadState* g_cur;
extern thread_local dim3 g_block_dim;
extern thread_local dim3 g_grid_dim;

// Scheduling of the fibers (see the header comment). Mode: 0 alternate (default),
// 1 reversed, 2 forward, 3 random. Seed: of the random permutations (reset at every
// launch, so a launch's schedule does not depend on earlier launches).
void set_schedule(int mode, unsigned seed);
void get_schedule(int* mode, unsigned* seed);
// Also settable with FUSEDRNN_EMU_SCHEDULE=alternate|reverse|forward|random[:seed].

// Synchronization points (each may switch to another fiber).
void syncthreads();
void syncthreads_at(const char* file, int line);
// Mutation testing of barriers: make the __syncthreads at `site` ("path:line" as listed by
// barrier_sites(); "" for none) a no-op. barrier_sites(): every site executed so far.
void set_drop_barrier(const char* site);
int barrier_site_count();
const char* barrier_site(int i);
void syncwarp(unsigned mask);
void grid_sync();
// Mutation testing of the grid barrier: make every grid.sync() a no-op (true) or not.
void set_drop_grid_sync(bool drop);
bool grid_sync_dropped();
// Warp collective: every lane in `mask` deposits `v`; returns, for the calling lane, a
// snapshot of all 32 lanes' deposits (undefined for lanes outside the mask).
const uint64_t* warp_exchange(unsigned mask, uint64_t v);
unsigned lane_id();

// Launch `body` (the kernel call) on a grid. Cooperative launches run every block's
// threads in one scheduler so grid_sync() can work; others run block by block. Within a
// cooperative launch, blocks run greedily: each pass runs only the first block (in the
// permuted block order) that has a runnable thread, so a block runs on until all its
// threads wait at grid.sync() (or exit) before the next block moves -- a legal schedule
// that makes any read of another block's data without a grid barrier see stale values.
void run_grid(dim3 grid, dim3 block, size_t smem_bytes, bool cooperative, const std::function<void()>& body);
// Fail the launch from inside a kernel (reported as std::runtime_error by run_grid).
[[noreturn]] void kernel_error(const char* msg);

inline unsigned char* dynamic_smem() { return g_cur->smem; }

template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, bool cooperative, A&&... args) {
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // converted like a kernel call
  run_grid(grid, block, smem, cooperative, [&] { std::apply(kernel, params); });
}

}  // namespace emu

using emu::dim3;
using uint3 = emu::uint3;
typedef void* cudaStream_t;

#define threadIdx (::emu::g_cur->tid)
#define blockIdx (::emu::g_cur->bid)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)
#define warpSize 32

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// `extern __shared__ T name[]` cannot be spelled in host C++: kernels declare their
// dynamic shared memory with this macro (csrc/cuda/kernels/common.cuh defines the nvcc one).
#define FRNN_DYN_SMEM(T, name) T* name = reinterpret_cast<T*>(::emu::dynamic_smem())

// Kernel launch: FRNN_LAUNCH(kernel, grid, block, smem_bytes, stream, args...)
#define FRNN_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::emu::launch(kernel, grid, block, smem, false, __VA_ARGS__)
#define FRNN_LAUNCH_COOPERATIVE(kernel, grid, block, smem, stream, ...) \
  ::emu::launch(kernel, grid, block, smem, true, __VA_ARGS__)
#define FRNN_CHECK_LAUNCH() ((void)0)

// ----------------------------------------------------------------------------- barriers
// Each __syncthreads call site is recorded (file:line); one site can be switched off at
// run time (emu::set_drop_barrier) to check that the tests notice its absence.
#define __syncthreads() ::emu::syncthreads_at(__FILE__, __LINE__)
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::syncwarp(mask); }
inline void __threadfence() {}
inline void __threadfence_block() {}

namespace cooperative_groups {
struct grid_group {
  void sync() const { emu::grid_sync(); }
};
struct thread_block {
  void sync() const { emu::syncthreads(); }
};
inline grid_group this_grid() { return {}; }
inline thread_block this_thread_block() { return {}; }
}  // namespace cooperative_groups

// ----------------------------------------------------------------------------- warp collectives
namespace emu {
template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type wider than 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
// Source lane of lane `l` for each shuffle flavour, `width`-wide segments (CUDA semantics).
template <class T>
inline T shfl_from(unsigned mask, T v, int src_in_segment_or_lane, int width, int kind, unsigned delta) {
  const uint64_t* all = warp_exchange(mask, to_bits(v));
  const int l = static_cast<int>(lane_id());
  const int seg = l & ~(width - 1);
  int src;
  switch (kind) {
    case 0: src = seg + (src_in_segment_or_lane & (width - 1)); break;              // idx
    case 1: src = (l - seg) >= static_cast<int>(delta) ? l - delta : l; break;        // up
    case 2: src = (l - seg) + static_cast<int>(delta) < width ? l + delta : l; break; // down
    default: src = seg + (((l - seg) ^ static_cast<int>(delta)) & (width - 1));      // xor
             if (((l - seg) ^ static_cast<int>(delta)) >= width) src = l;
  }
  if (!((mask >> src) & 1u)) kernel_error("shuffle reads a lane outside the mask (undefined in CUDA)");
  return from_bits<T>(all[src]);
}
}  // namespace emu

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) { return emu::shfl_from(mask, v, src, width, 0, 0); }
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) { return emu::shfl_from(mask, v, 0, width, 1, d); }
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) { return emu::shfl_from(mask, v, 0, width, 2, d); }
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int d, int width = 32) {
  return emu::shfl_from(mask, v, 0, width, 3, static_cast<unsigned>(d));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  const uint64_t* all = emu::warp_exchange(mask, pred ? 1u : 0u);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && all[l]) r |= 1u << l;
  return r;
}
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }

// ----------------------------------------------------------------------------- atomics
// Fibers switch only at synchronization points, so a read-modify-write cannot be
// interleaved: these are atomic by construction.
template <class T>
inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <class T>
inline T atomicSub(T* p, T v) { T old = *p; *p = old - v; return old; }
template <class T>
inline T atomicMax(T* p, T v) { T old = *p; *p = old < v ? v : old; return old; }
template <class T>
inline T atomicMin(T* p, T v) { T old = *p; *p = v < old ? v : old; return old; }
template <class T>
inline T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <class T>
inline T atomicCAS(T* p, T cmp, T v) { T old = *p; if (old == cmp) *p = v; return old; }

// ----------------------------------------------------------------------------- fast math
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
template <class T>
inline T __ldg(const T* p) { return *p; }
// Cache-global loads/stores (bypass L1: data exchanged between blocks within one launch).
// Memory is coherent here; the schedule (blocks run greedily, see run_grid) exposes a
// missing grid barrier instead.
template <class T>
inline T __ldcg(const T* p) { return *p; }
template <class T>
inline void __stcg(T* p, T v) { *p = v; }

// ----------------------------------------------------------------------------- __half, __nv_bfloat16
// Storage types with the IEEE binary16 / bfloat16 bit layouts (the same as at::Half /
// at::BFloat16), converted with round-to-nearest-even like the CUDA intrinsics.
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};

namespace emu {
inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return u2f(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    if (man == 0) return u2f(sign);
    // subnormal: value = man * 2^-24
    float v = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return u2f(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t float_to_half_bits(float f) {
  const uint32_t u = f2u(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t au = u & 0x7fffffffu;
  if (au >= 0x7f800000u) return sign | (au > 0x7f800000u ? 0x7e00u : 0x7c00u);  // nan / inf
  if (au >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: overflow to inf
  if (au < 0x38800000u) {                        // below the smallest normal half (2^-14)
    // subnormal half: round(|f| / 2^-24) to nearest even
    const float a = u2f(au) * 16777216.0f;  // exact scaling by 2^24
    float r = std::nearbyint(a);            // default rounding mode: nearest even
    return sign | static_cast<uint16_t>(r);
  }
  // normal: drop 13 mantissa bits with round-to-nearest-even
  uint32_t v = au - (112u << 23);
  const uint32_t rest = v & 0x1fffu;
  v >>= 13;
  if (rest > 0x1000u || (rest == 0x1000u && (v & 1u))) ++v;
  return sign | static_cast<uint16_t>(v);
}

inline float bf16_bits_to_float(uint16_t b) { return u2f(static_cast<uint32_t>(b) << 16); }
inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = f2u(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet nan
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}
}  // namespace emu

inline float __half2float(__half h) { return emu::half_bits_to_float(h.x); }
inline __half __float2half(float f) { return __half{emu::float_to_half_bits(f)}; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return emu::bf16_bits_to_float(b.x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16{emu::float_to_bf16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }

namespace emu {
// CUDA's atomicAdd on __half / bf16 (sm_70+ / sm_80+): round the fp32 sum.
inline __half atomicAdd_half(__half* p, __half v) {
  __half old = *p; *p = __float2half(__half2float(old) + __half2float(v)); return old;
}
}  // namespace emu
template <>
inline __half atomicAdd<__half>(__half* p, __half v) { return emu::atomicAdd_half(p, v); }
template <>
inline __nv_bfloat16 atomicAdd<__nv_bfloat16>(__nv_bfloat16* p, __nv_bfloat16 v) {
  __nv_bfloat16 old = *p;
  *p = __float2bfloat16(__bfloat162float(old) + __bfloat162float(v));
  return old;
}

// ----------------------------------------------------------------------------- tensor cores
// mma.sync.aligned.m16n8k16.row.col.f32.{f16|bf16}.{f16|bf16}.f32: d += A (16x16) B (16x8) for
// the warp, each lane holding the fragments of the PTX ISA layout (g = lane / 4, t = lane % 4):
//   a[0] = A[g][2t..2t+1]    a[1] = A[g+8][2t..2t+1]   a[2] = A[g][2t+8..]   a[3] = A[g+8][2t+8..]
//   b[0] = B[2t..2t+1][g]    b[1] = B[2t+8..2t+9][g]
//   d[0..1] = D[g][2t..2t+1] d[2..3] = D[g+8][2t..2t+1]
// (lower element of each pair in the low 16 bits). A warp collective: all 32 lanes must call
// it together. Products and sums in fp32 (the hardware's summation order is unspecified).
namespace emu {
inline float mma_elem(uint32_t r, int hi, bool bf16) {
  const uint16_t h = static_cast<uint16_t>(hi ? r >> 16 : r & 0xffffu);
  return bf16 ? bf16_bits_to_float(h) : half_bits_to_float(h);
}
inline void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, bool bf16) {
  uint64_t A01[32], A23[32], Bq[32];
  std::memcpy(A01, warp_exchange(0xffffffffu, a[0] | (uint64_t(a[1]) << 32)), sizeof A01);
  std::memcpy(A23, warp_exchange(0xffffffffu, a[2] | (uint64_t(a[3]) << 32)), sizeof A23);
  std::memcpy(Bq, warp_exchange(0xffffffffu, b[0] | (uint64_t(b[1]) << 32)), sizeof Bq);
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    const uint32_t r[4] = {uint32_t(A01[l]), uint32_t(A01[l] >> 32), uint32_t(A23[l]), uint32_t(A23[l] >> 32)};
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i & 1) * 8, col = 2 * t + (i >> 1) * 8;
      A[row][col] = mma_elem(r[i], 0, bf16);
      A[row][col + 1] = mma_elem(r[i], 1, bf16);
    }
    const uint32_t q[2] = {uint32_t(Bq[l]), uint32_t(Bq[l] >> 32)};
    for (int i = 0; i < 2; ++i) {
      B[2 * t + 8 * i][g] = mma_elem(q[i], 0, bf16);
      B[2 * t + 8 * i + 1][g] = mma_elem(q[i], 1, bf16);
    }
  }
  const int lane = static_cast<int>(lane_id()), g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >> 1) * 8, col = 2 * t + (i & 1);
    float s = 0.f;
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    d[i] += s;
  }
}
}  // namespace emu
