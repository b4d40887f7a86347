// Vanilla RNN (tanh / relu): fused step kernels (recurrent matmul + pointwise) and their
// host drivers. The pointwise math is csrc/cells/rnn.h.
#pragma once
#include "cells/rnn.h"
#include "cuda/kernels/common.cuh"
#include "cuda/kernels/persistent.cuh"

namespace fusedrnn {
namespace cuda {

template <class T>
struct RnnFwdP {
  const T* gx; const T* w_hh; const int64_t* lengths;
  T* y; const float* h_in; float* h_out;
  int steps, B, H; bool reverse, relu;
};

// Step s: h_out = act(gx_t + h_in W_hh^T) for the block's tile.
template <class T>
__global__ void __launch_bounds__(kThreads) rnn_fwd_step(RnnFwdP<T> p, int s) {
  FRNN_DYN_SMEM(float, smem);
  float acc[1] = {0.f};
  tile_gemm_nt<1>(acc, p.h_in, p.H, p.B, p.w_hh, p.H, 0, p.H, p.H, smem);
  const int b = blockIdx.y * TB + threadIdx.y, j = blockIdx.x * TN + threadIdx.x;
  if (b >= p.B || j >= p.H) return;
  const size_t bj = static_cast<size_t>(b) * p.H + j;
  int t;
  if (step_time(seq_len(p.lengths, b, p.steps), s, p.reverse, t)) {
    const size_t o = static_cast<size_t>(t) * p.B * p.H + bj;
    const float h = rnn_forward_unit(to_f(p.gx[o]) + acc[0], p.relu);
    p.h_out[bj] = h;
    p.y[o] = from_f<T>(h);
  } else {
    p.h_out[bj] = p.h_in[bj];
    p.y[static_cast<size_t>(t) * p.B * p.H + bj] = from_f<T>(0.f);
  }
}

template <class T>
struct RnnBwdP {
  const T* grad_y; const T* grad_h_n; const T* w_hh; const T* y; const int64_t* lengths;
  T* dgx; float* dpre; float* buf;  // buf: [2][B][H] da of the last two steps (by parity of s)
  T* grad_h0;
  int steps, B, H; bool reverse, relu;
};

// Step s (descending; s == -1 finishes with grad_h0): dh_t = da_{s+1} W_hh (the
// dh_{t-1} = dgates . W_hh of the step after) fused with this step's da.
template <class T>
__global__ void __launch_bounds__(kThreads) rnn_bwd_step(RnnBwdP<T> p, int s) {
  FRNN_DYN_SMEM(float, smem);
  const size_t BH = static_cast<size_t>(p.B) * p.H;
  const float* prev = p.buf + ((s + 1) & 1) * BH;
  float* cur = p.buf + (s & 1) * BH;
  float acc = 0.f;
  if (s + 1 < p.steps) tile_gemm_nn(acc, prev, p.H, p.B, p.w_hh, p.H, p.H, p.H, smem);
  const int b = blockIdx.y * TB + threadIdx.y, j = blockIdx.x * TN + threadIdx.x;
  if (b >= p.B || j >= p.H) return;
  const size_t bj = static_cast<size_t>(b) * p.H + j;
  const int L = seq_len(p.lengths, b, p.steps);
  const float dh_in = s + 1 < L ? acc : to_f(p.grad_h_n[bj]);
  if (s < 0) {
    p.grad_h0[bj] = from_f<T>(dh_in);
    return;
  }
  int t;
  if (step_time(L, s, p.reverse, t)) {
    const size_t o = static_cast<size_t>(t) * BH + bj;
    const float da = rnn_backward_unit(to_f(p.y[o]), dh_in + to_f(p.grad_y[o]), p.relu);
    p.dgx[o] = from_f<T>(da);
    p.dpre[o] = da;
    cur[bj] = da;
  } else {
    const size_t o = static_cast<size_t>(t) * BH + bj;
    p.dgx[o] = from_f<T>(0.f);
    p.dpre[o] = 0.f;
    cur[bj] = 0.f;
  }
}


// ---------------------------------------------------------------- persistent (persistent.cuh)
template <class T_>
struct RnnFwdPers {
  using T = T_;
  static constexpr int NA = 1;
  static constexpr bool kTransposed = false;
  const T* w; int B, H, iters; PGeom g;
  const T* gx; const int64_t* lengths; T* y;
  float* h;  // [2][B][H] fp32 state, by step parity
  bool reverse, relu;
  static constexpr int NP = 1;  // gx prefetched before the recurrent product
  __device__ const float* gemm_src(int s) const { return h + (s & 1) * static_cast<size_t>(B) * H; }
  __device__ void prefetch(int s, int b, int j, float (&pre)[NP]) const {
    int t;
    const bool active = step_time(seq_len(lengths, b, iters), s, reverse, t);
    pre[0] = active ? to_f(gx[static_cast<size_t>(t) * B * H + static_cast<size_t>(b) * H + j]) : 0.f;
  }
  __device__ void point(int s, int b, int j, const float* acc, const float (&pre)[NP], bool use_pre) const {
    const size_t BH = static_cast<size_t>(B) * H, bj = static_cast<size_t>(b) * H + j;
    float* h_out = h + ((s + 1) & 1) * BH;
    int t;
    if (step_time(seq_len(lengths, b, iters), s, reverse, t)) {
      const size_t o = static_cast<size_t>(t) * BH + bj;
      const float hv = rnn_forward_unit((use_pre ? pre[0] : to_f(gx[o])) + acc[0], relu);
      h_out[bj] = hv;
      y[o] = from_f<T>(hv);
    } else {
      h_out[bj] = __ldcg(h + (s & 1) * BH + bj);
      y[static_cast<size_t>(t) * BH + bj] = from_f<T>(0.f);
    }
  }
};

// Iteration it handles step s = steps - 1 - it (the last, s = -1, writes grad_h0).
template <class T_>
struct RnnBwdPers {
  using T = T_;
  static constexpr int NA = 1;
  static constexpr bool kTransposed = true;
  const T* w; int B, H, iters; PGeom g;
  int steps;
  const T* grad_y; const T* grad_h_n; const T* y; const int64_t* lengths;
  T* dgx; float* dpre; float* buf; T* grad_h0;  // buf: [2][B][H] da by parity of s
  bool reverse, relu;
  static constexpr int NP = 1;  // nothing prefetched
  __device__ void prefetch(int, int, int, float (&pre)[NP]) const { pre[0] = 0.f; }
  __device__ const float* gemm_src(int it) const {
    const int s = steps - 1 - it;
    return s + 1 < steps ? buf + ((s + 1) & 1) * static_cast<size_t>(B) * H : nullptr;
  }
  __device__ void point(int it, int b, int j, const float* acc, const float (&)[NP], bool) const {
    const int s = steps - 1 - it;
    const size_t BH = static_cast<size_t>(B) * H, bj = static_cast<size_t>(b) * H + j;
    const int L = seq_len(lengths, b, steps);
    const float dh_in = s + 1 < L ? acc[0] : to_f(grad_h_n[bj]);
    if (s < 0) {
      grad_h0[bj] = from_f<T>(dh_in);
      return;
    }
    float* cur = buf + (s & 1) * BH;
    int t;
    const bool active = step_time(L, s, reverse, t);
    const size_t o = static_cast<size_t>(t) * BH + bj;
    const float da = active ? rnn_backward_unit(to_f(y[o]), dh_in + to_f(grad_y[o]), relu) : 0.f;
    dgx[o] = from_f<T>(da);
    dpre[o] = da;
    cur[bj] = da;
  }
};

template <class T>
bool rnn_forward_persistent(const RnnForwardArgs& a, cudaStream_t st) {
  PersistentPlan plan;
  if (!choose_persistent<RnnFwdPers<T>>("rnn forward", a.H, a.H, a.B, a.T, nullptr, plan)) return false;
  const int BH = a.B * a.H;
  RnnFwdPers<T> p;
  p.w = static_cast<const T*>(a.w_hh); p.B = a.B; p.H = a.H; p.iters = a.T; p.g = PGeom{plan.U, plan.bch, a.H};
  p.gx = static_cast<const T*>(a.gx); p.lengths = a.lengths; p.y = static_cast<T*>(a.y); p.h = a.ws;
  p.reverse = a.reverse; p.relu = a.relu;
  launch_to_float<T>(a.h0, a.ws, BH, st);
  launch_persistent(p, plan, st);
  launch_from_float<T>(a.ws + (a.T & 1) * static_cast<size_t>(BH), a.h_n, BH, st);
  frnn_check_launch("rnn_forward (persistent)");
  return true;
}

template <class T>
bool rnn_backward_persistent(const RnnBackwardArgs& a, cudaStream_t st) {
  PersistentPlan plan;
  if (!choose_persistent<RnnBwdPers<T>>("rnn backward", a.H, a.H, a.B, a.T, nullptr, plan)) return false;
  RnnBwdPers<T> p;
  p.w = static_cast<const T*>(a.w_hh); p.B = a.B; p.H = a.H; p.iters = a.T + 1; p.g = PGeom{plan.U, plan.bch, a.H};
  p.steps = a.T; p.grad_y = static_cast<const T*>(a.grad_y); p.grad_h_n = static_cast<const T*>(a.grad_h_n);
  p.y = static_cast<const T*>(a.y); p.lengths = a.lengths; p.dgx = static_cast<T*>(a.grad_gx); p.dpre = a.dpre;
  p.buf = a.ws; p.grad_h0 = static_cast<T*>(a.grad_h0); p.reverse = a.reverse; p.relu = a.relu;
  launch_persistent(p, plan, st);
  frnn_check_launch("rnn_backward (persistent)");
  return true;
}

template <class T>
void rnn_forward_t(const RnnForwardArgs& a, cudaStream_t st) {
  if (rnn_forward_persistent<T>(a, st)) return;
  const int BH = a.B * a.H;
  float* h[2] = {a.ws, a.ws + BH};
  launch_to_float<T>(a.h0, h[0], BH, st);
  if (BH > 0) {
    RnnFwdP<T> p{static_cast<const T*>(a.gx), static_cast<const T*>(a.w_hh), a.lengths, static_cast<T*>(a.y),
                 nullptr, nullptr, a.T, a.B, a.H, a.reverse, a.relu};
    const size_t smem = smem_nt_floats(1) * sizeof(float);
    for (int s = 0; s < a.T; ++s) {
      p.h_in = h[s & 1];
      p.h_out = h[(s + 1) & 1];
      FRNN_LAUNCH(rnn_fwd_step<T>, step_grid(a.H, a.B), step_block(), smem, st, p, s);
    }
  }
  launch_from_float<T>(h[a.T & 1], a.h_n, BH, st);
  frnn_check_launch("rnn_forward");
}

template <class T>
void rnn_backward_t(const RnnBackwardArgs& a, cudaStream_t st) {
  if (rnn_backward_persistent<T>(a, st)) return;
  if (a.B * a.H == 0) return;
  RnnBwdP<T> p{static_cast<const T*>(a.grad_y), static_cast<const T*>(a.grad_h_n), static_cast<const T*>(a.w_hh),
               static_cast<const T*>(a.y), a.lengths, static_cast<T*>(a.grad_gx), a.dpre, a.ws,
               static_cast<T*>(a.grad_h0), a.T, a.B, a.H, a.reverse, a.relu};
  const size_t smem = smem_nn_floats() * sizeof(float);
  for (int s = a.T - 1; s >= -1; --s)
    FRNN_LAUNCH(rnn_bwd_step<T>, step_grid(a.H, a.B), step_block(), smem, st, p, s);
  frnn_check_launch("rnn_backward");
}

void rnn_forward(const RnnForwardArgs& a, void* stream) {
  FRNN_DISPATCH_DTYPE(rnn_forward_t, a, static_cast<cudaStream_t>(stream));
}
void rnn_backward(const RnnBackwardArgs& a, void* stream) {
  FRNN_DISPATCH_DTYPE(rnn_backward_t, a, static_cast<cudaStream_t>(stream));
}

}  // namespace cuda
}  // namespace fusedrnn
