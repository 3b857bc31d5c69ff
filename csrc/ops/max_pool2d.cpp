// max_pool2d's public op: routing (csrc/dispatch.h) and autograd. Backward keeps
// only the window offsets (the op's third output: the tap of each window's maximum,
// int8 up to 128 taps), neither the input nor int64 indices.
#include <torch/autograd.h>
#include <torch/library.h>

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

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct MaxPool2d : torch::autograd::Function<MaxPool2d> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, at::IntArrayRef k, at::IntArrayRef s,
                               at::IntArrayRef p, at::IntArrayRef d, bool ceil_mode, bool channels_last,
                               bool return_indices, bool return_offsets) {
    auto [out, indices, offsets] =
        call_below_autograd(public_op(), input, k, s, p, d, ceil_mode, channels_last, return_indices, return_offsets);
    ctx->mark_non_differentiable({indices, offsets});
    ctx->saved_data["input_size"] = input.sym_sizes();  // SymInts: traceable with dynamic shapes
    ctx->saved_data["k"] = k;
    ctx->saved_data["s"] = s;
    ctx->saved_data["p"] = p;
    ctx->saved_data["d"] = d;
    ctx->saved_data["channels_last"] = channels_last;
    ctx->saved_data["backend"] = static_cast<int64_t>(current_backend());
    ctx->save_for_backward({offsets});
    return {out, indices, offsets};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op_handle<Bwd>("dtkernels::max_pool2d_backward");
    const at::Tensor offsets = ctx->get_saved_variables()[0];
    const auto input_size = ctx->saved_data["input_size"].toSymIntVector();
    const auto k = ctx->saved_data["k"].toIntVector(), s = ctx->saved_data["s"].toIntVector(),
               p = ctx->saved_data["p"].toIntVector(), d = ctx->saved_data["d"].toIntVector();
    BackendGuard scope(static_cast<int>(ctx->saved_data["backend"].toInt()));
    at::Tensor gi = call_in_backward(bwd, grads[0], offsets, input_size, k, s, p, d,
                                     ctx->saved_data["channels_last"].toBool());
    variable_list res(9);
    res[0] = gi;
    return res;
  }
};

Outs max_pool2d_autograd(const at::Tensor& input, at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p,
                         at::IntArrayRef d, bool ceil_mode, bool channels_last, bool return_indices,
                         bool return_offsets) {
  if (!autograd_records(input))
    return call_below_autograd(public_op(), input, k, s, p, d, ceil_mode, channels_last, return_indices,
                               return_offsets);
  // Backward needs the offsets, so they are made whenever autograd records, whatever
  // the caller asked: the choice stays out of Python, where torch.jit.trace would
  // freeze it into the graph (a model traced under no_grad could not then train).
  auto r = MaxPool2d::apply(input, k, s, p, d, ceil_mode, channels_last, return_indices, /*return_offsets=*/true);
  return {r[0], r[1], r[2]};
}

}  // namespace
}  // namespace dtkernels

DTK_REGISTER_PUBLIC_OP(max_pool2d, &dtkernels::max_pool2d, &dtkernels::max_pool2d_backward, &dtkernels::max_pool2d_autograd)
