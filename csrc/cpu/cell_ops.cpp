// CPU implementations of the one-step cell ops (schemas and autograd: fusedrnn/cell_ops.py),
// which fusedrnn.LSTMCell / GRUCell / RNNCell call on the cpu backend.
//
// Why a separate op for one step: a cell step is small, and per-op overhead (Python, the
// dispatcher, one autograd node per op) was most of its time. The generic path (F.linear,
// a bias add, then the sequence op with T = 1) made 3-4 op calls and autograd nodes per
// step, and RNNCell ran at 0.55x of torch.nn at H=64. Here a step is one op forward and
// one op backward. The math is the sequence kernels' with T = 1 (kernels.h: the same cell
// headers, so no second copy of it); the input projection and weight gradients are BLAS.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <utility>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/op_utils.h"

namespace fusedrnn {
namespace cpu {
namespace {

using c10::optional;

Seq one_step(int64_t B) { return Seq{1, B, nullptr, false}; }

template <typename T>
T* ptr(const Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr; }

// The arguments every cell op takes, checked and contiguous: x [B, I], h [B, H],
// w_ih [G, I], w_hh [G, H], b_ih and b_hh [G] or both absent, with G = ng * H.
struct CellArgs {
  int64_t B, I, H, G;
  Tensor x, h, w_ih, w_hh, b_ih, b_hh;
};

CellArgs check_cell(const char* op, int ng, const Tensor& x, const Tensor& h, const Tensor& w_ih,
                    const Tensor& w_hh, const optional<Tensor>& b_ih, const optional<Tensor>& b_hh) {
  check_dtype(x, op);
  check_tensor(x, op, "x", x, 2);
  check_tensor(w_ih, op, "w_ih", x, 2);
  const int64_t B = x.size(0), I = x.size(1), G = w_ih.size(0);
  TORCH_CHECK(G > 0 && G % ng == 0, op, ": w_ih must have ", ng, " * hidden_size rows, got ", G);
  const int64_t H = G / ng;
  check_shape(w_ih, op, "w_ih", {G, I});
  check_tensor(h, op, "h", x, 2);
  check_shape(h, op, "h", {B, H});
  check_tensor(w_hh, op, "w_hh", x, 2);
  check_shape(w_hh, op, "w_hh", {G, H});
  Tensor bi = opt(b_ih), bh = opt(b_hh);
  TORCH_CHECK(bi.defined() == bh.defined(), op, ": b_ih and b_hh must both be given or both be None");
  for (auto [b, name] : {std::make_pair(&bi, "b_ih"), std::make_pair(&bh, "b_hh")}) {
    if (!b->defined()) continue;
    check_tensor(*b, op, name, x, 1);
    check_shape(*b, op, name, {G});
    *b = b->contiguous();
  }
  return {B, I, H, G, x.contiguous(), h.contiguous(), w_ih.contiguous(), w_hh.contiguous(), bi, bh};
}

// A backward op's incoming gradient or saved tensor: same dtype as grad_h1, shape `want`.
Tensor checked(const Tensor& t, const char* op, const char* name, const Tensor& ref, at::IntArrayRef want) {
  check_tensor(t, op, name, ref, (int64_t)want.size());
  check_shape(t, op, name, want);
  return t.contiguous();
}

// A step of at most this many multiply-adds (the forward's B x G x (I + H), the backward's
// twice that) runs on the calling thread alone (OnCallingThread: no parallel region, BLAS
// on one thread: MKL otherwise ran even a 4 x 64 step's projection on both). Measured on the
// 2-core Zen 5 VM, 2026-12-01, the forward ops on one thread against two: 1.2-1.4x faster at
// 2^17 (RNN H=64 B=4-16, H=128 B=4; LSTM H=64 B=4), 0.87-0.93x at 2^19 when the VM is quiet
// (1.2-2.1x in a phase where the two cores' traffic is slow); training steps (forward +
// backward) 1.10-1.14x up to 2^18 of the backward's work, 0.97-1.00x at 2^20. The modules
// (alternating processes, 3 rounds), H=64 B=4: RNNCell inference 14.6-15.1 -> 12.5-13.0 us,
// training 58.7-63.7 -> 54.6-56.0; LSTMCell 21.8-22.3 -> 19.2-19.5 / 85.8-89.0 -> 77.5-78.5;
// GRUCell 18.4-22.1 -> 16.1-16.4 / 75.7-111 -> 69.2-72.0; RNNCell B=16 16.1-16.7 -> 14.8-15.1.
constexpr int64_t kOneThreadMaxWork = 1 << 18;
bool one_thread(const CellArgs& a, int64_t passes) { return passes * a.B * a.G * (a.I + a.H) <= kOneThreadMaxWork; }
// Where a step's dense parts run on cpu::gemm's packed-panel kernels (step_linear and the
// others' `packed`), else on BLAS: from 2 rows, on steps of more than 2^20 multiply-adds (as
// one_thread counts them). Measured on the Zen 5 VM (2026-12-01; the modules, alternating
// processes, two runs of 2 rounds, against BLAS everywhere), above 2^20 at B 2-32, H
// 128-1024: training steps 1.00-1.80x faster (LSTMCell H=512 B=4 1540-1564 -> 857-864 us),
// inference 1.07-1.32x but for LSTMCell H=1024 B=4 and GRUCell H=1024 B=8, 0.93x and 0.84x in
// one run, 1.24x and 1.09x in the other (16-32 MB of weights through L3). MKL ran its AVX2
// kernel and copied the weight every call, as the packing does. At 2^19-2^20 mixed (RNNCell
// H=256 B=4 0.93x in inference and 0.83x in training, LSTMCell H=256 B=2 1.18x), and B=1 (a
// GEMV, which BLAS runs without a copy) 0.79-0.98x: those stay on BLAS.
// float64 (on TiledD, AVX-512 CPUs; BLAS elsewhere) only in the backward (passes 2): the
// forward's projection packed per call lost to MKL's GEMM (Zen 5, 2026-12-01, in-process,
// 7 rounds: GRUCell H=512 B=8 inference 348 -> 461 us, H=1024 B=32 3391 -> 3637), while
// training steps gained 1.05-1.45x (RNNCell H=1024 B=32 5092 -> 3532 us).
constexpr int64_t kPackedMinWork = 1 << 20;
bool packed_gemms(const CellArgs& a, int64_t passes) {
  return a.B >= 2 && passes * a.B * a.G * (a.I + a.H) > kPackedMinWork &&
         (passes == 2 || a.x.scalar_type() != at::kDouble);
}

// The step's input pre-activations [B, G]: x @ w_ih^T + b_ih (+ b_add, the LSTM's and
// RNN's b_hh; the GRU applies b_hh inside the cell).
Tensor project(const CellArgs& a, const Tensor& b_add) {
  Tensor gx = new_output({a.B, a.G}, a.x);
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "fusedrnn_cell_projection_cpu", [&] {
    cpu::step_linear<scalar_t>(a.B, a.G, a.I, a.x.data_ptr<scalar_t>(), a.w_ih.data_ptr<scalar_t>(),
                               ptr<scalar_t>(a.b_ih), ptr<scalar_t>(b_add), gx.data_ptr<scalar_t>(),
                               packed_gemms(a, 1));
  });
  return gx;
}

Tensor none(const Tensor& like) { return at::empty({0}, like.options()); }

// A weight's gradient [G, N] = d^T @ m over the step's rows, and (with_bias) its bias's [G].
// (register.cpp's weight_grad is the sequence version, over all steps with the h0 term.)
// `packed`: see packed_gemms.
std::pair<Tensor, Tensor> step_weight_grads(const Tensor& d, const Tensor& m, bool with_bias, bool packed) {
  const int64_t B = d.size(0), G = d.size(1), N = m.size(1);
  Tensor gw = new_output({G, N}, d), gb = with_bias ? new_output({G}, d) : none(d);
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "fusedrnn_cell_weight_grad_cpu", [&] {
    cpu::step_weight_grad<scalar_t>(B, G, N, d.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(),
                                    gw.data_ptr<scalar_t>(), ptr<scalar_t>(gb), packed);
  });
  return {gw, gb};
}

// The backward ops skip what is not needed: need_h (the state's gradient: its GEMM with
// w_hh; the LSTM's grad_c is always computed, it costs no GEMM), need_x, need_w. Results
// not needed are empty tensors.
//
// The input side of a step's backward from the gradient of gx (dgx [B, G]): grad_x
// (need_x), grad_w_ih and grad_b_ih (need_w; the bias only if there is one).
std::tuple<Tensor, Tensor, Tensor> input_grads(const CellArgs& a, const Tensor& dgx, bool has_bias, bool need_x,
                                               bool need_w) {
  Tensor gx = none(dgx);
  if (need_x) {
    gx = new_output({a.B, a.I}, dgx);
    AT_DISPATCH_FLOATING_TYPES(dgx.scalar_type(), "fusedrnn_cell_input_grad_cpu", [&] {
      cpu::step_matmul<scalar_t>(a.B, a.I, a.G, dgx.data_ptr<scalar_t>(), a.w_ih.data_ptr<scalar_t>(),
                                 gx.data_ptr<scalar_t>(), packed_gemms(a, 2));
    });
  }
  if (!need_w) return {gx, none(dgx), none(dgx)};
  auto [gw, gb] = step_weight_grads(dgx, a.x, has_bias, packed_gemms(a, 2));
  return {gx, gw, gb};
}

// ----------------------------------------------------------------------------- LSTM
std::tuple<Tensor, Tensor, Tensor> lstm_cell_op(const Tensor& x, const Tensor& h, const Tensor& c_,
                                                const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
                                                const optional<Tensor>& b_hh, bool train) {
  const char* op = "fusedrnn::lstm_cell (cpu)";
  const CellArgs a = check_cell(op, 4, x, h, w_ih, w_hh, b_ih, b_hh);
  const OnCallingThread small(one_thread(a, 1));
  const Tensor c = checked(c_, op, "c", a.x, {a.B, a.H});
  const Tensor gx = project(a, a.b_hh);
  Tensor h1 = new_output({a.B, a.H}, a.x), c1 = new_output({a.B, a.H}, a.x);
  Tensor gates = saved_output({a.B, a.G}, a.x, train);
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "fusedrnn_lstm_cell_cpu", [&] {
    // One step: y[0] is h1; c_n is c1, which is also the backward's saved cell state
    // (cells = nullptr: the kernel keeps its per-step copy in a scratch row).
    std::vector<scalar_t> h_n(a.B * a.H);
    cpu::lstm_forward<scalar_t>(gx.data_ptr<scalar_t>(), a.h.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(),
                                a.w_hh.data_ptr<scalar_t>(), nullptr, a.H, a.H, one_step(a.B),
                                h1.data_ptr<scalar_t>(), h_n.data(), c1.data_ptr<scalar_t>(),
                                ptr<scalar_t>(gates), nullptr);
  });
  return {h1, c1, gates};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_cell_backward_op(
    const Tensor& grad_h1_, const Tensor& grad_c1_, const Tensor& x, const Tensor& h, const Tensor& c_,
    const Tensor& w_ih, const Tensor& w_hh, bool has_bias, const Tensor& gates_, const Tensor& c1_, bool need_h,
    bool need_x, bool need_w) {
  const char* op = "fusedrnn::lstm_cell_backward (cpu)";
  const CellArgs a = check_cell(op, 4, x, h, w_ih, w_hh, c10::nullopt, c10::nullopt);
  const OnCallingThread small(one_thread(a, 2));
  const Tensor grad_h1 = checked(grad_h1_, op, "grad_h1", a.x, {a.B, a.H});
  const Tensor grad_c1 = checked(grad_c1_, op, "grad_c1", a.x, {a.B, a.H});
  const Tensor c = checked(c_, op, "c", a.x, {a.B, a.H}), c1 = checked(c1_, op, "c1", a.x, {a.B, a.H});
  const Tensor gates = checked(gates_, op, "gates", a.x, {a.B, a.G});
  Tensor dgx = new_output({a.B, a.G}, a.x), grad_h = need_h ? new_output({a.B, a.H}, a.x) : none(a.x);
  Tensor grad_c = new_output({a.B, a.H}, a.x);
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "fusedrnn_lstm_cell_backward_cpu", [&] {
    // One step: the output's gradient comes in as grad_y, grad_h_n is zero.
    std::vector<scalar_t> zero(a.B * a.H, scalar_t(0)), dfirst(a.B * a.G);
    cpu::lstm_backward<scalar_t>(grad_h1.data_ptr<scalar_t>(), zero.data(), grad_c1.data_ptr<scalar_t>(),
                                 c.data_ptr<scalar_t>(), a.w_hh.data_ptr<scalar_t>(), nullptr, a.H, a.H,
                                 one_step(a.B), gates.data_ptr<scalar_t>(), c1.data_ptr<scalar_t>(),
                                 dgx.data_ptr<scalar_t>(), ptr<scalar_t>(grad_h),
                                 grad_c.data_ptr<scalar_t>(), dfirst.data(), nullptr, nullptr);
  });
  auto [grad_x, grad_w_ih, grad_b] = input_grads(a, dgx, has_bias, need_x, need_w);
  Tensor grad_w_hh = need_w ? step_weight_grads(dgx, a.h, false, packed_gemms(a, 2)).first : none(dgx);
  return {grad_x, grad_h, grad_c, grad_w_ih, grad_w_hh, grad_b};
}

// ----------------------------------------------------------------------------- GRU
std::tuple<Tensor, Tensor, Tensor> gru_cell_op(const Tensor& x, const Tensor& h, const Tensor& w_ih,
                                               const Tensor& w_hh, const optional<Tensor>& b_ih,
                                               const optional<Tensor>& b_hh, bool train) {
  const char* op = "fusedrnn::gru_cell (cpu)";
  const CellArgs a = check_cell(op, 3, x, h, w_ih, w_hh, b_ih, b_hh);
  const OnCallingThread small(one_thread(a, 1));
  const Tensor gx = project(a, Tensor());
  Tensor h1 = new_output({a.B, a.H}, a.x);
  Tensor gates = saved_output({a.B, a.G}, a.x, train), hn = saved_output({a.B, a.H}, a.x, train);
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "fusedrnn_gru_cell_cpu", [&] {
    std::vector<scalar_t> h_n(a.B * a.H);  // one step: y[0] is h1
    cpu::gru_forward<scalar_t>(gx.data_ptr<scalar_t>(), a.h.data_ptr<scalar_t>(), a.w_hh.data_ptr<scalar_t>(),
                               ptr<scalar_t>(a.b_hh), a.H, one_step(a.B), h1.data_ptr<scalar_t>(), h_n.data(),
                               ptr<scalar_t>(gates), ptr<scalar_t>(hn));
  });
  return {h1, gates, hn};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_cell_backward_op(
    const Tensor& grad_h1_, const Tensor& x, const Tensor& h, const Tensor& w_ih, const Tensor& w_hh,
    bool has_bias, const Tensor& h1_, const Tensor& gates_, const Tensor& hn_, bool need_h, bool need_x, bool need_w) {
  const char* op = "fusedrnn::gru_cell_backward (cpu)";
  const CellArgs a = check_cell(op, 3, x, h, w_ih, w_hh, c10::nullopt, c10::nullopt);
  const OnCallingThread small(one_thread(a, 2));
  const Tensor grad_h1 = checked(grad_h1_, op, "grad_h1", a.x, {a.B, a.H});
  const Tensor h1 = checked(h1_, op, "h1", a.x, {a.B, a.H}), hn = checked(hn_, op, "hn", a.x, {a.B, a.H});
  const Tensor gates = checked(gates_, op, "gates", a.x, {a.B, a.G});
  Tensor dgx = new_output({a.B, a.G}, a.x), dgh = new_output({a.B, a.G}, a.x);
  Tensor grad_h = need_h ? new_output({a.B, a.H}, a.x) : none(a.x);
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "fusedrnn_gru_cell_backward_cpu", [&] {
    std::vector<scalar_t> zero(a.B * a.H, scalar_t(0)), dfirst(a.B * a.G);
    cpu::gru_backward<scalar_t>(grad_h1.data_ptr<scalar_t>(), zero.data(), a.h.data_ptr<scalar_t>(),
                                a.w_hh.data_ptr<scalar_t>(), a.H, one_step(a.B), h1.data_ptr<scalar_t>(),
                                gates.data_ptr<scalar_t>(), hn.data_ptr<scalar_t>(), dgx.data_ptr<scalar_t>(),
                                ptr<scalar_t>(grad_h), dfirst.data(), dgh.data_ptr<scalar_t>());
  });
  auto [grad_x, grad_w_ih, grad_b_ih] = input_grads(a, dgx, has_bias, need_x, need_w);
  auto [grad_w_hh, grad_b_hh] = need_w ? step_weight_grads(dgh, a.h, has_bias, packed_gemms(a, 2)) : std::pair(none(dgx), none(dgx));
  return {grad_x, grad_h, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh};
}

// ----------------------------------------------------------------------------- RNN
Tensor rnn_cell_op(const Tensor& x, const Tensor& h, const Tensor& w_ih, const Tensor& w_hh,
                   const optional<Tensor>& b_ih, const optional<Tensor>& b_hh, bool relu) {
  const char* op = "fusedrnn::rnn_cell (cpu)";
  const CellArgs a = check_cell(op, 1, x, h, w_ih, w_hh, b_ih, b_hh);
  const OnCallingThread small(one_thread(a, 1));
  const Tensor gx = project(a, a.b_hh);
  Tensor h1 = new_output({a.B, a.H}, a.x);
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "fusedrnn_rnn_cell_cpu", [&] {
    std::vector<scalar_t> h_n(a.B * a.H);  // one step: y[0] is h1
    cpu::rnn_forward<scalar_t>(gx.data_ptr<scalar_t>(), a.h.data_ptr<scalar_t>(), a.w_hh.data_ptr<scalar_t>(), a.H,
                               relu, one_step(a.B), h1.data_ptr<scalar_t>(), h_n.data());
  });
  return h1;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_cell_backward_op(
    const Tensor& grad_h1_, const Tensor& x, const Tensor& h, const Tensor& w_ih, const Tensor& w_hh,
    bool has_bias, bool relu, const Tensor& h1_, bool need_h, bool need_x, bool need_w) {
  const char* op = "fusedrnn::rnn_cell_backward (cpu)";
  const CellArgs a = check_cell(op, 1, x, h, w_ih, w_hh, c10::nullopt, c10::nullopt);
  const OnCallingThread small(one_thread(a, 2));
  const Tensor grad_h1 = checked(grad_h1_, op, "grad_h1", a.x, {a.B, a.H});
  const Tensor h1 = checked(h1_, op, "h1", a.x, {a.B, a.H});
  Tensor dgx = new_output({a.B, a.G}, a.x), grad_h = need_h ? new_output({a.B, a.H}, a.x) : none(a.x);
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "fusedrnn_rnn_cell_backward_cpu", [&] {
    std::vector<scalar_t> zero(a.B * a.H, scalar_t(0)), dfirst(a.B * a.G);
    cpu::rnn_backward<scalar_t>(grad_h1.data_ptr<scalar_t>(), zero.data(), a.w_hh.data_ptr<scalar_t>(), a.H, relu,
                                one_step(a.B), h1.data_ptr<scalar_t>(), dgx.data_ptr<scalar_t>(),
                                ptr<scalar_t>(grad_h), dfirst.data());
  });
  auto [grad_x, grad_w_ih, grad_b] = input_grads(a, dgx, has_bias, need_x, need_w);
  Tensor grad_w_hh = need_w ? step_weight_grads(dgx, a.h, false, packed_gemms(a, 2)).first : none(dgx);
  return {grad_x, grad_h, grad_w_ih, grad_w_hh, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) {
  m.impl("lstm_cell", &lstm_cell_op);
  m.impl("lstm_cell_backward", &lstm_cell_backward_op);
  m.impl("gru_cell", &gru_cell_op);
  m.impl("gru_cell_backward", &gru_cell_backward_op);
  m.impl("rnn_cell", &rnn_cell_op);
  m.impl("rnn_cell_backward", &rnn_cell_backward_op);
}

}  // namespace cpu
}  // namespace fusedrnn
