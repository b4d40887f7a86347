// The recurrence ops (schemas in fusedrnn/schema.py) on top of the kernel drivers of
// csrc/cuda/api.h: argument checks, output/workspace allocation, and the weight
// gradients as one GEMM over all time steps after the sequential part. Shared by the
// CUDA registration (csrc/cuda/register.cpp: device tensors, current stream) and the
// emulation (csrc/emulation/register.cpp: CPU tensors). The includer defines
//   FRNN_STREAM()          the stream to enqueue on (a cudaStream_t as void*)
//   FRNN_DEVICE_GUARD(t)   a guard making t's device current (or nothing)
// No host synchronization: only allocations, kernel launches and ATen GEMMs/gathers.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#include "cuda/api.h"

namespace fusedrnn {
namespace glue {

using at::Tensor;
using OptT = std::optional<Tensor>;
using cuda::DType;

inline DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, "fusedrnn CUDA kernels support float32, float16 and bfloat16, not ", t.scalar_type());
  }
}

// FUSEDRNN_POISON=1 (the tests): outputs and workspaces start as NaN, so an element a
// kernel forgets to write (or reads before writing) shows up.
inline bool poison() {
  const char* p = std::getenv("FUSEDRNN_POISON");
  return p && std::strcmp(p, "1") == 0;
}
inline Tensor new_out(at::IntArrayRef shape, const at::TensorOptions& opt) {
  Tensor t = at::empty(shape, opt);
  if (poison()) t.fill_(NAN);
  return t;
}

inline void check_input(const Tensor& t, const char* name, const Tensor& like, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "fusedrnn: ", name, " must be ", dim, "-D, got ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), "fusedrnn: ", name, " is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "fusedrnn: ", name, " has dtype ", t.scalar_type(),
              ", expected ", like.scalar_type());
}
inline void check_saved(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device() == like.device(), "fusedrnn: saved tensor ", name,
              " must be float32 on ", like.device());
}

// A forward argument's shape, named in the error (the contract: fusedrnn/contract.py).
inline void check_shape(const Tensor& t, const char* name, at::IntArrayRef want, const Tensor& gx) {
  TORCH_CHECK(t.sizes() == want, "fusedrnn: ", name, " must have shape ", want, " (gx is ", gx.sizes(), "), got ",
              t.sizes());
}

// int64 lengths on the kernels' device (kept alive by `keep`), or null. Values outside
// [0, T] would send the kernels out of bounds: checked on the host for CPU tensors (the
// emulation), by a device-side assert on the GPU (no host synchronization).
inline const int64_t* lengths_ptr(const OptT& lengths, Tensor& keep, const Tensor& like, int64_t T, int64_t B) {
  if (!lengths.has_value()) return nullptr;
  TORCH_CHECK(lengths->scalar_type() == at::kLong && lengths->dim() == 1 && lengths->size(0) == B,
              "fusedrnn: lengths must be an int64 tensor of shape [", B, "], got ", lengths->scalar_type(), " ",
              lengths->sizes());
  TORCH_CHECK(lengths->device() == like.device(), "fusedrnn: lengths is on ", lengths->device(), ", expected ",
              like.device());
  keep = lengths->contiguous();
  const Tensor valid = keep.ge(0).logical_and(keep.le(T)).all();
  if (keep.is_cpu()) {
    TORCH_CHECK(valid.item<bool>(), "fusedrnn: lengths must lie in [0, ", T, "] (T = gx.size(0))");
  } else {
    at::_assert_async(valid, "fusedrnn: lengths must lie in [0, T]");
  }
  return keep.data_ptr<int64_t>();
}

// [T, B, N] fp32: the state each step started from, at each real step's time index
// (h0 for the first real step; the previous real step's output otherwise). Padded
// positions get anything finite (their gradients are 0).
inline Tensor previous_states(const Tensor& y, const Tensor& h0, const OptT& lengths, bool reverse) {
  const int64_t T = y.size(0), B = y.size(1), N = y.size(2);
  Tensor ext = at::cat({y.to(at::kFloat), h0.to(at::kFloat).unsqueeze(0)}, 0);  // [T+1, B, N]
  auto lopt = at::TensorOptions().dtype(at::kLong).device(y.device());
  Tensor t = at::arange(T, lopt).unsqueeze(1);  // [T, 1]
  Tensor src;
  if (!reverse) {
    src = at::where(t == 0, at::full_like(t, T), t - 1).expand({T, B});
  } else {
    Tensor L = lengths.has_value() ? lengths->to(y.device(), at::kLong).unsqueeze(0) : at::full({1, B}, T, lopt);
    src = at::where(t < L - 1, t + 1, at::full_like(t, T).expand({T, B}));
  }
  return ext.gather(0, src.unsqueeze(2).expand({T, B, N}).contiguous());
}

// sum over (t, b) of a[t,b,:]^T b[t,b,:]: a weight gradient as one GEMM over all steps.
inline Tensor matmul_t(const Tensor& a, const Tensor& b) {
  return at::mm(a.reshape({-1, a.size(-1)}).t(), b.reshape({-1, b.size(-1)}));
}

// ----------------------------------------------------------------------------- RNN
inline std::tuple<Tensor, Tensor> rnn_forward(const Tensor& gx_, const Tensor& h0_, const Tensor& w_hh_,
                                              const OptT& lengths, bool reverse, bool relu) {
  check_input(gx_, "gx", gx_, 3);
  check_input(h0_, "h0", gx_, 2);
  check_input(w_hh_, "w_hh", gx_, 2);
  FRNN_DEVICE_GUARD(gx_);
  const Tensor gx = gx_.contiguous(), h0 = h0_.contiguous(), w_hh = w_hh_.contiguous();
  const int64_t T = gx.size(0), B = gx.size(1), H = gx.size(2);
  check_shape(h0, "h0", {B, H}, gx);
  check_shape(w_hh, "w_hh", {H, H}, gx);
  Tensor keep;
  cuda::RnnForwardArgs a{};
  a.dt = dtype_of(gx); a.T = T; a.B = B; a.H = H; a.reverse = reverse; a.relu = relu;
  a.gx = gx.data_ptr(); a.h0 = h0.data_ptr(); a.w_hh = w_hh.data_ptr();
  a.lengths = lengths_ptr(lengths, keep, gx, T, B);
  Tensor y = new_out({T, B, H}, gx.options()), h_n = new_out({B, H}, gx.options());
  Tensor ws = new_out({(int64_t)cuda::rnn_forward_ws(B, H)}, gx.options().dtype(at::kFloat));
  a.y = y.data_ptr(); a.h_n = h_n.data_ptr(); a.ws = ws.data_ptr<float>();
  cuda::rnn_forward(a, FRNN_STREAM());
  return {y, h_n};
}

inline std::tuple<Tensor, Tensor, Tensor> rnn_backward(const Tensor& grad_y_, const Tensor& grad_h_n_,
                                                       const Tensor& h0_, const Tensor& w_hh_, const OptT& lengths,
                                                       bool reverse, bool relu, const Tensor& y_) {
  check_input(h0_, "h0", h0_, 2);
  check_input(grad_y_, "grad_y", h0_, 3);
  check_input(grad_h_n_, "grad_h_n", h0_, 2);
  check_input(w_hh_, "w_hh", h0_, 2);
  check_input(y_, "y", h0_, 3);
  FRNN_DEVICE_GUARD(h0_);
  const Tensor grad_y = grad_y_.contiguous(), grad_h_n = grad_h_n_.contiguous(), h0 = h0_.contiguous(),
               w_hh = w_hh_.contiguous(), y = y_.contiguous();
  const int64_t T = y.size(0), B = y.size(1), H = y.size(2);
  Tensor keep;
  cuda::RnnBackwardArgs a{};
  a.dt = dtype_of(h0); a.T = T; a.B = B; a.H = H; a.reverse = reverse; a.relu = relu;
  a.grad_y = grad_y.data_ptr(); a.grad_h_n = grad_h_n.data_ptr(); a.w_hh = w_hh.data_ptr(); a.y = y.data_ptr();
  a.lengths = lengths_ptr(lengths, keep, h0, T, B);
  const auto f32 = h0.options().dtype(at::kFloat);
  Tensor grad_gx = new_out({T, B, H}, h0.options()), grad_h0 = new_out({B, H}, h0.options());
  Tensor dpre = new_out({T, B, H}, f32), ws = new_out({(int64_t)cuda::rnn_backward_ws(B, H)}, f32);
  a.grad_gx = grad_gx.data_ptr(); a.grad_h0 = grad_h0.data_ptr(); a.dpre = dpre.data_ptr<float>();
  a.ws = ws.data_ptr<float>();
  cuda::rnn_backward(a, FRNN_STREAM());
  Tensor grad_w_hh = matmul_t(dpre, previous_states(y, h0, lengths, reverse)).to(h0.scalar_type());
  return {grad_gx, grad_h0, grad_w_hh};
}

// ----------------------------------------------------------------------------- LSTM
inline std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward(const Tensor& gx_, const Tensor& h0_,
                                                                       const Tensor& c0_, const Tensor& w_hh_,
                                                                       const OptT& w_hr_, const OptT& lengths,
                                                                       bool reverse, bool train) {
  check_input(gx_, "gx", gx_, 3);
  check_input(h0_, "h0", gx_, 2);
  check_input(c0_, "c0", gx_, 2);
  check_input(w_hh_, "w_hh", gx_, 2);
  if (w_hr_.has_value()) check_input(*w_hr_, "w_hr", gx_, 2);
  FRNN_DEVICE_GUARD(gx_);
  const Tensor gx = gx_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous(), w_hh = w_hh_.contiguous();
  const Tensor w_hr = w_hr_.has_value() ? w_hr_->contiguous() : Tensor();
  const int64_t T = gx.size(0), B = gx.size(1), H = gx.size(2) / 4, P = h0.size(1);
  TORCH_CHECK(gx.size(2) == 4 * H, "fusedrnn: gx's last dimension (", gx.size(2), ") must be 4 * hidden_size");
  check_shape(h0, "h0", {B, w_hr.defined() ? w_hr.size(0) : H}, gx);
  check_shape(c0, "c0", {B, H}, gx);
  check_shape(w_hh, "w_hh", {4 * H, P}, gx);
  if (w_hr.defined()) check_shape(w_hr, "w_hr", {P, H}, gx);
  Tensor keep;
  cuda::LstmForwardArgs a{};
  a.dt = dtype_of(gx); a.T = T; a.B = B; a.H = H; a.P = P; a.reverse = reverse;
  a.gx = gx.data_ptr(); a.h0 = h0.data_ptr(); a.c0 = c0.data_ptr(); a.w_hh = w_hh.data_ptr();
  a.w_hr = w_hr.defined() ? w_hr.data_ptr() : nullptr;
  a.lengths = lengths_ptr(lengths, keep, gx, T, B);
  const auto f32 = gx.options().dtype(at::kFloat);
  Tensor y = new_out({T, B, P}, gx.options()), h_n = new_out({B, P}, gx.options()), c_n = new_out({B, H}, gx.options());
  // Inference (train=False): no saved tensors are allocated; the kernels get null pointers.
  Tensor gates = train ? new_out({T, B, 4 * H}, f32) : at::empty({0}, f32);
  Tensor cells = train ? new_out({T, B, H}, f32) : at::empty({0}, f32);
  Tensor ws = new_out({(int64_t)cuda::lstm_forward_ws(B, H, P)}, f32);
  a.y = y.data_ptr(); a.h_n = h_n.data_ptr(); a.c_n = c_n.data_ptr();
  a.gates = train ? gates.data_ptr<float>() : nullptr; a.cells = train ? cells.data_ptr<float>() : nullptr;
  a.ws = ws.data_ptr<float>();
  cuda::lstm_forward(a, FRNN_STREAM());
  return {y, h_n, c_n, gates, cells};
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward(
    const Tensor& grad_y_, const Tensor& grad_h_n_, const Tensor& grad_c_n_, const Tensor& h0_, const Tensor& c0_,
    const Tensor& w_hh_, const OptT& w_hr_, const OptT& lengths, bool reverse, const Tensor& y_,
    const Tensor& gates_, const Tensor& cells_) {
  check_input(h0_, "h0", h0_, 2);
  for (auto [t, n, d] : {std::make_tuple(&grad_y_, "grad_y", 3), std::make_tuple(&grad_h_n_, "grad_h_n", 2),
                         std::make_tuple(&grad_c_n_, "grad_c_n", 2), std::make_tuple(&c0_, "c0", 2),
                         std::make_tuple(&w_hh_, "w_hh", 2), std::make_tuple(&y_, "y", 3)})
    check_input(*t, n, h0_, d);
  if (w_hr_.has_value()) check_input(*w_hr_, "w_hr", h0_, 2);
  check_saved(gates_, "gates", h0_);
  check_saved(cells_, "cells", h0_);
  FRNN_DEVICE_GUARD(h0_);
  const Tensor grad_y = grad_y_.contiguous(), grad_h_n = grad_h_n_.contiguous(), grad_c_n = grad_c_n_.contiguous(),
               h0 = h0_.contiguous(), c0 = c0_.contiguous(), w_hh = w_hh_.contiguous(), y = y_.contiguous(),
               gates = gates_.contiguous(), cells = cells_.contiguous();
  const Tensor w_hr = w_hr_.has_value() ? w_hr_->contiguous() : Tensor();
  const int64_t T = gates.size(0), B = gates.size(1), H = gates.size(2) / 4, P = h0.size(1);
  Tensor keep;
  cuda::LstmBackwardArgs a{};
  a.dt = dtype_of(h0); a.T = T; a.B = B; a.H = H; a.P = P; a.reverse = reverse;
  a.grad_y = grad_y.data_ptr(); a.grad_h_n = grad_h_n.data_ptr(); a.grad_c_n = grad_c_n.data_ptr();
  a.c0 = c0.data_ptr(); a.w_hh = w_hh.data_ptr(); a.w_hr = w_hr.defined() ? w_hr.data_ptr() : nullptr;
  a.lengths = lengths_ptr(lengths, keep, h0, T, B);
  a.gates = gates.data_ptr<float>(); a.cells = cells.data_ptr<float>();
  const auto f32 = h0.options().dtype(at::kFloat);
  Tensor grad_gx = new_out({T, B, 4 * H}, h0.options()), grad_h0 = new_out({B, P}, h0.options()),
         grad_c0 = new_out({B, H}, h0.options());
  Tensor dpre = new_out({T, B, 4 * H}, f32);
  Tensor dhs = w_hr.defined() ? new_out({T, B, P}, f32) : Tensor();
  Tensor ws = new_out({(int64_t)cuda::lstm_backward_ws(B, H, P)}, f32);
  a.grad_gx = grad_gx.data_ptr(); a.grad_h0 = grad_h0.data_ptr(); a.grad_c0 = grad_c0.data_ptr();
  a.dpre = dpre.data_ptr<float>(); a.dhs = dhs.defined() ? dhs.data_ptr<float>() : nullptr;
  a.ws = ws.data_ptr<float>();
  cuda::lstm_backward(a, FRNN_STREAM());
  const auto dt = h0.scalar_type();
  Tensor grad_w_hh = matmul_t(dpre, previous_states(y, h0, lengths, reverse)).to(dt);
  Tensor grad_w_hr;
  if (w_hr.defined()) {
    Tensor hr = gates.narrow(2, 3 * H, H) * at::tanh(cells);  // unprojected h_t (0 at padded steps)
    grad_w_hr = matmul_t(dhs, hr).to(dt);
  } else {
    grad_w_hr = at::empty({0}, h0.options());
  }
  return {grad_gx, grad_h0, grad_c0, grad_w_hh, grad_w_hr};
}

// ----------------------------------------------------------------------------- GRU
inline std::tuple<Tensor, Tensor, Tensor, Tensor> gru_forward(const Tensor& gx_, const Tensor& h0_,
                                                              const Tensor& w_hh_, const OptT& b_hh_,
                                                              const OptT& lengths, bool reverse, bool train) {
  check_input(gx_, "gx", gx_, 3);
  check_input(h0_, "h0", gx_, 2);
  check_input(w_hh_, "w_hh", gx_, 2);
  if (b_hh_.has_value()) check_input(*b_hh_, "b_hh", gx_, 1);
  FRNN_DEVICE_GUARD(gx_);
  const Tensor gx = gx_.contiguous(), h0 = h0_.contiguous(), w_hh = w_hh_.contiguous();
  const Tensor b_hh = b_hh_.has_value() ? b_hh_->contiguous() : Tensor();
  const int64_t T = gx.size(0), B = gx.size(1), H = gx.size(2) / 3;
  TORCH_CHECK(gx.size(2) == 3 * H, "fusedrnn: gx's last dimension (", gx.size(2), ") must be 3 * hidden_size");
  check_shape(h0, "h0", {B, H}, gx);
  check_shape(w_hh, "w_hh", {3 * H, H}, gx);
  if (b_hh.defined()) check_shape(b_hh, "b_hh", {3 * H}, gx);
  Tensor keep;
  cuda::GruForwardArgs a{};
  a.dt = dtype_of(gx); a.T = T; a.B = B; a.H = H; a.reverse = reverse;
  a.gx = gx.data_ptr(); a.h0 = h0.data_ptr(); a.w_hh = w_hh.data_ptr();
  a.b_hh = b_hh.defined() ? b_hh.data_ptr() : nullptr;
  a.lengths = lengths_ptr(lengths, keep, gx, T, B);
  const auto f32 = gx.options().dtype(at::kFloat);
  Tensor y = new_out({T, B, H}, gx.options()), h_n = new_out({B, H}, gx.options());
  Tensor gates = train ? new_out({T, B, 3 * H}, f32) : at::empty({0}, f32);  // train=False: as lstm_forward
  Tensor hn = train ? new_out({T, B, H}, f32) : at::empty({0}, f32);
  Tensor ws = new_out({(int64_t)cuda::gru_forward_ws(B, H)}, f32);
  a.y = y.data_ptr(); a.h_n = h_n.data_ptr(); a.ws = ws.data_ptr<float>();
  a.gates = train ? gates.data_ptr<float>() : nullptr; a.hn = train ? hn.data_ptr<float>() : nullptr;
  cuda::gru_forward(a, FRNN_STREAM());
  return {y, h_n, gates, hn};
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor> gru_backward(const Tensor& grad_y_, const Tensor& grad_h_n_,
                                                               const Tensor& h0_, const Tensor& w_hh_,
                                                               const OptT& b_hh, const OptT& lengths, bool reverse,
                                                               const Tensor& y_, const Tensor& gates_,
                                                               const Tensor& hn_) {
  check_input(h0_, "h0", h0_, 2);
  check_input(grad_y_, "grad_y", h0_, 3);
  check_input(grad_h_n_, "grad_h_n", h0_, 2);
  check_input(w_hh_, "w_hh", h0_, 2);
  check_input(y_, "y", h0_, 3);
  check_saved(gates_, "gates", h0_);
  check_saved(hn_, "hn", h0_);
  FRNN_DEVICE_GUARD(h0_);
  const Tensor grad_y = grad_y_.contiguous(), grad_h_n = grad_h_n_.contiguous(), h0 = h0_.contiguous(),
               w_hh = w_hh_.contiguous(), y = y_.contiguous(), gates = gates_.contiguous(), hn = hn_.contiguous();
  const int64_t T = gates.size(0), B = gates.size(1), H = gates.size(2) / 3;
  Tensor keep;
  cuda::GruBackwardArgs a{};
  a.dt = dtype_of(h0); a.T = T; a.B = B; a.H = H; a.reverse = reverse;
  a.grad_y = grad_y.data_ptr(); a.grad_h_n = grad_h_n.data_ptr(); a.h0 = h0.data_ptr(); a.w_hh = w_hh.data_ptr();
  a.y = y.data_ptr(); a.lengths = lengths_ptr(lengths, keep, h0, T, B);
  a.gates = gates.data_ptr<float>(); a.hn = hn.data_ptr<float>();
  const auto f32 = h0.options().dtype(at::kFloat);
  Tensor grad_gx = new_out({T, B, 3 * H}, h0.options()), grad_h0 = new_out({B, H}, h0.options());
  Tensor dgh = new_out({T, B, 3 * H}, f32), ws = new_out({(int64_t)cuda::gru_backward_ws(B, H)}, f32);
  a.grad_gx = grad_gx.data_ptr(); a.grad_h0 = grad_h0.data_ptr(); a.dgh = dgh.data_ptr<float>();
  a.ws = ws.data_ptr<float>();
  cuda::gru_backward(a, FRNN_STREAM());
  const auto dt = h0.scalar_type();
  Tensor grad_w_hh = matmul_t(dgh, previous_states(y, h0, lengths, reverse)).to(dt);
  Tensor grad_b_hh = b_hh.has_value() ? dgh.sum({0, 1}).to(dt) : at::empty({0}, h0.options());
  return {grad_gx, grad_h0, grad_w_hh, grad_b_hh};
}

}  // namespace glue
}  // namespace fusedrnn
