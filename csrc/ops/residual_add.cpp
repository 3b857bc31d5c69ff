// residual_add's public op: routing (csrc/dispatch.h) and autograd. Backward keeps
// only the output: the ReLU mask is out > 0, and with alpha == 1 one gradient
// tensor serves both addends.
#include <torch/library.h>

#include "../autograd.h"
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

// Backward reads alpha, and with the ReLU the output (saved).
struct ResidualAddGrad {
  static constexpr const char* name = "dtkernels_ResidualAddBackward";
  struct State {
    double alpha = 1.0;
    bool relu = false;
    int64_t backend = 0;
    template <class F>
    void fields(F&& f) {
      f(alpha), f(relu), f(backend);
    }
  };

  static ag::variable_list backward(const State& st, const ag::variable_list& grads, const at::Tensor& out,
                                    const std::vector<bool>& needs) {
    static const auto bwd = op_handle<Bwd>("dtkernels::residual_add_backward");
    const at::Tensor& grad = grads[0];
    const bool need_x = needs[0], need_fx = needs[1];
    at::Tensor gx, gfx;
    if (!grad.defined()) return {gx, gfx};
    if (!st.relu) {
      if (need_x) gx = grad;
      if (need_fx) gfx = st.alpha == 1.0 ? grad : grad * st.alpha;
      return {gx, gfx};
    }
    BackendGuard scope(static_cast<int>(st.backend));
    if (need_x || (need_fx && st.alpha == 1.0)) gx = call_in_backward(bwd, grad, out, 1.0);
    if (need_fx) gfx = st.alpha == 1.0 ? gx : call_in_backward(bwd, grad, out, st.alpha);
    return {need_x ? gx : at::Tensor(), gfx};
  }
};

at::Tensor residual_add_autograd(const at::Tensor& x, const at::Tensor& fx, double alpha, bool relu) {
  if (!autograd_records(x, fx)) return call_below_autograd(public_op(), x, fx, alpha, relu);
  refuse_unsupported("residual_add", x, fx);
  at::Tensor out = call_below_autograd(public_op(), x, fx, alpha, relu);
  auto node = OpNode<ResidualAddGrad>::make(x, fx);
  node->state = {alpha, relu, static_cast<int64_t>(current_backend())};
  node->attach(out);
  if (relu) node->save(out, /*is_output=*/true);  // the ReLU mask is out > 0
  return out;
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
