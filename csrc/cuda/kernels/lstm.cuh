// LSTM (optionally with projection): fused step kernels and host drivers. The pointwise
// math is csrc/cells/lstm.h. Without projection P == H and one kernel per step does
// everything; with projection a second kernel per step applies h = hr W_hr^T (forward),
// and the backward splits into dh_t = da_{s+1} W_hh (+ grad_y) and dhr = dh_t W_hr fused
// with the gate derivatives.
#pragma once
#include "cells/lstm.h"
#include "cuda/kernels/common.cuh"
#include "cuda/kernels/persistent.cuh"

namespace fusedrnn {
namespace cuda {

template <class T>
struct LstmFwdP {
  const T* gx; const T* w_hh; const T* w_hr; const int64_t* lengths;
  T* y; float* gates; float* cells;
  const float* h_in; float* h_out;  // [B][P]
  float* c;                         // [B][H] cell state
  float* hr;                        // [B][H] unprojected h of this step (projection only)
  int steps, B, H, P; bool reverse;
};

template <class T>
__global__ void __launch_bounds__(kThreads) lstm_fwd_step(LstmFwdP<T> p, int s) {
  FRNN_DYN_SMEM(float, smem);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  tile_gemm_nt<4>(acc, p.h_in, p.P, p.B, p.w_hh, p.P, p.H, p.H, p.P, smem);
  const int b = blockIdx.y * TB + threadIdx.y, j = blockIdx.x * TN + threadIdx.x;
  if (b >= p.B || j >= p.H) return;
  const int H = p.H;
  const size_t bj = static_cast<size_t>(b) * H + j;
  int t;
  const bool active = step_time(seq_len(p.lengths, b, p.steps), s, p.reverse, t);
  const size_t o4 = (static_cast<size_t>(t) * p.B + b) * 4 * H + j;
  const size_t o1 = (static_cast<size_t>(t) * p.B + b) * H + j;
  if (active) {
    float i, f, g, o, c, h;
    lstm_forward_unit(to_f(p.gx[o4]) + acc[0], to_f(p.gx[o4 + H]) + acc[1], to_f(p.gx[o4 + 2 * H]) + acc[2],
                      to_f(p.gx[o4 + 3 * H]) + acc[3], p.c[bj], i, f, g, o, c, h);
    if (p.gates) {  // null in inference (train=False): nothing saved
      p.gates[o4] = i; p.gates[o4 + H] = f; p.gates[o4 + 2 * H] = g; p.gates[o4 + 3 * H] = o;
      p.cells[o1] = c;
    }
    p.c[bj] = c;
    if (p.w_hr) {
      p.hr[bj] = h;
    } else {
      p.h_out[bj] = h;
      p.y[o1] = from_f<T>(h);
    }
  } else {
    if (p.gates) {
      p.gates[o4] = 0.f; p.gates[o4 + H] = 0.f; p.gates[o4 + 2 * H] = 0.f; p.gates[o4 + 3 * H] = 0.f;
      p.cells[o1] = 0.f;
    }
    if (!p.w_hr) {
      p.h_out[bj] = p.h_in[bj];
      p.y[o1] = from_f<T>(0.f);
    }
  }
}

// Projection of step s: h_out = hr W_hr^T for the block's [B x P] tile.
template <class T>
__global__ void __launch_bounds__(kThreads) lstm_proj_step(LstmFwdP<T> p, int s) {
  FRNN_DYN_SMEM(float, smem);
  float acc[1] = {0.f};
  tile_gemm_nt<1>(acc, p.hr, p.H, p.B, p.w_hr, p.H, 0, p.P, p.H, smem);
  const int b = blockIdx.y * TB + threadIdx.y, q = blockIdx.x * TN + threadIdx.x;
  if (b >= p.B || q >= p.P) return;
  const size_t bq = static_cast<size_t>(b) * p.P + q;
  int t;
  const bool active = step_time(seq_len(p.lengths, b, p.steps), s, p.reverse, t);
  const size_t o = static_cast<size_t>(t) * p.B * p.P + bq;
  if (active) {
    p.h_out[bq] = acc[0];
    p.y[o] = from_f<T>(acc[0]);
  } else {
    p.h_out[bq] = p.h_in[bq];
    p.y[o] = from_f<T>(0.f);
  }
}

template <class T>
struct LstmBwdP {
  const T* grad_y; const T* grad_h_n; const T* w_hh; const T* w_hr; const T* c0; const int64_t* lengths;
  const float* gates; const float* cells;
  T* dgx; float* dpre;
  float* buf;     // [2][B][4H] da of the last two steps (by parity of s)
  float* dc;      // [B][H] dL/dc carried backwards
  float* dh_buf;  // [B][P] dL/dh_t of this step (projection only)
  float* dhs;     // [T][B][P] the same at every step (projection only)
  T* grad_h0;
  int steps, B, H, P; bool reverse;
};

// Projection only. Step s (s == -1: grad_h0): dh_t = da_{s+1} W_hh + grad_y_t for [B x P].
template <class T>
__global__ void __launch_bounds__(kThreads) lstm_bwd_dh_step(LstmBwdP<T> p, int s) {
  FRNN_DYN_SMEM(float, smem);
  const int G = 4 * p.H;
  float acc = 0.f;
  if (s + 1 < p.steps)
    tile_gemm_nn(acc, p.buf + ((s + 1) & 1) * static_cast<size_t>(p.B) * G, G, p.B, p.w_hh, p.P, p.P, G, smem);
  const int b = blockIdx.y * TB + threadIdx.y, q = blockIdx.x * TN + threadIdx.x;
  if (b >= p.B || q >= p.P) return;
  const size_t bq = static_cast<size_t>(b) * p.P + q;
  const int L = seq_len(p.lengths, b, p.steps);
  const float dh_in = s + 1 < L ? acc : to_f(p.grad_h_n[bq]);
  if (s < 0) {
    p.grad_h0[bq] = from_f<T>(dh_in);
    return;
  }
  int t;
  const bool active = step_time(L, s, p.reverse, t);
  const size_t o = static_cast<size_t>(t) * p.B * p.P + bq;
  if (active) {
    const float dh = dh_in + to_f(p.grad_y[o]);
    p.dh_buf[bq] = dh;
    p.dhs[o] = dh;
  } else {
    p.dhs[o] = 0.f;
  }
}

// Step s (descending). Without projection: dh_t = da_{s+1} W_hh (+ grad_y) fused with the
// gate derivatives (s == -1 writes grad_h0). With projection: dhr = dh_t W_hr fused with them.
template <class T>
__global__ void __launch_bounds__(kThreads) lstm_bwd_step(LstmBwdP<T> p, int s) {
  FRNN_DYN_SMEM(float, smem);
  const int H = p.H, G = 4 * H;
  const size_t BG = static_cast<size_t>(p.B) * G;
  float acc = 0.f;
  if (p.w_hr) tile_gemm_nn(acc, p.dh_buf, p.P, p.B, p.w_hr, H, H, p.P, smem);
  else if (s + 1 < p.steps) tile_gemm_nn(acc, p.buf + ((s + 1) & 1) * BG, G, p.B, p.w_hh, H, H, G, smem);
  const int b = blockIdx.y * TB + threadIdx.y, j = blockIdx.x * TN + threadIdx.x;
  if (b >= p.B || j >= H) return;
  const size_t bj = static_cast<size_t>(b) * H + j;
  const int L = seq_len(p.lengths, b, p.steps);
  int t;
  const bool active = step_time(L, s < 0 ? 0 : s, p.reverse, t);
  float dh = acc;
  if (!p.w_hr) {
    const float dh_in = s + 1 < L ? acc : to_f(p.grad_h_n[bj]);
    if (s < 0) {
      p.grad_h0[bj] = from_f<T>(dh_in);
      return;
    }
    if (active) dh = dh_in + to_f(p.grad_y[static_cast<size_t>(t) * p.B * H + bj]);
  }
  float* cur = p.buf + (s & 1) * BG + static_cast<size_t>(b) * G + j;
  const size_t o4 = (static_cast<size_t>(t) * p.B + b) * G + j;
  if (active) {
    const float i = p.gates[o4], f = p.gates[o4 + H], g = p.gates[o4 + 2 * H], o = p.gates[o4 + 3 * H];
    const float c = p.cells[(static_cast<size_t>(t) * p.B + b) * H + j];
    const int tp = p.reverse ? t + 1 : t - 1;  // time index of the previous real step
    const float c_prev = s > 0 ? p.cells[(static_cast<size_t>(tp) * p.B + b) * H + j] : to_f(p.c0[bj]);
    float dai, daf, dag, dao, dc_prev;
    lstm_backward_unit(i, f, g, o, c, c_prev, dh, p.dc[bj], dai, daf, dag, dao, dc_prev);
    p.dc[bj] = dc_prev;
    const float da[4] = {dai, daf, dag, dao};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      p.dgx[o4 + k * H] = from_f<T>(da[k]);
      p.dpre[o4 + k * H] = da[k];
      cur[k * H] = da[k];
    }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      p.dgx[o4 + k * H] = from_f<T>(0.f);
      p.dpre[o4 + k * H] = 0.f;
      cur[k * H] = 0.f;
    }
  }
}


// ---------------------------------------------------------------- persistent (persistent.cuh)
// Without projection only (P == H).
template <class T_>
struct LstmFwdPers {
  using T = T_;
  static constexpr int NA = 4;
  static constexpr bool kTransposed = false;
  const T* w; int B, H, iters; PGeom g;
  const T* gx; const int64_t* lengths; T* y; float* gates; float* cells;
  float* h;  // [2][B][H] fp32, by step parity
  float* c;  // [B][H] (each unit only ever touched by its own block)
  bool reverse;
  static constexpr int NP = 4;  // gx of the 4 gates, prefetched before the recurrent product
  __device__ const float* gemm_src(int s) const { return h + (s & 1) * static_cast<size_t>(B) * H; }
  __device__ void prefetch(int s, int b, int j, float (&pre)[NP]) const {
    int t;
    const bool active = step_time(seq_len(lengths, b, iters), s, reverse, t);
    const size_t o4 = (static_cast<size_t>(t) * B + b) * 4 * H + j;
#pragma unroll
    for (int g = 0; g < 4; ++g) pre[g] = active ? to_f(gx[o4 + g * H]) : 0.f;
  }
  __device__ void point(int s, int b, int j, const float* acc, const float (&pre)[NP], bool use_pre) const {
    const size_t BH = static_cast<size_t>(B) * H, bj = static_cast<size_t>(b) * H + j;
    float* h_out = h + ((s + 1) & 1) * BH;
    int t;
    const bool active = step_time(seq_len(lengths, b, iters), s, reverse, t);
    const size_t o4 = (static_cast<size_t>(t) * B + b) * 4 * H + j, o1 = static_cast<size_t>(t) * BH + bj;
    if (active) {
      float i, f, gg, o, cc, hh;
      float x[4];
#pragma unroll
      for (int g = 0; g < 4; ++g) x[g] = use_pre ? pre[g] : to_f(gx[o4 + g * H]);
      lstm_forward_unit(x[0] + acc[0], x[1] + acc[1], x[2] + acc[2], x[3] + acc[3], c[bj], i, f, gg, o, cc, hh);
      if (gates) {  // null in inference (train=False): nothing saved
        gates[o4] = i; gates[o4 + H] = f; gates[o4 + 2 * H] = gg; gates[o4 + 3 * H] = o;
        cells[o1] = cc;
      }
      c[bj] = cc;
      h_out[bj] = hh;
      y[o1] = from_f<T>(hh);
    } else {
      if (gates) {
        gates[o4] = 0.f; gates[o4 + H] = 0.f; gates[o4 + 2 * H] = 0.f; gates[o4 + 3 * H] = 0.f;
        cells[o1] = 0.f;
      }
      h_out[bj] = __ldcg(h + (s & 1) * BH + bj);
      y[o1] = from_f<T>(0.f);
    }
  }
};

// Iteration it handles step s = steps - 1 - it (the last, s = -1, writes grad_h0).
template <class T_>
struct LstmBwdPers {
  using T = T_;
  static constexpr int NA = 1;
  static constexpr bool kTransposed = true;
  const T* w; int B, H, iters; PGeom g;
  int steps;
  const T* grad_y; const T* grad_h_n; const T* c0; const int64_t* lengths;
  const float* gates; const float* cells;
  T* dgx; float* dpre;
  float* buf;  // [2][B][4H] da by parity of s
  float* dc;   // [B][H]
  T* grad_h0;
  bool reverse;
  static constexpr int NP = 1;  // nothing prefetched
  __device__ void prefetch(int, int, int, float (&pre)[NP]) const { pre[0] = 0.f; }
  __device__ const float* gemm_src(int it) const {
    const int s = steps - 1 - it;
    return s + 1 < steps ? buf + ((s + 1) & 1) * static_cast<size_t>(B) * 4 * H : nullptr;
  }
  __device__ void point(int it, int b, int j, const float* acc, const float (&)[NP], bool) const {
    const int s = steps - 1 - it, G = 4 * H;
    const size_t bj = static_cast<size_t>(b) * H + j;
    const int L = seq_len(lengths, b, steps);
    const float dh_in = s + 1 < L ? acc[0] : to_f(grad_h_n[bj]);
    if (s < 0) {
      grad_h0[bj] = from_f<T>(dh_in);
      return;
    }
    int t;
    const bool active = step_time(L, s, reverse, t);
    float* cur = buf + (s & 1) * static_cast<size_t>(B) * G + static_cast<size_t>(b) * G + j;
    const size_t o4 = (static_cast<size_t>(t) * B + b) * G + j;
    float da[4] = {0.f, 0.f, 0.f, 0.f};
    if (active) {
      const float dh = dh_in + to_f(grad_y[static_cast<size_t>(t) * B * H + bj]);
      const float i = gates[o4], f = gates[o4 + H], gg = gates[o4 + 2 * H], o = gates[o4 + 3 * H];
      const float c = cells[(static_cast<size_t>(t) * B + b) * H + j];
      const int tp = reverse ? t + 1 : t - 1;  // time index of the previous real step
      const float c_prev = s > 0 ? cells[(static_cast<size_t>(tp) * B + b) * H + j] : to_f(c0[bj]);
      float dc_prev;
      lstm_backward_unit(i, f, gg, o, c, c_prev, dh, dc[bj], da[0], da[1], da[2], da[3], dc_prev);
      dc[bj] = dc_prev;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      dgx[o4 + k * H] = from_f<T>(da[k]);
      dpre[o4 + k * H] = da[k];
      cur[k * H] = da[k];
    }
  }
};

static const char* const kLstmProjUnsupported = "LSTM projection (proj_size > 0) is not implemented in the persistent kernels";

template <class T>
bool lstm_forward_persistent(const LstmForwardArgs& a, cudaStream_t st) {
  PersistentPlan plan;
  if (!choose_persistent<LstmFwdPers<T>>("lstm forward", a.H, a.H, a.B, a.T, a.w_hr ? kLstmProjUnsupported : nullptr,
                                         plan))
    return false;
  const int BH = a.B * a.H;
  LstmFwdPers<T> p;
  p.w = static_cast<const T*>(a.w_hh); p.B = a.B; p.H = a.H; p.iters = a.T; p.g = PGeom{plan.U, plan.bch, a.H};
  p.gx = static_cast<const T*>(a.gx); p.lengths = a.lengths; p.y = static_cast<T*>(a.y);
  p.gates = a.gates; p.cells = a.cells; p.h = a.ws; p.c = a.ws + 2 * static_cast<size_t>(BH); p.reverse = a.reverse;
  launch_to_float<T>(a.h0, p.h, BH, st);
  launch_to_float<T>(a.c0, p.c, BH, st);
  launch_persistent(p, plan, st);
  launch_from_float<T>(p.h + (a.T & 1) * static_cast<size_t>(BH), a.h_n, BH, st);
  launch_from_float<T>(p.c, a.c_n, BH, st);
  frnn_check_launch("lstm_forward (persistent)");
  return true;
}

template <class T>
bool lstm_backward_persistent(const LstmBackwardArgs& a, cudaStream_t st) {
  PersistentPlan plan;
  if (!choose_persistent<LstmBwdPers<T>>("lstm backward", 4 * a.H, a.H, a.B, a.T,
                                         a.w_hr ? kLstmProjUnsupported : nullptr, plan))
    return false;
  const int BH = a.B * a.H;
  LstmBwdPers<T> p;
  p.w = static_cast<const T*>(a.w_hh); p.B = a.B; p.H = a.H; p.iters = a.T + 1;
  p.g = PGeom{plan.U, plan.bch, 4 * a.H};
  p.steps = a.T; p.grad_y = static_cast<const T*>(a.grad_y); p.grad_h_n = static_cast<const T*>(a.grad_h_n);
  p.c0 = static_cast<const T*>(a.c0); p.lengths = a.lengths; p.gates = a.gates; p.cells = a.cells;
  p.dgx = static_cast<T*>(a.grad_gx); p.dpre = a.dpre; p.buf = a.ws; p.dc = a.ws + 8 * static_cast<size_t>(BH);
  p.grad_h0 = static_cast<T*>(a.grad_h0); p.reverse = a.reverse;
  launch_to_float<T>(a.grad_c_n, p.dc, BH, st);
  launch_persistent(p, plan, st);
  launch_from_float<T>(p.dc, a.grad_c0, BH, st);
  frnn_check_launch("lstm_backward (persistent)");
  return true;
}

template <class T>
void lstm_forward_t(const LstmForwardArgs& a, cudaStream_t st) {
  if (lstm_forward_persistent<T>(a, st)) return;
  const int BP = a.B * a.P, BH = a.B * a.H;
  float* h[2] = {a.ws, a.ws + BP};
  float* c = a.ws + 2 * BP;
  float* hr = c + BH;
  launch_to_float<T>(a.h0, h[0], BP, st);
  launch_to_float<T>(a.c0, c, BH, st);
  if (BH > 0) {
    LstmFwdP<T> p{static_cast<const T*>(a.gx), static_cast<const T*>(a.w_hh), static_cast<const T*>(a.w_hr),
                  a.lengths, static_cast<T*>(a.y), a.gates, a.cells, nullptr, nullptr, c, hr,
                  a.T, a.B, a.H, a.P, a.reverse};
    for (int s = 0; s < a.T; ++s) {
      p.h_in = h[s & 1];
      p.h_out = h[(s + 1) & 1];
      FRNN_LAUNCH(lstm_fwd_step<T>, step_grid(a.H, a.B), step_block(), smem_nt_floats(4) * sizeof(float), st, p, s);
      if (a.w_hr)
        FRNN_LAUNCH(lstm_proj_step<T>, step_grid(a.P, a.B), step_block(), smem_nt_floats(1) * sizeof(float), st, p, s);
    }
  }
  launch_from_float<T>(h[a.T & 1], a.h_n, BP, st);
  launch_from_float<T>(c, a.c_n, BH, st);
  frnn_check_launch("lstm_forward");
}

template <class T>
void lstm_backward_t(const LstmBackwardArgs& a, cudaStream_t st) {
  if (lstm_backward_persistent<T>(a, st)) return;
  const int BH = a.B * a.H;
  float* buf = a.ws;
  float* dc = buf + 8 * static_cast<size_t>(BH);
  float* dh_buf = dc + BH;
  launch_to_float<T>(a.grad_c_n, dc, BH, st);
  if (BH > 0) {
    LstmBwdP<T> p{static_cast<const T*>(a.grad_y), static_cast<const T*>(a.grad_h_n), static_cast<const T*>(a.w_hh),
                  static_cast<const T*>(a.w_hr), static_cast<const T*>(a.c0), a.lengths, a.gates, a.cells,
                  static_cast<T*>(a.grad_gx), a.dpre, buf, dc, dh_buf, a.dhs, static_cast<T*>(a.grad_h0),
                  a.T, a.B, a.H, a.P, a.reverse};
    const size_t smem = smem_nn_floats() * sizeof(float);
    for (int s = a.T - 1; s >= 0; --s) {
      if (a.w_hr) FRNN_LAUNCH(lstm_bwd_dh_step<T>, step_grid(a.P, a.B), step_block(), smem, st, p, s);
      FRNN_LAUNCH(lstm_bwd_step<T>, step_grid(a.H, a.B), step_block(), smem, st, p, s);
    }
    if (a.w_hr) FRNN_LAUNCH(lstm_bwd_dh_step<T>, step_grid(a.P, a.B), step_block(), smem, st, p, -1);
    else FRNN_LAUNCH(lstm_bwd_step<T>, step_grid(a.H, a.B), step_block(), smem, st, p, -1);
  }
  launch_from_float<T>(dc, a.grad_c0, BH, st);
  frnn_check_launch("lstm_backward");
}

void lstm_forward(const LstmForwardArgs& a, void* stream) {
  FRNN_DISPATCH_DTYPE(lstm_forward_t, a, static_cast<cudaStream_t>(stream));
}
void lstm_backward(const LstmBackwardArgs& a, void* stream) {
  FRNN_DISPATCH_DTYPE(lstm_backward_t, a, static_cast<cudaStream_t>(stream));
}

}  // namespace cuda
}  // namespace fusedrnn
