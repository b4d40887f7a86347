// CPU implementations of the fusedrnn recurrence ops (schemas defined in Python,
// fusedrnn/schema.py): argument checks, output allocation, the fused sequential
// kernels of kernels.cpp, and the weight gradients as one GEMM over all time steps.
// Light includes (per-operator ATen headers, no torch/extension.h) keep this TU's compile time down.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/op_utils.h"
#include "cpu/output_pool.h"

namespace fusedrnn {
namespace cpu {
namespace {

using at::Tensor;
using c10::optional;

// Validated lengths as a contiguous int64 CPU tensor (undefined if absent).
Tensor check_lengths(const optional<Tensor>& lengths, const char* op, int64_t T, int64_t B) {
  if (!lengths.has_value() || !lengths->defined()) return Tensor();
  const Tensor& L = *lengths;
  TORCH_CHECK(L.device().is_cpu(), op, ": lengths must be a CPU tensor (got ", L.device(), ")");
  TORCH_CHECK(L.scalar_type() == at::kLong, op, ": lengths must be int64, got ", L.scalar_type());
  TORCH_CHECK(L.dim() == 1 && L.size(0) == B, op, ": lengths must have shape [", B, "], got ", L.sizes());
  Tensor Lc = L.contiguous();
  const int64_t* p = Lc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(p[b] >= 0 && p[b] <= T, op, ": lengths[", b, "] = ", p[b], " is outside [0, ", T, "]");
  return Lc;
}

// The kernels' view of a call's sequences (Seq), with the storage of Seq::active: built
// when the lengths are non-increasing, as the modules pass a PackedSequence's.
struct SeqArgs {
  std::vector<int64_t> active;
  Seq sq;
  SeqArgs(int64_t T, int64_t B, const Tensor& L, bool reverse)
      : sq{T, B, L.defined() ? L.data_ptr<int64_t>() : nullptr, reverse} {
    const int64_t* len = sq.lengths;
    if (!len || B == 0 || !std::is_sorted(len, len + B, std::greater<int64_t>())) return;
    active.resize(T + 1);
    int64_t b = B;
    for (int64_t s = 0; s <= T; ++s) {
      while (b > 0 && len[b - 1] <= s) --b;
      active[s] = b;
    }
    sq.active = active.data();
  }
  SeqArgs(const SeqArgs&) = delete;
  SeqArgs& operator=(const SeqArgs&) = delete;
};

// out [M, N] (+)= a^T @ b for contiguous a [K, M] and b [K, N] (the first dims flattened):
// a weight's gradient summed over K rows of time steps (cpu::gemm reads a^T in place).
void grad_gemm(const Tensor& a, const Tensor& b, Tensor& out, bool acc) {
  const int64_t M = a.size(-1), N = b.size(-1), K = a.numel() / std::max<int64_t>(M, 1);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "fusedrnn_grad_gemm_cpu", [&] {
    cpu::gemm<scalar_t>(M, N, K, a.data_ptr<scalar_t>(), 1, M, b.data_ptr<scalar_t>(), N, 1,
                        out.data_ptr<scalar_t>(), N, acc);
  });
}

// Whether d^T @ h is exactly zero because h is (contiguous d and h): h0 = 0 is the
// modules' state when no hx is given. Not when d has an inf or NaN (0 * inf = NaN).
bool zero_product(const Tensor& d, const Tensor& h) {
  bool zero = false;
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "fusedrnn_zero_product_cpu", [&] {
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* dp = d.data_ptr<scalar_t>();
    zero = cpu::all_zero(hp, h.numel()) &&
           std::all_of(dp, dp + d.numel(), [](scalar_t v) { return std::isfinite(v); });
  });
  return zero;
}

// grad_w = dfirst^T @ h0 + sum_t dpre[t]^T @ y[t -/+ 1]: the state each step started
// from is h0 at the sequence's first step and the previous output otherwise. Padded
// steps have dpre = 0 and y = 0, so one shifted GEMM over all steps covers lengths too.
// With h0 = 0 the first term is skipped (1/T of the GEMM's work). With non-increasing
// lengths (Seq::active) the shifted pairs of step k (dpre[k + 1] and y[k] forward,
// dpre[k] and y[k + 1] reversed) are nonzero only in the active[k + 1] rows still running
// at k + 1: where over a tenth of the rows are padding, the GEMM takes those rows only
// (gathered: ~5-10% of the GEMM's time per row kept).
Tensor weight_grad(const Tensor& dpre, const Tensor& dfirst, const Tensor& h0, const Tensor& y, bool reverse,
                   const int64_t* active) {
  const int64_t T = dpre.size(0), B = dpre.size(1), G = dpre.size(2), P = y.size(2);
  Tensor gw = new_output({G, P}, dpre);
  const bool first = T == 1 || !zero_product(dfirst, h0);
  if (first) grad_gemm(dfirst, h0, gw, false);
  if (T > 1) {
    Tensor d = reverse ? dpre.narrow(0, 0, T - 1) : dpre.narrow(0, 1, T - 1);
    Tensor h = reverse ? y.narrow(0, 1, T - 1) : y.narrow(0, 0, T - 1);
    int64_t kept = 0;
    for (int64_t k = 0; active && k < T - 1; ++k) kept += active[k + 1];
    if (active && kept * 10 < (T - 1) * B * 9) {
      Tensor idx = at::empty({kept}, dpre.options().dtype(at::kLong));
      int64_t* p = idx.data_ptr<int64_t>();
      for (int64_t k = 0; k < T - 1; ++k)
        for (int64_t b = 0; b < active[k + 1]; ++b) *p++ = k * B + b;
      d = d.reshape({-1, G}).index_select(0, idx);
      h = h.reshape({-1, P}).index_select(0, idx);
    }
    grad_gemm(d, h, gw, first);
  }
  return gw;
}

// weight_grad for a bfloat16 w_hh, returned in bfloat16 (its dtype): the same sum as one
// GEMM over bfloat16 copies of [dfirst; dpre shifted] and [h0; y shifted] on torch's
// bfloat16 matmul (oneDNN's dot products, twice our float32 GEMM's rate), as torch.nn's
// bfloat16 modules compute it.
Tensor weight_grad_bf16(const Tensor& dpre, const Tensor& dfirst, const Tensor& h0, const Tensor& y, bool reverse) {
  const int64_t T = dpre.size(0), B = dpre.size(1), G = dpre.size(2), P = y.size(2);
  const bool first = T == 1 || !zero_product(dfirst, h0);
  const int64_t rows = ((first ? 1 : 0) + std::max<int64_t>(T - 1, 0)) * B;
  const auto bf16 = dpre.options().dtype(at::kBFloat16);
  Tensor d = at::empty({rows, G}, bf16), h = at::empty({rows, P}, bf16);
  int64_t r = 0;
  if (first) {
    d.narrow(0, 0, B).copy_(dfirst);
    h.narrow(0, 0, B).copy_(h0);
    r = B;
  }
  if (T > 1) {
    d.narrow(0, r, (T - 1) * B).copy_((reverse ? dpre.narrow(0, 0, T - 1) : dpre.narrow(0, 1, T - 1)).reshape({-1, G}));
    h.narrow(0, r, (T - 1) * B).copy_((reverse ? y.narrow(0, 1, T - 1) : y.narrow(0, 0, T - 1)).reshape({-1, P}));
  }
  return d.t().mm(h);
}

// ----------------------------------------------------------------------------- input projection
// gx = x @ w^T + b over all rows of x (every time step) in one cpu::gemm, and its
// gradients (fusedrnn/projection.py). x: [..., I], w: [G, I], b: [G] or none.
int64_t rows_of(const Tensor& x) {
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  return m;
}

void check_projection(const Tensor& x, const Tensor& w, const char* op) {
  check_dtype(x, op);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension, got a scalar");
  check_tensor(x, op, "x", x, x.dim());
  check_tensor(w, op, "w", x, 2);
  check_shape(w, op, "w", {w.size(0), x.size(-1)});
}

Tensor projection_op(const Tensor& x_, const Tensor& w_, const optional<Tensor>& b_) {
  const char* op = "fusedrnn::projection (cpu)";
  check_projection(x_, w_, op);
  const int64_t I = x_.size(-1), G = w_.size(0), M = rows_of(x_);
  const Tensor b = opt(b_);
  if (b.defined()) {
    check_tensor(b, op, "b", x_, 1);
    check_shape(b, op, "b", {G});
  }
  const Tensor x = x_.contiguous(), w = w_.contiguous(), bc = b.defined() ? b.contiguous() : b;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = G;
  Tensor out = new_output(shape, x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fusedrnn_projection_cpu", [&] {
    cpu::gemm<scalar_t>(M, G, I, x.data_ptr<scalar_t>(), I, 1, w.data_ptr<scalar_t>(), 1, I, out.data_ptr<scalar_t>(),
                        G, false, bc.defined() ? bc.data_ptr<scalar_t>() : nullptr);
  });
  return out;
}

// dL/dx = grad @ w, dL/dw = grad^T @ x, dL/db = the column sums of grad; each only if
// needed (else an empty tensor).
std::tuple<Tensor, Tensor, Tensor> projection_backward_op(const Tensor& grad_, const Tensor& x_, const Tensor& w_,
                                                          bool need_x, bool need_w, bool need_b) {
  const char* op = "fusedrnn::projection_backward (cpu)";
  check_projection(x_, w_, op);
  const int64_t I = x_.size(-1), G = w_.size(0), M = rows_of(x_);
  check_tensor(grad_, op, "grad", x_, x_.dim());
  std::vector<int64_t> shape(x_.sizes().begin(), x_.sizes().end());
  shape.back() = G;
  check_shape(grad_, op, "grad", shape);
  const Tensor grad = contiguous_pooled(grad_), x = x_.contiguous(), w = w_.contiguous();
  Tensor gx = need_x ? new_output(x.sizes(), x) : x.new_empty({0});
  Tensor gw = need_w ? new_output({G, I}, x) : x.new_empty({0});
  // db comes with dW (the column sums of grad, summed as dW's GEMM copies grad^T: ~1% of
  // an LSTM training step at B=64, H=256 for a separate pass), or on its own.
  Tensor gb = need_b && need_w ? new_output({G}, x) : need_b ? grad.reshape({M, G}).sum(0) : x.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fusedrnn_projection_backward_cpu", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    if (need_x) cpu::gemm<scalar_t>(M, I, G, g, G, 1, w.data_ptr<scalar_t>(), I, 1, gx.data_ptr<scalar_t>(), I, false);
    if (need_w)
      cpu::gemm<scalar_t>(G, I, M, g, 1, G, x.data_ptr<scalar_t>(), I, 1, gw.data_ptr<scalar_t>(), I, false, nullptr,
                          need_b ? gb.data_ptr<scalar_t>() : nullptr);
  });
  return {gx, gw, gb};
}

// ----------------------------------------------------------------------------- PackedSequence layout
// The padded, time-major layout of a PackedSequence (fusedrnn/packed.py, which also
// holds this op's torch version, the spec): from batch_sizes [T] (how many sequences run
// at step t, non-increasing), the lengths [B] of the sequences in packed order
// (B = batch_sizes[0]; non-increasing) and `rows` [N]: the padded row t * B + b of each
// packed row (step t holds packed rows sum(batch_sizes[:t]) .. + batch_sizes[t]). One
// call where the torch version takes about ten ops (~25-45 us of a ~130 us call of a
// small packed RNN). Rejects what pack_padded_sequence never makes: torch.nn reads some
// such batch_sizes without an error and fusedrnn would return a wrong result.
std::tuple<Tensor, Tensor> packed_layout_op(const Tensor& batch_sizes) {
  const char* op = "fusedrnn::packed_layout (cpu)";
  TORCH_CHECK(batch_sizes.device().is_cpu() && batch_sizes.scalar_type() == at::kLong && batch_sizes.dim() == 1, op,
              ": batch_sizes must be a 1-D int64 CPU tensor (a PackedSequence's), got ", batch_sizes.scalar_type(), " ",
              batch_sizes.sizes(), " on ", batch_sizes.device());
  const Tensor bs = batch_sizes.contiguous();
  const int64_t T = bs.numel();
  const int64_t* s = bs.data_ptr<int64_t>();
  const int64_t B = T ? s[0] : 0;
  int64_t N = 0;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(s[t] >= 0 && (t == 0 || s[t] <= s[t - 1]), op,
                ": batch_sizes must be non-negative and non-increasing (as pack_padded_sequence and pack_sequence "
                "make them), got ", s[t], " at step ", t, t ? " after " : "", t ? std::to_string(s[t - 1]) : "");
    N += s[t];
  }
  const auto int64 = bs.options();
  Tensor lengths = at::empty({B}, int64), rows = at::empty({N}, int64);
  int64_t* len = lengths.data_ptr<int64_t>();
  int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t b = 0; b < s[t]; ++b) *r++ = t * B + b;
    // the sequences b in [batch_sizes[t + 1], batch_sizes[t]) end after step t
    for (int64_t b = t + 1 < T ? s[t + 1] : 0; b < s[t]; ++b) len[b] = t + 1;
  }
  return {lengths, rows};
}

// gx = x @ w^T + b for the rows `rows` of x (seen as [M, I]) only; gx's other rows are 0.
// A PackedSequence's padded rows (packed_layout's rows): the GEMM of the rows that hold
// data, gathered into and scattered from pooled memory, each output row written once.
// Its autograd (csrc/cpu/autograd.cpp, ProjectionRows) does the backward from
// projection_backward on the same rows.
Tensor projection_rows_op(const Tensor& x_, const Tensor& w_, const optional<Tensor>& b_, const Tensor& rows_) {
  const char* op = "fusedrnn::projection_rows (cpu)";
  check_projection(x_, w_, op);
  const int64_t I = x_.size(-1), G = w_.size(0), M = rows_of(x_);
  TORCH_CHECK(rows_.device().is_cpu() && rows_.scalar_type() == at::kLong && rows_.dim() == 1, op,
              ": rows must be a 1-D int64 CPU tensor, got ", rows_.scalar_type(), " ", rows_.sizes(), " on ",
              rows_.device());
  const Tensor rows = rows_.contiguous(), x = x_.contiguous();
  const int64_t N = rows.numel();
  const int64_t* r = rows.data_ptr<int64_t>();
  std::vector<int64_t> source(M, -1);  // the packed row each output row takes, -1: a zero row
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(r[n] >= 0 && r[n] < M, op, ": rows must be in [0, ", M, "), got ", r[n]);
    source[r[n]] = n;
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = G;
  Tensor out = new_output(shape, x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fusedrnn_projection_rows_cpu", [&] {
    Tensor xr = new_output({N, I}, x);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* xrp = xr.data_ptr<scalar_t>();
    // (copies in parallel above ~1 MB: a large layer's gx is tens of MB)
    at::parallel_for(0, N, std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(I, 1)), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) std::copy_n(xp + r[n] * I, I, xrp + n * I);
    });
    const Tensor packed = projection_op(xr, w_, b_);
    const scalar_t* pp = packed.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(G, 1)), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        if (source[m] < 0) std::fill_n(o + m * G, G, scalar_t(0));
        else std::copy_n(pp + source[m] * G, G, o + m * G);
      }
    });
  });
  return out;
}

// ----------------------------------------------------------------------------- bfloat16 w_hh
// The sequence ops accept a bfloat16 w_hh with float32 everything else: the modules'
// bfloat16 path (fusedrnn/modules.py), whose recurrent products then run on bfloat16 dot
// products (kernels.h, *_forward_bf16, *_backward_bf16; elsewhere on w_hh cast to float32).
// w_hh's gradient comes back in bfloat16 (weight_grad_bf16).
// Whether w_hh is such a weight; checks that gx is float32.
bool bf16_weight(const Tensor& w_hh, const Tensor& gx, const char* op) {
  if (!w_hh.defined() || w_hh.scalar_type() != at::kBFloat16) return false;
  TORCH_CHECK(gx.scalar_type() == at::kFloat, op, ": a bfloat16 w_hh needs float32 gx (got ", gx.scalar_type(),
              "); otherwise all floating-point arguments must have gx's dtype");
  return true;
}
const uint16_t* bf16_bits(const Tensor& w) { return reinterpret_cast<const uint16_t*>(w.data_ptr()); }
// A bfloat16 tensor as float32 (exact; like's options), where the bfloat16 kernels do not run.
Tensor bf16_to_float(const Tensor& w, const Tensor& like) {
  Tensor out = new_output(w.sizes(), like);
  out.copy_(w);
  return out;
}

// The bfloat16 path's input projection (fusedrnn/projection.py; its autograd:
// ProjectionBf16 in autograd.cpp): bfloat16 x [..., I] and w [G, I], float32 b [G] or none -> float32 [..., G]
// (kernels.h, gemm_bf16).
Tensor projection_bf16_op(const Tensor& x_, const Tensor& w_, const optional<Tensor>& b_) {
  const char* op = "fusedrnn::projection_bf16 (cpu)";
  TORCH_CHECK(x_.scalar_type() == at::kBFloat16, op, ": x must be bfloat16, got ", x_.scalar_type());
  TORCH_CHECK(x_.dim() >= 1, op, ": x must have at least 1 dimension, got a scalar");
  check_tensor(x_, op, "x", x_, x_.dim());
  check_tensor(w_, op, "w", x_, 2);
  check_shape(w_, op, "w", {w_.size(0), x_.size(-1)});
  const int64_t I = x_.size(-1), G = w_.size(0), M = rows_of(x_);
  Tensor b = opt(b_);
  if (b.defined()) {
    TORCH_CHECK(b.scalar_type() == at::kFloat, op, ": b must be float32, got ", b.scalar_type());
    TORCH_CHECK(b.device().is_cpu(), op, ": b must be a CPU tensor (got ", b.device(), ")");
    check_shape(b, op, "b", {G});
    b = b.contiguous();
  }
  const Tensor x = x_.contiguous(), w = w_.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = G;
  Tensor out = new_output(shape, x.options().dtype(at::kFloat));
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  if (!cpu::gemm_bf16(M, G, I, bf16_bits(x), bf16_bits(w), bp, out.data_ptr<float>())) {
    const Tensor xf = bf16_to_float(x, out), wf = bf16_to_float(w, out);
    cpu::gemm<float>(M, G, I, xf.data_ptr<float>(), I, 1, wf.data_ptr<float>(), 1, I, out.data_ptr<float>(), G, false,
                     bp);
  }
  return out;
}

// ----------------------------------------------------------------------------- LSTM
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward_op(
    const Tensor& gx_, const Tensor& h0_, const Tensor& c0_, const Tensor& w_hh_, const optional<Tensor>& w_hr_,
    const optional<Tensor>& lengths, bool reverse, bool train) {
  const char* op = "fusedrnn::lstm_forward (cpu)";
  check_dtype(gx_, op);
  check_tensor(gx_, op, "gx", gx_, 3);
  const int64_t T = gx_.size(0), B = gx_.size(1), G = gx_.size(2);
  TORCH_CHECK(G % 4 == 0 && G > 0, op, ": gx's last dimension must be 4 * hidden_size, got ", G);
  const int64_t H = G / 4;
  Tensor w_hr = opt(w_hr_);
  const int64_t P = w_hr.defined() ? w_hr.size(0) : H;
  check_tensor(h0_, op, "h0", gx_, 2);
  check_tensor(c0_, op, "c0", gx_, 2);
  const bool bf16w = bf16_weight(w_hh_, gx_, op);
  check_tensor(w_hh_, op, "w_hh", bf16w ? w_hh_ : gx_, 2);
  check_shape(h0_, op, "h0", {B, P});
  check_shape(c0_, op, "c0", {B, H});
  check_shape(w_hh_, op, "w_hh", {G, P});
  if (w_hr.defined()) {
    check_tensor(w_hr, op, "w_hr", gx_, 2);
    check_shape(w_hr, op, "w_hr", {P, H});
    TORCH_CHECK(P > 0, op, ": w_hr must have proj_size > 0 rows");
  }
  Tensor L = check_lengths(lengths, op, T, B);
  Tensor gx = gx_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous(), w_hh = w_hh_.contiguous();
  if (w_hr.defined()) w_hr = w_hr.contiguous();
  Tensor y = new_output({T, B, P}, gx), h_n = new_output({B, P}, gx), c_n = new_output({B, H}, gx);
  // Inference (train=False) neither allocates nor writes the saved tensors.
  Tensor gates = saved_output({T, B, G}, gx, train), cells = saved_output({T, B, H}, gx, train);
  const SeqArgs seq(T, B, L, reverse);
  const Seq& sq = seq.sq;
  if (bf16w && cpu::lstm_forward_bf16(gx.data_ptr<float>(), h0.data_ptr<float>(), c0.data_ptr<float>(),
                                      bf16_bits(w_hh), w_hr.defined() ? w_hr.data_ptr<float>() : nullptr, H, P, sq,
                                      y.data_ptr<float>(), h_n.data_ptr<float>(), c_n.data_ptr<float>(),
                                      train ? gates.data_ptr<float>() : nullptr, train ? cells.data_ptr<float>() : nullptr))
    return {y, h_n, c_n, gates, cells};
  if (bf16w) w_hh = bf16_to_float(w_hh, gx);
  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "fusedrnn_lstm_forward_cpu", [&] {
    cpu::lstm_forward<scalar_t>(gx.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(),
                                w_hh.data_ptr<scalar_t>(), w_hr.defined() ? w_hr.data_ptr<scalar_t>() : nullptr,
                                H, P, sq, y.data_ptr<scalar_t>(), h_n.data_ptr<scalar_t>(),
                                c_n.data_ptr<scalar_t>(), train ? gates.data_ptr<scalar_t>() : nullptr,
                                train ? cells.data_ptr<scalar_t>() : nullptr);
  });
  return {y, h_n, c_n, gates, cells};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward_op(
    const Tensor& grad_y_, const Tensor& grad_h_n_, const Tensor& grad_c_n_, const Tensor& h0_, const Tensor& c0_,
    const Tensor& w_hh_, const optional<Tensor>& w_hr_, const optional<Tensor>& lengths, bool reverse,
    const Tensor& y_, const Tensor& gates_, const Tensor& cells_) {
  const char* op = "fusedrnn::lstm_backward (cpu)";
  check_dtype(grad_y_, op);
  const bool bf16w = bf16_weight(w_hh_, grad_y_, op);  // (then w_hh's dtype is its own)
  check_tensor(grad_y_, op, "grad_y", grad_y_, 3);
  check_tensor(gates_, op, "gates", grad_y_, 3);
  const int64_t T = gates_.size(0), B = gates_.size(1), G = gates_.size(2);
  TORCH_CHECK(G % 4 == 0 && G > 0, op, ": gates' last dimension must be 4 * hidden_size, got ", G);
  const int64_t H = G / 4;
  Tensor w_hr = opt(w_hr_);
  const int64_t P = w_hr.defined() ? w_hr.size(0) : H;
  check_shape(grad_y_, op, "grad_y", {T, B, P});
  for (auto [t, name, shape] : {std::make_tuple(&grad_h_n_, "grad_h_n", std::vector<int64_t>{B, P}),
                                std::make_tuple(&grad_c_n_, "grad_c_n", std::vector<int64_t>{B, H}),
                                std::make_tuple(&h0_, "h0", std::vector<int64_t>{B, P}),
                                std::make_tuple(&c0_, "c0", std::vector<int64_t>{B, H}),
                                std::make_tuple(&w_hh_, "w_hh", std::vector<int64_t>{G, P}),
                                std::make_tuple(&y_, "y", std::vector<int64_t>{T, B, P}),
                                std::make_tuple(&cells_, "cells", std::vector<int64_t>{T, B, H})}) {
    check_tensor(*t, op, name, bf16w && t == &w_hh_ ? w_hh_ : grad_y_, (int64_t)shape.size());
    check_shape(*t, op, name, shape);
  }
  if (w_hr.defined()) {
    check_tensor(w_hr, op, "w_hr", grad_y_, 2);
    check_shape(w_hr, op, "w_hr", {P, H});
  }
  Tensor L = check_lengths(lengths, op, T, B);
  Tensor grad_y = contiguous_pooled(grad_y_), grad_h_n = grad_h_n_.contiguous(), grad_c_n = grad_c_n_.contiguous();
  Tensor h0 = h0_.contiguous(), c0 = c0_.contiguous(), w_hh = w_hh_.contiguous(), y = y_.contiguous();
  Tensor gates = gates_.contiguous(), cells = cells_.contiguous();
  if (w_hr.defined()) w_hr = w_hr.contiguous();
  Tensor grad_gx = new_output({T, B, G}, grad_y), grad_h0 = new_output({B, P}, grad_y);
  Tensor grad_c0 = new_output({B, H}, grad_y), dfirst = new_output({B, G}, grad_y);
  Tensor dhs, hr;
  if (w_hr.defined()) {
    dhs = new_output({T, B, P}, grad_y);
    hr = new_output({T, B, H}, grad_y);
  }
  const SeqArgs seq(T, B, L, reverse);
  const Seq& sq = seq.sq;
  const bool done = bf16w && !w_hr.defined() &&
                    cpu::lstm_backward_bf16(grad_y.data_ptr<float>(), grad_h_n.data_ptr<float>(),
                                            grad_c_n.data_ptr<float>(), c0.data_ptr<float>(), bf16_bits(w_hh), H, sq,
                                            gates.data_ptr<float>(), cells.data_ptr<float>(), grad_gx.data_ptr<float>(),
                                            grad_h0.data_ptr<float>(), grad_c0.data_ptr<float>(),
                                            dfirst.data_ptr<float>());
  if (bf16w && !done) w_hh = bf16_to_float(w_hh, grad_y);
  if (!done) AT_DISPATCH_FLOATING_TYPES(grad_y.scalar_type(), "fusedrnn_lstm_backward_cpu", [&] {
    cpu::lstm_backward<scalar_t>(
        grad_y.data_ptr<scalar_t>(), grad_h_n.data_ptr<scalar_t>(), grad_c_n.data_ptr<scalar_t>(),
        c0.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(), w_hr.defined() ? w_hr.data_ptr<scalar_t>() : nullptr,
        H, P, sq, gates.data_ptr<scalar_t>(), cells.data_ptr<scalar_t>(), grad_gx.data_ptr<scalar_t>(),
        grad_h0.data_ptr<scalar_t>(), grad_c0.data_ptr<scalar_t>(), dfirst.data_ptr<scalar_t>(),
        dhs.defined() ? dhs.data_ptr<scalar_t>() : nullptr, hr.defined() ? hr.data_ptr<scalar_t>() : nullptr);
  });
  Tensor grad_w_hh = bf16w ? weight_grad_bf16(grad_gx, dfirst, h0, y, reverse)
                           : weight_grad(grad_gx, dfirst, h0, y, reverse, sq.active);
  Tensor grad_w_hr = at::empty({0}, grad_y.options());
  if (w_hr.defined()) {
    grad_w_hr = new_output({P, H}, grad_y);
    grad_gemm(dhs, hr, grad_w_hr, false);
  }
  return {grad_gx, grad_h0, grad_c0, grad_w_hh, grad_w_hr};
}

// ----------------------------------------------------------------------------- GRU
std::tuple<Tensor, Tensor, Tensor, Tensor> gru_forward_op(
    const Tensor& gx_, const Tensor& h0_, const Tensor& w_hh_, const optional<Tensor>& b_hh_,
    const optional<Tensor>& lengths, bool reverse, bool train) {
  const char* op = "fusedrnn::gru_forward (cpu)";
  check_dtype(gx_, op);
  check_tensor(gx_, op, "gx", gx_, 3);
  const int64_t T = gx_.size(0), B = gx_.size(1), G = gx_.size(2);
  TORCH_CHECK(G % 3 == 0 && G > 0, op, ": gx's last dimension must be 3 * hidden_size, got ", G);
  const int64_t H = G / 3;
  check_tensor(h0_, op, "h0", gx_, 2);
  const bool bf16w = bf16_weight(w_hh_, gx_, op);
  check_tensor(w_hh_, op, "w_hh", bf16w ? w_hh_ : gx_, 2);
  check_shape(h0_, op, "h0", {B, H});
  check_shape(w_hh_, op, "w_hh", {G, H});
  Tensor b_hh = opt(b_hh_);
  if (b_hh.defined()) {
    check_tensor(b_hh, op, "b_hh", gx_, 1);
    check_shape(b_hh, op, "b_hh", {G});
    b_hh = b_hh.contiguous();
  }
  Tensor L = check_lengths(lengths, op, T, B);
  Tensor gx = gx_.contiguous(), h0 = h0_.contiguous(), w_hh = w_hh_.contiguous();
  Tensor y = new_output({T, B, H}, gx), h_n = new_output({B, H}, gx);
  Tensor gates = saved_output({T, B, G}, gx, train), hn = saved_output({T, B, H}, gx, train);
  const SeqArgs seq(T, B, L, reverse);
  const Seq& sq = seq.sq;
  if (bf16w && cpu::gru_forward_bf16(gx.data_ptr<float>(), h0.data_ptr<float>(), bf16_bits(w_hh),
                                     b_hh.defined() ? b_hh.data_ptr<float>() : nullptr, H, sq, y.data_ptr<float>(),
                                     h_n.data_ptr<float>(), train ? gates.data_ptr<float>() : nullptr,
                                     train ? hn.data_ptr<float>() : nullptr))
    return {y, h_n, gates, hn};
  if (bf16w) w_hh = bf16_to_float(w_hh, gx);
  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "fusedrnn_gru_forward_cpu", [&] {
    cpu::gru_forward<scalar_t>(gx.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(),
                               b_hh.defined() ? b_hh.data_ptr<scalar_t>() : nullptr, H, sq,
                               y.data_ptr<scalar_t>(), h_n.data_ptr<scalar_t>(),
                               train ? gates.data_ptr<scalar_t>() : nullptr, train ? hn.data_ptr<scalar_t>() : nullptr);
  });
  return {y, h_n, gates, hn};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_backward_op(
    const Tensor& grad_y_, const Tensor& grad_h_n_, const Tensor& h0_, const Tensor& w_hh_,
    const optional<Tensor>& b_hh_, const optional<Tensor>& lengths, bool reverse, const Tensor& y_,
    const Tensor& gates_, const Tensor& hn_) {
  const char* op = "fusedrnn::gru_backward (cpu)";
  check_dtype(grad_y_, op);
  const bool bf16w = bf16_weight(w_hh_, grad_y_, op);  // (then w_hh's dtype is its own)
  check_tensor(grad_y_, op, "grad_y", grad_y_, 3);
  check_tensor(gates_, op, "gates", grad_y_, 3);
  const int64_t T = gates_.size(0), B = gates_.size(1), G = gates_.size(2);
  TORCH_CHECK(G % 3 == 0 && G > 0, op, ": gates' last dimension must be 3 * hidden_size, got ", G);
  const int64_t H = G / 3;
  check_shape(grad_y_, op, "grad_y", {T, B, H});
  for (auto [t, name, shape] : {std::make_tuple(&grad_h_n_, "grad_h_n", std::vector<int64_t>{B, H}),
                                std::make_tuple(&h0_, "h0", std::vector<int64_t>{B, H}),
                                std::make_tuple(&w_hh_, "w_hh", std::vector<int64_t>{G, H}),
                                std::make_tuple(&y_, "y", std::vector<int64_t>{T, B, H}),
                                std::make_tuple(&hn_, "hn", std::vector<int64_t>{T, B, H})}) {
    check_tensor(*t, op, name, bf16w && t == &w_hh_ ? w_hh_ : grad_y_, (int64_t)shape.size());
    check_shape(*t, op, name, shape);
  }
  Tensor b_hh = opt(b_hh_);
  if (b_hh.defined()) {
    check_tensor(b_hh, op, "b_hh", grad_y_, 1);
    check_shape(b_hh, op, "b_hh", {G});
  }
  Tensor L = check_lengths(lengths, op, T, B);
  Tensor grad_y = contiguous_pooled(grad_y_), grad_h_n = grad_h_n_.contiguous(), h0 = h0_.contiguous();
  Tensor w_hh = w_hh_.contiguous(), y = y_.contiguous(), gates = gates_.contiguous(), hn = hn_.contiguous();
  Tensor grad_gx = new_output({T, B, G}, grad_y), grad_h0 = new_output({B, H}, grad_y);
  Tensor dfirst = new_output({B, G}, grad_y), dgh = new_output({T, B, G}, grad_y);
  const SeqArgs seq(T, B, L, reverse);
  const Seq& sq = seq.sq;
  const bool done = bf16w && cpu::gru_backward_bf16(grad_y.data_ptr<float>(), grad_h_n.data_ptr<float>(),
                                                    h0.data_ptr<float>(), bf16_bits(w_hh), H, sq, y.data_ptr<float>(),
                                                    gates.data_ptr<float>(), hn.data_ptr<float>(),
                                                    grad_gx.data_ptr<float>(), grad_h0.data_ptr<float>(),
                                                    dfirst.data_ptr<float>(), dgh.data_ptr<float>());
  if (bf16w && !done) w_hh = bf16_to_float(w_hh, grad_y);
  if (!done) AT_DISPATCH_FLOATING_TYPES(grad_y.scalar_type(), "fusedrnn_gru_backward_cpu", [&] {
    cpu::gru_backward<scalar_t>(grad_y.data_ptr<scalar_t>(), grad_h_n.data_ptr<scalar_t>(),
                                h0.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(), H, sq, y.data_ptr<scalar_t>(),
                                gates.data_ptr<scalar_t>(), hn.data_ptr<scalar_t>(), grad_gx.data_ptr<scalar_t>(),
                                grad_h0.data_ptr<scalar_t>(), dfirst.data_ptr<scalar_t>(),
                                dgh.data_ptr<scalar_t>());
  });
  Tensor grad_w_hh = bf16w ? weight_grad_bf16(dgh, dfirst, h0, y, reverse)
                           : weight_grad(dgh, dfirst, h0, y, reverse, sq.active);
  Tensor grad_b_hh = b_hh.defined() ? dgh.sum(at::IntArrayRef{0, 1}) : at::empty({0}, grad_y.options());
  return {grad_gx, grad_h0, grad_w_hh, grad_b_hh};
}

// ----------------------------------------------------------------------------- RNN
std::tuple<Tensor, Tensor> rnn_forward_op(const Tensor& gx_, const Tensor& h0_, const Tensor& w_hh_,
                                       const optional<Tensor>& lengths, bool reverse, bool relu) {
  const char* op = "fusedrnn::rnn_forward (cpu)";
  check_dtype(gx_, op);
  check_tensor(gx_, op, "gx", gx_, 3);
  const int64_t T = gx_.size(0), B = gx_.size(1), H = gx_.size(2);
  TORCH_CHECK(H > 0, op, ": hidden_size must be positive");
  check_tensor(h0_, op, "h0", gx_, 2);
  const bool bf16w = bf16_weight(w_hh_, gx_, op);
  check_tensor(w_hh_, op, "w_hh", bf16w ? w_hh_ : gx_, 2);
  check_shape(h0_, op, "h0", {B, H});
  check_shape(w_hh_, op, "w_hh", {H, H});
  Tensor L = check_lengths(lengths, op, T, B);
  Tensor gx = gx_.contiguous(), h0 = h0_.contiguous(), w_hh = w_hh_.contiguous();
  Tensor y = new_output({T, B, H}, gx), h_n = new_output({B, H}, gx);
  const SeqArgs seq(T, B, L, reverse);
  const Seq& sq = seq.sq;
  if (bf16w && cpu::rnn_forward_bf16(gx.data_ptr<float>(), h0.data_ptr<float>(), bf16_bits(w_hh), H, relu, sq,
                                     y.data_ptr<float>(), h_n.data_ptr<float>()))
    return {y, h_n};
  if (bf16w) w_hh = bf16_to_float(w_hh, gx);
  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "fusedrnn_rnn_forward_cpu", [&] {
    cpu::rnn_forward<scalar_t>(gx.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(), H,
                               relu, sq, y.data_ptr<scalar_t>(), h_n.data_ptr<scalar_t>());
  });
  return {y, h_n};
}

std::tuple<Tensor, Tensor, Tensor> rnn_backward_op(const Tensor& grad_y_, const Tensor& grad_h_n_, const Tensor& h0_,
                                                const Tensor& w_hh_, const optional<Tensor>& lengths, bool reverse,
                                                bool relu, const Tensor& y_) {
  const char* op = "fusedrnn::rnn_backward (cpu)";
  check_dtype(grad_y_, op);
  const bool bf16w = bf16_weight(w_hh_, grad_y_, op);  // (then w_hh's dtype is its own)
  check_tensor(grad_y_, op, "grad_y", grad_y_, 3);
  const int64_t T = grad_y_.size(0), B = grad_y_.size(1), H = grad_y_.size(2);
  TORCH_CHECK(H > 0, op, ": hidden_size must be positive");
  for (auto [t, name, shape] : {std::make_tuple(&grad_h_n_, "grad_h_n", std::vector<int64_t>{B, H}),
                                std::make_tuple(&h0_, "h0", std::vector<int64_t>{B, H}),
                                std::make_tuple(&w_hh_, "w_hh", std::vector<int64_t>{H, H}),
                                std::make_tuple(&y_, "y", std::vector<int64_t>{T, B, H})}) {
    check_tensor(*t, op, name, bf16w && t == &w_hh_ ? w_hh_ : grad_y_, (int64_t)shape.size());
    check_shape(*t, op, name, shape);
  }
  Tensor L = check_lengths(lengths, op, T, B);
  Tensor grad_y = contiguous_pooled(grad_y_), grad_h_n = grad_h_n_.contiguous(), h0 = h0_.contiguous();
  Tensor w_hh = w_hh_.contiguous(), y = y_.contiguous();
  Tensor grad_gx = new_output({T, B, H}, grad_y), grad_h0 = new_output({B, H}, grad_y);
  Tensor dfirst = new_output({B, H}, grad_y);
  const SeqArgs seq(T, B, L, reverse);
  const Seq& sq = seq.sq;
  const bool done = bf16w && cpu::rnn_backward_bf16(grad_y.data_ptr<float>(), grad_h_n.data_ptr<float>(),
                                                    bf16_bits(w_hh), H, relu, sq, y.data_ptr<float>(),
                                                    grad_gx.data_ptr<float>(), grad_h0.data_ptr<float>(),
                                                    dfirst.data_ptr<float>());
  if (bf16w && !done) w_hh = bf16_to_float(w_hh, grad_y);
  if (!done) AT_DISPATCH_FLOATING_TYPES(grad_y.scalar_type(), "fusedrnn_rnn_backward_cpu", [&] {
    cpu::rnn_backward<scalar_t>(grad_y.data_ptr<scalar_t>(), grad_h_n.data_ptr<scalar_t>(),
                                w_hh.data_ptr<scalar_t>(), H, relu, sq, y.data_ptr<scalar_t>(),
                                grad_gx.data_ptr<scalar_t>(), grad_h0.data_ptr<scalar_t>(),
                                dfirst.data_ptr<scalar_t>());
  });
  Tensor grad_w_hh = bf16w ? weight_grad_bf16(grad_gx, dfirst, h0, y, reverse)
                           : weight_grad(grad_gx, dfirst, h0, y, reverse, sq.active);
  return {grad_gx, grad_h0, grad_w_hh};
}

// ----------------------------------------------------------------------------- both directions
// A bidirectional layer's two directions in inference, in one op call (fusedrnn/
// bidirectional.py: the modules call it where nothing records a gradient). Where neither
// direction's steps have the work to be split over threads, the two run at once, one per
// thread (the directions never interact), instead of one after the other on one thread
// while the other threads wait; elsewhere one after the other, each split as alone. The
// same kernels either way: the same results, bit for bit (an LSTM with projection to
// rounding: its h @ w_hr^T is BLAS's, one-threaded inside the region). step_work: a direction's
// multiply-adds per step. Not below 2^20 multiply-adds a direction: waking the other
// thread (a futex wake, and on a VM the idle vCPU's) cost about what it saved there, by
// how much depending on the host's state (modules, T=32, 9 interleaved rounds, minutes
// apart: RNN H=32 B=16 at 2^19 0.56x then 1.06x; LSTM H=32 B=4 0.96x then 1.17x); from
// 2^20 1.25-1.45x (LSTM H=64 B=4, H=128 B=1, GRU H=128 B=1, RNN H=256 B=1, ...).
constexpr int64_t kPairMinWork = int64_t(1) << 20;
bool directions_at_once(int64_t step_work, int64_t steps) {
  return at::get_num_threads() >= 2 && !at::in_parallel_region() && cpu::step_runs_on_one_thread(step_work) &&
         step_work * steps >= kPairMinWork;
}
template <typename F>
void both_directions(int64_t step_work, int64_t steps, const F& run) {
  if (!directions_at_once(step_work, steps)) {
    run(0);
    run(1);
    return;
  }
  at::parallel_for(0, 2, 1, [&](int64_t b, int64_t e) {
    for (int64_t d = b; d < e; ++d) run(d);
  });
}
int64_t step_work(const Tensor& gx, const Tensor& w_hh) { return gx.size(1) * w_hh.size(0) * w_hh.size(1); }

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward_pair_op(
    const Tensor& gx0, const Tensor& gx1, const Tensor& h00, const Tensor& h01, const Tensor& c00, const Tensor& c01,
    const Tensor& w0, const Tensor& w1, const optional<Tensor>& w_hr0, const optional<Tensor>& w_hr1,
    const optional<Tensor>& lengths) {
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> r[2];
  both_directions(std::max(step_work(gx0, w0), step_work(gx1, w1)), gx0.size(0), [&](int64_t d) {
    r[d] = d ? lstm_forward_op(gx1, h01, c01, w1, w_hr1, lengths, true, false)
             : lstm_forward_op(gx0, h00, c00, w0, w_hr0, lengths, false, false);
  });
  return {std::get<0>(r[0]), std::get<0>(r[1]), std::get<1>(r[0]), std::get<1>(r[1]), std::get<2>(r[0]),
          std::get<2>(r[1])};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_forward_pair_op(const Tensor& gx0, const Tensor& gx1, const Tensor& h00,
                                                              const Tensor& h01, const Tensor& w0, const Tensor& w1,
                                                              const optional<Tensor>& b0, const optional<Tensor>& b1,
                                                              const optional<Tensor>& lengths) {
  std::tuple<Tensor, Tensor, Tensor, Tensor> r[2];
  both_directions(std::max(step_work(gx0, w0), step_work(gx1, w1)), gx0.size(0), [&](int64_t d) {
    r[d] = d ? gru_forward_op(gx1, h01, w1, b1, lengths, true, false) : gru_forward_op(gx0, h00, w0, b0, lengths, false, false);
  });
  return {std::get<0>(r[0]), std::get<0>(r[1]), std::get<1>(r[0]), std::get<1>(r[1])};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rnn_forward_pair_op(const Tensor& gx0, const Tensor& gx1, const Tensor& h00,
                                                              const Tensor& h01, const Tensor& w0, const Tensor& w1,
                                                              const optional<Tensor>& lengths, bool relu) {
  std::tuple<Tensor, Tensor> r[2];
  both_directions(std::max(step_work(gx0, w0), step_work(gx1, w1)), gx0.size(0), [&](int64_t d) {
    r[d] = d ? rnn_forward_op(gx1, h01, w1, lengths, true, relu) : rnn_forward_op(gx0, h00, w0, lengths, false, relu);
  });
  return {std::get<0>(r[0]), std::get<0>(r[1]), std::get<1>(r[0]), std::get<1>(r[1])};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) {
  m.impl("lstm_forward", &lstm_forward_op);
  m.impl("lstm_backward", &lstm_backward_op);
  m.impl("gru_forward", &gru_forward_op);
  m.impl("gru_backward", &gru_backward_op);
  m.impl("rnn_forward", &rnn_forward_op);
  m.impl("rnn_backward", &rnn_backward_op);
  m.impl("projection", &projection_op);
  m.impl("projection_backward", &projection_backward_op);
  m.impl("projection_rows", &projection_rows_op);
  m.impl("packed_layout", &packed_layout_op);
  m.impl("lstm_forward_pair", &lstm_forward_pair_op);
  m.impl("gru_forward_pair", &gru_forward_pair_op);
  m.impl("rnn_forward_pair", &rnn_forward_pair_op);
  m.impl("projection_bf16", &projection_bf16_op);
}

}  // namespace cpu
}  // namespace fusedrnn

// The Python module fusedrnn._C: importing it registers the kernels above.
namespace {
// The kernels' packed weights come from the output pool too (kernels.h, Scratch).
void* scratch_alloc(size_t bytes, void** handle) {
  auto* dp = new c10::DataPtr(fusedrnn::cpu::OutputPool::get().allocate(bytes));
  *handle = dp;
  return dp->get();
}
void scratch_release(void* handle) { delete static_cast<c10::DataPtr*>(handle); }
const bool scratch_set = [] {
  fusedrnn::cpu::set_scratch({&scratch_alloc, &scratch_release});
  return true;
}();
PyObject* simd_path(PyObject*, PyObject*) { return PyUnicode_FromString(fusedrnn::cpu::simd_path()); }
PyObject* bf16_kernels_run(PyObject*, PyObject* args) {
  long long steps = 0;
  if (!PyArg_ParseTuple(args, "L", &steps)) return nullptr;
  return PyBool_FromLong(fusedrnn::cpu::bf16_kernels_run((int64_t)steps));
}
PyObject* pool_bytes(PyObject*, PyObject*) {
  return PyLong_FromSize_t(fusedrnn::cpu::OutputPool::get().pooled_bytes());
}
PyObject* pool_hold_lock(PyObject*, PyObject* args) {
  int ms = 0;
  if (!PyArg_ParseTuple(args, "i", &ms)) return nullptr;
  fusedrnn::cpu::OutputPool::get().hold_lock_for_test(ms);
  Py_RETURN_NONE;
}
PyObject* gemm_test_delay(PyObject*, PyObject* args) {
  int us = 0;
  if (!PyArg_ParseTuple(args, "i", &us)) return nullptr;
  return PyLong_FromLongLong((long long)fusedrnn::cpu::gemm_test_delay(us));
}
PyObject* calling_thread_threads(PyObject*, PyObject*) {
  int kernels = 0, blas = 0;
  fusedrnn::cpu::calling_thread_threads(&kernels, &blas);
  return Py_BuildValue("(ii)", kernels, blas);
}
// _set_options(tiled: int, min_work: int, split: int = -1) -> (old_tiled, old_min_work,
// old_split); -1 / 0 / -1 keep a value.
PyObject* set_options(PyObject*, PyObject* args) {
  int tiled = -1, split = -1;
  long long min_work = 0;
  if (!PyArg_ParseTuple(args, "iL|i", &tiled, &min_work, &split)) return nullptr;
  int old_tiled = 0, old_split = 0;
  int64_t old_min_work = 0;
  fusedrnn::cpu::set_options(tiled, (int64_t)min_work, split, &old_tiled, &old_min_work, &old_split);
  return Py_BuildValue("(iLi)", old_tiled, (long long)old_min_work, old_split);
}
PyObject* directions_at_once_py(PyObject*, PyObject* args) {
  long long work = 0, steps = 0;
  if (!PyArg_ParseTuple(args, "LL", &work, &steps)) return nullptr;
  return PyBool_FromLong(fusedrnn::cpu::directions_at_once((int64_t)work, (int64_t)steps));
}
PyMethodDef methods[] = {
    {"simd_path", simd_path, METH_NOARGS, "elementwise code path in use: avx2 or baseline"},
    {"directions_at_once", directions_at_once_py, METH_VARARGS,
     "directions_at_once(step_work, steps) -> whether the *_forward_pair ops run a bidirectional layer's "
     "directions at once, one thread each, for `steps` steps of step_work multiply-adds (else one after the other)"},
    {"bf16_kernels_run", bf16_kernels_run, METH_VARARGS,
     "bf16_kernels_run(steps) -> whether the sequence ops run a bfloat16 w_hh on AVX512-BF16 dot products "
     "for a sequence of `steps` steps (else they cast it to float32)"},
    {"_pool_bytes", pool_bytes, METH_NOARGS,
     "bytes of freed op outputs the cpu output pool holds for reuse (FUSEDRNN_CPU_POOL_MB caps it)"},
    {"_pool_hold_lock_for_test", pool_hold_lock, METH_VARARGS,
     "_pool_hold_lock_for_test(ms): a background thread holds the output pool's lock for ms milliseconds"},
    {"_gemm_test_delay", gemm_test_delay, METH_VARARGS,
     "_gemm_test_delay(us) -> units run by another thread than their owner so far: from now on the last "
     "thread of each float32 GEMM (projection, dx, weight gradients) waits before its own work until another "
     "thread has taken one of its units, at most us microseconds (0: not). For tests."},
    {"_calling_thread_threads", calling_thread_threads, METH_NOARGS,
     "_calling_thread_threads() -> (kernels, blas): the threads a large step's kernels would use on the "
     "calling thread now, and its BLAS calls (-1: BLAS is not MKL). For tests: a cell op's small step runs "
     "on the calling thread alone and must leave both as they were."},
    {"_set_options", set_options, METH_VARARGS,
     "_set_options(tiled, min_work, split=-1) -> previous (tiled, min_work, split): float32 GEMM kernels: "
     "BLAS (0), packed-panel AVX2 micro-kernels (1), those with the recurrent steps in AVX-512's 32 "
     "registers (2), with 4-vector panels on 16-float zmm vectors (3) (the default where the CPU has AVX-512: 3 "
     "where it runs 512-bit FMAs at full width, else 2; without AVX-512 lowered to 1), unchanged (-1); "
     "multiply-adds per thread per step before a step is split over threads (<= 0: unchanged); how "
     "threads share a time loop: chosen per call (0), by hidden units (1), by batch rows where the "
     "kernel can (2), unchanged (-1). For tests and benchmarks."},
    {nullptr, nullptr, 0, nullptr}};
PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                      "fusedrnn CPU kernels (registered for the CPU dispatch key of the fusedrnn::* ops)", -1,
                      methods};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
