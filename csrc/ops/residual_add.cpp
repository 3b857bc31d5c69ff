// residual_add's public op: routing (csrc/dispatch.h) and autograd. Backward keeps
// only the output: the ReLU mask is out > 0, and with alpha == 1 one gradient
// tensor serves both addends.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../dispatch.h"
#include "../unboxed.h"

namespace dtkernels {
namespace {

using Fwd = at::Tensor(const at::Tensor&, const at::Tensor&, double, bool);
using Bwd = at::Tensor(const at::Tensor&, const at::Tensor&, double);

Route fwd_route("residual_add");
Route bwd_route("residual_add_backward");

const c10::TypedOperatorHandle<Fwd>& public_op() {
  static const auto op = op_handle<Fwd>("dtkernels::residual_add");
  return op;
}

const UnboxedEntry<Fwd> unboxed_entry("residual_add");

at::Tensor residual_add(const at::Tensor& x, const at::Tensor& fx, double alpha, bool relu) {
  static const Routed<Fwd> r(fwd_route, "dtkernels::_residual_add", "dtkernels::_residual_add_py");
  return r.pick(x.device()).call(x, fx, alpha, relu);
}

at::Tensor residual_add_backward(const at::Tensor& grad_out, const at::Tensor& out, double scale) {
  static const Routed<Bwd> r(bwd_route, "dtkernels::_residual_add_backward", "dtkernels::_residual_add_backward_py");
  return r.pick(grad_out.device()).call(grad_out, out, scale);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct ResidualAdd : torch::autograd::Function<ResidualAdd> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& fx, double alpha,
                            bool relu) {
    at::Tensor out = call_below_autograd(public_op(), x, fx, alpha, relu);
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["backend"] = static_cast<int64_t>(current_backend());
    if (relu) ctx->save_for_backward({out});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op_handle<Bwd>("dtkernels::residual_add_backward");
    const at::Tensor& grad = grads[0];
    const double alpha = ctx->saved_data["alpha"].toDouble();
    const bool need_x = ctx->needs_input_grad(0), need_fx = ctx->needs_input_grad(1);
    at::Tensor gx, gfx;
    if (!ctx->saved_data["relu"].toBool()) {
      if (need_x) gx = grad;
      if (need_fx) gfx = alpha == 1.0 ? grad : grad * alpha;
      return {gx, gfx, at::Tensor(), at::Tensor()};
    }
    const at::Tensor out = ctx->get_saved_variables()[0];
    BackendGuard scope(static_cast<int>(ctx->saved_data["backend"].toInt()));
    if (need_x || (need_fx && alpha == 1.0)) gx = call_in_backward(bwd, grad, out, 1.0);
    if (need_fx) gfx = alpha == 1.0 ? gx : call_in_backward(bwd, grad, out, alpha);
    return {need_x ? gx : at::Tensor(), gfx, at::Tensor(), at::Tensor()};
  }
};

at::Tensor residual_add_autograd(const at::Tensor& x, const at::Tensor& fx, double alpha, bool relu) {
  if (!autograd_records(x, fx)) return call_below_autograd(public_op(), x, fx, alpha, relu);
  return ResidualAdd::apply(x, fx, alpha, relu);
}

// Under torch.autocast: x and fx of different float dtypes meet in the wider one.
template <c10::DeviceType D>
at::Tensor residual_add_autocast(const at::Tensor& x, const at::Tensor& fx, double alpha, bool relu) {
  const auto [a, b] = autocast_promote<D>(x, fx);
  AutocastOff<D> off;
  return public_op().call(a, b, alpha, relu);
}

}  // namespace
}  // namespace dtkernels

DTK_REGISTER_PUBLIC_OP(residual_add, &dtkernels::residual_add, &dtkernels::residual_add_backward, &dtkernels::residual_add_autograd)
DTK_REGISTER_AUTOCAST(residual_add, dtkernels::residual_add_autocast)
