// Host-side interface of the fused recurrence kernels: plain C++ (no torch, no CUDA
// headers), shared by the CUDA build (csrc/cuda/*.cu, launches on a cudaStream_t) and
// the CPU emulation build (csrc/emulation/kernels.cpp, same kernel sources).
//
// Each function runs a whole layer/direction: an init kernel, one fused step kernel per
// time step (two for LSTM with projection), a finalize kernel. Everything is enqueued on
// `stream`; nothing synchronizes with the host. Workspaces (fp32) are allocated by the
// caller (sizes below) and may hold garbage on entry.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

namespace fusedrnn {
namespace cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// Pointers are to contiguous tensors of dtype `dt` unless declared float. `lengths`:
// int64 [B] on the same device, or null. Shapes as in fusedrnn/reference.py.
struct RnnForwardArgs {
  DType dt; int T, B, H; bool reverse, relu;
  const void *gx, *h0, *w_hh; const int64_t* lengths;
  void *y, *h_n;
  float* ws;  // rnn_forward_ws floats
};
struct RnnBackwardArgs {
  DType dt; int T, B, H; bool reverse, relu;
  const void *grad_y, *grad_h_n, *w_hh, *y; const int64_t* lengths;
  void *grad_gx, *grad_h0;
  float* dpre;  // [T, B, H] fp32: dL/d(pre-activation), for the weight-gradient GEMM
  float* ws;    // rnn_backward_ws floats
};
struct LstmForwardArgs {
  DType dt; int T, B, H, P; bool reverse;  // P == H without projection (w_hr == null)
  const void *gx, *h0, *c0, *w_hh, *w_hr; const int64_t* lengths;
  void *y, *h_n, *c_n;
  float *gates, *cells;  // saved: [T, B, 4H], [T, B, H]; both null in inference (train=False)
  float* ws;             // lstm_forward_ws floats
};
struct LstmBackwardArgs {
  DType dt; int T, B, H, P; bool reverse;
  const void *grad_y, *grad_h_n, *grad_c_n, *c0, *w_hh, *w_hr; const int64_t* lengths;
  const float *gates, *cells;
  void *grad_gx, *grad_h0, *grad_c0;
  float* dpre;  // [T, B, 4H] fp32
  float* dhs;   // [T, B, P] fp32 dL/dh_t (projected; for grad_w_hr), only with w_hr
  float* ws;    // lstm_backward_ws floats
};
struct GruForwardArgs {
  DType dt; int T, B, H; bool reverse;
  const void *gx, *h0, *w_hh, *b_hh; const int64_t* lengths;  // b_hh may be null
  void *y, *h_n;
  float *gates, *hn;  // saved: [T, B, 3H] (r, z, n), [T, B, H] (W_hn h + b_hn); null: train=False
  float* ws;
};
struct GruBackwardArgs {
  DType dt; int T, B, H; bool reverse;
  const void *grad_y, *grad_h_n, *h0, *w_hh, *y; const int64_t* lengths;
  const float *gates, *hn;
  void *grad_gx, *grad_h0;
  float* dgh;  // [T, B, 3H] fp32: dL/d(W_hh h + b_hh), for grad_w_hh / grad_b_hh
  float* ws;
};

inline size_t rnn_forward_ws(int B, int H) { return size_t(2) * B * H; }
inline size_t rnn_backward_ws(int B, int H) { return size_t(2) * B * H; }
inline size_t lstm_forward_ws(int B, int H, int P) { return size_t(2) * B * P + size_t(2) * B * H; }
inline size_t lstm_backward_ws(int B, int H, int P) { return size_t(8) * B * H + size_t(B) * H + size_t(B) * P; }
inline size_t gru_forward_ws(int B, int H) { return size_t(2) * B * H; }
inline size_t gru_backward_ws(int B, int H) { return size_t(6) * B * H + size_t(B) * H; }

// ----------------------------------------------------------------------------- algorithm
// Which kernels run a call (csrc/cuda/PERSISTENT.md):
//   per_step    one launch per time step (kernels/{rnn,lstm,gru}.cuh);
//   persistent  one cooperative launch for the whole sequence, each block keeping its slice
//               of W_hh on chip (kernels/persistent.cuh); a call it cannot run raises;
//   auto        persistent when the slices fit the device (SM count and shared memory
//               queried at run time; the emulation uses a pretend device), else per_step.
// Process-wide switch, initially $FUSEDRNN_CUDA_ALGO or auto (the `_emulated` module sets
// per_step at import unless that variable is set, so the part-1 tests keep testing the
// per-step kernels). last_algo(): the choice of the latest call and why.
enum class Algo : int { Auto = 0, PerStep = 1, Persistent = 2 };
struct AlgoState {
  std::mutex m;
  Algo algo = Algo::Auto;
  std::string last = "none yet";
  int pretend_sms = 4, pretend_smem = 100 * 1024;  // the emulation's device
  int pretend_cc_major = 8;                          // its compute capability (major)
};
inline bool parse_algo(const char* name, Algo& out) {
  if (!std::strcmp(name, "auto")) out = Algo::Auto;
  else if (!std::strcmp(name, "per_step")) out = Algo::PerStep;
  else if (!std::strcmp(name, "persistent")) out = Algo::Persistent;
  else return false;
  return true;
}
inline AlgoState& algo_state() {
  static AlgoState* s = [] {
    auto* st = new AlgoState();
    const char* e = std::getenv("FUSEDRNN_CUDA_ALGO");
    if (e && *e && !parse_algo(e, st->algo))
      throw std::invalid_argument("FUSEDRNN_CUDA_ALGO must be auto, per_step or persistent");
    return st;
  }();
  return *s;
}
inline const char* algo_name(Algo a) {
  return a == Algo::Auto ? "auto" : a == Algo::PerStep ? "per_step" : "persistent";
}
inline void set_algo(const char* name) {
  Algo a;
  if (!parse_algo(name, a)) throw std::invalid_argument(std::string("fusedrnn: algo must be auto, per_step or persistent, not ") + name);
  std::lock_guard<std::mutex> l(algo_state().m);
  algo_state().algo = a;
}
inline Algo get_algo() {
  std::lock_guard<std::mutex> l(algo_state().m);
  return algo_state().algo;
}
inline void set_last_algo(const std::string& why) {
  std::lock_guard<std::mutex> l(algo_state().m);
  algo_state().last = why;
}
inline std::string last_algo() {
  std::lock_guard<std::mutex> l(algo_state().m);
  return algo_state().last;
}
// Emulation only: the SM count, shared memory per block (bytes) and compute capability
// (major) of the pretend device.
inline void set_pretend_device(int sms, int smem_per_block, int cc_major = 8) {
  if (sms < 1 || smem_per_block < 1024) throw std::invalid_argument("fusedrnn: pretend device needs >= 1 SM and >= 1 KB");
  std::lock_guard<std::mutex> l(algo_state().m);
  algo_state().pretend_sms = sms;
  algo_state().pretend_smem = smem_per_block;
  algo_state().pretend_cc_major = cc_major;
}

// CUDA build only: why this build has no kernel code that `device` can run (empty if it
// has): a GPU older than every architecture of TORCH_CUDA_ARCH_LIST at build time, with no
// PTX it can compile either. The backend then refuses calls on that device with this
// reason (fusedrnn/backends/native.py), rather than failing at the first launch.
std::string kernel_image_missing(int device);

// `stream` is a cudaStream_t in the CUDA build (ignored by the emulation).
void rnn_forward(const RnnForwardArgs& a, void* stream);
void rnn_backward(const RnnBackwardArgs& a, void* stream);
void lstm_forward(const LstmForwardArgs& a, void* stream);
void lstm_backward(const LstmBackwardArgs& a, void* stream);
void gru_forward(const GruForwardArgs& a, void* stream);
void gru_backward(const GruBackwardArgs& a, void* stream);

}  // namespace cuda
}  // namespace fusedrnn
