// Autograd of the cpu backend's ops in C++: the one-step cell ops (fusedrnn/cell_ops.py,
// for every device: Autograd) and, for CPU tensors (AutogradCPU), the sequence ops
// (fusedrnn/schema.py) and the input projection (fusedrnn/projection.py). Each forward
// runs the op below autograd; each backward calls the op's backward op.
//
// Why C++ and not torch.library.register_autograd: the Python wrapper costs ~50-60 us per
// op call on the 2-core VM, forward and backward. For a cell op, called once per step,
// that made a training step slower than torch.nn's (RNNCell H=64 B=4: the op alone
// ~18 us). For a layer's projection + sequence op it was ~0.2-0.3 ms of a training
// iteration: a tenth of LSTM B=1 H=256 T=64. The sequence ops' Python registration
// (fusedrnn/ops.py, alias Autograd) stays for the CUDA kernels, which share the ops: a
// kernel registered to AutogradCPU takes precedence over the alias for CPU tensors. This
// is the only TU with the autograd headers. (The backward ops' own autograd, which
// refuses double backward, is registered in Python.)
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>

#include "cpu/cell_grads.h"

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
// grad_or_zeros (cell_grads.h): the sequence ops' C++ takes strided gradients
// (contiguous_pooled in op_utils.h); the cell ops want them contiguous.
Tensor or_zeros(const Tensor& g, const Tensor& like) { return grad_or_zeros(g, like).contiguous(); }
// A forward op called with train=False kept no saved state: its backward refuses.
void check_trained(AutogradContext* ctx, const char* op) {
  TORCH_CHECK(ctx->saved_data["train"].toBool(), "fusedrnn: backward through ", op,
              " called with train=False, which keeps no saved state for the backward; call it with "
              "train=True when a gradient is needed");
}
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

optional<Tensor> opt(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : c10::nullopt; }

// ----------------------------------------------------------------------------- double backward
// A backward called with create_graph=True runs with grad mode on. There the fused
// backward kernels (first derivatives only) are replaced by differentiable ops, so the
// gradients can be differentiated again, to any order. The cell ops run their gradient
// formulas in ATen ops (cell_grads.h). The sequence ops run the reference backward on
// their saved output y (fusedrnn::sequence_grads, fusedrnn/double_backward.py), with
// gx = x @ w_ih^T + b recomputed for the LSTM and GRU (sequence_grads below).

// The gates a cell op's forward saved, as a differentiable function of the step's inputs
// (x, h, w_ih, w_hh, b_ih, b_hh) for its create_graph backward (cell_grads.h): forward
// returns a copy of them (LSTM: i, f, g, o; GRU: r, z, n and hn, the GRU op's other saved
// tensor: [gates | hn]), backward their gradient through the pre-activations into the
// inputs. The gates are saved as this node's output, so a backward of that backward
// differentiates through them again: any order.
struct SavedGates : torch::autograd::Function<SavedGates> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& h, const Tensor& w_ih,
                        const Tensor& w_hh, const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
                        const Tensor& gates, const optional<Tensor>& hn) {
    Tensor act = hn ? at::cat({gates, *hn}, 1) : gates.clone();
    ctx->save_for_backward({x, h, w_ih, w_hh, act});
    ctx->saved_data["bias"] = has(b_ih);
    ctx->saved_data["lstm"] = !hn;
    return act;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const bool bias = ctx->saved_data["bias"].toBool();
    const auto [dgi, dgh] = ctx->saved_data["lstm"].toBool() ? grads::lstm_gates_to_preactivations(s[4], grads[0])
                                                              : grads::gru_gates_to_preactivations(s[4], grads[0]);
    const auto need = [&](int i) { return ctx->needs_input_grad(i); };  // x, h, w_ih, w_hh, b_ih, b_hh
    auto r = grads::from_preactivations(s[0], s[1], s[2], s[3], dgi, dgh, Tensor(), {},
                                        {need(0), need(1), need(2), need(3), bias && need(4), bias && need(5)});
    r.resize(8);  // (gates, hn: constants here)
    return r;
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
    ctx->save_for_backward({x, h, c, w_ih, w_hh, gates, c1, b_ih.value_or(Tensor()), b_hh.value_or(Tensor())});
    ctx->saved_data["bias"] = has(b_ih);
    ctx->saved_data["train"] = train;
    ctx->mark_non_differentiable({gates});
    ctx->set_materialize_grads(false);
    return {h1, c1, gates};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_trained(ctx, "lstm_cell");
    static const auto op = op_handle<LstmBwdSig>("fusedrnn::lstm_cell_backward");
    const auto s = ctx->get_saved_variables();
    const bool bias = ctx->saved_data["bias"].toBool();
    const Needs n(ctx, 2, bias);
    if (at::GradMode::is_enabled()) {  // create_graph: see cell_grads.h
      const auto need = [&](int i) { return ctx->needs_input_grad(i); };  // x, h, c, w_ih, w_hh, b_ih, b_hh
      const Tensor act = SavedGates::apply(s[0], s[1], s[3], s[4], opt(s[7]), opt(s[8]), s[5], c10::nullopt);
      auto r = grads::lstm_cell(s[0], s[1], s[2], s[3], s[4], act, s[6], grads[0], grads[1],
                                {need(0), need(1), need(2), need(3), need(4), bias && need(5), bias && need(6)});
      r.emplace_back();  // (train)
      return r;
    }
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
    ctx->save_for_backward({x, h, w_ih, w_hh, h1, gates, hn, b_ih.value_or(Tensor()), b_hh.value_or(Tensor())});
    ctx->saved_data["bias"] = has(b_ih);
    ctx->saved_data["train"] = train;
    ctx->mark_non_differentiable({gates, hn});
    ctx->set_materialize_grads(false);
    return {h1, gates, hn};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_trained(ctx, "gru_cell");
    static const auto op = op_handle<GruBwdSig>("fusedrnn::gru_cell_backward");
    const auto s = ctx->get_saved_variables();
    const bool bias = ctx->saved_data["bias"].toBool();
    const Needs n(ctx, 1, bias);
    if (at::GradMode::is_enabled()) {  // create_graph: see cell_grads.h
      const auto need = [&](int i) { return ctx->needs_input_grad(i); };  // x, h, w_ih, w_hh, b_ih, b_hh
      const Tensor act = SavedGates::apply(s[0], s[1], s[2], s[3], opt(s[7]), opt(s[8]), s[5], s[6]);
      auto r = grads::gru_cell(s[0], s[1], s[2], s[3], act, grads[0],
                               {need(0), need(1), need(2), need(3), bias && need(4), bias && need(5)});
      r.emplace_back();  // (train)
      return r;
    }
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
    ctx->save_for_backward({x, h, w_ih, w_hh, h1, b_ih.value_or(Tensor()), b_hh.value_or(Tensor())});
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
    if (at::GradMode::is_enabled()) {  // create_graph: see cell_grads.h
      const auto need = [&](int i) { return ctx->needs_input_grad(i); };  // x, h, w_ih, w_hh, b_ih, b_hh
      auto r = grads::rnn_cell(s[0], s[1], s[2], s[3], s[4], relu, grads[0],
                               {need(0), need(1), need(2), need(3), bias && need(4), bias && need(5)});
      r.emplace_back();  // (relu)
      return r;
    }
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

// ----------------------------------------------------------------------------- input projection
using ProjSig = Tensor(const Tensor&, const Tensor&, const optional<Tensor>&);
using ProjBwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, bool, bool, bool);

// A layer whose input projection needs no gradient (x, w_ih and the biases in gx all
// frozen, e.g. fine-tuning only w_hh or a learned h0) gets no projection node, so the
// sequence op could not find what to recompute gx from in a create_graph backward.
// Keeping gx for that would cost its memory in every training step; instead the
// projection notes its inputs here (references: x is the layer's input, w and b the
// layer's weights or a bias sum) and the sequence op called next in this thread on that
// gx takes them (gx_source). Any sequence op clears the note, so a projection called on
// its own keeps its inputs alive only until the thread's next projection or sequence op;
// gx is referenced weakly, only to recognize it.
struct FrozenProjection {
  c10::optional<c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>> gx;
  Tensor x, w, b;
};
thread_local FrozenProjection frozen_projection;

// (Called after Function::apply, which runs forward with grad mode off.)
void note_frozen_projection(const Tensor& gx, const Tensor& x, const Tensor& w, const optional<Tensor>& b) {
  if (at::GradMode::is_enabled() && !gx.requires_grad())
    frozen_projection = {c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(gx.getIntrusivePtr()),
                         x, w, b.value_or(Tensor())};
  else
    frozen_projection = {};
}

// x @ w^T + b's gradients in differentiable ATen ops (the projections' create_graph
// backward, and ProjectionBf16's always), for g [M, G] and x2 [M, I]: {dx [M, I], dw, db}
// where needed. The GEMMs take gm: g itself, or g rounded to bfloat16 (ProjectionBf16).
variable_list linear_grads(const Tensor& g, const Tensor& gm, const Tensor& x2, const Tensor& w, bool nx, bool nw,
                           bool nb) {
  return {nx ? gm.mm(w) : Tensor(), nw ? gm.t().mm(x2) : Tensor(), nb ? g.sum(0) : Tensor()};
}

// Which of a projection node's inputs (x, w, b) need a gradient. needs_input_grad counts
// only the defined tensor inputs: b's index exists only with b.
struct ProjNeeds {
  bool x, w, b;
  explicit ProjNeeds(AutogradContext* ctx)
      : x(ctx->needs_input_grad(0)),
        w(ctx->needs_input_grad(1)),
        b(ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2)) {}
};

// linear_grads on a projection node's saved x [..., I] and w [G, I] (s[0], s[1]), dx in
// x's shape. bf16: the GEMMs take the incoming gradient rounded to bfloat16 (ProjectionBf16).
variable_list saved_linear_grads(const variable_list& s, const Tensor& grad, const ProjNeeds& n, bool bf16) {
  const Tensor &x = s[0], &w = s[1];  // (w's sizes: x's may be symbolic under opcheck)
  const Tensor g = grad.reshape({-1, w.size(0)});
  auto r = linear_grads(g, bf16 ? g.to(at::kBFloat16) : g, x.reshape({-1, w.size(1)}), w, n.x, n.w, n.b);
  if (n.x) r[0] = r[0].view_as(x);
  return r;
}

// The forward of Projection and ProjectionBf16: the op below autograd, x, w, b saved (b
// only for a double backward: gx_source).
Tensor project_saving_inputs(AutogradContext* ctx, const c10::TypedOperatorHandle<ProjSig>& op, const Tensor& x,
                             const Tensor& w, const optional<Tensor>& b) {
  Tensor out = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, w, b);
  }();
  ctx->save_for_backward({x, w, b.value_or(Tensor())});
  ctx->saved_data["bias"] = has(b);
  return out;
}

struct Projection : torch::autograd::Function<Projection> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const optional<Tensor>& b) {
    static const auto op = op_handle<ProjSig>("fusedrnn::projection");
    return project_saving_inputs(ctx, op, x, w, b);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<ProjBwdSig>("fusedrnn::projection_backward");
    const auto s = ctx->get_saved_variables();
    const ProjNeeds n(ctx);
    if (at::GradMode::is_enabled())  // create_graph: the same formulas in differentiable ATen ops
      return saved_linear_grads(s, grads[0], n, false);
    auto [gx, gw, gb] = call_backward([&] { return op.call(grads[0], s[0], s[1], n.x, n.w, n.b); });
    return {if_needed(gx, n.x), if_needed(gw, n.w), if_needed(gb, n.b)};
  }
};

// The autograd kernel of a projection node F (Projection, ProjectionBf16): its gx, and the
// note of its inputs for a sequence op whose gx needs no gradient (FrozenProjection).
template <typename F>
Tensor projection_noting_inputs(const Tensor& x, const Tensor& w, const optional<Tensor>& b) {
  Tensor gx = F::apply(x, w, b);
  note_frozen_projection(gx, x, w, b);
  return gx;
}

// fusedrnn::projection_bf16 (the bfloat16 kernels' path: bfloat16 x and w, float32 b ->
// float32 gx). Its backward as torch.nn's bfloat16 modules compute it: the incoming
// gradient rounded to bfloat16 and torch's bfloat16 matmuls (oneDNN's dot products, ~2x our
// float32 GEMMs), the gradients of x and w in bfloat16, b's summed in float32. In C++, as
// the projection's, so that a sequence op's double backward finds x, w, b (gx_source), and
// without torch.library's Python wrapper. With create_graph the same ATen ops are
// differentiable.
struct ProjectionBf16 : torch::autograd::Function<ProjectionBf16> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const optional<Tensor>& b) {
    static const auto op = op_handle<ProjSig>("fusedrnn::projection_bf16");
    return project_saving_inputs(ctx, op, x, w, b);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return saved_linear_grads(ctx->get_saved_variables(), grads[0], ProjNeeds(ctx), true);
  }
};


// fusedrnn::projection_rows: the projection of some rows of x (a PackedSequence's rows
// that hold data), the other rows of gx 0. The same gradients on those rows (dx 0 on the
// others); with create_graph in differentiable ATen ops.
using ProjRowsSig = Tensor(const Tensor&, const Tensor&, const optional<Tensor>&, const Tensor&);
struct ProjectionRows : torch::autograd::Function<ProjectionRows> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const optional<Tensor>& b,
                        const Tensor& rows) {
    static const auto op = op_handle<ProjRowsSig>("fusedrnn::projection_rows");
    Tensor out = [&] {
      at::AutoDispatchBelowADInplaceOrView guard;
      return op.call(x, w, b, rows);
    }();
    ctx->save_for_backward({x, w, b.value_or(Tensor()), rows});  // (x, w, b: gx_source)
    ctx->saved_data["bias"] = has(b);
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<ProjBwdSig>("fusedrnn::projection_backward");
    const auto s = ctx->get_saved_variables();
    const Tensor &x = s[0], &w = s[1], &rows = s[3];
    const ProjNeeds n(ctx);
    const bool nx = n.x, nw = n.w, nb = n.b;
    const int64_t G = w.size(0), I = w.size(1);  // (w's sizes: x's may be symbolic under opcheck)
    const Tensor g = grads[0].reshape({-1, G}).index_select(0, rows), xr = x.reshape({-1, I}).index_select(0, rows);
    auto scatter = [&](const Tensor& dxr) {
      return at::zeros_like(x, at::MemoryFormat::Contiguous).view({-1, I}).index_copy(0, rows, dxr).view_as(x);
    };
    if (at::GradMode::is_enabled()) {  // create_graph
      auto r = linear_grads(g, g, xr, w, nx, nw, nb);
      return {nx ? scatter(r[0]) : Tensor(), r[1], r[2], Tensor()};
    }
    auto [gxr, gw, gb] = call_backward([&] { return op.call(g, xr, w, nx, nw, nb); });
    return {nx ? scatter(gxr) : Tensor(), if_needed(gw, nw), if_needed(gb, nb), Tensor()};
  }
};

Tensor projection_rows_autograd(const Tensor& x, const Tensor& w, const optional<Tensor>& b, const Tensor& rows) {
  Tensor gx = ProjectionRows::apply(x, w, b, rows);
  note_frozen_projection(gx, x, w, b);
  return gx;
}

// What a create_graph backward of a sequence op recomputes gx from: the input
// projection's inputs (x, w, b) when gx is fusedrnn::projection's output (the modules'
// float32 and float64 layers; or projection_rows' or projection_bf16's, the bfloat16
// kernels' path), which that op's node keeps anyway (or, where that needs no
// gradient, FrozenProjection's note), or gx itself when it is a leaf. Nothing otherwise
// (then double backward raises: ops._no_double_backward).
struct GxSource {
  Tensor x, w, b, gx;
};
GxSource gx_source(const Tensor& gx) {
  const FrozenProjection frozen = std::exchange(frozen_projection, FrozenProjection{});
  if (!gx.requires_grad()) {
    if (frozen.gx && frozen.gx->_unsafe_get_target() == gx.unsafeGetTensorImpl()) return {frozen.x, frozen.w, frozen.b};
    return {};
  }
  const auto& fn = gx.grad_fn();
  if (!fn) return {Tensor(), Tensor(), Tensor(), gx};
  // The projections save x, w, b first (projection_rows' gx is recomputed over all rows:
  // the ops never read gx at the others).
  torch::autograd::AutogradContext* ctx = nullptr;
  if (auto* node = dynamic_cast<torch::autograd::CppNode<Projection>*>(fn.get())) ctx = &node->ctx_;
  else if (auto* node = dynamic_cast<torch::autograd::CppNode<ProjectionRows>*>(fn.get())) ctx = &node->ctx_;
  else if (auto* node = dynamic_cast<torch::autograd::CppNode<ProjectionBf16>*>(fn.get())) ctx = &node->ctx_;
  if (ctx) {
    const auto s = ctx->get_saved_variables();
    return {s[0], s[1], s[2], Tensor()};
  }
  return {};
}

// A sequence op's create_graph backward: fusedrnn::sequence_grads on gx recomputed from
// `src` (the LSTM and GRU; the RNN's needs only y), its inputs and its saved output y
// (differentiable through the op's own node). Returns the gradients of the op's inputs
// (gx, h0[, c0], w_hh[, w_hr or b_hh]), undefined where not `need`ed.
using SeqGradsSig = std::vector<Tensor>(c10::string_view, bool, bool, const optional<Tensor>&, const Tensor&,
                                        const optional<Tensor>&, const Tensor&, const optional<Tensor>&,
                                        const optional<Tensor>&, const optional<Tensor>&, const Tensor&,
                                        const Tensor&, const Tensor&, const optional<Tensor>&, bool);
variable_list sequence_grads(const char* cell, bool relu, bool reverse, const GxSource& src, const Tensor& h0,
                             const Tensor& c0, const Tensor& w_hh, const Tensor& w_hr, const Tensor& b_hh,
                             const Tensor& lengths, const Tensor& y, const variable_list& grads,
                             const std::vector<bool>& need) {
  static const auto op = op_handle<SeqGradsSig>("fusedrnn::sequence_grads");
  // (bfloat16 x and w, projection_bf16's: their products are exact in float32, as there)
  const auto up = [](const Tensor& t) { return t.scalar_type() == at::kBFloat16 ? t.to(at::kFloat) : t; };
  // (gx on the projection's own GEMM and autograd, Projection above: MKL's, which at::linear
  // runs, is about half as fast here)
  const Tensor gx = src.x.defined() ? Projection::apply(up(src.x), up(src.w), src.b.defined() ? opt(up(src.b)) : c10::nullopt)
                                    : src.gx;
  const bool lstm = c0.defined();
  // (the weights' gradients, computed only if one of them is needed: from w_hh's index on)
  const bool weights = std::any_of(need.begin() + (lstm ? 3 : 2), need.end(), [](bool b) { return b; });
  auto r = op.call(cell, relu, reverse, opt(gx), h0, opt(c0), w_hh, opt(w_hr), opt(b_hh), opt(lengths), y,
                   grad_or_zeros(grads[0], y), grad_or_zeros(grads[1], h0),
                   lstm ? opt(grad_or_zeros(grads[2], c0)) : c10::nullopt, weights);
  for (size_t k = 0; k < r.size(); ++k)
    if (!need[k]) r[k] = Tensor();
  return r;
}

// ----------------------------------------------------------------------------- sequence ops
// The same contract as the Python registration in fusedrnn/ops.py (_lstm_setup,
// _lstm_backward, ...): the saved outputs (gates, cells, hn) are not differentiable, an
// unused output's gradient is zeros, and train=False keeps nothing for a backward.

using LstmSeqSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                      const Tensor&, const optional<Tensor>&,
                                                                      const optional<Tensor>&, bool, bool);
using LstmSeqBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const optional<Tensor>&, const optional<Tensor>&, bool, const Tensor&, const Tensor&, const Tensor&);

struct LstmSeq : torch::autograd::Function<LstmSeq> {
  static variable_list forward(AutogradContext* ctx, const Tensor& gx, const Tensor& h0, const Tensor& c0,
                               const Tensor& w_hh, const optional<Tensor>& w_hr, const optional<Tensor>& lengths,
                               bool reverse, bool train) {
    static const auto op = op_handle<LstmSeqSig>("fusedrnn::lstm_forward");
    auto [y, hn, cn, gates, cells] = [&] {
      at::AutoDispatchBelowADInplaceOrView guard;
      return op.call(gx, h0, c0, w_hh, w_hr, lengths, reverse, train);
    }();
    const GxSource src = gx_source(gx);
    ctx->save_for_backward({h0, c0, w_hh, w_hr.value_or(Tensor()), lengths.value_or(Tensor()), y, gates, cells, src.x,
                            src.w, src.b, src.gx});
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["train"] = train;
    ctx->mark_non_differentiable({gates, cells});
    ctx->set_materialize_grads(false);
    return {y, hn, cn, gates, cells};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_trained(ctx, "lstm_forward");
    static const auto op = op_handle<LstmSeqBwdSig>("fusedrnn::lstm_backward");
    const auto s = ctx->get_saved_variables();  // h0, c0, w_hh, w_hr, lengths, y, gates, cells, GxSource
    const bool proj = s[3].defined();
    if (at::GradMode::is_enabled() && (s[8].defined() || s[11].defined())) {  // create_graph
      const auto need = [&](int i) { return ctx->needs_input_grad(i); };  // gx, h0, c0, w_hh, w_hr
      auto r = sequence_grads("lstm", false, ctx->saved_data["reverse"].toBool(), {s[8], s[9], s[10], s[11]}, s[0],
                              s[1], s[2], s[3], Tensor(), s[4], s[5], grads,
                              {need(0), need(1), need(2), need(3), proj && need(4)});
      r.resize(8);  // (lengths, reverse, train)
      return r;
    }
    auto [ggx, gh0, gc0, gwhh, gwhr] = call_backward([&] {
      return op.call(grad_or_zeros(grads[0], s[5]), grad_or_zeros(grads[1], s[0]), grad_or_zeros(grads[2], s[1]),
                     s[0], s[1], s[2], opt(s[3]), opt(s[4]), ctx->saved_data["reverse"].toBool(), s[5],
                     s[6], s[7]);
    });
    return {ggx, gh0, gc0, gwhh, proj ? gwhr : Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward_autograd(const Tensor& gx, const Tensor& h0,
                                                                         const Tensor& c0, const Tensor& w_hh,
                                                                         const optional<Tensor>& w_hr,
                                                                         const optional<Tensor>& lengths,
                                                                         bool reverse, bool train) {
  auto r = LstmSeq::apply(gx, h0, c0, w_hh, w_hr, lengths, reverse, train);
  return {r[0], r[1], r[2], r[3], r[4]};
}

using GruSeqSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                             const optional<Tensor>&, const optional<Tensor>&, bool,
                                                             bool);
using GruSeqBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                const Tensor&, const optional<Tensor>&,
                                                                const optional<Tensor>&, bool, const Tensor&,
                                                                const Tensor&, const Tensor&);

struct GruSeq : torch::autograd::Function<GruSeq> {
  static variable_list forward(AutogradContext* ctx, const Tensor& gx, const Tensor& h0, const Tensor& w_hh,
                               const optional<Tensor>& b_hh, const optional<Tensor>& lengths, bool reverse,
                               bool train) {
    static const auto op = op_handle<GruSeqSig>("fusedrnn::gru_forward");
    auto [y, hn, gates, hs] = [&] {
      at::AutoDispatchBelowADInplaceOrView guard;
      return op.call(gx, h0, w_hh, b_hh, lengths, reverse, train);
    }();
    const GxSource src = gx_source(gx);
    ctx->save_for_backward({h0, w_hh, b_hh.value_or(Tensor()), lengths.value_or(Tensor()), y, gates, hs, src.x, src.w,
                            src.b, src.gx});
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["train"] = train;
    ctx->mark_non_differentiable({gates, hs});
    ctx->set_materialize_grads(false);
    return {y, hn, gates, hs};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    check_trained(ctx, "gru_forward");
    static const auto op = op_handle<GruSeqBwdSig>("fusedrnn::gru_backward");
    const auto s = ctx->get_saved_variables();  // h0, w_hh, b_hh, lengths, y, gates, hn, GxSource
    const bool bias = s[2].defined();
    if (at::GradMode::is_enabled() && (s[7].defined() || s[10].defined())) {  // create_graph
      const auto need = [&](int i) { return ctx->needs_input_grad(i); };  // gx, h0, w_hh, b_hh
      auto r = sequence_grads("gru", false, ctx->saved_data["reverse"].toBool(), {s[7], s[8], s[9], s[10]}, s[0],
                              Tensor(), s[1], Tensor(), s[2], s[3], s[4], grads,
                              {need(0), need(1), need(2), bias && need(3)});
      r.resize(7);  // (lengths, reverse, train)
      return r;
    }
    auto [ggx, gh0, gwhh, gbhh] = call_backward([&] {
      return op.call(grad_or_zeros(grads[0], s[4]), grad_or_zeros(grads[1], s[0]), s[0], s[1], opt(s[2]),
                     opt(s[3]), ctx->saved_data["reverse"].toBool(), s[4], s[5], s[6]);
    });
    return {ggx, gh0, gwhh, bias ? gbhh : Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_forward_autograd(const Tensor& gx, const Tensor& h0,
                                                                const Tensor& w_hh, const optional<Tensor>& b_hh,
                                                                const optional<Tensor>& lengths, bool reverse,
                                                                bool train) {
  auto r = GruSeq::apply(gx, h0, w_hh, b_hh, lengths, reverse, train);
  return {r[0], r[1], r[2], r[3]};
}

using RnnSeqSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
                                             bool, bool);
using RnnSeqBwdSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                        const optional<Tensor>&, bool, bool, const Tensor&);

struct RnnSeq : torch::autograd::Function<RnnSeq> {
  static variable_list forward(AutogradContext* ctx, const Tensor& gx, const Tensor& h0, const Tensor& w_hh,
                               const optional<Tensor>& lengths, bool reverse, bool relu) {
    static const auto op = op_handle<RnnSeqSig>("fusedrnn::rnn_forward");
    auto [y, hn] = [&] {
      at::AutoDispatchBelowADInplaceOrView guard;
      return op.call(gx, h0, w_hh, lengths, reverse, relu);
    }();
    gx_source(gx);  // (takes the projection's note, unused: the RNN's create_graph backward needs only y)
    ctx->save_for_backward({h0, w_hh, lengths.value_or(Tensor()), y});
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["relu"] = relu;
    ctx->set_materialize_grads(false);
    return {y, hn};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<RnnSeqBwdSig>("fusedrnn::rnn_backward");
    const auto s = ctx->get_saved_variables();  // h0, w_hh, lengths, y
    if (at::GradMode::is_enabled()) {  // create_graph: from y alone
      const auto need = [&](int i) { return ctx->needs_input_grad(i); };  // gx, h0, w_hh
      auto r = sequence_grads("rnn", ctx->saved_data["relu"].toBool(), ctx->saved_data["reverse"].toBool(), {},
                              s[0], Tensor(), s[1], Tensor(), Tensor(), s[2], s[3], grads,
                              {need(0), need(1), need(2)});
      r.resize(6);  // (lengths, reverse, relu)
      return r;
    }
    auto [ggx, gh0, gwhh] = call_backward([&] {
      return op.call(grad_or_zeros(grads[0], s[3]), grad_or_zeros(grads[1], s[0]), s[0], s[1], opt(s[2]),
                     ctx->saved_data["reverse"].toBool(), ctx->saved_data["relu"].toBool(), s[3]);
    });
    return {ggx, gh0, gwhh, Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> rnn_forward_autograd(const Tensor& gx, const Tensor& h0, const Tensor& w_hh,
                                                const optional<Tensor>& lengths, bool reverse, bool relu) {
  auto r = RnnSeq::apply(gx, h0, w_hh, lengths, reverse, relu);
  return {r[0], r[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedrnn, Autograd, m) {
  m.impl("lstm_cell", &lstm_cell_autograd);
  m.impl("gru_cell", &gru_cell_autograd);
  m.impl("rnn_cell", &rnn_cell_autograd);
}

TORCH_LIBRARY_IMPL(fusedrnn, AutogradCPU, m) {
  m.impl("lstm_forward", &lstm_forward_autograd);
  m.impl("gru_forward", &gru_forward_autograd);
  m.impl("rnn_forward", &rnn_forward_autograd);
  m.impl("projection", &projection_noting_inputs<Projection>);
  m.impl("projection_rows", &projection_rows_autograd);
  m.impl("projection_bf16", &projection_noting_inputs<ProjectionBf16>);
}

}  // namespace cpu
}  // namespace fusedrnn
