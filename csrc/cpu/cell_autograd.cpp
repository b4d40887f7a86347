// Autograd of the one-step cell ops (fusedrnn/cell_ops.py), in C++ for the Autograd
// dispatch key: forward = the op below autograd, backward = the cell's backward op.
//
// Why C++ and not torch.library.register_autograd (what the sequence ops use): a cell op
// is called once per step, and the Python autograd wrapper cost ~60 us per call on the
// 2-core VM (RNNCell H=64 B=4: the op alone ~18 us), which made a training step of
// fusedrnn's cells slower than torch.nn's. This is the only TU with the autograd headers.
// (The backward ops' own autograd, which refuses double backward, is registered in Python.)
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace fusedrnn {
namespace cpu {
namespace {

using at::Tensor;
using c10::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

bool has(const optional<Tensor>& t) { return t.has_value() && t->defined(); }
Tensor or_zeros(const Tensor& g, const Tensor& like) { return g.defined() ? g.contiguous() : at::zeros_like(like); }
Tensor if_needed(const Tensor& g, bool need) { return need ? g : Tensor(); }

// Calls a backward op from a backward(). The backward ops' own autograd (it refuses double
// backward) is torch.library's Python wrapper, ~25 us a call (RNNCell H=64 B=4: the backward
// op's CPU kernel is ~10 us). Without create_graph, grad mode is off and it would only pass
// the call on, so the call goes below autograd; with create_graph it goes through it.
template <typename F>
auto call_backward(const F& f) {
  if (at::GradMode::is_enabled()) return f();
  at::AutoDispatchBelowADInplaceOrView guard;
  return f();
}

// Which gradients the backward op computes: the state's (need_h: h, or c for the LSTM's
// grad_c, which comes with it), the input's, the weights' and biases'. Edge indices count
// only the defined tensor inputs: x, h, [c,] w_ih, w_hh, then b_ih, b_hh if present.
struct Needs {
  bool h, x, w;
  Needs(AutogradContext* ctx, int n_state, bool bias) {
    x = ctx->needs_input_grad(0);
    h = ctx->needs_input_grad(1);
    w = ctx->needs_input_grad(1 + n_state) || ctx->needs_input_grad(2 + n_state) ||
        (bias && (ctx->needs_input_grad(3 + n_state) || ctx->needs_input_grad(4 + n_state)));
  }
};

// ----------------------------------------------------------------------------- LSTM
using LstmSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                   const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                                                   bool);
using LstmBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool,
    const Tensor&, const Tensor&, bool, bool, bool);

struct LstmCell : torch::autograd::Function<LstmCell> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& h, const Tensor& c,
                               const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
                               const optional<Tensor>& b_hh, bool train) {
    static const auto op = op_handle<LstmSig>("fusedrnn::lstm_cell");
    auto [h1, c1, gates] = [&] {
      at::AutoDispatchBelowADInplaceOrView guard;
      return op.call(x, h, c, w_ih, w_hh, b_ih, b_hh, train);
    }();
    ctx->save_for_backward({x, h, c, w_ih, w_hh, gates, c1});
    ctx->saved_data["bias"] = has(b_ih);
    ctx->saved_data["train"] = train;
    ctx->mark_non_differentiable({gates});
    ctx->set_materialize_grads(false);
    return {h1, c1, gates};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(ctx->saved_data["train"].toBool(),
                "fusedrnn: backward through lstm_cell called with train=False; call it with train=True");
    static const auto op = op_handle<LstmBwdSig>("fusedrnn::lstm_cell_backward");
    const auto s = ctx->get_saved_variables();
    const bool bias = ctx->saved_data["bias"].toBool();
    const Needs n(ctx, 2, bias);
    auto [gx, gh, gc, gwih, gwhh, gb] = call_backward([&] {
      return op.call(or_zeros(grads[0], s[6]), or_zeros(grads[1], s[6]), s[0], s[1], s[2], s[3], s[4], bias, s[5],
                     s[6], n.h, n.x, n.w);
    });
    const Tensor b = if_needed(gb, n.w && bias);
    return {if_needed(gx, n.x), if_needed(gh, n.h), gc, if_needed(gwih, n.w), if_needed(gwhh, n.w), b, b, Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> lstm_cell_autograd(const Tensor& x, const Tensor& h, const Tensor& c,
                                                      const Tensor& w_ih, const Tensor& w_hh,
                                                      const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
                                                      bool train) {
  auto r = LstmCell::apply(x, h, c, w_ih, w_hh, b_ih, b_hh, train);
  return {r[0], r[1], r[2]};
}

// ----------------------------------------------------------------------------- GRU
using GruSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                  const optional<Tensor>&, const optional<Tensor>&, bool);
using GruBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool, const Tensor&, const Tensor&,
    const Tensor&, bool, bool, bool);

struct GruCell : torch::autograd::Function<GruCell> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& h, const Tensor& w_ih,
                               const Tensor& w_hh, const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
                               bool train) {
    static const auto op = op_handle<GruSig>("fusedrnn::gru_cell");
    auto [h1, gates, hn] = [&] {
      at::AutoDispatchBelowADInplaceOrView guard;
      return op.call(x, h, w_ih, w_hh, b_ih, b_hh, train);
    }();
    ctx->save_for_backward({x, h, w_ih, w_hh, h1, gates, hn});
    ctx->saved_data["bias"] = has(b_ih);
    ctx->saved_data["train"] = train;
    ctx->mark_non_differentiable({gates, hn});
    ctx->set_materialize_grads(false);
    return {h1, gates, hn};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(ctx->saved_data["train"].toBool(),
                "fusedrnn: backward through gru_cell called with train=False; call it with train=True");
    static const auto op = op_handle<GruBwdSig>("fusedrnn::gru_cell_backward");
    const auto s = ctx->get_saved_variables();
    const bool bias = ctx->saved_data["bias"].toBool();
    const Needs n(ctx, 1, bias);
    auto [gx, gh, gwih, gwhh, gbih, gbhh] = call_backward([&] {
      return op.call(or_zeros(grads[0], s[4]), s[0], s[1], s[2], s[3], bias, s[4], s[5], s[6], n.h, n.x, n.w);
    });
    return {if_needed(gx, n.x),    if_needed(gh, n.h),           if_needed(gwih, n.w),
            if_needed(gwhh, n.w),  if_needed(gbih, n.w && bias), if_needed(gbhh, n.w && bias),
            Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> gru_cell_autograd(const Tensor& x, const Tensor& h, const Tensor& w_ih,
                                                     const Tensor& w_hh, const optional<Tensor>& b_ih,
                                                     const optional<Tensor>& b_hh, bool train) {
  auto r = GruCell::apply(x, h, w_ih, w_hh, b_ih, b_hh, train);
  return {r[0], r[1], r[2]};
}

// ----------------------------------------------------------------------------- RNN
using RnnSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
                      const optional<Tensor>&, bool);
using RnnBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                     const Tensor&, const Tensor&, bool, bool,
                                                                     const Tensor&, bool, bool, bool);

struct RnnCell : torch::autograd::Function<RnnCell> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& h, const Tensor& w_ih,
                        const Tensor& w_hh, const optional<Tensor>& b_ih, const optional<Tensor>& b_hh, bool relu) {
    static const auto op = op_handle<RnnSig>("fusedrnn::rnn_cell");
    Tensor h1 = [&] {
      at::AutoDispatchBelowADInplaceOrView guard;
      return op.call(x, h, w_ih, w_hh, b_ih, b_hh, relu);
    }();
    ctx->save_for_backward({x, h, w_ih, w_hh, h1});
    ctx->saved_data["bias"] = has(b_ih);
    ctx->saved_data["relu"] = relu;
    return h1;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<RnnBwdSig>("fusedrnn::rnn_cell_backward");
    const auto s = ctx->get_saved_variables();
    const bool bias = ctx->saved_data["bias"].toBool();
    const Needs n(ctx, 1, bias);
    const bool relu = ctx->saved_data["relu"].toBool();
    auto [gx, gh, gwih, gwhh, gb] = call_backward([&] {
      return op.call(grads[0].contiguous(), s[0], s[1], s[2], s[3], bias, relu, s[4], n.h, n.x, n.w);
    });
    const Tensor b = if_needed(gb, n.w && bias);
    return {if_needed(gx, n.x), if_needed(gh, n.h), if_needed(gwih, n.w), if_needed(gwhh, n.w), b, b, Tensor()};
  }
};

Tensor rnn_cell_autograd(const Tensor& x, const Tensor& h, const Tensor& w_ih, const Tensor& w_hh,
                         const optional<Tensor>& b_ih, const optional<Tensor>& b_hh, bool relu) {
  return RnnCell::apply(x, h, w_ih, w_hh, b_ih, b_hh, relu);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedrnn, Autograd, m) {
  m.impl("lstm_cell", &lstm_cell_autograd);
  m.impl("gru_cell", &gru_cell_autograd);
  m.impl("rnn_cell", &rnn_cell_autograd);
}

}  // namespace cpu
}  // namespace fusedrnn
