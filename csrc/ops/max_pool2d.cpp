// max_pool2d's public op: routing (csrc/dispatch.h) and autograd. Backward keeps
// only the window offsets (the op's third output: the tap of each window's maximum,
// int8 up to 128 taps), neither the input nor int64 indices.
#include <torch/library.h>

#include "../autograd.h"
#include "../dispatch.h"
#include "../unboxed.h"

namespace dtkernels {
namespace {

using Outs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Fwd = Outs(const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool, bool,
                 bool, bool);
using Bwd = at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef, at::IntArrayRef, at::IntArrayRef,
                       at::IntArrayRef, at::IntArrayRef, bool);

Route fwd_route("max_pool2d");
Route bwd_route("max_pool2d_backward");

const c10::TypedOperatorHandle<Fwd>& public_op() {
  static const auto op = op_handle<Fwd>("dtkernels::max_pool2d");
  return op;
}

const UnboxedEntry<Fwd> unboxed_entry("max_pool2d");

Outs max_pool2d(const at::Tensor& input, at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d,
                bool ceil_mode, bool channels_last, bool return_indices, bool return_offsets) {
  static const Routed<Fwd> r(fwd_route, "dtkernels::_max_pool2d", "dtkernels::_max_pool2d_py");
  return r.pick(input.device()).call(input, k, s, p, d, ceil_mode, channels_last, return_indices, return_offsets);
}

at::Tensor max_pool2d_backward(const at::Tensor& grad_out, const at::Tensor& offsets, c10::SymIntArrayRef input_size,
                               at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d,
                               bool channels_last) {
  static const Routed<Bwd> r(bwd_route, "dtkernels::_max_pool2d_backward", "dtkernels::_max_pool2d_backward_py");
  return r.pick(grad_out.device()).call(grad_out, offsets, input_size, k, s, p, d, channels_last);
}

// Backward reads the offsets (saved), the input's size and the pooling arguments.
struct MaxPool2dGrad {
  static constexpr const char* name = "dtkernels_MaxPool2dBackward";
  struct State {
    std::vector<c10::SymInt> input_size;  // SymInts: traceable with dynamic shapes
    std::vector<int64_t> k, s, p, d;
    bool channels_last = false;
    int64_t backend = 0;
    template <class F>
    void fields(F&& f) {
      f(input_size), f(k), f(s), f(p), f(d), f(channels_last), f(backend);
    }
  };

  static ag::variable_list backward(const State& st, const ag::variable_list& grads, const at::Tensor& offsets,
                                    const std::vector<bool>& needs) {
    static const auto bwd = op_handle<Bwd>("dtkernels::max_pool2d_backward");
    if (!needs[0] || !grads[0].defined()) return {at::Tensor()};
    BackendGuard scope(static_cast<int>(st.backend));
    return {call_in_backward(bwd, grads[0], offsets, st.input_size, st.k, st.s, st.p, st.d, st.channels_last)};
  }
};

Outs max_pool2d_autograd(const at::Tensor& input, at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p,
                         at::IntArrayRef d, bool ceil_mode, bool channels_last, bool return_indices,
                         bool return_offsets) {
  if (!autograd_records(input))
    return call_below_autograd(public_op(), input, k, s, p, d, ceil_mode, channels_last, return_indices,
                               return_offsets);
  refuse_unsupported("max_pool2d", input);
  // Backward needs the offsets, so they are made whenever autograd records, whatever
  // the caller asked: the choice stays out of Python, where torch.jit.trace would
  // freeze it into the graph (a model traced under no_grad could not then train).
  Outs res = call_below_autograd(public_op(), input, k, s, p, d, ceil_mode, channels_last, return_indices,
                                 /*return_offsets=*/true);
  auto node = OpNode<MaxPool2dGrad>::make(input);
  node->state = {input.sym_sizes().vec(), k.vec(), s.vec(), p.vec(), d.vec(), channels_last,
                 static_cast<int64_t>(current_backend())};
  node->attach(std::get<0>(res));
  node->save(std::get<2>(res), /*is_output=*/false);  // integer: no grad_fn of its own
  return res;
}

}  // namespace
}  // namespace dtkernels

DTK_REGISTER_PUBLIC_OP(max_pool2d, &dtkernels::max_pool2d, &dtkernels::max_pool2d_backward, &dtkernels::max_pool2d_autograd)
