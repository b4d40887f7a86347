// fusedrnn._emulated: the `_emulated` recurrence ops (the CUDA kernel sources run on CPU
// tensors by the emulator, csrc/emulation/kernels.cpp) registered for the CPU dispatch
// key, plus Python bindings of the emulator's self-test kernels and schedule control.
// Schemas are declared in Python (fusedrnn/ops.py: ops.define("emulated")).
#include <torch/extension.h>
#include <torch/library.h>

#define FRNN_STREAM() (static_cast<void*>(nullptr))
#define FRNN_DEVICE_GUARD(t) TORCH_CHECK((t).device().is_cpu(), "fusedrnn emulated backend: CPU tensors only")
#include "cuda/glue.h"
#include "emulation/selftest.h"

namespace g = fusedrnn::glue;

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) {
  m.impl("lstm_forward_emulated", &g::lstm_forward);
  m.impl("lstm_backward_emulated", &g::lstm_backward);
  m.impl("gru_forward_emulated", &g::gru_forward);
  m.impl("gru_backward_emulated", &g::gru_backward);
  m.impl("rnn_forward_emulated", &g::rnn_forward);
  m.impl("rnn_backward_emulated", &g::rnn_backward);
}

namespace {
using at::Tensor;

void check_cpu(const Tensor& t, at::ScalarType dt) {
  TORCH_CHECK(t.is_cpu() && t.is_contiguous() && t.scalar_type() == dt, "selftest: contiguous CPU ", dt, " expected");
}

Tensor neighbor(const Tensor& in, int64_t blocks, int64_t threads, int64_t iters, bool a, bool b) {
  check_cpu(in, at::kFloat);
  TORCH_CHECK(in.numel() == blocks * threads);
  Tensor out = at::full_like(in, NAN);
  emu_selftest::neighbor(in.data_ptr<float>(), out.data_ptr<float>(), blocks, threads, iters, a, b);
  return out;
}

std::vector<Tensor> warp(const Tensor& in) {
  check_cpu(in, at::kFloat);
  const int64_t n = in.numel();
  TORCH_CHECK(n % 64 == 0);
  Tensor xs = at::full_like(in, NAN), ds = at::full_like(in, NAN), bc = at::full_like(in, NAN),
         pre = at::full_like(in, NAN);
  Tensor ballot = at::zeros({n / 32}, in.options().dtype(at::kInt));
  Tensor all_any = at::full({n, 2}, -1, in.options().dtype(at::kInt));
  emu_selftest::warp(in.data_ptr<float>(), n, xs.data_ptr<float>(), ds.data_ptr<float>(), bc.data_ptr<float>(),
                     pre.data_ptr<float>(), reinterpret_cast<unsigned*>(ballot.data_ptr<int>()),
                     all_any.data_ptr<int>());
  return {xs, ds, bc, pre, ballot, all_any};
}

std::vector<Tensor> atomics(const Tensor& bins, const Tensor& vals, int64_t nbins) {
  check_cpu(bins, at::kInt);
  check_cpu(vals, at::kFloat);
  Tensor hist = at::zeros({nbins}, bins.options()), total = at::zeros({1}, vals.options());
  Tensor mx = at::full({1}, -1, bins.options()), cas = at::zeros({1}, bins.options());
  emu_selftest::atomics(bins.data_ptr<int>(), vals.data_ptr<float>(), bins.numel(), hist.data_ptr<int>(),
                        total.data_ptr<float>(), mx.data_ptr<int>(), cas.data_ptr<int>());
  return {hist, total, mx, cas};
}

Tensor grid(const Tensor& in, int64_t blocks, int64_t threads, bool barrier) {
  check_cpu(in, at::kFloat);
  TORCH_CHECK(in.numel() == blocks * threads);
  Tensor partial = at::full({blocks}, NAN, in.options()), out = at::full_like(in, NAN);
  emu_selftest::grid(in.data_ptr<float>(), partial.data_ptr<float>(), out.data_ptr<float>(), blocks, threads, barrier);
  return out;
}

Tensor index_ids(std::vector<int64_t> g, std::vector<int64_t> b) {
  TORCH_CHECK(g.size() == 3 && b.size() == 3);
  unsigned gg[3], bb[3];
  for (int i = 0; i < 3; ++i) gg[i] = g[i], bb[i] = b[i];
  Tensor out = at::full({g[0] * g[1] * g[2] * b[0] * b[1] * b[2]}, -1, at::kInt);
  emu_selftest::index(out.data_ptr<int>(), gg, bb);
  return out;
}

std::vector<Tensor> convert(const Tensor& in) {
  check_cpu(in, at::kFloat);
  const int64_t n = in.numel();
  Tensor h = at::empty({n}, at::kShort), bf = at::empty({n}, at::kShort);
  Tensor hb = at::empty({n}, at::kFloat), bb = at::empty({n}, at::kFloat);
  emu_selftest::convert(in.data_ptr<float>(), reinterpret_cast<uint16_t*>(h.data_ptr<int16_t>()),
                        reinterpret_cast<uint16_t*>(bf.data_ptr<int16_t>()), hb.data_ptr<float>(),
                        bb.data_ptr<float>(), n);
  return {h, bf, hb, bb};
}

void divergent_barrier() {
  Tensor out = at::zeros({32}, at::kFloat);
  emu_selftest::divergent_barrier(out.data_ptr<float>());
}

void set_drop_barrier(const std::string& site) { emu_selftest::set_drop_barrier(site.c_str()); }
std::vector<std::string> barrier_sites() {
  std::vector<std::string> v;
  for (int i = 0; i < emu_selftest::barrier_site_count(); ++i) v.push_back(emu_selftest::barrier_site(i));
  return v;
}

std::tuple<int64_t, int64_t> get_schedule() {
  int mode;
  unsigned seed;
  emu_selftest::get_schedule(&mode, &seed);
  return {mode, seed};
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedrnn CUDA kernels under the CPU emulation of the CUDA execution model";
  // The part-1 tests test the per-step kernels: per_step unless FUSEDRNN_CUDA_ALGO says otherwise.
  const char* algo_env = std::getenv("FUSEDRNN_CUDA_ALGO");
  if (!algo_env || !*algo_env) fusedrnn::cuda::set_algo("per_step");
  m.def("set_algo", [](const std::string& a) { fusedrnn::cuda::set_algo(a.c_str()); },
        "'auto' | 'per_step' | 'persistent' (csrc/cuda/api.h)");
  m.def("get_algo", [] { return std::string(fusedrnn::cuda::algo_name(fusedrnn::cuda::get_algo())); });
  m.def("last_algo", &fusedrnn::cuda::last_algo, "the algorithm the latest call chose, and why");
  m.def("set_pretend_device", &fusedrnn::cuda::set_pretend_device,
        "SM count, shared memory per block (bytes) and compute capability (major) of the device the emulation "
        "plans for", pybind11::arg("sms"), pybind11::arg("smem_per_block"), pybind11::arg("cc_major") = 8);
  m.def("get_pretend_device", [] {
    std::lock_guard<std::mutex> l(fusedrnn::cuda::algo_state().m);
    const auto& s = fusedrnn::cuda::algo_state();
    return std::make_tuple(s.pretend_sms, s.pretend_smem, s.pretend_cc_major);
  });
  m.def("set_drop_grid_sync", &emu_selftest::set_drop_grid_sync, "make every grid.sync() a no-op (mutation tests)");
  m.def("set_schedule", &emu_selftest::set_schedule, "mode: 0 alternate, 1 reversed, 2 forward, 3 random; seed",
        pybind11::arg("mode"), pybind11::arg("seed") = 12345u);
  m.def("get_schedule", &get_schedule);
  m.def("set_drop_barrier", &set_drop_barrier, "make the __syncthreads at 'file:line' a no-op ('' restores all)");
  m.def("barrier_sites", &barrier_sites, "every __syncthreads call site executed so far ('file:line')");
  m.def("selftest_neighbor", &neighbor);
  m.def("selftest_warp", &warp);
  m.def("selftest_atomics", &atomics);
  m.def("selftest_grid", &grid);
  m.def("selftest_index", &index_ids);
  m.def("selftest_convert", &convert);
  m.def("selftest_divergent_barrier", &divergent_barrier);
}
