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
  float *gates, *cells;  // saved: [T, B, 4H], [T, B, H]
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
  float *gates, *hn;  // saved: [T, B, 3H] (r, z, n), [T, B, H] (W_hn h + b_hn)
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

// `stream` is a cudaStream_t in the CUDA build (ignored by the emulation).
void rnn_forward(const RnnForwardArgs& a, void* stream);
void rnn_backward(const RnnBackwardArgs& a, void* stream);
void lstm_forward(const LstmForwardArgs& a, void* stream);
void lstm_backward(const LstmBackwardArgs& a, void* stream);
void gru_forward(const GruForwardArgs& a, void* stream);
void gru_backward(const GruBackwardArgs& a, void* stream);

}  // namespace cuda
}  // namespace fusedrnn
