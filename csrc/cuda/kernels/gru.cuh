// GRU: fused step kernels and host drivers. The pointwise math is csrc/cells/gru.h.
// b_hh is applied inside the step (PyTorch's n = tanh(x_n + r * (W_hn h + b_hn))).
#pragma once
#include "cells/gru.h"
#include "cuda/kernels/common.cuh"
#include "cuda/kernels/persistent.cuh"

namespace fusedrnn {
namespace cuda {

template <class T>
struct GruFwdP {
  const T* gx; const T* w_hh; const T* b_hh; const int64_t* lengths;
  T* y; float* gates; float* hn;
  const float* h_in; float* h_out;
  int steps, B, H; bool reverse;
};

// (minBlocks = 1: without it ptxas picks 32 registers and spills 16-20 bytes here; with it,
// 96 registers and no spill. The other kernels do not spill either way.)
template <class T>
__global__ void __launch_bounds__(kThreads, 1) gru_fwd_step(GruFwdP<T> p, int s) {
  FRNN_DYN_SMEM(float, smem);
  float acc[3] = {0.f, 0.f, 0.f};
  tile_gemm_nt<3>(acc, p.h_in, p.H, p.B, p.w_hh, p.H, p.H, p.H, p.H, smem);
  const int b = blockIdx.y * TB + threadIdx.y, j = blockIdx.x * TN + threadIdx.x;
  if (b >= p.B || j >= p.H) return;
  const int H = p.H;
  const size_t bj = static_cast<size_t>(b) * H + j;
  int t;
  const bool active = step_time(seq_len(p.lengths, b, p.steps), s, p.reverse, t);
  const size_t o3 = (static_cast<size_t>(t) * p.B + b) * 3 * H + j;
  const size_t o1 = (static_cast<size_t>(t) * p.B + b) * H + j;
  if (active) {
    float hr = acc[0], hz = acc[1], hn = acc[2];
    if (p.b_hh) {
      hr += to_f(p.b_hh[j]);
      hz += to_f(p.b_hh[H + j]);
      hn += to_f(p.b_hh[2 * H + j]);
    }
    float r, z, n, h;
    gru_forward_unit(to_f(p.gx[o3]), to_f(p.gx[o3 + H]), to_f(p.gx[o3 + 2 * H]), hr, hz, hn, p.h_in[bj], r, z, n, h);
    if (p.gates) {  // null in inference (train=False): nothing saved
      p.gates[o3] = r; p.gates[o3 + H] = z; p.gates[o3 + 2 * H] = n;
      p.hn[o1] = hn;
    }
    p.h_out[bj] = h;
    p.y[o1] = from_f<T>(h);
  } else {
    if (p.gates) {
      p.gates[o3] = 0.f; p.gates[o3 + H] = 0.f; p.gates[o3 + 2 * H] = 0.f;
      p.hn[o1] = 0.f;
    }
    p.h_out[bj] = p.h_in[bj];
    p.y[o1] = from_f<T>(0.f);
  }
}

template <class T>
struct GruBwdP {
  const T* grad_y; const T* grad_h_n; const T* h0; const T* w_hh; const T* y; const int64_t* lengths;
  const float* gates; const float* hn;
  T* dgx; float* dgh;
  float* buf;     // [2][B][3H] dL/d(W_hh h + b_hh) of the last two steps (by parity of s)
  float* direct;  // [B][H] z * dh_t of the step after: the direct part of dh_{t-1}
  T* grad_h0;
  int steps, B, H; bool reverse;
};

// Step s (descending; s == -1 writes grad_h0): dh_t = dgh_{s+1} W_hh + z * dh_{s+1} (+ grad_y)
// fused with this step's gate derivatives.
template <class T>
__global__ void __launch_bounds__(kThreads) gru_bwd_step(GruBwdP<T> p, int s) {
  FRNN_DYN_SMEM(float, smem);
  const int H = p.H, G = 3 * H;
  const size_t BG = static_cast<size_t>(p.B) * G;
  float acc = 0.f;
  if (s + 1 < p.steps) tile_gemm_nn(acc, p.buf + ((s + 1) & 1) * BG, G, p.B, p.w_hh, H, H, G, smem);
  const int b = blockIdx.y * TB + threadIdx.y, j = blockIdx.x * TN + threadIdx.x;
  if (b >= p.B || j >= H) return;
  const size_t bj = static_cast<size_t>(b) * H + j;
  const int L = seq_len(p.lengths, b, p.steps);
  const float dh_in = s + 1 < L ? acc + p.direct[bj] : to_f(p.grad_h_n[bj]);
  if (s < 0) {
    p.grad_h0[bj] = from_f<T>(dh_in);
    return;
  }
  int t;
  const bool active = step_time(L, s, p.reverse, t);
  const size_t o3 = (static_cast<size_t>(t) * p.B + b) * G + j;
  const size_t o1 = (static_cast<size_t>(t) * p.B + b) * H + j;
  float* cur = p.buf + (s & 1) * BG + static_cast<size_t>(b) * G + j;
  if (active) {
    const float dh = dh_in + to_f(p.grad_y[o1]);
    const int tp = p.reverse ? t + 1 : t - 1;  // time index of the previous real step
    const float h_prev = s > 0 ? to_f(p.y[(static_cast<size_t>(tp) * p.B + b) * H + j]) : to_f(p.h0[bj]);
    float dxr, dxz, dxn, dhn, ddirect;
    gru_backward_unit(p.gates[o3], p.gates[o3 + H], p.gates[o3 + 2 * H], p.hn[o1], h_prev, dh,
                      dxr, dxz, dxn, dhn, ddirect);
    p.direct[bj] = ddirect;
    p.dgx[o3] = from_f<T>(dxr); p.dgx[o3 + H] = from_f<T>(dxz); p.dgx[o3 + 2 * H] = from_f<T>(dxn);
    p.dgh[o3] = dxr; p.dgh[o3 + H] = dxz; p.dgh[o3 + 2 * H] = dhn;
    cur[0] = dxr; cur[H] = dxz; cur[2 * H] = dhn;
  } else {
    p.dgx[o3] = from_f<T>(0.f); p.dgx[o3 + H] = from_f<T>(0.f); p.dgx[o3 + 2 * H] = from_f<T>(0.f);
    p.dgh[o3] = 0.f; p.dgh[o3 + H] = 0.f; p.dgh[o3 + 2 * H] = 0.f;
    cur[0] = 0.f; cur[H] = 0.f; cur[2 * H] = 0.f;
  }
}


// ---------------------------------------------------------------- persistent (persistent.cuh)
template <class T_>
struct GruFwdPers {
  using T = T_;
  static constexpr int NA = 3;
  static constexpr bool kTransposed = false;
  const T* w; int B, H, iters; PGeom g;
  const T* gx; const T* b_hh; const int64_t* lengths; T* y; float* gates; float* hn;
  float* h;  // [2][B][H] fp32, by step parity
  bool reverse;
  static constexpr int NP = 3;  // gx of the 3 gates, prefetched before the recurrent product
  __device__ const float* gemm_src(int s) const { return h + (s & 1) * static_cast<size_t>(B) * H; }
  __device__ void prefetch(int s, int b, int j, float (&pre)[NP]) const {
    int t;
    const bool active = step_time(seq_len(lengths, b, iters), s, reverse, t);
    const size_t o3 = (static_cast<size_t>(t) * B + b) * 3 * H + j;
#pragma unroll
    for (int g = 0; g < 3; ++g) pre[g] = active ? to_f(gx[o3 + g * H]) : 0.f;
  }
  __device__ void point(int s, int b, int j, const float* acc, const float (&pre)[NP], bool use_pre) const {
    const size_t BH = static_cast<size_t>(B) * H, bj = static_cast<size_t>(b) * H + j;
    const float h_prev = __ldcg(h + (s & 1) * BH + bj);
    float* h_out = h + ((s + 1) & 1) * BH;
    int t;
    const bool active = step_time(seq_len(lengths, b, iters), s, reverse, t);
    const size_t o3 = (static_cast<size_t>(t) * B + b) * 3 * H + j, o1 = static_cast<size_t>(t) * BH + bj;
    if (active) {
      float ahr = acc[0], ahz = acc[1], ahn = acc[2];
      if (b_hh) {
        ahr += to_f(b_hh[j]);
        ahz += to_f(b_hh[H + j]);
        ahn += to_f(b_hh[2 * H + j]);
      }
      float r, z, n, hv;
      float x[3];
#pragma unroll
      for (int g = 0; g < 3; ++g) x[g] = use_pre ? pre[g] : to_f(gx[o3 + g * H]);
      gru_forward_unit(x[0], x[1], x[2], ahr, ahz, ahn, h_prev, r, z, n, hv);
      if (gates) {  // null in inference (train=False): nothing saved
        gates[o3] = r; gates[o3 + H] = z; gates[o3 + 2 * H] = n;
        hn[o1] = ahn;
      }
      h_out[bj] = hv;
      y[o1] = from_f<T>(hv);
    } else {
      if (gates) {
        gates[o3] = 0.f; gates[o3 + H] = 0.f; gates[o3 + 2 * H] = 0.f;
        hn[o1] = 0.f;
      }
      h_out[bj] = h_prev;
      y[o1] = from_f<T>(0.f);
    }
  }
};

// Iteration it handles step s = steps - 1 - it (the last, s = -1, writes grad_h0).
template <class T_>
struct GruBwdPers {
  using T = T_;
  static constexpr int NA = 1;
  static constexpr bool kTransposed = true;
  const T* w; int B, H, iters; PGeom g;
  int steps;
  const T* grad_y; const T* grad_h_n; const T* h0; const T* y; const int64_t* lengths;
  const float* gates; const float* hn;
  T* dgx; float* dgh;
  float* buf;     // [2][B][3H] dL/d(W_hh h + b_hh) by parity of s
  float* direct;  // [B][H] z * dh of the step after
  T* grad_h0;
  bool reverse;
  static constexpr int NP = 1;  // nothing prefetched
  __device__ void prefetch(int, int, int, float (&pre)[NP]) const { pre[0] = 0.f; }
  __device__ const float* gemm_src(int it) const {
    const int s = steps - 1 - it;
    return s + 1 < steps ? buf + ((s + 1) & 1) * static_cast<size_t>(B) * 3 * H : nullptr;
  }
  __device__ void point(int it, int b, int j, const float* acc, const float (&)[NP], bool) const {
    const int s = steps - 1 - it, G = 3 * H;
    const size_t bj = static_cast<size_t>(b) * H + j;
    const int L = seq_len(lengths, b, steps);
    const float dh_in = s + 1 < L ? acc[0] + direct[bj] : to_f(grad_h_n[bj]);
    if (s < 0) {
      grad_h0[bj] = from_f<T>(dh_in);
      return;
    }
    int t;
    const bool active = step_time(L, s, reverse, t);
    const size_t o3 = (static_cast<size_t>(t) * B + b) * G + j, o1 = (static_cast<size_t>(t) * B + b) * H + j;
    float* cur = buf + (s & 1) * static_cast<size_t>(B) * G + static_cast<size_t>(b) * G + j;
    float dxr = 0.f, dxz = 0.f, dxn = 0.f, dhn = 0.f;
    if (active) {
      const float dh = dh_in + to_f(grad_y[o1]);
      const int tp = reverse ? t + 1 : t - 1;  // time index of the previous real step
      const float h_prev = s > 0 ? to_f(y[(static_cast<size_t>(tp) * B + b) * H + j]) : to_f(h0[bj]);
      float ddirect;
      gru_backward_unit(gates[o3], gates[o3 + H], gates[o3 + 2 * H], hn[o1], h_prev, dh, dxr, dxz, dxn, dhn, ddirect);
      direct[bj] = ddirect;
    }
    dgx[o3] = from_f<T>(dxr); dgx[o3 + H] = from_f<T>(dxz); dgx[o3 + 2 * H] = from_f<T>(dxn);
    dgh[o3] = dxr; dgh[o3 + H] = dxz; dgh[o3 + 2 * H] = dhn;
    cur[0] = dxr; cur[H] = dxz; cur[2 * H] = dhn;
  }
};

template <class T>
bool gru_forward_persistent(const GruForwardArgs& a, cudaStream_t st) {
  PersistentPlan plan;
  if (!choose_persistent<GruFwdPers<T>>("gru forward", a.H, a.H, a.B, a.T, nullptr, plan)) return false;
  const int BH = a.B * a.H;
  GruFwdPers<T> p;
  p.w = static_cast<const T*>(a.w_hh); p.B = a.B; p.H = a.H; p.iters = a.T; p.g = PGeom{plan.U, plan.bch, a.H};
  p.gx = static_cast<const T*>(a.gx); p.b_hh = static_cast<const T*>(a.b_hh); p.lengths = a.lengths;
  p.y = static_cast<T*>(a.y); p.gates = a.gates; p.hn = a.hn; p.h = a.ws; p.reverse = a.reverse;
  launch_to_float<T>(a.h0, p.h, BH, st);
  launch_persistent(p, plan, st);
  launch_from_float<T>(p.h + (a.T & 1) * static_cast<size_t>(BH), a.h_n, BH, st);
  frnn_check_launch("gru_forward (persistent)");
  return true;
}

template <class T>
bool gru_backward_persistent(const GruBackwardArgs& a, cudaStream_t st) {
  PersistentPlan plan;
  if (!choose_persistent<GruBwdPers<T>>("gru backward", 3 * a.H, a.H, a.B, a.T, nullptr, plan)) return false;
  GruBwdPers<T> p;
  p.w = static_cast<const T*>(a.w_hh); p.B = a.B; p.H = a.H; p.iters = a.T + 1;
  p.g = PGeom{plan.U, plan.bch, 3 * a.H};
  p.steps = a.T; p.grad_y = static_cast<const T*>(a.grad_y); p.grad_h_n = static_cast<const T*>(a.grad_h_n);
  p.h0 = static_cast<const T*>(a.h0); p.y = static_cast<const T*>(a.y); p.lengths = a.lengths;
  p.gates = a.gates; p.hn = a.hn; p.dgx = static_cast<T*>(a.grad_gx); p.dgh = a.dgh; p.buf = a.ws;
  p.direct = a.ws + 6 * static_cast<size_t>(a.B) * a.H; p.grad_h0 = static_cast<T*>(a.grad_h0); p.reverse = a.reverse;
  launch_persistent(p, plan, st);
  frnn_check_launch("gru_backward (persistent)");
  return true;
}

template <class T>
void gru_forward_t(const GruForwardArgs& a, cudaStream_t st) {
  if (gru_forward_persistent<T>(a, st)) return;
  const int BH = a.B * a.H;
  float* h[2] = {a.ws, a.ws + BH};
  launch_to_float<T>(a.h0, h[0], BH, st);
  if (BH > 0) {
    GruFwdP<T> p{static_cast<const T*>(a.gx), static_cast<const T*>(a.w_hh), static_cast<const T*>(a.b_hh),
                 a.lengths, static_cast<T*>(a.y), a.gates, a.hn, nullptr, nullptr, a.T, a.B, a.H, a.reverse};
    for (int s = 0; s < a.T; ++s) {
      p.h_in = h[s & 1];
      p.h_out = h[(s + 1) & 1];
      FRNN_LAUNCH(gru_fwd_step<T>, step_grid(a.H, a.B), step_block(), smem_nt_floats(3) * sizeof(float), st, p, s);
    }
  }
  launch_from_float<T>(h[a.T & 1], a.h_n, BH, st);
  frnn_check_launch("gru_forward");
}

template <class T>
void gru_backward_t(const GruBackwardArgs& a, cudaStream_t st) {
  if (gru_backward_persistent<T>(a, st)) return;
  const int BH = a.B * a.H;
  if (BH == 0) return;
  GruBwdP<T> p{static_cast<const T*>(a.grad_y), static_cast<const T*>(a.grad_h_n), static_cast<const T*>(a.h0),
               static_cast<const T*>(a.w_hh), static_cast<const T*>(a.y), a.lengths, a.gates, a.hn,
               static_cast<T*>(a.grad_gx), a.dgh, a.ws, a.ws + 6 * static_cast<size_t>(BH),
               static_cast<T*>(a.grad_h0), a.T, a.B, a.H, a.reverse};
  const size_t smem = smem_nn_floats() * sizeof(float);
  for (int s = a.T - 1; s >= -1; --s)
    FRNN_LAUNCH(gru_bwd_step<T>, step_grid(a.H, a.B), step_block(), smem, st, p, s);
  frnn_check_launch("gru_backward");
}

void gru_forward(const GruForwardArgs& a, void* stream) {
  FRNN_DISPATCH_DTYPE(gru_forward_t, a, static_cast<cudaStream_t>(stream));
}
void gru_backward(const GruBackwardArgs& a, void* stream) {
  FRNN_DISPATCH_DTYPE(gru_backward_t, a, static_cast<cudaStream_t>(stream));
}

}  // namespace cuda
}  // namespace fusedrnn
