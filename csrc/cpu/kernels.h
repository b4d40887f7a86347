// Fused CPU recurrence kernels: raw-pointer entry points, no torch headers.
// Implemented in kernels.cpp (light TU), called from register.cpp (the only TU
// that includes ATen/torch). Semantics: fusedrnn/reference.py.
//
// Layouts (all row-major, contiguous): gx/gates [T,B,G], y [T,B,P], cells/hn [T,B,H],
// weights as PyTorch stores them (w_hh [G,P], w_hr [P,H]). `lengths` may be null
// (every sequence has length T); values are in [0, T].
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace fusedrnn {
namespace cpu {

struct Seq {
  int64_t T;
  int64_t B;
  const int64_t* lengths;  // [B] or nullptr
  bool reverse;
  // With non-increasing lengths (a PackedSequence in its sorted order): active[s], s in
  // [0, T], the rows still running at step s (those with length > s: a prefix of the
  // batch). Null otherwise. The recurrent GEMMs skip the rows that have ended, as
  // torch.nn's packed path does (PyTorch's batch_sizes).
  const int64_t* active = nullptr;
  // How many of rows [b0, b1) are still running at step s (all of them without `active`).
  int64_t rows(int64_t s, int64_t b0, int64_t b1) const {
    return active ? std::max<int64_t>(0, std::min(active[s], b1) - b0) : b1 - b0;
  }
};

// Forward ops: write every element of y/h_n/c_n/gates/cells (and hn for GRU).
// gates/cells (GRU: gates/hn) may be nullptr (inference, train=False): not written.
template <typename T>
void lstm_forward(const T* gx, const T* h0, const T* c0, const T* w_hh, const T* w_hr,
                  int64_t H, int64_t P, const Seq& sq,
                  T* y, T* h_n, T* c_n, T* gates, T* cells);
template <typename T>
void gru_forward(const T* gx, const T* h0, const T* w_hh, const T* b_hh, int64_t H, const Seq& sq,
                 T* y, T* h_n, T* gates, T* hn);
template <typename T>
void rnn_forward(const T* gx, const T* h0, const T* w_hh, int64_t H, bool relu, const Seq& sq,
                 T* y, T* h_n);

// Forwards with the recurrent weight in bfloat16 (its raw bits, [G, P] as PyTorch stores
// it) and everything else float32: the recurrent products run on AVX512-BF16 dot products,
// with h rounded to bfloat16 before each step's product (kernels.cpp, tiled_bf16.h); the
// saved tensors as the float32 forwards write them (null in inference). They return false
// and write nothing where that kernel does not run (a CPU without AVX512-BF16, fewer than
// 8 steps, FUSEDRNN_CPU_TILED=0): the caller then runs the float32 forward on the weight
// cast to float32.
// Whether they run for a sequence of `steps` steps.
bool bf16_kernels_run(int64_t steps);
bool lstm_forward_bf16(const float* gx, const float* h0, const float* c0, const uint16_t* w_hh, const float* w_hr,
                       int64_t H, int64_t P, const Seq& sq, float* y, float* h_n, float* c_n, float* gates,
                       float* cells);
bool gru_forward_bf16(const float* gx, const float* h0, const uint16_t* w_hh, const float* b_hh, int64_t H,
                      const Seq& sq, float* y, float* h_n, float* gates, float* hn);
// Their backwards (the sequential part, as the float32 ones), the recurrent GEMM dh +=
// dpre @ W_hh on the same dot products with dpre rounded to bfloat16; not for the LSTM
// with projection (false there, as where the forwards do not run).
bool lstm_backward_bf16(const float* grad_y, const float* grad_h_n, const float* grad_c_n, const float* c0,
                        const uint16_t* w_hh, int64_t H, const Seq& sq, const float* gates, const float* cells,
                        float* grad_gx, float* grad_h0, float* grad_c0, float* dfirst);
bool gru_backward_bf16(const float* grad_y, const float* grad_h_n, const float* h0, const uint16_t* w_hh, int64_t H,
                       const Seq& sq, const float* y, const float* gates, const float* hn, float* grad_gx,
                       float* grad_h0, float* dfirst, float* dgh);
bool rnn_backward_bf16(const float* grad_y, const float* grad_h_n, const uint16_t* w_hh, int64_t H, bool relu,
                       const Seq& sq, const float* y, float* grad_gx, float* grad_h0, float* dfirst);
// The bfloat16 path's input projection: C[M,N] = A[M,K] @ W[N,K]^T (+ bias[N] if not null),
// A and W bfloat16 bits (row-major), C float32. False (nothing written) where the kernel
// does not run (bf16_kernels_run(8) is false).
bool gemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, const uint16_t* W, const float* bias, float* C);
bool rnn_forward_bf16(const float* gx, const float* h0, const uint16_t* w_hh, int64_t H, bool relu, const Seq& sq,
                      float* y, float* h_n);

// Backward ops: the sequential part only. They write grad_gx (all of it), grad_h0,
// grad_c0 and `dfirst` [B,G]: each sequence's pre-activation gradient at its first
// (oriented) step, 0 for empty sequences, for the weight gradient's h0 term.
// grad_h0 may be nullptr (nothing needs it): then its GEMM is skipped.
// LSTM with projection also writes dhs [T,B,P] (dL/dh_t, 0 at padded steps) and
// hr [T,B,H] (unprojected h_t, 0 at padded steps) for grad_w_hr.
// GRU also writes dgh [T,B,3H]: gradient w.r.t. W_hh h + b_hh.
template <typename T>
void lstm_backward(const T* grad_y, const T* grad_h_n, const T* grad_c_n, const T* c0,
                   const T* w_hh, const T* w_hr, int64_t H, int64_t P, const Seq& sq,
                   const T* gates, const T* cells,
                   T* grad_gx, T* grad_h0, T* grad_c0, T* dfirst, T* dhs, T* hr);
template <typename T>
void gru_backward(const T* grad_y, const T* grad_h_n, const T* h0, const T* w_hh, int64_t H,
                  const Seq& sq, const T* y, const T* gates, const T* hn,
                  T* grad_gx, T* grad_h0, T* dfirst, T* dgh);
template <typename T>
void rnn_backward(const T* grad_y, const T* grad_h_n, const T* w_hh, int64_t H, bool relu,
                  const Seq& sq, const T* y, T* grad_gx, T* grad_h0, T* dfirst);

// One cell step's dense parts (cell_ops.cpp), not ATen ops: at the sizes of a decoding step
// (e.g. B=4, H=64) an ATen op's dispatch costs more than its GEMM. `packed`: on cpu::gemm
// (our packed-panel kernels, the weight packed per call: float32, and float64 on AVX-512
// CPUs), else straight on BLAS
// (cell_ops.cpp says where each is faster).
// out[M,N] = x[M,K] @ w[N,K]^T (+ b1[N]) (+ b2[N]); b1 and b2 may be null.
template <typename T>
void step_linear(int64_t M, int64_t N, int64_t K, const T* x, const T* w, const T* b1, const T* b2, T* out,
                 bool packed);
// out[M,N] = a[M,K] @ b[K,N] (an input's or a state's gradient: dgates @ w).
template <typename T>
void step_matmul(int64_t M, int64_t N, int64_t K, const T* a, const T* b, T* out, bool packed);
// A weight's gradient gw[G,N] = d[B,G]^T @ m[B,N]; gb[G] (if not null) = the column sums of d.
template <typename T>
void step_weight_grad(int64_t B, int64_t G, int64_t N, const T* d, const T* m, T* gw, T* gb, bool packed);

// C[M,N] = A @ B (+ bias[n] if bias is not null; acc: C += A @ B, bias ignored) for the
// GEMMs over all timesteps (the input projection and the weight gradients), with
// A(m,k) = A[m*sam + k*sak] and B(k,n) = B[k*sbk + n*sbn]: one stride of each must be 1,
// either one, so a transposed operand needs no copy. C is row-major (ldc). colsum (if not
// null) [M] = the sums of A's rows (a bias gradient, for A = grad^T; free where a weight
// gradient copies A anyway). float32 on AVX2, and float64 on AVX-512 (TiledD), run the
// recurrent micro-kernel blocked for cache (kernels.cpp, gemm_blocked); otherwise BLAS.
// Up to kNarrowColumns columns N, with
// A row-major or stored transposed (a weight gradient's grad^T), it runs narrow kernels of
// its own, float32 and float64 (kernels_impl.h, narrow_gemm): the input projection to 32
// gates or fewer (RNN hidden <= 32), and the backward of a few input features or of a
// hidden size <= 32. In-process against the packed micro-kernel (2 threads, Zen 4): the
// projection backward (dx, dW, db) at 32768 rows x 64 gates x 8 features 3.1 -> 0.50 ms,
// x 128 gates x 32 features 6.2 -> 4.0 ms; the projection of 32768 rows x 64 features to 16
// gates 1.45 -> 0.42 ms (F.linear 0.45); at 64 columns the weight gradient measured slower
// (7.8 against 7.3 ms), hence the bound.
constexpr int64_t kNarrowColumns = 32;
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t sam, int64_t sak, const T* B, int64_t sbk,
          int64_t sbn, T* C, int64_t ldc, bool acc, const T* bias = nullptr, T* colsum = nullptr);

// Whether all n values are zero (+0 or -0). h0 = 0 is the modules' state when no hx is
// given; the first step's products with it are skipped (FirstStep in kernels.cpp, the
// weight gradient's h0 term in register.cpp).
template <typename T>
inline bool all_zero(const T* p, int64_t n) {
  return std::all_of(p, p + n, [](T v) { return v == T(0); });
}

// Memory for the kernels' large temporaries (the packed weights: 16 MB for an LSTM layer
// of hidden size 1024), supplied by the op layer (register.cpp: the output pool), which
// keeps this file and kernels.cpp free of ATen headers. alloc returns the memory and sets
// *handle; release(handle) gives it back. Unset: new[] / delete[].
struct Scratch {
  void* (*alloc)(size_t bytes, void** handle) = nullptr;
  void (*release)(void* handle) = nullptr;
};
void set_scratch(const Scratch& s);

// Which elementwise code path runs ("avx2" or "baseline"), for the benchmark/report.
const char* simd_path();

// Tuning knobs, process-wide (tests use them to force every code path):
// tiled: the float32 GEMMs' kernels (FUSEDRNN_CPU_TILED): 0 = BLAS, 1 = the packed-panel
// AVX2 micro-kernels, 2 = those with the recurrent steps' kernels in AVX-512's 32
// registers, 3 = 4-vector panels on 16-float (zmm) vectors (the default where the CPU has
// AVX-512: 3 where it runs 512-bit FMAs at full width, else 2; lowered to 1 without
// AVX-512), -1 = unchanged; float64 runs its packed-panel kernels (TiledD, 8-double zmm
// vectors) in modes 2 and 3, BLAS in 0 and 1; min_work: multiply-adds per thread per step below which a step is not
// split over threads (FUSEDRNN_CPU_MIN_WORK), <= 0 = unchanged; split: how the threads
// share a time loop (FUSEDRNN_CPU_SPLIT, see make_split in kernels.cpp): 0 = chosen per
// call, 1 = by hidden units, 2 = by batch rows wherever the kernel can, -1 = unchanged.
// Returns the previous values through the pointers (may be null).
void set_options(int tiled, int64_t min_work, int split, int* old_tiled, int64_t* old_min_work, int* old_split);

// Whether a recurrence whose steps take `step_work` multiply-adds (batch x gates x hidden x
// K) runs each step on one thread: below min_work per thread a step is not split (the
// time loop's slices, make_slices in kernels.cpp).
bool step_runs_on_one_thread(int64_t step_work);

// While it lives (if `on`), the calling thread's kernels run on that thread alone: no
// parallel region, and its BLAS calls on one thread (MKL's thread-local setting, where
// torch's BLAS is MKL). For the cell ops' small steps (cell_ops.cpp), where a parallel
// region or BLAS's own threads cost more than the work they share.
class OnCallingThread {
 public:
  explicit OnCallingThread(bool on);
  ~OnCallingThread();
  OnCallingThread(const OnCallingThread&) = delete;
  OnCallingThread& operator=(const OnCallingThread&) = delete;

 private:
  bool on_;
  int blas_old_ = 0;
};
// For tests: how many threads a large step's kernels would use if the calling thread ran
// one now, and its BLAS calls (MKL's count for this thread; -1 where BLAS is not MKL).
void calling_thread_threads(int* kernels, int* blas);

// Test hook of the float32 GEMMs' work stealing: from now on the last thread of each GEMM
// waits before its own work, as if preempted, until another thread has taken one of its
// units or `us` microseconds have passed (0: no wait). Returns how many units a thread
// other than their owner has run since the process started.
int64_t gemm_test_delay(int us);

}  // namespace cpu
}  // namespace fusedrnn
