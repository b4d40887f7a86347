// Helpers shared by the CPU op implementations (register.cpp: the sequence ops;
// cell_ops.cpp: the one-step cell ops): output allocation and argument checks.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdlib>
#include <limits>
#include <string>

#include "cpu/output_pool.h"

namespace fusedrnn {
namespace cpu {

using at::Tensor;

inline bool poison() {
  static const bool on = [] {
    const char* v = std::getenv("FUSEDRNN_POISON");
    return v && std::string(v) == "1";
  }();
  return on;
}

// An output the kernel must fully write (memory from the output pool, see output_pool.h):
// NaN-filled first under FUSEDRNN_POISON=1.
inline Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  Tensor t = OutputPool::get().empty(shape, options);
  if (poison()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}
inline Tensor new_output(at::IntArrayRef shape, const Tensor& like) { return new_output(shape, like.options()); }

// `t` if it is contiguous, else a contiguous copy in memory from the output pool. For the
// backward ops' incoming gradients, which are often not contiguous (y.sum()'s is an
// expanded scalar): ATen's .contiguous() takes fresh memory and page-faults it in
// (~270 us for a 1 MB grad_y in an LSTM training step at B=32 H=256: 1.5% of the step).
inline Tensor contiguous_pooled(const Tensor& t) {
  if (t.is_contiguous()) return t;
  Tensor c = OutputPool::get().empty(t.sizes(), t.options());
  c.copy_(t);
  return c;
}

// A saved tensor of a forward op: with train=False (inference) an empty tensor, and
// the kernel gets nullptr for it and skips those writes (see kernels.h).
inline Tensor saved_output(at::IntArrayRef shape, const Tensor& like, bool train) {
  return train ? new_output(shape, like) : like.new_empty({0});
}

inline void check_tensor(const Tensor& t, const char* op, const char* name, const Tensor& ref, int64_t dim) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor (got ", t.device(), ")");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but the first argument (gx, grad_y, x or grad_h1) has dtype ", ref.scalar_type(), "; all floating-point arguments must match");
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_shape(const Tensor& t, const char* op, const char* name, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, op, ": ", name, " must have shape ", want, ", got ", t.sizes());
}

inline void check_dtype(const Tensor& ref, const char* op) {
  TORCH_CHECK(ref.scalar_type() == at::kFloat || ref.scalar_type() == at::kDouble, op,
              ": the cpu backend supports float32 and float64, got ", ref.scalar_type());
}

inline Tensor opt(const c10::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

}  // namespace cpu
}  // namespace fusedrnn
