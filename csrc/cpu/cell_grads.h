// The one-step cell ops' gradients in differentiable ATen ops, for a backward called with
// create_graph=True (csrc/cpu/autograd.cpp): the cells' own pointwise functions
// (cells/*_unit.inc, the formulas every kernel runs) instantiated on tensors, so the
// gradients can be differentiated again, to any order, without a nested autograd::grad.
// Included by autograd.cpp only (it needs ATen).
//
// Why: the cell ops had recomputed ATen's cell and differentiated it with a nested
// autograd::grad per step; with the engine's overhead a gradient-penalty step through
// RNNCell took 1.3-1.6x torch.nn's time (bench/double_backward.py).
#pragma once
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/rsub.h>
#include <ATen/ops/sigmoid_backward.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/tanh_backward.h>
#include <ATen/ops/threshold_backward.h>
#include <ATen/ops/zeros_like.h>

#include <utility>
#include <vector>

#include "cells/common.h"

namespace fusedrnn {
namespace cpu {

// An output's incoming gradient, or zeros where nothing used that output (also autograd.cpp's).
inline at::Tensor grad_or_zeros(const at::Tensor& g, const at::Tensor& like) {
  return g.defined() ? g : at::zeros_like(like);
}

namespace grads {

using at::Tensor;

// A tensor, or a scalar constant (T(1) in the formulas), as the number type of the
// cells' pointwise functions: every operation a differentiable ATen op.
struct DV {
  Tensor t;  // undefined: the constant s
  double s = 0;
  DV() = default;
  DV(Tensor x) : t(std::move(x)) {}
  DV(double x) : s(x) {}
  DV(int x) : s(x) {}
};
inline DV operator+(const DV& a, const DV& b) {
  if (!a.t.defined()) return b.t.defined() ? DV(b.t + a.s) : DV(a.s + b.s);
  return b.t.defined() ? DV(a.t + b.t) : DV(a.t + b.s);
}
inline DV operator-(const DV& a, const DV& b) {
  if (!a.t.defined()) return b.t.defined() ? DV(at::rsub(b.t, a.s)) : DV(a.s - b.s);
  return b.t.defined() ? DV(a.t - b.t) : DV(a.t - b.s);
}
inline DV operator*(const DV& a, const DV& b) {
  if (!a.t.defined()) return b.t.defined() ? DV(b.t * a.s) : DV(a.s * b.s);
  return b.t.defined() ? DV(a.t * b.t) : DV(a.t * b.s);
}
inline DV tanh_(const DV& x) { return at::tanh(x.t); }  // (lstm_backward_unit's tanh(c))
// (one op each, differentiable in both arguments; y and g are always tensors here)
inline DV dsigmoid_(const DV& y, const DV& g) { return at::sigmoid_backward(g.t, y.t); }
inline DV dtanh_(const DV& y, const DV& g) { return at::tanh_backward(g.t, y.t); }

#include "cells/gru_unit.inc"
#include "cells/lstm_unit.inc"

// The gradients of (x, h, [c,] w_ih, w_hh, b_ih, b_hh) where need[k] (undefined elsewhere),
// given dL/d(pre-activations) on the input side (dgi) and the hidden side (dgh) and the
// parts of the state gradients that bypass the GEMMs.
inline std::vector<Tensor> from_preactivations(const Tensor& x, const Tensor& h, const Tensor& w_ih,
                                               const Tensor& w_hh, const Tensor& dgi, const Tensor& dgh,
                                               const Tensor& dh_direct, const std::vector<Tensor>& state_extra,
                                               const std::vector<bool>& need) {
  std::vector<Tensor> r;
  r.push_back(need[0] ? dgi.mm(w_ih) : Tensor());
  r.push_back(need[1] ? (dh_direct.defined() ? dgh.mm(w_hh) + dh_direct : dgh.mm(w_hh)) : Tensor());
  for (const Tensor& e : state_extra) r.push_back(need[r.size()] ? e : Tensor());
  const size_t k = r.size();
  r.push_back(need[k] ? dgi.t().mm(x) : Tensor());
  r.push_back(need[k + 1] ? dgh.t().mm(h) : Tensor());
  r.push_back(need[k + 2] ? dgi.sum(0) : Tensor());
  r.push_back(need[k + 3] ? dgh.sum(0) : Tensor());
  return r;
}

// The create_graph backward reads the gates the forward saved, as a function of the step's
// inputs through the SavedGates node (autograd.cpp), instead of recomputing the step's GEMMs
// (x @ w_ih^T and h @ w_hh^T, ATen's linear twice per step: LSTMCell's double backward ran
// at 0.85-0.94x torch.nn's, whose cell keeps its GEMMs' outputs). SavedGates' backward takes
// dL/d(gates) to the pre-activations' gradients with these, {input side, hidden side}, then
// to the inputs with from_preactivations.
// LSTM: act = [i, f, g, o] (lstm_gates_backward).
inline std::pair<Tensor, Tensor> lstm_gates_to_preactivations(const Tensor& act, const Tensor& d) {
  const auto a = act.chunk(4, 1), g = d.chunk(4, 1);
  DV dai, daf, dag, dao;
  lstm_gates_backward<DV>(a[0], a[1], a[2], a[3], g[0], g[1], g[2], g[3], dai, daf, dag, dao);
  const Tensor da = at::cat({dai.t, daf.t, dag.t, dao.t}, 1);
  return {da, da};
}
// GRU: act = [r, z, n, hn] with hn = h @ W_hn^T + b_hn, r and z sigmoids of (input side +
// hidden side), n = tanh(xn + r * hn) (gru_forward_unit).
inline std::pair<Tensor, Tensor> gru_gates_to_preactivations(const Tensor& act, const Tensor& d) {
  const auto a = act.chunk(4, 1), g = d.chunk(4, 1);
  const DV dxn = dtanh_(a[2], g[2]);
  const DV dxr = dsigmoid_(a[0], DV(g[0]) + dxn * DV(a[3]));
  const DV dxz = dsigmoid_(a[1], g[1]);
  const DV dhn = DV(g[3]) + dxn * DV(a[0]);
  return {at::cat({dxr.t, dxz.t, dxn.t}, 1), at::cat({dxr.t, dxz.t, dhn.t}, 1)};
}

// LSTM cell: grads (dL/dh1, dL/dc1; either undefined) -> (x, h, c, w_ih, w_hh, b_ih, b_hh),
// from act = [i, f, g, o] (SavedGates) and c1 (the op's output).
inline std::vector<Tensor> lstm_cell(const Tensor& x, const Tensor& h, const Tensor& c, const Tensor& w_ih,
                                     const Tensor& w_hh, const Tensor& act, const Tensor& c1, const Tensor& g_h,
                                     const Tensor& g_c, const std::vector<bool>& need) {
  const auto a = act.chunk(4, 1);
  DV dai, daf, dag, dao, dc;
  lstm_backward_unit<DV>(a[0], a[1], a[2], a[3], c1, c, grad_or_zeros(g_h, h), grad_or_zeros(g_c, c), dai, daf, dag,
                         dao, dc);
  const Tensor da = at::cat({dai.t, daf.t, dag.t, dao.t}, 1);
  return from_preactivations(x, h, w_ih, w_hh, da, da, Tensor(), {dc.t}, need);
}

// GRU cell: dL/dh1 (undefined: none) -> (x, h, w_ih, w_hh, b_ih, b_hh), from act = [r, z, n,
// hn] (SavedGates).
inline std::vector<Tensor> gru_cell(const Tensor& x, const Tensor& h, const Tensor& w_ih, const Tensor& w_hh,
                                    const Tensor& act, const Tensor& g_h, const std::vector<bool>& need) {
  const auto a = act.chunk(4, 1);
  DV dxr, dxz, dxn, dhn, dhd;
  gru_backward_unit<DV>(a[0], a[1], a[2], a[3], h, grad_or_zeros(g_h, h), dxr, dxz, dxn, dhn, dhd);
  return from_preactivations(x, h, w_ih, w_hh, at::cat({dxr.t, dxz.t, dxn.t}, 1), at::cat({dxr.t, dxz.t, dhn.t}, 1),
                             dhd.t, {}, need);
}

// RNN cell: from its saved output h1 (differentiable through the op's own node), with no
// recomputation: the pre-activation's gradient is ATen's tanh or relu backward of h1.
inline std::vector<Tensor> rnn_cell(const Tensor& x, const Tensor& h, const Tensor& w_ih, const Tensor& w_hh,
                                    const Tensor& h1, bool relu, const Tensor& g_h, const std::vector<bool>& need) {
  const Tensor g = grad_or_zeros(g_h, h1);
  const Tensor da = relu ? at::threshold_backward(g, h1, 0) : at::tanh_backward(g, h1);
  return from_preactivations(x, h, w_ih, w_hh, da, da, Tensor(), {}, need);
}

}  // namespace grads
}  // namespace cpu
}  // namespace fusedrnn
