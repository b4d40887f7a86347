// Fused CPU recurrence kernels (see kernels.h and kernels_impl.h). This TU includes
// only light headers: the cells' pointwise math, <ATen/Parallel.h> for
// at::parallel_for, and the BLAS gemm symbols that libtorch_cpu exports (MKL).
#include <math.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstdint>
#include <memory>
#include <new>
#include <thread>
#include <type_traits>
#include <vector>

// Vector variants of the transcendental functions (glibc's libmvec) so that the
// `omp simd` pointwise loops below vectorize through the cells' exp_/tanh_.
// glibc only declares them under -ffast-math; declaring them here keeps IEEE
// semantics everywhere else. (x86-64 glibc only: elsewhere the loops stay scalar.)
#if defined(__x86_64__) && defined(__GLIBC__)
#define FRNN_X86_SIMD 1
#pragma omp declare simd notinbranch
extern "C" float expf(float);
#pragma omp declare simd notinbranch
extern "C" float tanhf(float);
#pragma omp declare simd notinbranch
extern "C" double exp(double);
#pragma omp declare simd notinbranch
extern "C" double tanh(double);
#endif

#include <ATen/Parallel.h>
#if FRNN_X86_SIMD
#include <immintrin.h>
#endif

#include "cells/gru.h"
#include "cells/lstm.h"
#include "cells/rnn.h"
#include "cpu/kernels.h"

// Fortran BLAS (LP64), exported by libtorch_cpu (MKL in the x86 wheels).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
// MKL's thread count for the calling thread's BLAS calls (0: its global setting); returns
// the previous one. Weak: null where torch's BLAS is not MKL (OnCallingThread then leaves
// BLAS's threads alone).
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
int MKL_Get_Max_Threads() __attribute__((weak));  // (tests: calling_thread_threads)
}

namespace fusedrnn {
namespace cpu {
namespace {

inline void blas(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void blas(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
                 const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// Row-major C[M,N] = op(A) @ op(B) + beta * C on column-major BLAS (which computes
// C^T = op(B)^T op(A)^T): op(A) is A[M,K] (ta 'N') or A[K,M]^T ('T'), op(B) is B[K,N]
// (tb 'N') or B[N,K]^T ('T'). K = 0 writes beta * C (BLAS implementations differ there).
template <typename T>
void gemm_rm(char ta, char tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* Bm,
             int64_t ldb, T* C, int64_t ldc, T beta) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = beta == T(0) ? T(0) : beta * C[m * ldc + n];
    return;
  }
  blas(tb, ta, (int)N, (int)M, (int)K, T(1), Bm, (int)ldb, A, (int)lda, beta, C, (int)ldc);
}
// C[M,N] = A[M,K] @ W[N,K]^T + beta * C
template <typename T>
void gemm_nt(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* W, int64_t ldw, T* C,
             int64_t ldc, T beta) {
  gemm_rm<T>('N', 'T', M, N, K, A, lda, W, ldw, C, ldc, beta);
}
// C[M,N] = A[M,K] @ Bm[K,N] + beta * C
template <typename T>
void gemm_nn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* Bm, int64_t ldb, T* C,
             int64_t ldc, T beta) {
  gemm_rm<T>('N', 'N', M, N, K, A, lda, Bm, ldb, C, ldc, beta);
}

// Cache-line-aligned storage for the kernels' per-call buffers (states, gate buffers).
// Two threads write adjacent units of the same rows every step (the boundary between
// their slices, a multiple of 8 or 32 units). In a buffer from plain new/malloc (16-byte
// aligned; mmap'ed chunks start 16 bytes into a page) that boundary falls inside a
// cache line, which then moves between the cores at every row of every step (false
// sharing). In-process A/B against buffers 16 bytes off a line (op T=32, 21 interleaved
// calls): LSTM forward 1.03-1.28x faster (B 8-64, H 256-1024; most at B=8), GRU forward
// 1.07-1.17x, LSTM backward 1.01-1.08x. make_slices puts the boundaries on whole lines.
template <typename T>
struct LineAlloc {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  LineAlloc() = default;
  template <typename U>
  LineAlloc(const LineAlloc<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), kAlign));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, kAlign); }
  template <typename U>
  bool operator==(const LineAlloc<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAlloc<U>&) const { return false; }
};
template <typename T>
using Buf = std::vector<T, LineAlloc<T>>;

// `w` as a T* where it is one, else null: the forwards' recurrent weight, which may be
// bfloat16 bits (TiledBF) while everything else is float32.
template <typename T, typename W>
const T* same_type(const W* w) {
  if constexpr (std::is_same_v<T, W>) return w;
  else return nullptr;
}

Scratch g_scratch;  // set once when the extension loads (register.cpp)

// A float buffer of the kernels' own, from the scratch provider when there is one.
class ScratchBuffer {
 public:
  explicit ScratchBuffer(size_t n) {
    if (g_scratch.alloc) {
      p_ = static_cast<float*>(g_scratch.alloc(n * sizeof(float), &handle_));
    } else {
      own_.reset(new float[n]);
      p_ = own_.get();
    }
  }
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  ~ScratchBuffer() {
    if (handle_) g_scratch.release(handle_);
  }
  float* get() const { return p_; }

 private:
  float* p_ = nullptr;
  void* handle_ = nullptr;
  std::unique_ptr<float[]> own_;
};

// A partition of `units` (hidden units or projection columns) over threads.
struct Slices {
  int n = 1;
  // The threads the work justifies (>= n; n may be fewer, one granule of units each): a
  // time loop split by batch rows (make_split) may use them all.
  int threads = 1;
  int64_t bound[65] = {0};
  int64_t lo(int k) const { return bound[k]; }
  int64_t hi(int k) const { return bound[k + 1]; }
};

// Below this many multiply-adds per step per thread, a parallel region (one per step,
// a barrier at its end) costs more than it saves. Measured on the 2-core VM, idle, 25
// interleaved calls, T=32: 2^14 against the former 2^18 made the LSTM module 1.4-1.7x
// faster at batch 1 (H 256-1024: one thread streamed the whole W_hh from L3 every
// step) and GRU/RNN equal or faster at B 1-64; 2^12 gained nothing more. Then 2^16
// (2026-11-30, the VM quiet, modules in-process, 5 interleaved rounds, T=32, B 1-32,
// H 64-256, inference and training, 54 cases): geomean 1.054x against 2^14, up to 1.84x
// (GRU B=4 H=64 inference; LSTM B=4 H=64 1.73x, B=1 H=128 1.31x), slower in one case
// (RNN B=16 H=64 inference 0.87x); 2^17 and 2^18 lost more (down to 0.77x). A step of
// 2^17 multiply-adds takes ~2.5 us on one core, about what a parallel region cost there.
// On a loaded machine a barrier can wait a whole time slice for a preempted thread:
// raise it there. FUSEDRNN_CPU_MIN_WORK sets the initial value; set_options() changes it
// (tests).
std::atomic<int64_t> g_min_work{[] {
  const char* e = std::getenv("FUSEDRNN_CPU_MIN_WORK");
  const long long x = e ? std::atoll(e) : 0;
  return x > 0 ? (int64_t)x : (int64_t)(1 << 16);
}()};
// How float32 on AVX2 runs the recurrent GEMMs and cpu::gemm: 0 = BLAS, 1 = the
// packed-panel micro-kernels (TiledF below) in the 16 AVX2 registers, 2 = the same, with
// the recurrent steps' kernels in the 32 registers AVX-512 gives (taller blocks of rows:
// see TiledF::kernel32), 3 = the micro-kernels on 16-float (zmm) vectors
// (TiledF::kernel512). Where the CPU has AVX-512 (F and VL) the default is 3 on CPUs that
// execute 512-bit FMAs at full width (zmm_full_width), 2 elsewhere; without AVX-512 every
// mode is lowered to 1. float64 runs TiledD (8-double zmm vectors) in modes 2 and 3, BLAS
// in 0 and 1. FUSEDRNN_CPU_TILED=0/1/2/3 sets it; set_options() too.
bool has_avx512() {
#if FRNN_X86_SIMD
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  return yes;
#else
  return false;
#endif
}
// Whether the kernels default to 16-float (zmm) vectors here: where 512-bit FMAs run at
// full width, twice the 8-float rate. AMD from Zen 5 (CPU family 0x1A; measured on a
// 2-core Zen 5 VM, 2026-11-30: the kernels' GEMMs 1.7-1.9x, see TiledF::kernel512); not
// Zen 4 (family 0x19), which splits them in two (a zmm kernel measured 0.87-1.06x there:
// see kernel32's note). Intel's AVX-512 CPUs too, NOT measured: their server parts run
// 512-bit FMAs on two units (oneDNN's LSTM uses them: on Zen 5 the 8-float kernels ran at
// 0.55-0.66x of it), client parts on one, at the 8-float rate. FUSEDRNN_CPU_TILED=2 keeps
// the 8-float kernels.
bool zmm_full_width() {
#if FRNN_X86_SIMD
  static const bool yes = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
    const bool amd = b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;    // "AuthenticAMD"
    const bool intel = b == 0x756e6547u && d == 0x49656e69u && c == 0x6c65746eu;  // "GenuineIntel"
    if (intel) return true;
    if (!amd || !__get_cpuid(1, &a, &b, &c, &d)) return false;
    const unsigned base = (a >> 8) & 0xf, family = base == 0xf ? base + ((a >> 20) & 0xff) : base;
    return family >= 0x1a;
  }();
  return yes && has_avx512();
#else
  return false;
#endif
}
int tiled_mode(int requested) { return std::max(0, std::min(requested, has_avx512() ? 3 : 1)); }
std::atomic<int> g_tiled{[] {
  const char* e = std::getenv("FUSEDRNN_CPU_TILED");
  return tiled_mode(e && e[0] >= '0' && e[0] <= '9' ? std::atoi(e) : zmm_full_width() ? 3 : 2);
}()};
int64_t min_work_per_thread() { return g_min_work.load(std::memory_order_relaxed); }
// Set by OnCallingThread (kernels.h): this thread's kernels run on it alone.
thread_local bool t_calling_thread_only = false;
// How a recurrence's time loop is shared between threads (see make_split): 0 = chosen per
// call, 1 = always by hidden units, 2 = by batch rows wherever the kernel can (tests).
// FUSEDRNN_CPU_SPLIT sets it; set_options() too.
std::atomic<int> g_split{[] {
  const char* e = std::getenv("FUSEDRNN_CPU_SPLIT");
  const int x = e && e[0] >= '0' && e[0] <= '2' ? e[0] - '0' : 0;
  return x;
}()};

// Test hook of the GEMMs' work stealing (run_stealing; gemm_test_delay in kernels.h).
std::atomic<int> g_test_delay_us{0};
std::atomic<int64_t> g_units_taken{0};

// `gran`: slice boundaries on multiples of this many units (the tiled path passes its
// panel width), rounded up to a multiple of 16: whole 64-byte lines of float rows, so
// that two threads never write one line (see LineAlloc).
Slices make_slices(int64_t units, int64_t work_per_unit, int64_t gran = 16) {
  gran = (gran + 15) / 16 * 16;
  Slices sl;
  int64_t n = at::in_parallel_region() || t_calling_thread_only ? 1 : at::get_num_threads();
  n = std::min<int64_t>(n, 64);
  n = std::min<int64_t>(n, std::max<int64_t>(1, units * work_per_unit / min_work_per_thread()));
  sl.threads = (int)n;
  n = std::min<int64_t>(n, std::max<int64_t>(1, (units + gran - 1) / gran));  // at least one granule each
  sl.n = (int)n;
  const int64_t chunks = (units + gran - 1) / gran;
  for (int k = 0; k <= sl.n; ++k) sl.bound[k] = std::min<int64_t>(units, (chunks * k / sl.n) * gran);
  sl.bound[sl.n] = units;
  return sl;
}

template <typename F>
void run_slices(const Slices& sl, const F& f) {
  if (sl.n == 1) {
    f(0);
    return;
  }
  at::parallel_for(0, sl.n, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) f((int)k);
  });
}

// How the threads share a recurrence's time loop. By units (the default): at every step,
// thread k computes hidden units [units.lo(k), units.hi(k)) of every batch row, then all
// threads meet (the end of a parallel region) before the next step reads the new state.
// By rows (rows.n > 1): thread k runs the whole time loop for batch rows [rows.lo(k),
// rows.hi(k)), all units, in one parallel region: rows of a batch never interact, so
// there is no per-step barrier. Each thread then streams the whole packed weight every
// step instead of its slice, which costs nothing while the weight comes from L2/L3 fast
// enough. In-process A/B (2 threads, Zen 4, T=32): the LSTM forward op at B 8-64, H 256
// and 512, 1.01-1.07x on an idle machine and 1.04-1.33x while another VM's load made it
// noisy (a thread descheduled for a while stalls the other at every barrier of unit
// splitting); H=1024 (16 MB packed) 0.92-0.97x, hence kRowsMaxWeightBytes. Rows are
// chosen where each thread's rows fill the micro-kernel's row blocks as well as unit
// splitting does (B=12 on 2 threads: 6 = 4 + 2 rows per thread, 0.92-0.95x). Modules
// (forward, and forward + backward), B 8-64, H 256-1024, rows where chosen against units
// everywhere: geomean 1.05x; LSTM 1.02-1.19x at H 256-512, GRU 1.04-1.26x, RNN 0.98-1.13x;
// shapes left on units (LSTM, GRU at H=1024) 0.98-1.03x (noise).
struct Split {
  Slices units, rows;
  bool by_rows() const { return rows.n > 1; }
  int n() const { return by_rows() ? rows.n : units.n; }  // slice indices k in use
};
// `units`: the kernel's unit slices (make_slices); `R`: the micro-kernel's rows per block;
// `weight_bytes`: the weights a step streams (the recurrent weight, and W_hr; packed
// panels are the same size but for padding); `tiled`:
// the steps run the packed-panel micro-kernels, else BLAS (float64, fewer than 8 steps,
// the LSTM backward with projection), on the unpacked weight when split by rows. There
// rows need at least kRowsMinBlas rows per thread and 8+ steps: in-process A/B against
// units (modules, 2 threads), float64 T=32 at B=8 0.92-1.13x, B 32-64 1.02-1.27x; float32
// T=4 (units then skip packing the weight) 0.81-1.09x, mostly below 1.
constexpr int64_t kRowsMaxWeightBytes = 16 << 20;  // summed over the threads
constexpr int64_t kRowsMinBlas = 16;
Split make_split(const Slices& units, int64_t B, int64_t R, int64_t weight_bytes, bool tiled, int64_t steps,
                 const Seq* sq) {
  Split sp;
  sp.units = units;
  const int mode = g_split.load(std::memory_order_relaxed);
  const int64_t n = units.threads;  // (rows may use more threads than there are unit slices: H=16, B=128)
  bool rows = false;
  if (n > 1 && mode != 1) {
    if (mode == 2) {
      rows = B >= 2;
    } else {
      const int64_t per = (B + n - 1) / n;  // the most rows a thread gets
      rows = B >= R * n && (per + R - 1) / R * n <= (B + R - 1) / R && n * weight_bytes <= kRowsMaxWeightBytes &&
             (tiled || (B / n >= kRowsMinBlas && steps >= 8));
    }
  }
  if (rows) {
    sp.rows.n = (int)std::min<int64_t>(n, B);
    for (int k = 0; k <= sp.rows.n; ++k) sp.rows.bound[k] = B * k / sp.rows.n;
    if (sq && sq->active) {  // rows that end early skip their GEMM rows: equal sums of lengths
      int64_t total = 0, sum = 0;
      for (int64_t b = 0; b < B; ++b) total += sq->lengths[b];
      const int64_t n = sp.rows.n;
      for (int64_t b = 0, k = 1; b < B && k < n; ++b) {
        sum += sq->lengths[b];
        while (k < n && sum * n >= total * k) sp.rows.bound[k++] = b + 1;
      }
      for (int64_t k = 1; k < n; ++k)  // (each thread at least one row)
        sp.rows.bound[k] = std::clamp<int64_t>(sp.rows.bound[k], sp.rows.bound[k - 1] + 1, B - (n - k));
    }
  }
  return sp;
}

// The time loop: for i = 0 .. steps-1, st.begin(i), then step(k, i, j0, j1, b0, b1, st)
// for units [j0, j1) of rows [b0, b1) in every slice k, then st.end(). `st` is the
// loop's state (ping-pong buffers: cheap to copy, same evolution in every thread). By
// units, one parallel region per step, with pre(i, st) and post(i, st) single-threaded
// around it (they may run parallel regions of their own); by rows, each thread works on
// its own copy of st, and pre/post are not called: step does their work for its rows.
// Ends with `st` as after the last step.
struct NoHook {
  template <typename S>
  void operator()(int64_t, S&) const {}
};
template <typename S, typename F, typename Pre = NoHook, typename Post = NoHook>
void run_steps(const Split& sp, int64_t steps, int64_t units, int64_t B, S& st, const F& step,
               const Pre& pre = Pre(), const Post& post = Post()) {
  if (sp.by_rows()) {
    run_slices(sp.rows, [&](int k) {
      S my = st;
      for (int64_t i = 0; i < steps; ++i) {
        my.begin(i);
        step(k, i, int64_t(0), units, sp.rows.lo(k), sp.rows.hi(k), my);
        my.end();
      }
    });
    for (int64_t i = 0; i < steps; ++i) {
      st.begin(i);
      st.end();
    }
    return;
  }
  for (int64_t i = 0; i < steps; ++i) {
    st.begin(i);
    pre(i, st);
    run_slices(sp.units, [&](int k) { step(k, i, sp.units.lo(k), sp.units.hi(k), int64_t(0), B, st); });
    post(i, st);
    st.end();
  }
}

// A forward's state: h_{t-1} (cur) and h_t (next), swapped after every step.
template <typename T>
struct PingPong {
  T* cur;
  T* next;
  void begin(int64_t) {}
  void end() { std::swap(cur, next); }
};

// A forward's first step when h0 is all zero, the modules' state when no hx is given:
// every row of 0 @ W^T is the same (+0, or NaN where W has a non-finite entry, as the
// full GEMM gives: the micro-kernel's accumulators start from +0; a BLAS library could
// differ from its full GEMM in the sign of a zero at most), so step 0 computes the first
// row of its rows only and every row's cell reads that one: 1/T of the recurrent GEMM.
struct FirstStep {
  bool zero;
  template <typename T>
  FirstStep(const T* h0, int64_t n) : zero(all_zero(h0, n)) {}
  // How many of the n running rows (Seq::rows) step s's GEMM computes, and which row's
  // result row b reads.
  int64_t gemm_rows(int64_t s, int64_t n) const {
    return zero && s == 0 ? std::min<int64_t>(1, n) : n;  // (batch 0: none)
  }
  int64_t row(int64_t s, int64_t b0, int64_t b) const { return zero && s == 0 ? b0 : b; }
};

// How many rows a tiled forward step (by rows: a thread's own rows) computes the gates of
// before it runs their cells: in inference, where a row's part of the gate buffer is 2 KB
// or more (LSTM H >= 128 in float32), one micro-kernel row block at a time, so that the
// cells read the gates the GEMM has just written to L1; elsewhere all rows at once.
// In-process A/B, LSTM inference, T 32-64 (2026-12-01, Zen 5): by rows, H=128 (input 8)
// B 32-64 1.14-1.28x, B=128 1.06x; H=256 B 32-64 1.02-1.06x; H=512 1.01-1.04x. Not: H
// 32-64 (0.94-1.0x with 8 or 16 rows), units splits (B=24 H=128 0.80x: each chunk's GEMM
// streams the slice's weight again), training (0.98-1.0x: the cells' stores of the saved
// gates dominate there), float64 (0.93-1.02x at H 64-256), a bfloat16 w_hh (TiledBF: B=64
// H=512 0.97-0.98x), GRU (0.96-1.0x at H 256-512), RNN (1.03-1.08x at H=256 with a
// threshold of 1 KB, 0.98-1.0x at H 512-1024): float32 LSTM forwards only.
inline int64_t cell_chunk_rows(bool by_rows, bool inference, int64_t rows, int64_t row_bytes, int64_t R) {
  return by_rows && inference && row_bytes >= 2048 ? R : rows;
}

// Rows [b0, b1) of a tiled forward step, `chunk` rows at a time: gemm(c0, n, i) computes
// the gates of rows [c0, c0 + n) (chunk i), then cells(b) runs row b's cell math. With
// nr < b1 - b0 GEMM rows (the first step's one row when h0 = 0, rows that have ended): one
// GEMM of nr rows, then every row's cells.
template <typename Gemm, typename Cells>
void gemm_then_cells(int64_t b0, int64_t b1, int64_t nr, int64_t chunk, const Gemm& gemm, const Cells& cells) {
  if (nr < b1 - b0 || chunk <= 0) chunk = b1 - b0;
  for (int64_t c0 = b0, i = 0; c0 < b1; c0 += chunk, ++i) {
    const int64_t c1 = std::min(b1, c0 + chunk);
    gemm(c0, nr < b1 - b0 ? nr : c1 - c0, i);
    for (int64_t b = c0; b < c1; ++b) cells(b);
  }
}

// Reorders the rows of a gate-major weight [ng*H, K] so that each slice's rows (all
// gates of its units, gate-major within the slice) are contiguous: one GEMM per
// slice per step, output columns [ng*j0, ng*j1) of a [B, ng*H] buffer.
template <typename T>
void pack_rows(const T* w, T* out, int ng, int64_t H, int64_t K, const Slices& sl) {
  for (int k = 0; k < sl.n; ++k) {
    const int64_t j0 = sl.lo(k), nu = sl.hi(k) - j0;
    for (int g = 0; g < ng; ++g)
      std::copy(w + (g * H + j0) * K, w + (g * H + j0 + nu) * K, out + (ng * j0 + g * nu) * K);
  }
}


// The recurrent weight [ng*H, K] seen per slice: gh[:, ng*j0 + g*nu + u] = h @ W[g*H + j0 + u]^T.
// Long sequences pack each slice's rows contiguously once (one GEMM per slice per
// step); short ones (e.g. step-by-step decoding) skip the copy and run one GEMM per gate.
template <typename T>
struct GateWeights {
  static constexpr int64_t kPackMinSteps = 8;
  const T* w;
  int ng;
  int64_t H, K;
  const Slices& sl;
  std::vector<T> packed;
  GateWeights(const T* w_, int ng_, int64_t H_, int64_t K_, const Slices& sl_, int64_t steps)
      : w(w_), ng(ng_), H(H_), K(K_), sl(sl_) {
    if (steps >= kPackMinSteps) {
      packed.resize(ng * H * K);
      pack_rows(w, packed.data(), ng, H, K, sl);
    }
  }
  void gemm(int k, int64_t B, const T* h, T* gh) const {
    const int64_t j0 = sl.lo(k), nu = sl.hi(k) - j0;
    if (!packed.empty()) {
      gemm_nt<T>(B, ng * nu, K, h, K, packed.data() + ng * j0 * K, K, gh + ng * j0, ng * H, T(0));
    } else if (nu == H) {  // one slice: the unpacked weight is already in its layout, one GEMM
      gemm_nt<T>(B, ng * H, K, h, K, w, K, gh, ng * H, T(0));
    } else {
      for (int g = 0; g < ng; ++g)
        gemm_nt<T>(B, nu, K, h, K, w + (g * H + j0) * K, K, gh + ng * j0 + g * nu, ng * H, T(0));
    }
  }
};


// A forward's saved tensor [T, B, width] (gates, cells, hn). In inference it is null
// (train=False) and every (t, b) row of slice k goes to slice k's scratch row instead,
// which stays in cache and which nothing reads. One row per slice, whole lines apart:
// slices write disjoint units, but a shared row would put gate q's slice boundary
// (q * H + j0) inside a line that both threads write at every row of every step.
template <typename T>
struct SavedRows {
  T* base;
  int64_t B, width, stride;
  Buf<T> scratch;
  SavedRows(T* p, int64_t B_, int64_t w, int nslices)
      : base(p), B(B_), width(w), stride((w + 15) / 16 * 16), scratch(p ? 0 : nslices * stride) {}
  T* at(int64_t t, int64_t b, int k) { return base ? base + (t * B + b) * width : scratch.data() + k * stride; }
};

// span(q, n) for the panels [p0, p1) of a step, one at a time or (pairs) a pair [q, q + 1]
// for even q, and `reversed`, from the last to the first. The time loops reverse every
// other step, so that a step starts on the panels the previous one ended on, still in L2:
// streamed in one order every step, a weight larger than L2 evicts each panel before its
// next use. Where the software prefetch runs (weights of kPrefetchMinBytes and more:
// its `next` is the following panel in memory) they keep one order. Each output is the
// same either way. The forward ops, T=32-64, Zen 5, alternating processes, 3 rounds: LSTM
// H=512 B=8 3.24-3.36 -> 2.97-3.13 ms, B=4 1.67-1.78 -> 1.56-1.63, B 32-64 1-3% faster,
// B=64 H=256 unchanged; GRU H=512 B=8 2.31-2.45 -> 2.08-2.35, B=64 unchanged. (In the
// backward's recurrent GEMM: no difference measured, so it keeps one order.)
template <typename Span>
void for_spans(bool pairs, int64_t npanel, int64_t p0, int64_t p1, bool reversed, const Span& span) {
  if (reversed) {
    for (int64_t p = p1; p > p0;) {
      const int64_t q = pairs && ((p - 1) & 1) ? p - 2 : p - 1;
      span(q, p - q);
      p = q;
    }
    return;
  }
  for (int64_t p = p0; p < p1;) {
    const int64_t n = pairs && p + 1 < npanel ? 2 : 1;
    span(p, n);
    p += n;
  }
}

// Packed-panel recurrent GEMM (TiledF: float32 on AVX2/FMA, TiledD: float64 on AVX-512;
// see the avx2 namespace below). This generic version is never used: use() is false.
template <typename T>
struct TiledStub {
  static bool use(int64_t, int64_t) { return false; }
  static int64_t panel_units(int) { return 8; }
  static int64_t block_rows(int) { return 4; }
  TiledStub(const T*, int64_t, int64_t, int, int64_t, int64_t, int64_t, const Slices&) {}
  int64_t ldc() const { return 0; }
  struct ARows {
    const T* p;
    int64_t ld;
  };
  ARows rows_of(int, const T* a, int64_t lda, int64_t) const { return {a, lda}; }
  int64_t first_panel(int64_t) const { return 0; }
  int64_t end_panel(int64_t) const { return 0; }
  void gemm_panel(int64_t, int64_t, const T*, int64_t, T*, int64_t, bool, bool, T*) const {}
  void gemm_gates(int64_t, int64_t, int64_t, const T*, int64_t, T*, int64_t, bool) const {}
};

}  // namespace

// Seq::len is defined here (the header keeps Seq a plain struct).
}  // namespace cpu
}  // namespace fusedrnn

namespace fusedrnn {
namespace cpu {
namespace {
struct SeqV : Seq {
  explicit SeqV(const Seq& s) : Seq(s) {}
  int64_t len(int64_t b) const { return lengths ? lengths[b] : T; }
};
}  // namespace

#if FRNN_X86_SIMD
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace {

// The recurrent GEMM C[B, N] (+)= A[B, K] @ W^T on a weight packed once per call into
// panels of 8*V output columns: panel p holds, for k = 0..K-1, its 8*V values of row k
// contiguously (zero-padded), so the micro-kernel streams it with aligned-size loads
// and keeps an R x V block of 8-wide accumulators in registers (R batch rows).
// Column layout of a panel: with ng gates interleaved (LSTM ng = V = 4, GRU ng = V = 3)
// panel p covers units [8p, 8p+8) and vector v holds gate v of those units, so one
// panel's output is all gates of 8 hidden units (the cell math's unit of work).
// With ng = 1 (RNN, and every backward, whose output is dL/dh) panel p covers units
// [8Vp, 8Vp+8V). The output C is either a padded gate buffer (ldc = npanel*8V) or,
// with `exact`, a [B, units] matrix whose last panel may be partial.
// (That geometry is PanelGeometry's, shared with TiledD, the float64 version.)
struct PanelGeometry {
  int V, ng;
  int64_t units, K, npanel;
  PanelGeometry(int ng_, int64_t units_, int64_t K_)
      : V(ng_ == 1 ? 4 : ng_), ng(ng_), units(units_), K(K_), npanel((units_ + panel_units(ng_) - 1) / panel_units(ng_)) {}
  static int64_t panel_units(int ng) { return ng == 1 ? 32 : 8; }
  int64_t first_panel(int64_t u0) const { return u0 / panel_units(ng); }
  // Whether panel p's vectors all hold real columns (no zero padding).
  bool full_panel(int64_t p) const { return (p + 1) * panel_units(ng) <= units; }
  // The weight column (gate * units + unit) of vector v's first value in panel p.
  int64_t column(int v, int64_t p) const { return ng == 1 ? p * panel_units(1) + v * 8 : v * units + p * panel_units(ng); }
  int64_t end_panel(int64_t u1) const { return (u1 + panel_units(ng) - 1) / panel_units(ng); }
};
// A packed-panel weight's constructor work: each thread of `sl` packs its slice's panels
// (tw.pack(W, sc, sk, p); TiledF, TiledD, TiledBF).
template <typename TW, typename W>
void pack_slices(TW& tw, const W* w, int64_t sc, int64_t sk, const Slices& sl) {
  run_slices(sl, [&](int k) {
    for (int64_t p = tw.first_panel(sl.lo(k)); p < tw.end_panel(sl.hi(k)); ++p) tw.pack(w, sc, sk, p);
  });
}

struct TiledF : PanelGeometry {
  // Shorter sequences run BLAS on the unpacked weight (packing it costs a pass over it),
  // except from 2 steps where the weight [G*H, K] has at most kShortMaxWeights elements:
  // there the per-step BLAS calls (one per gate) cost more than the packing. Measured
  // in-process, 2026-11-30, Zen 4 (bench/MEASUREMENTS.md): T 2-7, H <= 128, the forward op
  // 0.98-3.3x (B >= 4 at H = 32: 1.6-3.3x), a module's training step 0.98-1.17x; at H = 256
  // training steps were 0.69-0.98x slower packed, so those stay on BLAS.
  static constexpr int64_t kMinSteps = 8;
  static constexpr int64_t kShortMaxWeights = 65536;
  static constexpr int64_t KC = 128;       // gemm_blocked's k-block: a 4-vector panel block is 16 KB (L1)
  // The recurrent steps' k-block (gemm_span): the whole K up to 512, so each micro-kernel
  // call runs 4x longer between its loads and stores of the accumulators (its 64 KB weight
  // block then streams from L2 at 128 bytes per 16 FMAs). Sums in the same order, the same
  // bits. In-process, 15 interleaved calls, KC 128 -> 512 (2026-12-01, Zen 5): LSTM B=64
  // H=512 inference 1.05x, training 1.02x; GRU B=64 H=512 inference 1.03x; H=1024 within
  // noise (0.998-1.018x); none clearly slower.
  static constexpr int64_t kStepKC = 512;
  static constexpr int64_t kPrefetchMinBytes = 8 << 20;  // packed weight size (see gemm_panel)
  static constexpr int64_t kPrefetchMinRows = 12;  // 4+ row blocks: bursts; fewer rows: in the k loop
  static bool use(int64_t steps, int64_t weights) {
    return (steps >= kMinSteps || (steps >= 2 && weights <= kShortMaxWeights)) &&
           g_tiled.load(std::memory_order_relaxed);
  }
  // Rows per micro-kernel block in the recurrent steps (rows() below).
  // (zmm: kernel512's 8 rows; make_split splits by rows only where each thread's rows fill
  // them as well as the whole batch does: LSTM H=512 B=8 split 4 + 4 by rows streamed the
  // whole weight on each thread at half the rows per pass, 1.16-1.18x slower than by units.)
  static int64_t block_rows(int ng) { return zmm() ? 8 : ng == 3 || wide() ? 4 : 3; }

  // GRU's 3-vector panels on zmm vectors (tiled mode 3) are packed in pairs, [q, q + 1] for
  // even q, each k's 48 values together, so that the step's GEMM runs 3 zmm per row
  // (kernel512<6, R>) instead of a zmm and an 8-float vector per panel; the gate buffer's
  // layout is the same (panel p's 24 columns at 24 p). An odd last panel stays alone.
  bool pairs;
  std::unique_ptr<ScratchBuffer> P;  // the packed panels

  // value(col, k) = W[col * sc + k * sk]; col = gate * units + unit.
  TiledF(const float* W, int64_t sc, int64_t sk, int ng_, int64_t units_, int64_t K_, int64_t /*unused*/,
         const Slices& sl)
      : TiledF(ng_, units_, K_) {
    pack_slices(*this, W, sc, sk, sl);
  }
  // Unpacked: the caller packs each panel (pack(), e.g. inside its own parallel region).
  TiledF(int ng_, int64_t units_, int64_t K_)
      : PanelGeometry(ng_, units_, K_), pairs(ng_ == 3 && zmm()), P(new ScratchBuffer(npanel * K * 8 * V)) {}
  void pack(const float* W, int64_t sc, int64_t sk, int64_t p) {
    const int64_t up = panel_units(ng);
    int64_t start, ld;  // (ld: floats between its k rows)
    packed_at(pairs, npanel, K, 8 * V, p, start, ld);
    float* out = P->get() + start;
    if (sc == 1 && full_panel(p)) {
      // Columns contiguous (the backward's W_hh^T, B of a weight gradient), no padding: all
      // the panel's vectors of row k, row after row, in one pass over W. (Vector by vector,
      // V passes over rows H or 4H floats apart, for W_hh^T a multiple of 4 KB: in-process,
      // T=32, training steps LSTM B=1 H=1024 1.2x faster, GRU B=8 H=512 and RNN B=8
      // H=1024 1.04-1.06x, B 32-64 within noise; TiledD and TiledBF pack the same way.)
      for (int64_t k = 0; k < K; ++k)
        for (int v = 0; v < V; ++v) _mm256_storeu_ps(out + k * ld + v * 8, _mm256_loadu_ps(W + column(v, p) + k * sk));
      return;
    }
    for (int v = 0; v < V; ++v) {
      const int gate = ng == 1 ? 0 : v;
      const int64_t u0 = p * up + (ng == 1 ? v * 8 : 0);
      int64_t k = 0;
      if (sk == 1) {
        // Rows of W contiguous in k (the forward's W_hh): 8 rows x 8 k at a time through
        // an 8x8 register transpose.
        const float* row[8];
        for (int l = 0; l < 8; ++l) row[l] = u0 + l < units ? W + (gate * units + u0 + l) * sc : nullptr;
        for (; k + 8 <= K; k += 8) {
          __m256 r[8];
          for (int l = 0; l < 8; ++l) r[l] = row[l] ? _mm256_loadu_ps(row[l] + k) : _mm256_setzero_ps();
          transpose8(r);
          for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + (k + j) * ld + v * 8, r[j]);
        }
      }
      if (sc == 1 && u0 + 8 <= units)  // columns contiguous, in a partial panel: 8 at a time
        for (; k < K; ++k) _mm256_storeu_ps(out + k * ld + v * 8, _mm256_loadu_ps(W + gate * units + u0 + k * sk));
      for (; k < K; ++k)
        for (int l = 0; l < 8; ++l) {
          const int64_t u = u0 + l;
          out[k * ld + v * 8 + l] = u < units ? W[(gate * units + u) * sc + k * sk] : 0.f;
        }
    }
  }
  static inline void transpose8(__m256 r[8]) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
    r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
    r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
  }
  // Row stride of the padded gate buffer: one cache line more than the panels, so that
  // rows are not a multiple of 4 KB apart (L1 set conflicts, 4K aliasing).
  int64_t ldc() const { return npanel * 8 * V + 16; }
  // A step's A operand as gemm_panel takes it (TiledBF converts it; here it is A itself).
  struct ARows {
    const float* p;
    int64_t ld;
  };
  ARows rows_of(int, const float* a, int64_t lda, int64_t) const { return {a, lda}; }

  // `pf`: npf (<= K) cache lines to prefetch, one per k step (the in-loop prefetch, see rows()).
  // `init` (if not null and not acc): the accumulators start from it (8*VV values, a bias).
  // NREG: the vector registers the loop order may count on (16 for AVX2; kernel32: 32).
  template <int VV, int R, int NREG = 16>
  __attribute__((always_inline)) static inline void kernel(int64_t K, const float* A, int64_t lda, const float* Pn,
                                                           float* C, int64_t ldc, bool acc, const char* pf,
                                                           int64_t npf, const float* init) {
    __m256 c[R][VV];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < VV; ++v)
        c[r][v] = acc    ? _mm256_loadu_ps(C + r * ldc + v * 8)
                  : init ? _mm256_loadu_ps(init + v * 8)
                         : _mm256_setzero_ps();
    int64_t k = 0;
    if constexpr (R == 1) {
      // One row (batch 1, a GEMV): a second set of accumulators for odd k, so that
      // 2*VV independent FMA chains hide the FMA latency.
      __m256 d[VV];
#pragma GCC unroll 8
      for (int v = 0; v < VV; ++v) d[v] = _mm256_setzero_ps();
      for (; k + 2 <= K; k += 2) {
        const float* w = Pn + k * (8 * VV);
        const __m256 a0 = _mm256_broadcast_ss(A + k), a1 = _mm256_broadcast_ss(A + k + 1);
#pragma GCC unroll 8
        for (int v = 0; v < VV; ++v) {
          c[0][v] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(w + v * 8), c[0][v]);
          d[v] = _mm256_fmadd_ps(a1, _mm256_loadu_ps(w + 8 * VV + v * 8), d[v]);
        }
      }
#pragma GCC unroll 8
      for (int v = 0; v < VV; ++v) c[0][v] = _mm256_add_ps(c[0][v], d[v]);
    }
    // The loop order keeps every operand in the 16 ymm registers: R*VV accumulators
    // plus either the R broadcasts of A (then one weight vector at a time) or the VV
    // weight vectors (then one broadcast at a time), whichever fits. With 17 live
    // values GCC reloads a weight vector from L1 for every row instead, which cost
    // ~25% of the kernel's throughput (60 -> 80 GFLOP/s per core for 3x4).
    if constexpr (R * VV + R + 1 <= NREG) {
      for (; k < K; ++k) {
        if (k < npf) _mm_prefetch(pf + 64 * k, _MM_HINT_T0);
        const float* w = Pn + k * (8 * VV);
        __m256 a[R];
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) a[r] = _mm256_broadcast_ss(A + r * lda + k);
#pragma GCC unroll 8
        for (int v = 0; v < VV; ++v) {
          const __m256 wv = _mm256_loadu_ps(w + v * 8);
#pragma GCC unroll 16
          for (int r = 0; r < R; ++r) c[r][v] = _mm256_fmadd_ps(a[r], wv, c[r][v]);
        }
      }
    } else {
      for (; k < K; ++k) {
        if (k < npf) _mm_prefetch(pf + 64 * k, _MM_HINT_T0);
        const float* w = Pn + k * (8 * VV);
        __m256 wv[VV];
#pragma GCC unroll 8
        for (int v = 0; v < VV; ++v) wv[v] = _mm256_loadu_ps(w + v * 8);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const __m256 a = _mm256_broadcast_ss(A + r * lda + k);
#pragma GCC unroll 8
          for (int v = 0; v < VV; ++v) c[r][v] = _mm256_fmadd_ps(a, wv[v], c[r][v]);
        }
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < VV; ++v) _mm256_storeu_ps(C + r * ldc + v * 8, c[r][v]);
  }
  // The same kernel compiled for AVX-512's 32 vector registers (still 8-float vectors),
  // where a block of 4 rows of a 4-vector panel (the LSTM and RNN forward, every
  // backward) keeps its 16 accumulators, 4 broadcasts and a weight vector in registers:
  // a step's GEMM passes over each weight block B / 4 times instead of B / 3. Same sums
  // in the same order, so the results are bit-identical. In-process A/B against the
  // 16-register kernel, T=32, 2 threads, Zen 4: LSTM op forward and backward 1.04-1.09x at
  // B=8 (H 256, 512), 1.00-1.05x at B 32-64. Not used: GRU's 3-vector panels in 6-row
  // blocks (its forward module 0.93-0.99x), cpu::gemm's blocks (192 rows of A in L2: no
  // gain), a build of everything for AVX-512 (the input projection 2-6% slower), 16-float
  // (zmm) vectors (no faster: Zen 4 splits them in two).
  template <int VV, int R>
  __attribute__((target("avx2,fma,avx512f,avx512vl"), noinline)) static void kernel32(
      int64_t K, const float* A, int64_t lda, const float* Pn, float* C, int64_t ldc, bool acc, const char* pf,
      int64_t npf, const float* init) {
    kernel<VV, R, 32>(K, A, lda, Pn, C, ldc, acc, pf, npf, init);
  }
  // kernel512's accumulators (TiledBF's too): a row's first 16 columns in a zmm vector,
  // the rest (16 of a 4-vector panel, 8 of a 3-vector one) in Hi512; from C (acc), from
  // `init` (a bias, if not null) or zero, and back to C.
  template <int VV>
  using Hi512 = std::conditional_t<VV == 4, __m512, __m256>;
  template <int VV, int R>
  __attribute__((target("avx2,fma,avx512f,avx512vl"), always_inline)) static inline void load512(
      __m512 (&c)[R], Hi512<VV> (&d)[R], const float* C, int64_t ldc, bool acc, const float* init) {
    static_assert(VV == 3 || VV == 4, "4- and 3-vector panels");
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const float* from = acc ? C + r * ldc : init;
      c[r] = from ? _mm512_loadu_ps(from) : _mm512_setzero_ps();
      if constexpr (VV == 4) d[r] = from ? _mm512_loadu_ps(from + 16) : _mm512_setzero_ps();
      else d[r] = from ? _mm256_loadu_ps(from + 16) : _mm256_setzero_ps();
    }
  }
  template <int VV, int R>
  __attribute__((target("avx2,fma,avx512f,avx512vl"), always_inline)) static inline void store512(
      const __m512 (&c)[R], const Hi512<VV> (&d)[R], float* C, int64_t ldc) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      _mm512_storeu_ps(C + r * ldc, c[r]);
      if constexpr (VV == 4) _mm512_storeu_ps(C + r * ldc + 16, d[r]);
      else _mm256_storeu_ps(C + r * ldc + 16, d[r]);
    }
  }
  // The same for a pair of 3-vector panels (pairs, VV = 6): 3 zmm vectors per row.
  template <int R>
  __attribute__((target("avx2,fma,avx512f,avx512vl"), always_inline)) static inline void load512x3(
      __m512 (&c)[R][3], const float* C, int64_t ldc, bool acc, const float* init) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const float* from = acc ? C + r * ldc : init;
      for (int z = 0; z < 3; ++z) c[r][z] = from ? _mm512_loadu_ps(from + 16 * z) : _mm512_setzero_ps();
    }
  }
  template <int R>
  __attribute__((target("avx2,fma,avx512f,avx512vl"), always_inline)) static inline void store512x3(
      const __m512 (&c)[R][3], float* C, int64_t ldc) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
      for (int z = 0; z < 3; ++z) _mm512_storeu_ps(C + r * ldc + 16 * z, c[r][z]);
  }
  // Where panel p's values start in a packed weight of npanel panels of w floats per k
  // (K of them) and how many floats lie between its k rows: alone, p K w and w; packed in
  // pairs (`pairs`, GRU on zmm), inside the block of its pair [q, q + 1] (q = p rounded down
  // to even, unless q is the odd last panel, alone): q K w + (p - q) w and 2w. (TiledBF too.)
  static void packed_at(bool pairs, int64_t npanel, int64_t K, int64_t w, int64_t p, int64_t& start, int64_t& ld) {
    const int64_t q = pairs ? p & ~int64_t(1) : p;
    start = q * K * w + (p - q) * w;
    ld = pairs && q + 1 < npanel ? 2 * w : w;
  }
  // 16-float (zmm) vectors: a 4-vector panel's 32 columns are 2 of them per row (a lone
  // 3-vector panel: one, and an 8-float vector for its last 8 columns; a pair of them,
  // VV = 6: 3), so a block of R rows keeps 2R accumulators (pairs: 3R; R = 8: 16 or 24 of
  // the 32 registers; the broadcasts of A are the FMAs' memory operands). Half the FMA
  // instructions of the 8-float kernels, for CPUs that run 512-bit FMAs at full width
  // (zmm_full_width: Zen 5). Each output's sum over k is in the same order as kernel's, so
  // the results are bit-identical. One row (a GEMV, bound by the weight loads) stays on
  // kernel. GRU's panels in pairs (pairs), B=64, H=512, T=32, inference: the recurrence op
  // 297 -> 413 GFLOP/s (10.84 -> 7.81 ms), the module 18.56 -> 14.70 ms.
  template <int VV, int R>
  __attribute__((target("avx2,fma,avx512f,avx512vl"), noinline)) static void kernel512(
      int64_t K, const float* A, int64_t lda, const float* Pn, float* C, int64_t ldc, bool acc, const char* pf,
      int64_t npf, const float* init) {
    if constexpr (VV == 6) {  // a pair of 3-vector panels (pairs): 48 columns, 3 zmm per row
      __m512 c[R][3];
      load512x3<R>(c, C, ldc, acc, init);
      for (int64_t k = 0; k < K; ++k) {
        if (k < npf) _mm_prefetch(pf + 64 * k, _MM_HINT_T0);
        const float* w = Pn + k * 48;
        const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16), w2 = _mm512_loadu_ps(w + 32);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const __m512 a = _mm512_set1_ps(A[r * lda + k]);
          c[r][0] = _mm512_fmadd_ps(a, w0, c[r][0]);
          c[r][1] = _mm512_fmadd_ps(a, w1, c[r][1]);
          c[r][2] = _mm512_fmadd_ps(a, w2, c[r][2]);
        }
      }
      store512x3<R>(c, C, ldc);
    } else {
      Hi512<VV> d[R];
      __m512 c[R];
      load512<VV, R>(c, d, C, ldc, acc, init);
      for (int64_t k = 0; k < K; ++k) {
        if (k < npf) _mm_prefetch(pf + 64 * k, _MM_HINT_T0);
        const float* w = Pn + k * (8 * VV);
        const __m512 w0 = _mm512_loadu_ps(w);
        if constexpr (VV == 4) {
          const __m512 w1 = _mm512_loadu_ps(w + 16);
#pragma GCC unroll 16
          for (int r = 0; r < R; ++r) {
            const __m512 a = _mm512_set1_ps(A[r * lda + k]);
            c[r] = _mm512_fmadd_ps(a, w0, c[r]);
            d[r] = _mm512_fmadd_ps(a, w1, d[r]);
          }
        } else {
          const __m256 w1 = _mm256_loadu_ps(w + 16);
#pragma GCC unroll 16
          for (int r = 0; r < R; ++r) {
            const float a = A[r * lda + k];
            c[r] = _mm512_fmadd_ps(_mm512_set1_ps(a), w0, c[r]);
            d[r] = _mm256_fmadd_ps(_mm256_set1_ps(a), w1, d[r]);
          }
        }
      }
      store512<VV, R>(c, d, C, ldc);
    }
  }
  static bool wide() { return g_tiled.load(std::memory_order_relaxed) >= 2; }
  static bool zmm() { return g_tiled.load(std::memory_order_relaxed) == 3; }
  // f(std::integral_constant<int, r>()) for a run-time r in [1, N].
  template <int N, typename F>
  static void with_rows(int64_t r, const F& f) {
    if constexpr (N >= 1) {
      if (r == N) f(std::integral_constant<int, N>());
      else with_rows<N - 1>(r, f);
    }
  }
  // Runs block(R, b, pf, npf) over B rows in blocks of RM rows (R = RM as an
  // std::integral_constant, then the tail): the rows [b, b + R) through the micro-kernel,
  // with `pf`/`npf` its in-loop prefetch. A lone last row would run the 1-row kernel (a GEMV,
  // bound by the weight loads, not the FMAs): end on two shorter blocks instead, e.g. 64 =
  // 20 x 3 + 2 + 2. `next` (if not null): the weight block the caller runs next
  // (next_bytes), prefetched while this one computes so that it arrives from L3/memory
  // during FMAs rather than as a burst of misses at the start of the next block's first
  // pass. With 4+ row blocks each block first prefetches its share; with fewer (B <
  // kPrefetchMinRows) those bursts stall the few blocks there are (B=8: 10% slower), so each
  // block instead prefetches one line per k step inside its loop until the next block is
  // covered. In-process A/B of prefetching on/off, op T=32, 2 threads, 16 MB packed weight:
  // LSTM H=1024 1.05-1.46x at B 2-11, RNN H=2048 1.4-1.5x at B 4-8. (TiledBF's rows too.)
  template <int RM, typename Block>
  static void row_blocks(int64_t B, int64_t K, const void* next, int64_t next_bytes, const Block& block) {
    int64_t full = B / RM, rem = B % RM;
    if (rem == 1 && full > 0) --full, rem += RM;
    const char* nx = static_cast<const char*>(next);
    const int64_t lines = next ? next_bytes / 64 : 0;
    const bool in_loop = B < kPrefetchMinRows;
    int64_t b = 0, done = 0;  // done: lines prefetched so far (in-loop)
    auto run = [&](auto r_const) {
      const int64_t n = in_loop ? std::min(K, lines - done) : 0;
      block(r_const, b, nx + 64 * done, n);
      done += n;
      b += decltype(r_const)::value;
    };
    for (int64_t i = 0; i < full; ++i) {
      if (!in_loop)
        for (int64_t l = i * lines / full; l < (i + 1) * lines / full; ++l) _mm_prefetch(nx + 64 * l, _MM_HINT_T0);
      run(std::integral_constant<int, RM>());
    }
    auto tail = [&](int64_t r) { with_rows<RM - 1>(r, run); };
    if (rem == RM + 1) {
      tail(RM - 1);
      tail(2);
    } else {
      tail(rem);
    }
  }
  // C[B, 8VV] (+)= A[B, K] @ the panel block Pn (K x 8VV), in blocks of RM rows (WIDE:
  // kernel32's taller blocks); `next`: see row_blocks.
  // In tiled mode 3 (zmm()) every caller's blocks run on kernel512, 8 rows at a time.
  template <int VV, bool WIDE = false>
  static void rows(int64_t B, int64_t K, const float* A, int64_t lda, const float* Pn, float* C, int64_t ldc,
                   bool acc, const float* next, int64_t next_bytes, const float* init = nullptr) {
    static_assert(!WIDE || VV == 4, "kernel32's row blocks are for 4-vector panels");
    if (zmm()) {
      row_blocks<8>(B, K, next, next_bytes, [&](auto r_const, int64_t b, const char* pf, int64_t npf) {
        constexpr int R = decltype(r_const)::value;
        if constexpr (R > 1) kernel512<VV, R>(K, A + b * lda, lda, Pn, C + b * ldc, ldc, acc, pf, npf, init);
        else kernel<VV, R>(K, A + b * lda, lda, Pn, C + b * ldc, ldc, acc, pf, npf, init);
      });
      return;
    }
    constexpr int RM = WIDE ? 4 : VV == 4 ? 3 : 4;
    row_blocks<RM>(B, K, next, next_bytes, [&](auto r_const, int64_t b, const char* pf, int64_t npf) {
      constexpr int R = decltype(r_const)::value;
      if constexpr (WIDE && R > 1) kernel32<VV, R>(K, A + b * lda, lda, Pn, C + b * ldc, ldc, acc, pf, npf, init);
      else kernel<VV, R>(K, A + b * lda, lda, Pn, C + b * ldc, ldc, acc, pf, npf, init);
    });
  }
  // Panel p's columns of C (+)= A @ W^T for all B rows, k-blocked. Without `exact`, C is
  // the padded gate buffer [B, ldc()] and the panel's columns are [8Vp, 8Vp+8V). With
  // `exact`, C is [B, units] (leading dimension ldc, last panel possibly partial) and
  // the micro-kernel works on the contiguous scratch `tmp` (B*8V floats, one per
  // thread) instead: rows of dL/dh are often a multiple of 4 KB apart.
  // C [M, units]'s columns [col, col + valid) to and from a contiguous M x w scratch (w = 8V,
  // zero-padded).
  // (float32 and, for TiledD, float64)
  template <typename T>
  static void to_tmp(int64_t M, const T* C, int64_t ldc, int64_t col, int64_t valid, T* tmp, int64_t w) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < w; ++j) tmp[m * w + j] = j < valid ? C[m * ldc + col + j] : T(0);
  }
  template <typename T>
  static void from_tmp(int64_t M, const T* tmp, T* C, int64_t ldc, int64_t col, int64_t valid, int64_t w) {
    for (int64_t m = 0; m < M; ++m) std::copy(tmp + m * w, tmp + m * w + valid, C + m * ldc + col);
  }
  void gemm_panel(int64_t p, int64_t B, const float* A, int64_t lda, float* C, int64_t ldc, bool acc,
                  bool exact, float* tmp) const {
    gemm_span(p, 1, B, A, lda, C, ldc, acc, exact, tmp);
  }
  // A step's GEMM into the padded gate buffer C [B, ldc()]: panels [p0, p1), p0 even (the
  // time loops' slices start on multiples of 16 units), in pairs where they are packed so,
  // `reversed` (odd steps) from the last: see for_spans.
  void gemm_gates(int64_t p0, int64_t p1, int64_t B, const float* A, int64_t lda, float* C, int64_t ldc,
                  bool reversed) const {
    for_spans(pairs, npanel, p0, p1, reversed && !prefetches(),
              [&](int64_t q, int64_t n) { gemm_span(q, n, B, A, lda, C, ldc, false, false, nullptr); });
  }
  // Whether gemm_span prefetches the weight (for_spans keeps one order then).
  bool prefetches() const { return npanel * K * 8 * V * 4 >= kPrefetchMinBytes; }
  // gemm_panel on `np` panels from p at once: 2 for a pair (not `exact`).
  void gemm_span(int64_t p, int64_t np, int64_t B, const float* A, int64_t lda, float* C, int64_t ldc, bool acc,
                 bool exact, float* tmp) const {
    const int64_t w = 8 * V * np;
    const int64_t col = p * panel_units(ng);
    const int64_t valid = exact ? std::min<int64_t>(w, units - col) : w;
    float* Ct = exact ? tmp : C + p * 8 * V;
    const int64_t ldt = exact ? w : ldc;
    if (exact && acc) to_tmp(B, C, ldc, col, valid, tmp, w);
    const float* Pn = P->get() + p * K * 8 * V;
    if (K == 0 && !acc)
      for (int64_t b = 0; b < B; ++b) std::fill(Ct + b * ldt, Ct + b * ldt + w, 0.f);
    // Software prefetch of the next weight block (the panels are contiguous in P, so
    // at a panel's last k-block that is the next panel's first) for large weights (see
    // rows() for how). In-process A/B (LSTM op, T=32, 2 threads): H=1024 (16 MB packed)
    // 7-10% faster at B 16-64 and 1.05-1.46x at B 2-11; H 256/512 (<= 4 MB, which the hardware
    // prefetcher keeps up with from L3) 2-3% slower, hence the size threshold.
    const bool pf = B >= 2 && prefetches();
    const float* end = P->get() + npanel * K * 8 * V;
    for (int64_t k0 = 0; k0 < K; k0 += kStepKC) {
      const int64_t kc = std::min(kStepKC, K - k0);
      const bool a = acc || k0 > 0;
      const float* next = pf && Pn + (k0 + kc) * w < end ? Pn + (k0 + kc) * w : nullptr;
      const int64_t nbytes = std::min<int64_t>(kStepKC * w, end - (Pn + (k0 + kc) * w)) * 4;
      if (V == 4 && wide()) rows<4, true>(B, kc, A + k0, lda, Pn + k0 * w, Ct, ldt, a, next, nbytes);
      else if (V == 4) rows<4>(B, kc, A + k0, lda, Pn + k0 * w, Ct, ldt, a, next, nbytes);
      else if (np == 2) rows<6>(B, kc, A + k0, lda, Pn + k0 * w, Ct, ldt, a, next, nbytes);
      else rows<3>(B, kc, A + k0, lda, Pn + k0 * w, Ct, ldt, a, next, nbytes);
    }
    if (exact) from_tmp(B, tmp, C, ldc, col, valid, w);
  }
  float* panels() const { return P->get(); }
};

#include "cpu/tiled_bf16.h"
#include "cpu/tiled_f64.h"

// Panel p's columns of C (+)= A[:, :kc] @ (the panel's rows k0 .. k0+kc) for M rows of
// C [M, units] (leading dimension ldc), plus bias[units] if not null and not acc; a
// partial last panel goes through `tmp` (M*8V values). The step of gemm_blocked below, on
// TiledF (float32) or TiledD (float64).
template <typename TW, typename T>
void gemm_block(const TW& tw, int64_t p, int64_t M, int64_t k0, int64_t kc, const T* A, int64_t lda, T* C,
                int64_t ldc, bool acc, T* tmp, const T* bias) {
  const int64_t w = 8 * tw.V;
  const int64_t col = p * TW::panel_units(tw.ng);
  const int64_t valid = std::min<int64_t>(w, tw.units - col);
  const bool direct = valid == w;
  T init[32] = {T(0)};  // the panel's bias, zero-padded
  if (bias && !acc) std::copy(bias + col, bias + col + valid, init);
  T* Ct = direct ? C + col : tmp;
  const int64_t ldt = direct ? ldc : w;
  if (!direct && acc) TiledF::to_tmp(M, C, ldc, col, valid, tmp, w);
  const T* Pn = tw.panels() + (p * tw.K + k0) * w;
  const T* in = bias && !acc ? init : nullptr;
  if (tw.V == 4) TW::template rows<4>(M, kc, A, lda, Pn, Ct, ldt, acc, nullptr, 0, in);
  else TW::template rows<3>(M, kc, A, lda, Pn, Ct, ldt, acc, nullptr, 0, in);
  if (!direct) TiledF::from_tmp(M, tmp, C, ldc, col, valid, w);
}

// pack_a's elements outside its tiles (rows [0, mt) from k = kt on, the others from 0).
template <typename T>
inline void pack_a_rest(const T* a, int64_t sam, int64_t sak, int64_t mc, int64_t kc, int64_t mt, int64_t kt, T* out,
                        T* colsum) {
  for (int64_t m = 0; m < mc; ++m) {
    T sum = T(0);
    for (int64_t k = m < mt ? kt : 0; k < kc; ++k) sum += out[m * kc + k] = a[m * sam + k * sak];
    if (colsum) colsum[m] += sum;
  }
}

// out[m * kc + k] = a[m * sam + k * sak] for an mc x kc block (A's rows made contiguous
// in k, as the micro-kernel reads them); colsum (if not null): colsum[m] += the sum of
// the block's row m (a bias gradient, from the pass that reads A anyway). When A's
// columns are contiguous (sam 1: a weight gradient's grad^T) 8 x 8 at a time through a
// register transpose, k-chunk by k-chunk: A's k rows are often a multiple of 4 KB apart,
// so a chunk's 8 rows share an L1 set, and going along m within them uses each line
// before it is evicted (in-process A/B against m-chunk by m-chunk: dW 1.02-1.045x).
inline void pack_a(const float* a, int64_t sam, int64_t sak, int64_t mc, int64_t kc, float* out, float* colsum) {
  const int64_t m8 = sam == 1 ? mc / 8 * 8 : 0, k8 = kc / 8 * 8;
  for (int64_t k = 0; k < k8; k += 8)
    for (int64_t m = 0; m < m8; m += 8) {
      __m256 r[8];
      for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(a + (k + j) * sak + m);
      if (colsum) {
        const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(r[0], r[1]), _mm256_add_ps(r[2], r[3])),
                                       _mm256_add_ps(_mm256_add_ps(r[4], r[5]), _mm256_add_ps(r[6], r[7])));
        _mm256_storeu_ps(colsum + m, _mm256_add_ps(_mm256_loadu_ps(colsum + m), s));
      }
      TiledF::transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + (m + i) * kc + k, r[i]);
    }
  pack_a_rest(a, sam, sak, mc, kc, m8, k8, out, colsum);  // the k tail, the last rows
}

// pack_a for float64 (TiledD's weight gradients): 4 x 4 at a time.
inline void pack_a(const double* a, int64_t sam, int64_t sak, int64_t mc, int64_t kc, double* out, double* colsum) {
  const int64_t m4 = sam == 1 ? mc / 4 * 4 : 0, k4 = kc / 4 * 4;
  for (int64_t k = 0; k < k4; k += 4)
    for (int64_t m = 0; m < m4; m += 4) {
      __m256d r[4];
      for (int j = 0; j < 4; ++j) r[j] = _mm256_loadu_pd(a + (k + j) * sak + m);
      if (colsum)
        _mm256_storeu_pd(colsum + m, _mm256_add_pd(_mm256_loadu_pd(colsum + m),
                                                   _mm256_add_pd(_mm256_add_pd(r[0], r[1]), _mm256_add_pd(r[2], r[3]))));
      const __m256d t0 = _mm256_unpacklo_pd(r[0], r[1]), t1 = _mm256_unpackhi_pd(r[0], r[1]);
      const __m256d t2 = _mm256_unpacklo_pd(r[2], r[3]), t3 = _mm256_unpackhi_pd(r[2], r[3]);
      _mm256_storeu_pd(out + m * kc + k, _mm256_permute2f128_pd(t0, t2, 0x20));
      _mm256_storeu_pd(out + (m + 1) * kc + k, _mm256_permute2f128_pd(t1, t3, 0x20));
      _mm256_storeu_pd(out + (m + 2) * kc + k, _mm256_permute2f128_pd(t0, t2, 0x31));
      _mm256_storeu_pd(out + (m + 3) * kc + k, _mm256_permute2f128_pd(t1, t3, 0x31));
    }
  pack_a_rest(a, sam, sak, mc, kc, m4, k4, out, colsum);  // the k tail, the last rows
}

// Rows [m0, m1) x panels [p0, p1) of C (+)= A @ B on B's packed panels `tw` (K rows), in
// blocks of MC rows and KC k: a block of A (MC x KC: 96 KB copied, up to 768 KB read in
// place) stays in L2 while a panel's KC x 32 block serves its MC / 8 micro-kernel calls. A is read in
// place when its rows are contiguous in k (sak 1), else copied block by block into that
// layout. KC: 1024 when A is read in place (x @ w^T, grad @ w, whose K is the input or
// gate width: mostly one block, so C is written once, and each micro-kernel call runs
// longer between its accumulators' loads and stores; A's block, <= 768 KB, stays in a
// 1 MB L2). In-process A/B, 15 interleaved calls (2026-12-01, Zen 5), against 256: LSTM
// inference B 32-64 H=512 1.02x, B=8 and 64 at H=1024 1.05x, GRU 1.01-1.035x, training
// 1.01-1.02x, float64 1.01-1.045x; 256 had been 1.017x over 128. 128 for the weight
// gradients (no gain there).
// (TW, T: TiledF and float, or TiledD and double, whose KC is half: the same bytes.)
constexpr int64_t kGemmMC = 192;
template <typename TW, typename T>
inline void gemm_rows(const TW& tw, int64_t K, const T* A, int64_t sam, int64_t sak, T* C, int64_t ldc,
                      bool acc, const T* bias, int64_t m0, int64_t m1, int64_t p0, int64_t p1,
                      T* colsum = nullptr) {
  constexpr int64_t MC = kGemmMC;
  const int64_t KC = sak == 1 ? 8 * TW::KC : TW::KC;
  Buf<T> ap(sak == 1 ? 0 : MC * KC), tmp(MC * 32);
  for (; m0 < m1; m0 += MC) {
    const int64_t mc = std::min(MC, m1 - m0);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = std::min(KC, K - k0);
      const T* a = A + m0 * sam + k0 * sak;
      int64_t lda = sam;
      if (sak != 1) {
        pack_a(a, sam, sak, mc, kc, ap.data(), colsum ? colsum + m0 : nullptr);
        a = ap.data();
        lda = kc;
      }
      for (int64_t p = p0; p < p1; ++p)  // (the bias initializes the first k-block's accumulators)
        gemm_block(tw, p, mc, k0, kc, a, lda, C + m0 * ldc, ldc, acc || k0 > 0, tmp.data(), bias);
    }
  }
}

// Runs a GEMM's work on the threads of `sl`: thread t first calls setup(t) (e.g. packs
// its panels), then runs its own units run(t, 0 .. nb-1) in order (the loop order and
// cache reuse of a static split), then takes the other threads' untaken units from the
// back, of those whose setup has finished. On a machine shared with other work, a
// preempted thread's share then goes to the thread that is running instead of holding up
// the whole GEMM. In-process A/B against the static split (2 threads, Zen 4, T*B x G x H
// shapes, B 8-64, H 256-1024): the input projection, dx and dW 0.99-1.03x on an idle
// machine, 1.16-1.74x with one other busy process on the 2 cores.
template <typename Setup, typename Run>
void run_stealing(const Slices& sl, int64_t nb, const Setup& setup, const Run& run) {
  if (sl.n == 1) {
    setup(0);
    for (int64_t j = 0; j < nb; ++j) run(0, j);
    return;
  }
  std::unique_ptr<std::atomic<bool>[]> taken(new std::atomic<bool>[sl.n * nb]), ready(new std::atomic<bool>[sl.n]);
  for (int64_t u = 0; u < sl.n * nb; ++u) taken[u].store(false, std::memory_order_relaxed);
  for (int t = 0; t < sl.n; ++t) ready[t].store(false, std::memory_order_relaxed);
  // Test hook (gemm_test_delay): the last thread acts preempted. It waits before its own
  // units until another thread has taken its last unit (the first one stolen), and the
  // others wait for its setup before they look for units to take; each wait at most
  // test_us. (A fixed sleep of the last thread was flaky on a loaded host: it could start
  // only after the others had finished and found nothing ready to take.)
  const int test_us = nb > 0 ? g_test_delay_us.load(std::memory_order_relaxed) : 0;
  const auto test_wait = [&](const std::atomic<bool>& flag) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(test_us);
    while (!flag.load(std::memory_order_acquire) && std::chrono::steady_clock::now() < end)
      std::this_thread::sleep_for(std::chrono::microseconds(20));
  };
  run_slices(sl, [&](int t) {
    setup(t);
    ready[t].store(true, std::memory_order_release);
    if (test_us > 0 && t == sl.n - 1) test_wait(taken[t * nb + nb - 1]);
    for (int64_t j = 0; j < nb; ++j)
      if (!taken[t * nb + j].exchange(true, std::memory_order_relaxed)) run(t, j);
    for (int o = 1; o < sl.n; ++o) {
      const int v = (t + o) % sl.n;
      if (test_us > 0 && v == sl.n - 1) test_wait(ready[v]);
      if (!ready[v].load(std::memory_order_acquire)) continue;  // (v has not started: leave it its units)
      for (int64_t j = nb - 1; j >= 0; --j)
        if (!taken[v * nb + j].exchange(true, std::memory_order_relaxed)) {
          run(v, j);
          g_units_taken.fetch_add(1, std::memory_order_relaxed);
        }
    }
  });
}

// C[M, N] (+)= A @ B for the GEMMs over all timesteps (the input projection, the weight
// gradients): A(m, k) = A[m * sam + k * sak], B(k, n) = Bm[k * sbk + n * sbn], C row-major
// (ldc). GotoBLAS-style blocking (gemm_rows) around the recurrent micro-kernel, B packed
// into 32-column panels. colsum (if not null; only where A is copied, sak != 1): += the
// sums of A's rows.
// float32 on TiledF, float64 on TiledD (AVX-512 only: see gemm).
template <typename T>
inline void gemm_blocked(int64_t M, int64_t N, int64_t K, const T* A, int64_t sam, int64_t sak,
                         const T* Bm, int64_t sbk, int64_t sbn, T* C, int64_t ldc, bool acc,
                         const T* bias, T* colsum) {
  using TW = std::conditional_t<std::is_same_v<T, float>, TiledF, TiledD>;
  const Slices sp = make_slices(N, M * K, TiledF::panel_units(1));
  if (sak == 1) {  // (x @ w^T, grad @ w: B is a weight) threads own panels: each packs its own
    // Units: one block of MC rows across a thread's panels.
    TW tw(1, N, K);
    run_stealing(
        sp, (M + kGemmMC - 1) / kGemmMC,
        [&](int t) {
          for (int64_t p = tw.first_panel(sp.lo(t)); p < tw.end_panel(sp.hi(t)); ++p) tw.pack(Bm, sbn, sbk, p);
        },
        [&](int t, int64_t j) {
          gemm_rows(tw, K, A, sam, sak, C, ldc, acc, bias, j * kGemmMC, std::min(M, (j + 1) * kGemmMC),
                    tw.first_panel(sp.lo(t)), tw.end_panel(sp.hi(t)));
        });
    return;
  }
  // A weight's gradient (A = grad^T, K = all time steps' rows). Threads own rows of C, so
  // that no block of A is copied twice, and share B's panels, packed first. In-process A/B
  // on dW [4H, H] = dG^T @ x over T*B rows (T=32): 1.03-1.07x faster than splitting the
  // columns (B 8-64, H 256-1024). B (x or h of every step) is packed KB rows at a time:
  // the scratch stays bounded (8 MB at N = 1024) instead of a copy of all of B.
  constexpr int64_t KB = 2048;
  const Slices sm = make_slices(M, N * K, 1);
  for (int64_t kb = 0; kb < K; kb += KB) {
    const int64_t kn = std::min(KB, K - kb);
    TW tw(1, N, kn);
    run_slices(sp, [&](int t) {
      for (int64_t p = tw.first_panel(sp.lo(t)); p < tw.end_panel(sp.hi(t)); ++p) tw.pack(Bm + kb * sbk, sbn, sbk, p);
    });
    int64_t nb = 0;  // units: blocks of MC of a thread's rows
    for (int t = 0; t < sm.n; ++t) nb = std::max(nb, (sm.hi(t) - sm.lo(t) + kGemmMC - 1) / kGemmMC);
    run_stealing(sm, nb, [](int) {}, [&](int t, int64_t j) {
      const int64_t m0 = sm.lo(t) + j * kGemmMC, m1 = std::min(sm.hi(t), m0 + kGemmMC);
      if (m0 < m1)
        gemm_rows(tw, kn, A + kb * sak, sam, sak, C, ldc, acc || kb > 0, bias, m0, m1, 0, tw.npanel, colsum);
    });
  }
}

// The forward cells read each row's gx, written by the input projection and so in L3 or
// memory (loads perf had at ~40% of the cell's samples). While a row's cells run, this
// fetches the same units of the next row (gx rows are contiguous: ng * H apart), one line
// per gate every other 8-unit panel, so that they arrive during compute. In-process A/B of the
// forward ops, T=32, Zen 4: LSTM 1.06x at B=64 H=256, 1.0-1.03x at B 8-32 or H=512; GRU
// 1.01-1.04x. Not kept for the backward's cell (saved gates, cells, grad_y: 0.99-1.0x) nor
// the RNN's (1.0x). A prefetch past the end of gx is harmless (no fault).
inline void prefetch_next_row(const float* x, int64_t H, int ng) {
  for (int q = 0; q < ng; ++q) _mm_prefetch(reinterpret_cast<const char*>(x + (ng + q) * H), _MM_HINT_T0);
}

// tanh and sigmoid of 8 floats, inline (not libmvec calls): tanh_ and sigmoid_ of V8 below.
// 1/d: the 12-bit estimate plus one Newton step (relative error ~1e-7, float32 rounding
// level) instead of vdivps, whose throughput bounded the cell.
inline __m256 recip8(__m256 d) {
  const __m256 r = _mm256_rcp_ps(d);
  return _mm256_fmadd_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(1.f)), r);
}
// tanh(x) as x P(x^2) / Q(x^2) on [-9, 9] and +-1 beyond (where float32 tanh rounds to
// +-1): a rational fit of degrees 5/3 in x^2 (iteratively reweighted least squares on
// the relative error); max error of this float32 evaluation 3.1e-7 over [-12, 12]
// (numpy against float64 tanh). It replaced 1 - 2 / (exp(2|x|) + 1) plus a small-|x|
// polynomial, at about half the operations: the cell got 35% faster in isolation and the
// LSTM op 2.5-6% (in-process A/B, T=32, B 8-64, H 256/512). The clamp's operand order
// keeps NaN (maxps/minps return their second operand when one is NaN).
// (The fit's coefficients, highest degree first, here once: tanh16 evaluates the same.)
constexpr float kTanhP[6] = {1.8257196e-11f, -1.2781256e-08f, 9.267709e-06f, 0.0029207948f, 0.12919259f, 0.99999994f};
constexpr float kTanhQ[4] = {0.00022810468f, 0.023763305f, 0.46252543f, 1.f};
constexpr float kTanhClamp = 9.f;
inline __m256 tanh8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(kTanhClamp), _mm256_max_ps(_mm256_set1_ps(-kTanhClamp), x));
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 p = _mm256_fmadd_ps(z, _mm256_set1_ps(kTanhP[0]), _mm256_set1_ps(kTanhP[1]));
  __m256 q = _mm256_fmadd_ps(z, _mm256_set1_ps(kTanhQ[0]), _mm256_set1_ps(kTanhQ[1]));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(kTanhP[2]));
  q = _mm256_fmadd_ps(q, z, _mm256_set1_ps(kTanhQ[2]));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(kTanhP[3]));
  q = _mm256_fmadd_ps(q, z, _mm256_set1_ps(kTanhQ[3]));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(kTanhP[4]));
  p = _mm256_mul_ps(_mm256_fmadd_ps(p, z, _mm256_set1_ps(kTanhP[5])), x);
  return _mm256_mul_ps(p, recip8(q));
}
// sigmoid(x) = (1 + tanh(x / 2)) / 2: absolute error <= 1.8e-7 (so not relative-accurate
// for x < -15, where sigmoid < 3e-7; the gates only enter products and sums).
inline __m256 sigmoid8(__m256 x) {
  return _mm256_fmadd_ps(tanh8(_mm256_mul_ps(x, _mm256_set1_ps(0.5f))), _mm256_set1_ps(0.5f),
                         _mm256_set1_ps(0.5f));
}
}  // namespace

// The float32 cells on 16-float (zmm) vectors, which every cell function below
// (lstm_cells8, gru_cells8, rnn_tanh_cells8, lstm_backward_cells8) hands its work to in
// tiled mode 3 (TiledF::zmm(): CPUs that run 512-bit operations at full width). Why: in
// the LSTM forward op at B=64 (T=32, 2 threads, rows split, Zen 5) the cells took 15% of
// each thread's cycles at H=256 and 8% at H=512, compute-bound (prefetching their gx rows
// into L1 or L2 during the GEMM changed nothing). Per-thread cycle counts of the cell
// phase, 8-float -> these: H=256 23.0 -> 15.3 M, H=512 45 -> 33 M; the LSTM module
// (in-process, alternating processes, 3 rounds) about 1% faster in inference at B=64, no
// change in training (within the 1-2% noise). tanh16 is tanh8 on 16 lanes with
// _mm512_rcp14_ps (plus the same Newton step) for the reciprocal: a 12-bit _mm256_rcp_ps
// per half cost what the wider vectors saved. rcp14's bits differ from rcp's, so mode 3
// runs every vector cell here, an odd last 8 units under a mask, never on the 8-float
// cells: then a unit's result does not depend on which lanes or thread computed it
// (splits stay bit-identical); modes 2 and 3 differ by float32 rounding.
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512vl")
// (GCC 12's avx512fintrin.h builds max, min and rcp14 on _mm512_undefined_ps, which -Wall
// then reports as maybe-uninitialized: GCC bug 105593)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace avx512 {
inline __m512 recip16(__m512 d) {
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.f)), r);
}
inline __m512 tanh16(__m512 x) {  // tanh8's fit and clamp, in the same order
  x = _mm512_min_ps(_mm512_set1_ps(kTanhClamp), _mm512_max_ps(_mm512_set1_ps(-kTanhClamp), x));
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 p = _mm512_fmadd_ps(z, _mm512_set1_ps(kTanhP[0]), _mm512_set1_ps(kTanhP[1]));
  __m512 q = _mm512_fmadd_ps(z, _mm512_set1_ps(kTanhQ[0]), _mm512_set1_ps(kTanhQ[1]));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(kTanhP[2]));
  q = _mm512_fmadd_ps(q, z, _mm512_set1_ps(kTanhQ[2]));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(kTanhP[3]));
  q = _mm512_fmadd_ps(q, z, _mm512_set1_ps(kTanhQ[3]));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(kTanhP[4]));
  p = _mm512_mul_ps(_mm512_fmadd_ps(p, z, _mm512_set1_ps(kTanhP[5])), x);
  return _mm512_mul_ps(p, recip16(q));
}
inline __m512 sigmoid16(__m512 x) {
  return _mm512_fmadd_ps(tanh16(_mm512_mul_ps(x, _mm512_set1_ps(0.5f))), _mm512_set1_ps(0.5f),
                         _mm512_set1_ps(0.5f));
}
// 16 floats as a number type for the cells' pointwise functions (as avx2::V8), with
// masked loads and stores: lanes outside the mask are neither read (zero) nor written.
struct V16 {
  __m512 v;
  V16() = default;
  V16(__m512 x) : v(x) {}
  V16(float x) : v(_mm512_set1_ps(x)) {}
  static V16 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
  // 8 floats from `lo`, and 8 from `hi` unless `two` is false (two panels' vectors of a gate)
  static V16 load2(const float* lo, const float* hi, bool two) {
    const __m512 l = _mm512_maskz_loadu_ps(0x00ff, lo);
    return two ? _mm512_mask_loadu_ps(l, 0xff00, hi - 8) : l;  // (lanes 8-15 from hi)
  }
  void store(float* p, __mmask16 m) const { _mm512_mask_storeu_ps(p, m, v); }
};
// (vector-extension arithmetic, as V8's: the compiler fuses the same products and sums)
inline V16 operator+(V16 a, V16 b) { return a.v + b.v; }
inline V16 operator-(V16 a, V16 b) { return a.v - b.v; }
inline V16 operator*(V16 a, V16 b) { return a.v * b.v; }
inline V16 tanh_(V16 x) { return tanh16(x.v); }
inline V16 sigmoid_(V16 x) { return sigmoid16(x.v); }
inline V16 relu_(V16 x) { return _mm512_max_ps(_mm512_setzero_ps(), x.v); }  // (keeps NaN, as V8's)
using fusedrnn::exp_;
using fusedrnn::relu_;
using fusedrnn::sigmoid_;
using fusedrnn::tanh_;
#include "cells/derivatives.inc"
#include "cells/gru_unit.inc"
#include "cells/lstm_unit.inc"
#include "cells/rnn_unit.inc"

constexpr __mmask16 kAll = 0xffff, kLow8 = 0x00ff;

// avx2::lstm_cells8's work, panels [p, pe) two at a time (units 8p .. 8p + 15; panel p's
// pre-activations at a + 32 p, panel p + 1's right after), an odd last one alone. In two
// passes over the row, the gates and c_t, then h_t = o tanh(c_t): one pass's chain of
// dependent operations (four activations, c_t, tanh(c_t)) outran the out-of-order window
// (perf: the samples piled up on tanh(c_t)); the cell phase at H=256 16.9 -> 15.3 M cycles.
__attribute__((noinline)) int64_t lstm_cells16(const float* x, int64_t H, const float* a, float* cb, float* gt,
                                               float* ct, float* out, float* y, int64_t p, int64_t pe) {
  const int64_t p_first = p;
  for (; p < pe; p += 2) {
    const int64_t u = 8 * p;
    const float* ap = a + 32 * p;
    const bool two = p + 1 < pe;
    const __mmask16 m = two ? kAll : kLow8;
    prefetch_next_row(x + u, H, 4);
    auto pre = [&](int q) { return V16::load(x + q * H + u, m) + V16::load2(ap + 8 * q, ap + 32 + 8 * q, two); };
    V16 i, f, g, o, c;
    lstm_forward_gates<V16>(pre(0), pre(1), pre(2), pre(3), V16::load(cb + u, m), i, f, g, o, c);
    i.store(gt + u, m);
    f.store(gt + H + u, m);
    g.store(gt + 2 * H + u, m);
    o.store(gt + 3 * H + u, m);
    c.store(ct + u, m);
    c.store(cb + u, m);
  }
  for (p = p_first; p < pe; p += 2) {
    const int64_t u = 8 * p;
    const __mmask16 m = p + 1 < pe ? kAll : kLow8;
    const V16 h = lstm_forward_h<V16>(V16::load(gt + 3 * H + u, m), V16::load(cb + u, m));
    h.store(out + u, m);
    if (y) h.store(y + u, m);
  }
  return pe;
}

// avx2::gru_cells8's work, panels [p, pe) as lstm_cells16 (panel p's h_r, h_z, h_n at a + 24 p).
__attribute__((noinline)) int64_t gru_cells16(const float* x, int64_t H, const float* a, const float* b,
                                              const float* hp, float* gt, float* hs, float* out, float* y, int64_t p,
                                              int64_t pe) {
  for (; p < pe; p += 2) {
    const int64_t u = 8 * p;
    const float* ap = a + 24 * p;
    const bool two = p + 1 < pe;
    const __mmask16 m = two ? kAll : kLow8;
    prefetch_next_row(x + u, H, 3);
    auto hh = [&](int q) { return V16::load2(ap + 8 * q, ap + 24 + 8 * q, two) + V16::load(b + q * H + u, m); };
    const V16 an = hh(2);
    V16 r, z, n, h;
    gru_forward_unit<V16>(V16::load(x + u, m), V16::load(x + H + u, m), V16::load(x + 2 * H + u, m), hh(0), hh(1), an,
                          V16::load(hp + u, m), r, z, n, h);
    r.store(gt + u, m);
    z.store(gt + H + u, m);
    n.store(gt + 2 * H + u, m);
    an.store(hs + u, m);
    h.store(out + u, m);
    h.store(y + u, m);
  }
  return pe;
}

// avx2::rnn_tanh_cells8's work: units [0, n - n % 8), 16 at a time and the last 8 alone.
__attribute__((noinline)) int64_t rnn_tanh_cells16(const float* x, const float* a, float* out, int64_t n) {
  int64_t u = 0;
  for (; u + 8 <= n; u += 16) {
    const __mmask16 m = u + 16 <= n ? kAll : kLow8;
    rnn_forward_unit<V16>(V16::load(x + u, m) + V16::load(a + u, m), false).store(out + u, m);
  }
  return n - n % 8;
}

// avx2::lstm_backward_cells8's work: units [0, n - n % 8), as rnn_tanh_cells16.
__attribute__((noinline)) int64_t lstm_backward_cells16(const float* gt, const float* ct, const float* cp,
                                                        const float* d, const float* gy, float* dzero, float* dcb,
                                                        float* gg, float* dcr, float* hr, int64_t H, int64_t n) {
  for (int64_t u = 0; u + 8 <= n; u += 16) {
    const __mmask16 m = u + 16 <= n ? kAll : kLow8;
    const V16 i = V16::load(gt + u, m), f = V16::load(gt + H + u, m), g = V16::load(gt + 2 * H + u, m),
              o = V16::load(gt + 3 * H + u, m), c = V16::load(ct + u, m);
    const V16 dh = gy ? V16::load(d + u, m) + V16::load(gy + u, m) : V16::load(d + u, m);
    V16 dai, daf, dag, dao, dcp;
    lstm_backward_unit<V16>(i, f, g, o, c, V16::load(cp + u, m), dh, V16::load(dcb + u, m), dai, daf, dag, dao, dcp);
    for (float* q : {gg, dcr}) {
      if (!q) continue;
      dai.store(q + u, m);
      daf.store(q + H + u, m);
      dag.store(q + 2 * H + u, m);
      dao.store(q + 3 * H + u, m);
    }
    dcp.store(dcb + u, m);
    if (hr) (o * tanh_(c)).store(hr + u, m);
    if (dzero) V16(0.f).store(dzero + u, m);
  }
  return n - n % 8;
}

// narrow_gemm_t's (kernels_impl.h) partial sums of one thread on 16-float vectors, rows
// [k0, k1) of A and B: pc[j M + m] += sum_k B[k sbk + j] A[k sak + m] (j < N <= 32, m < M)
// and, if ps is not null, ps[m] += sum_k A[k sak + m] (a bias gradient). Tiles of 32 m x NJ
// j (2 NJ accumulators, NJ <= 8, the column sums 2 more in the first), KC rows at a time
// (that chunk of A stays in L2 for all tiles). It replaced an update of pc in memory for
// every 4 rows (bound by its loads and stores); LSTM(8, 32) B=128 T=128 training had spent
// 23% of its samples there. The projection's backward op (dW and db, alternating
// processes, Zen 5), first that update on 8-float then on 16-float vectors, then these
// tiles: 16384 rows x 128 gates x 32 features 0.78-0.81 -> 0.59-0.64 -> 0.31-0.32 ms, x 8
// features 0.23 -> 0.19 -> 0.10-0.11; 16384 x 32 x 32 0.27 -> 0.19 -> 0.084-0.087; 4096 x
// 256 x 16 0.21 -> 0.16 -> 0.095-0.103.
template <int NJ>
inline void narrow_tile(float* pc, float* ps, int64_t M, int64_t m0, int64_t j0, const float* A, int64_t sak,
                        const float* Bm, int64_t sbk, int64_t ka, int64_t kb) {
  const int64_t left = M - m0;
  const __mmask16 lo = left >= 16 ? kAll : __mmask16((1u << left) - 1);
  const __mmask16 hi = left >= 32 ? kAll : left > 16 ? __mmask16((1u << (left - 16)) - 1) : __mmask16(0);
  __m512 c[NJ][2], s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int j = 0; j < NJ; ++j) {
    c[j][0] = _mm512_maskz_loadu_ps(lo, pc + (j0 + j) * M + m0);
    c[j][1] = _mm512_maskz_loadu_ps(hi, pc + (j0 + j) * M + m0 + 16);
  }
  for (int64_t k = ka; k < kb; ++k) {
    const float* a = A + k * sak + m0;
    const __m512 d0 = _mm512_maskz_loadu_ps(lo, a), d1 = _mm512_maskz_loadu_ps(hi, a + 16);
    const float* x = Bm + k * sbk + j0;
#pragma GCC unroll 8
    for (int j = 0; j < NJ; ++j) {
      const __m512 b = _mm512_set1_ps(x[j]);
      c[j][0] = _mm512_fmadd_ps(b, d0, c[j][0]);
      c[j][1] = _mm512_fmadd_ps(b, d1, c[j][1]);
    }
    if (ps) {
      s0 = _mm512_add_ps(s0, d0);
      s1 = _mm512_add_ps(s1, d1);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NJ; ++j) {
    _mm512_mask_storeu_ps(pc + (j0 + j) * M + m0, lo, c[j][0]);
    _mm512_mask_storeu_ps(pc + (j0 + j) * M + m0 + 16, hi, c[j][1]);
  }
  if (ps) {
    _mm512_mask_storeu_ps(ps + m0, lo, _mm512_add_ps(_mm512_maskz_loadu_ps(lo, ps + m0), s0));
    _mm512_mask_storeu_ps(ps + m0 + 16, hi, _mm512_add_ps(_mm512_maskz_loadu_ps(hi, ps + m0 + 16), s1));
  }
}
__attribute__((noinline)) void narrow_partials(float* pc, float* ps, int64_t M, int64_t N, const float* A,
                                               int64_t sak, const float* Bm, int64_t sbk, int64_t k0, int64_t k1) {
  constexpr int64_t KC = 256;
  for (int64_t ka = k0; ka < k1; ka += KC) {
    const int64_t kb = std::min(k1, ka + KC);
    for (int64_t m0 = 0; m0 < M; m0 += 32)
      for (int64_t j0 = 0; j0 < N; j0 += 8) {
        float* s = j0 == 0 ? ps : nullptr;  // (the column sums with the first tile)
        switch (std::min<int64_t>(8, N - j0)) {
          case 1: narrow_tile<1>(pc, s, M, m0, j0, A, sak, Bm, sbk, ka, kb); break;
          case 2: narrow_tile<2>(pc, s, M, m0, j0, A, sak, Bm, sbk, ka, kb); break;
          case 3: narrow_tile<3>(pc, s, M, m0, j0, A, sak, Bm, sbk, ka, kb); break;
          case 4: narrow_tile<4>(pc, s, M, m0, j0, A, sak, Bm, sbk, ka, kb); break;
          case 5: narrow_tile<5>(pc, s, M, m0, j0, A, sak, Bm, sbk, ka, kb); break;
          case 6: narrow_tile<6>(pc, s, M, m0, j0, A, sak, Bm, sbk, ka, kb); break;
          case 7: narrow_tile<7>(pc, s, M, m0, j0, A, sak, Bm, sbk, ka, kb); break;
          default: narrow_tile<8>(pc, s, M, m0, j0, A, sak, Bm, sbk, ka, kb); break;
        }
      }
  }
}
// The float64 LSTM forward cell of TiledD's path (see avx2::lstm_cells8): the cell's scalar
// math vectorized 8 doubles at a time in this AVX-512 region (libmvec's 8-lane exp and
// tanh) instead of the AVX2 region's 4.
__attribute__((noinline)) int64_t lstm_cells8d(const double* x, int64_t H, const double* a, double* cb, double* gt,
                                               double* ct, double* out, double* y, int64_t p, int64_t pe) {
  for (; p < pe; ++p) {
    const int64_t u = 8 * p;
    const double* ap = a + 32 * p;
#pragma omp simd
    for (int l = 0; l < 8; ++l) {
      double i, f, g, o, c, h;
      lstm_forward_unit<double>(x[u + l] + ap[l], x[H + u + l] + ap[8 + l], x[2 * H + u + l] + ap[16 + l],
                                x[3 * H + u + l] + ap[24 + l], cb[u + l], i, f, g, o, c, h);
      gt[u + l] = i; gt[H + u + l] = f; gt[2 * H + u + l] = g; gt[3 * H + u + l] = o;
      ct[u + l] = c; cb[u + l] = c; out[u + l] = h;
    }
    if (y) std::copy(out + u, out + u + 8, y + u);
  }
  return pe;
}
// The float64 GRU forward cell of TiledD's path (see avx2::gru_cells8), as lstm_cells8d.
__attribute__((noinline)) int64_t gru_cells8d(const double* x, int64_t H, const double* a, const double* b,
                                              const double* hp, double* gt, double* hs, double* out, double* y,
                                              int64_t p, int64_t pe) {
  for (; p < pe; ++p) {
    const int64_t u = 8 * p;
    const double* ap = a + 24 * p;
#pragma omp simd
    for (int l = 0; l < 8; ++l) {
      double r, z, n, h;
      const double an = ap[16 + l] + b[2 * H + u + l];
      gru_forward_unit<double>(x[u + l], x[H + u + l], x[2 * H + u + l], ap[l] + b[u + l], ap[8 + l] + b[H + u + l],
                               an, hp[u + l], r, z, n, h);
      gt[u + l] = r; gt[H + u + l] = z; gt[2 * H + u + l] = n;
      hs[u + l] = an; out[u + l] = h; y[u + l] = h;
    }
  }
  return pe;
}
// The float64 tanh RNN's cell (see avx2::rnn_tanh_cells8), units [0, n), as lstm_cells8d.
__attribute__((noinline)) int64_t rnn_tanh_cells8d(const double* x, const double* a, double* out, int64_t n) {
#pragma omp simd
  for (int64_t u = 0; u < n; ++u) out[u] = rnn_forward_unit<double>(x[u] + a[u], false);
  return n;
}
}  // namespace avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options

namespace avx2 {
// An AVX vector of 8 floats as a number type, so that the cells' pointwise functions
// (cells/*_unit.inc, included here a second time: inside this region they compile for
// AVX2, and in this namespace the kernels below find them) run on 8 units at a time:
// the formulas every kernel uses, with tanh8 and sigmoid8 as tanh_ and sigmoid_.
struct V8 {
  __m256 v;
  V8() = default;
  V8(__m256 x) : v(x) {}
  V8(float x) : v(_mm256_set1_ps(x)) {}  // the formulas' constants (T(1))
  static V8 load(const float* p) { return _mm256_loadu_ps(p); }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
};
inline V8 operator+(V8 a, V8 b) { return a.v + b.v; }
inline V8 operator-(V8 a, V8 b) { return a.v - b.v; }
inline V8 operator*(V8 a, V8 b) { return a.v * b.v; }
inline V8 tanh_(V8 x) { return tanh8(x.v); }
inline V8 sigmoid_(V8 x) { return sigmoid8(x.v); }
inline V8 relu_(V8 x) { return _mm256_max_ps(_mm256_setzero_ps(), x.v); }  // (keeps NaN: maxps returns its second operand then)
using fusedrnn::exp_;  // (the scalar overloads, for the float and double loops)
using fusedrnn::relu_;
using fusedrnn::sigmoid_;
using fusedrnn::tanh_;
#include "cells/derivatives.inc"
#include "cells/gru_unit.inc"
#include "cells/lstm_unit.inc"
#include "cells/rnn_unit.inc"

// The LSTM forward cell of one batch row over the full panels [p, pe) of the tiled path
// (8 units each; panel p's pre-activations i, f, g, o at a + 32 p), in one call so that
// the polynomial constants stay in registers. x: the gx row (gate stride H), cb: the cell
// state (updated), gt: the gates row (stride H), ct: c_t, out: h_t, y (if not null): a
// copy of h_t. Returns the first panel not done: pe for float32, and for float64 where the
// CPU has AVX-512 (avx512::lstm_cells8d), p (nothing) otherwise.
template <typename T>
inline int64_t lstm_cells8(const T* x, int64_t H, const T* a, T* cb, T* gt, T* ct, T* out, T* y, int64_t p,
                           int64_t pe) {
  if constexpr (std::is_same_v<T, float>) {
    if (TiledF::zmm()) return avx512::lstm_cells16(x, H, a, cb, gt, ct, out, y, p, pe);
    for (; p < pe; ++p) {
      const int64_t u = 8 * p;
      const float* ap = a + 32 * p;
      if (p % 2 == 0) prefetch_next_row(x + u, H, 4);
      V8 i, f, g, o, c, h;
      lstm_forward_unit<V8>(V8::load(x + u) + V8::load(ap), V8::load(x + H + u) + V8::load(ap + 8),
                            V8::load(x + 2 * H + u) + V8::load(ap + 16), V8::load(x + 3 * H + u) + V8::load(ap + 24),
                            V8::load(cb + u), i, f, g, o, c, h);
      i.store(gt + u);
      f.store(gt + H + u);
      g.store(gt + 2 * H + u);
      o.store(gt + 3 * H + u);
      c.store(ct + u);
      c.store(cb + u);
      h.store(out + u);
      if (y) h.store(y + u);
    }
  } else if constexpr (std::is_same_v<T, double>) {
    if (TiledF::wide()) return avx512::lstm_cells8d(x, H, a, cb, gt, ct, out, y, p, pe);
  }
  return p;
}

// The GRU forward cell of one batch row over the full panels [p, pe) of the tiled path:
// panel p's pre-activations h_r, h_z, h_n at a + 24 p (8 units each), b: b_hh, hp:
// h_{t-1}; writes the gates (r, z, n; stride H), hs (W_hn h + b_hn), out (h_t) and y.
// Returns as lstm_cells8.
template <typename T>
inline int64_t gru_cells8(const T* x, int64_t H, const T* a, const T* b, const T* hp, T* gt, T* hs, T* out, T* y,
                          int64_t p, int64_t pe) {
  if constexpr (std::is_same_v<T, float>) {
    if (TiledF::zmm()) return avx512::gru_cells16(x, H, a, b, hp, gt, hs, out, y, p, pe);
    for (; p < pe; ++p) {
      const int64_t u = 8 * p;
      const float* ap = a + 24 * p;
      if (p % 2 == 0) prefetch_next_row(x + u, H, 3);
      const V8 an = V8::load(ap + 16) + V8::load(b + 2 * H + u);
      V8 r, z, n, h;
      gru_forward_unit<V8>(V8::load(x + u), V8::load(x + H + u), V8::load(x + 2 * H + u),
                           V8::load(ap) + V8::load(b + u), V8::load(ap + 8) + V8::load(b + H + u), an,
                           V8::load(hp + u), r, z, n, h);
      r.store(gt + u);
      z.store(gt + H + u);
      n.store(gt + 2 * H + u);
      an.store(hs + u);
      h.store(out + u);
      h.store(y + u);
    }
  } else if constexpr (std::is_same_v<T, double>) {
    if (TiledF::wide()) return avx512::gru_cells8d(x, H, a, b, hp, gt, hs, out, y, p, pe);
  }
  return p;
}

// The tanh RNN's cell, out[u] = tanh(x[u] + a[u]) for u in [0, n), 8 at a time. Returns
// how many units it did: a multiple of 8 for float32, n for float64 where the CPU has
// AVX-512 (avx512::rnn_tanh_cells8d), 0 otherwise (the caller's loop does the rest).
template <typename T>
inline int64_t rnn_tanh_cells8(const T* x, const T* a, T* out, int64_t n) {
  int64_t u = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (TiledF::zmm()) return avx512::rnn_tanh_cells16(x, a, out, n);
    for (; u + 8 <= n; u += 8) rnn_forward_unit<V8>(V8::load(x + u) + V8::load(a + u), false).store(out + u);
  } else if constexpr (std::is_same_v<T, double>) {
    if (TiledF::wide()) return avx512::rnn_tanh_cells8d(x, a, out, n);
  }
  return u;
}

// The LSTM backward pointwise of one batch row, units [0, n) 8 at a time; the arguments
// as in the kernel's loop (dcr may be null). dL/dh_t is d + gy (gy may be null: with
// projection); dzero (if not null) is zeroed for the next step's GEMM; hr (if not null:
// projection) gets o * tanh(c), the unprojected h_t. Returns how many units it did: a
// multiple of 8 for float32, 0 for other types (the caller's loop does the rest). (A
// float64 version on 8-double vectors, as lstm_cells8d, measured no faster in training.)
template <typename T>
inline int64_t lstm_backward_cells8(const T* gt, const T* ct, const T* cp, const T* d, const T* gy, T* dzero,
                                    T* dcb, T* gg, T* dcr, T* hr, int64_t H, int64_t n) {
  int64_t u = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (TiledF::zmm()) return avx512::lstm_backward_cells16(gt, ct, cp, d, gy, dzero, dcb, gg, dcr, hr, H, n);
    for (; u + 8 <= n; u += 8) {
      const V8 i = V8::load(gt + u), f = V8::load(gt + H + u), g = V8::load(gt + 2 * H + u),
               o = V8::load(gt + 3 * H + u), c = V8::load(ct + u);
      const V8 dh = gy ? V8::load(d + u) + V8::load(gy + u) : V8::load(d + u);
      V8 dai, daf, dag, dao, dcp;
      lstm_backward_unit<V8>(i, f, g, o, c, V8::load(cp + u), dh, V8::load(dcb + u), dai, daf, dag, dao, dcp);
      for (float* q : {gg, dcr}) {
        if (!q) continue;
        dai.store(q + u);
        daf.store(q + H + u);
        dag.store(q + 2 * H + u);
        dao.store(q + 3 * H + u);
      }
      dcp.store(dcb + u);
      if (hr) (o * tanh_(c)).store(hr + u);
      if (dzero) V8(0.f).store(dzero + u);
    }
  }
  return u;
}

// narrow_gemm_t's partial sums of rows [k0, k1) (avx512::narrow_partials) where the zmm
// kernels run (float32); returns the first row not done: k1 there, else k0.
template <typename T>
inline int64_t narrow_partials(T* pc, T* ps, int64_t M, int64_t N, const T* A, int64_t sak, const T* Bm,
                               int64_t sbk, int64_t k0, int64_t k1) {
  if constexpr (std::is_same_v<T, float>)
    if (TiledF::zmm()) {
      avx512::narrow_partials(pc, ps, M, N, A, sak, Bm, sbk, k0, k1);
      return k1;
    }
  return k0;
}

template <typename T>
using Tiled = std::conditional_t<std::is_same_v<T, float>, TiledF,
                                 std::conditional_t<std::is_same_v<T, double>, TiledD, TiledStub<T>>>;
using Seq = SeqV;
#include "cpu/kernels_impl.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace base {
template <typename T>
using Tiled = TiledStub<T>;
template <typename T>
inline int64_t lstm_cells8(const T*, int64_t, const T*, T*, T*, T*, T*, T*, int64_t p, int64_t) { return p; }
template <typename T>
inline int64_t lstm_backward_cells8(const T*, const T*, const T*, const T*, const T*, T*, T*, T*, T*, T*, int64_t,
                                    int64_t) {
  return 0;
}
template <typename T>
inline int64_t gru_cells8(const T*, int64_t, const T*, const T*, const T*, T*, T*, T*, T*, int64_t p, int64_t) {
  return p;
}
template <typename T>
inline int64_t rnn_tanh_cells8(const T*, const T*, T*, int64_t) {
  return 0;
}
template <typename T>
inline int64_t narrow_partials(T*, T*, int64_t, int64_t, const T*, int64_t, const T*, int64_t, int64_t k0, int64_t) {
  return k0;
}
using Seq = SeqV;
#include "cpu/kernels_impl.h"
}  // namespace base

namespace {
#if FRNN_X86_SIMD
bool use_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#define FRNN_DISPATCH(fn, ...) \
  (use_avx2() ? avx2::fn<T>(__VA_ARGS__) : base::fn<T>(__VA_ARGS__))
#else
bool use_avx2() { return false; }
#define FRNN_DISPATCH(fn, ...) base::fn<T>(__VA_ARGS__)
#endif
}  // namespace

void set_scratch(const Scratch& s) { g_scratch = s; }

int64_t gemm_test_delay(int us) {
  g_test_delay_us.store(std::max(us, 0), std::memory_order_relaxed);
  return g_units_taken.load(std::memory_order_relaxed);
}

const char* simd_path() { return use_avx2() ? "avx2" : "baseline"; }

bool step_runs_on_one_thread(int64_t step_work) { return step_work < 2 * min_work_per_thread(); }

OnCallingThread::OnCallingThread(bool on) : on_(on && !t_calling_thread_only) {
  if (!on_) return;
  t_calling_thread_only = true;
  if (MKL_Set_Num_Threads_Local) blas_old_ = MKL_Set_Num_Threads_Local(1);
}
OnCallingThread::~OnCallingThread() {
  if (!on_) return;
  t_calling_thread_only = false;
  if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(blas_old_);
}
void calling_thread_threads(int* kernels, int* blas) {
  *kernels = make_slices(1 << 16, 1 << 16).threads;
  *blas = MKL_Get_Max_Threads ? MKL_Get_Max_Threads() : -1;
}

void set_options(int tiled, int64_t min_work, int split, int* old_tiled, int64_t* old_min_work, int* old_split) {
  if (old_tiled) *old_tiled = g_tiled.load();
  if (old_min_work) *old_min_work = g_min_work.load();
  if (old_split) *old_split = g_split.load();
  if (tiled >= 0) g_tiled.store(tiled_mode(tiled));
  if (min_work > 0) g_min_work.store(min_work);
  if (split >= 0 && split <= 2) g_split.store(split);
}

template <typename T>
void lstm_forward(const T* gx, const T* h0, const T* c0, const T* w_hh, const T* w_hr,
                  int64_t H, int64_t P, const Seq& sq, T* y, T* h_n, T* c_n, T* gates, T* cells) {
  const SeqV s(sq);
  FRNN_DISPATCH(lstm_forward, gx, h0, c0, w_hh, w_hr, H, P, s, y, h_n, c_n, gates, cells);
}
template <typename T>
void gru_forward(const T* gx, const T* h0, const T* w_hh, const T* b_hh, int64_t H, const Seq& sq,
                 T* y, T* h_n, T* gates, T* hn) {
  const SeqV s(sq);
  FRNN_DISPATCH(gru_forward, gx, h0, w_hh, b_hh, H, s, y, h_n, gates, hn);
}
template <typename T>
void rnn_forward(const T* gx, const T* h0, const T* w_hh, int64_t H, bool relu, const Seq& sq,
                 T* y, T* h_n) {
  const SeqV s(sq);
  FRNN_DISPATCH(rnn_forward, gx, h0, w_hh, H, relu, s, y, h_n);
}
bool bf16_kernels_run(int64_t steps) {
#if FRNN_X86_SIMD
  return use_avx2() && TiledBF::use(steps, 0);
#else
  (void)steps;
  return false;
#endif
}
// fn's float32 kernel body on TiledBF (a bfloat16 w_hh), where it runs (bf16_kernels_run).
#if FRNN_X86_SIMD
#define FRNN_BF16(fn, ...)                         \
  if (!bf16_kernels_run(sq.T)) return false;      \
  avx2::fn<float, TiledBF, uint16_t>(__VA_ARGS__); \
  return true
#else
#define FRNN_BF16(fn, ...) return false
#endif
bool lstm_forward_bf16(const float* gx, const float* h0, const float* c0, const uint16_t* w_hh, const float* w_hr,
                       int64_t H, int64_t P, const Seq& sq, float* y, float* h_n, float* c_n, float* gates,
                       float* cells) {
  const SeqV s(sq);
  FRNN_BF16(lstm_forward, gx, h0, c0, w_hh, w_hr, H, P, s, y, h_n, c_n, gates, cells);
}
bool gru_forward_bf16(const float* gx, const float* h0, const uint16_t* w_hh, const float* b_hh, int64_t H,
                      const Seq& sq, float* y, float* h_n, float* gates, float* hn) {
  const SeqV s(sq);
  FRNN_BF16(gru_forward, gx, h0, w_hh, b_hh, H, s, y, h_n, gates, hn);
}
bool rnn_forward_bf16(const float* gx, const float* h0, const uint16_t* w_hh, int64_t H, bool relu, const Seq& sq,
                      float* y, float* h_n) {
  const SeqV s(sq);
  FRNN_BF16(rnn_forward, gx, h0, w_hh, H, relu, s, y, h_n);
}
bool lstm_backward_bf16(const float* grad_y, const float* grad_h_n, const float* grad_c_n, const float* c0,
                        const uint16_t* w_hh, int64_t H, const Seq& sq, const float* gates, const float* cells,
                        float* grad_gx, float* grad_h0, float* grad_c0, float* dfirst) {
  const SeqV s(sq);
  FRNN_BF16(lstm_backward, grad_y, grad_h_n, grad_c_n, c0, w_hh, nullptr, H, H, s, gates, cells, grad_gx, grad_h0,
            grad_c0, dfirst, nullptr, nullptr);
}
bool gru_backward_bf16(const float* grad_y, const float* grad_h_n, const float* h0, const uint16_t* w_hh, int64_t H,
                       const Seq& sq, const float* y, const float* gates, const float* hn, float* grad_gx,
                       float* grad_h0, float* dfirst, float* dgh) {
  const SeqV s(sq);
  FRNN_BF16(gru_backward, grad_y, grad_h_n, h0, w_hh, H, s, y, gates, hn, grad_gx, grad_h0, dfirst, dgh);
}
bool rnn_backward_bf16(const float* grad_y, const float* grad_h_n, const uint16_t* w_hh, int64_t H, bool relu,
                       const Seq& sq, const float* y, float* grad_gx, float* grad_h0, float* dfirst) {
  const SeqV s(sq);
  FRNN_BF16(rnn_backward, grad_y, grad_h_n, w_hh, H, relu, s, y, grad_gx, grad_h0, dfirst);
}
#undef FRNN_BF16
bool gemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, const uint16_t* W, const float* bias, float* C) {
#if FRNN_X86_SIMD
  if (!bf16_kernels_run(TiledF::kMinSteps)) return false;
  gemm_bf16_panels(M, N, K, A, W, bias, C);
  return true;
#else
  return false;
#endif
}

template <typename T>
void lstm_backward(const T* grad_y, const T* grad_h_n, const T* grad_c_n, const T* c0,
                   const T* w_hh, const T* w_hr, int64_t H, int64_t P, const Seq& sq,
                   const T* gates, const T* cells,
                   T* grad_gx, T* grad_h0, T* grad_c0, T* dfirst, T* dhs, T* hr) {
  const SeqV s(sq);
  FRNN_DISPATCH(lstm_backward, grad_y, grad_h_n, grad_c_n, c0, w_hh, w_hr, H, P, s, gates, cells,
                grad_gx, grad_h0, grad_c0, dfirst, dhs, hr);
}
template <typename T>
void gru_backward(const T* grad_y, const T* grad_h_n, const T* h0, const T* w_hh, int64_t H,
                  const Seq& sq, const T* y, const T* gates, const T* hn,
                  T* grad_gx, T* grad_h0, T* dfirst, T* dgh) {
  const SeqV s(sq);
  FRNN_DISPATCH(gru_backward, grad_y, grad_h_n, h0, w_hh, H, s, y, gates, hn, grad_gx, grad_h0, dfirst, dgh);
}
template <typename T>
void rnn_backward(const T* grad_y, const T* grad_h_n, const T* w_hh, int64_t H, bool relu,
                  const Seq& sq, const T* y, T* grad_gx, T* grad_h0, T* dfirst) {
  const SeqV s(sq);
  FRNN_DISPATCH(rnn_backward, grad_y, grad_h_n, w_hh, H, relu, s, y, grad_gx, grad_h0, dfirst);
}

template <typename T>
void step_linear(int64_t M, int64_t N, int64_t K, const T* x, const T* w, const T* b1, const T* b2, T* out,
                 bool packed) {
  if (packed) {
    std::vector<T> sum(b1 && b2 ? N : 0);
    for (int64_t n = 0; n < (int64_t)sum.size(); ++n) sum[n] = b1[n] + b2[n];
    return gemm<T>(M, N, K, x, K, 1, w, 1, K, out, N, false, b1 && b2 ? sum.data() : b1 ? b1 : b2, nullptr);
  }
  if (!b1 && !b2) return gemm_nt<T>(M, N, K, x, K, w, K, out, N, T(0));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) out[m * N + n] = (b1 ? b1[n] : T(0)) + (b2 ? b2[n] : T(0));
  gemm_nt<T>(M, N, K, x, K, w, K, out, N, T(1));
}
template <typename T>
void step_matmul(int64_t M, int64_t N, int64_t K, const T* a, const T* b, T* out, bool packed) {
  if (packed) return gemm<T>(M, N, K, a, K, 1, b, N, 1, out, N, false, nullptr, nullptr);
  gemm_nn<T>(M, N, K, a, K, b, N, out, N, T(0));
}
template <typename T>
void step_weight_grad(int64_t B, int64_t G, int64_t N, const T* d, const T* m, T* gw, T* gb, bool packed) {
  if (packed) return gemm<T>(G, N, B, d, 1, G, m, N, 1, gw, N, false, nullptr, gb);  // (gb: sums of d's rows)
  gemm_rm<T>('T', 'N', G, N, B, d, G, m, N, gw, N, T(0));  // d^T @ m
  if (!gb) return;
  std::fill(gb, gb + G, T(0));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < G; ++g) gb[g] += d[b * G + g];
}

template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t sam, int64_t sak, const T* Bm, int64_t sbk,
          int64_t sbn, T* C, int64_t ldc, bool acc, const T* bias, T* colsum) {
  // N <= 32 (narrow_gemm, narrow_gemm_t in kernels_impl.h), where the kernels are ours
  // (FUSEDRNN_CPU_TILED != 0), either type: A row-major (C written, not added to), or a
  // weight gradient's A = d^T.
  const bool narrow = g_tiled.load(std::memory_order_relaxed) && N > 0 && N <= kNarrowColumns && M > 0;
  if (narrow && sak != 1 && sam == 1 && sbn == 1)
    return FRNN_DISPATCH(narrow_gemm_t, M, N, K, A, sak, Bm, sbk, C, ldc, acc, bias, colsum);
  bool blocked = false;  // (cpu::gemm's own kernels)
#if FRNN_X86_SIMD
  if constexpr (std::is_same_v<T, float>)
    blocked = use_avx2() && g_tiled.load(std::memory_order_relaxed) && M > 0 && N > 0 && K > 0;
  else if constexpr (std::is_same_v<T, double>)  // (TiledD: AVX-512 only)
    blocked = use_avx2() && TiledF::wide() && M > 0 && N > 0 && K > 0;
#endif
  if (colsum) std::fill(colsum, colsum + M, T(0));
  if (colsum && !(blocked && sak != 1)) {  // (where A is not copied: a pass of its own over A)
    if (sam == 1)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t m = 0; m < M; ++m) colsum[m] += A[k * sak + m];
    else
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) colsum[m] += A[m * sam + k * sak];
  }
  if (narrow && sak == 1 && !acc) return FRNN_DISPATCH(narrow_gemm, M, N, K, A, sam, Bm, sbk, sbn, C, ldc, bias);
#if FRNN_X86_SIMD
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>)
    if (blocked) return gemm_blocked(M, N, K, A, sam, sak, Bm, sbk, sbn, C, ldc, acc, bias, sak != 1 ? colsum : nullptr);
#endif
  if (bias && !acc) {
    for (int64_t m = 0; m < M; ++m) std::copy(bias, bias + N, C + m * ldc);
    acc = true;
  }
  // BLAS wants a leading dimension >= the stored rows' length even where a size-1
  // dimension makes it unused.
  const bool an = sak == 1, bn = sbn == 1;  // row-major A [M, K], B [K, N]
  const int64_t lda = an ? (M == 1 ? K : sam) : (K == 1 ? M : sak);
  const int64_t ldb = bn ? (K == 1 ? N : sbk) : (N == 1 ? K : sbn);
  gemm_rm<T>(an ? 'N' : 'T', bn ? 'N' : 'T', M, N, K, A, std::max<int64_t>(lda, 1), Bm, std::max<int64_t>(ldb, 1), C,
             ldc, acc ? T(1) : T(0));
}

#define FRNN_INSTANTIATE(T)                                                                              \
  template void lstm_forward<T>(const T*, const T*, const T*, const T*, const T*, int64_t, int64_t,     \
                                const Seq&, T*, T*, T*, T*, T*);                                         \
  template void gru_forward<T>(const T*, const T*, const T*, const T*, int64_t, const Seq&, T*, T*, T*,  \
                               T*);                                                                      \
  template void rnn_forward<T>(const T*, const T*, const T*, int64_t, bool, const Seq&, T*, T*);         \
  template void lstm_backward<T>(const T*, const T*, const T*, const T*, const T*, const T*, int64_t,   \
                                 int64_t, const Seq&, const T*, const T*, T*, T*, T*, T*, T*, T*);       \
  template void gru_backward<T>(const T*, const T*, const T*, const T*, int64_t, const Seq&, const T*,  \
                                const T*, const T*, T*, T*, T*, T*);                                     \
  template void rnn_backward<T>(const T*, const T*, const T*, int64_t, bool, const Seq&, const T*, T*,  \
                                T*, T*);                                                                 \
  template void step_linear<T>(int64_t, int64_t, int64_t, const T*, const T*, const T*, const T*, T*, bool); \
  template void step_matmul<T>(int64_t, int64_t, int64_t, const T*, const T*, T*, bool);                     \
  template void step_weight_grad<T>(int64_t, int64_t, int64_t, const T*, const T*, T*, T*, bool);           \
  template void gemm<T>(int64_t, int64_t, int64_t, const T*, int64_t, int64_t, const T*, int64_t, int64_t, T*, \
                        int64_t, bool, const T*, T*);
FRNN_INSTANTIATE(float)
FRNN_INSTANTIATE(double)

}  // namespace cpu
}  // namespace fusedrnn
