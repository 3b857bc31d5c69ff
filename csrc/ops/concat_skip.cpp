// concat_skip's public op: routing (csrc/dispatch.h) and autograd. Backward keeps
// no tensor: skip's gradient is a view of the output gradient, and so is x's
// without an upsample; only the upsample's adjoint (concat_skip_backward) runs a
// kernel. A custom op's outputs may not alias its inputs, so the views are made
// here, in the autograd Function, where they cost nothing.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../dispatch.h"
#include "../unboxed.h"

namespace dtkernels {
namespace {

using Mode = std::optional<c10::string_view>;
using Fwd = at::Tensor(const at::Tensor&, const at::Tensor&, Mode, int64_t, bool, bool);
using Bwd = at::Tensor(const at::Tensor&, Mode, int64_t, bool);

Route fwd_route("concat_skip");
Route bwd_route("concat_skip_backward");

const c10::TypedOperatorHandle<Fwd>& public_op() {
  static const auto op = op_handle<Fwd>("dtkernels::concat_skip");
  return op;
}

const UnboxedEntry<Fwd> unboxed_entry("concat_skip");

at::Tensor concat_skip(const at::Tensor& x, const at::Tensor& skip, Mode upsample, int64_t scale_factor,
                       bool align_corners, bool skip_first) {
  static const Routed<Fwd> r(fwd_route, "dtkernels::_concat_skip", "dtkernels::_concat_skip_py");
  return r.pick(x.device()).call(x, skip, upsample, scale_factor, align_corners, skip_first);
}

at::Tensor concat_skip_backward(const at::Tensor& grad_up, Mode upsample, int64_t scale_factor, bool align_corners) {
  static const Routed<Bwd> r(bwd_route, "dtkernels::_concat_skip_backward", "dtkernels::_concat_skip_backward_py");
  return r.pick(grad_up.device()).call(grad_up, upsample, scale_factor, align_corners);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct ConcatSkip : torch::autograd::Function<ConcatSkip> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& skip, Mode upsample,
                            int64_t scale_factor, bool align_corners, bool skip_first) {
    at::Tensor out = call_below_autograd(public_op(), x, skip, upsample, scale_factor, align_corners, skip_first);
    // SymInts, so that torch.compile can trace this with dynamic shapes
    ctx->saved_data["cx"] = x.sym_size(1);
    ctx->saved_data["cs"] = skip.sym_size(1);
    ctx->saved_data["upsample"] = upsample ? c10::IValue(std::string(*upsample)) : c10::IValue();
    ctx->saved_data["scale_factor"] = scale_factor;
    ctx->saved_data["align_corners"] = align_corners;
    ctx->saved_data["skip_first"] = skip_first;
    ctx->saved_data["backend"] = static_cast<int64_t>(current_backend());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op_handle<Bwd>("dtkernels::concat_skip_backward");
    const at::Tensor& grad = grads[0];
    const c10::SymInt cx = ctx->saved_data["cx"].toSymInt(), cs = ctx->saved_data["cs"].toSymInt();
    const bool skip_first = ctx->saved_data["skip_first"].toBool();
    at::Tensor gx, gskip;
    if (ctx->needs_input_grad(1)) gskip = grad.narrow_symint(1, skip_first ? c10::SymInt(0) : cx, cs);
    if (ctx->needs_input_grad(0)) {
      gx = grad.narrow_symint(1, skip_first ? cs : c10::SymInt(0), cx);
      const c10::IValue& mode = ctx->saved_data["upsample"];
      if (!mode.isNone()) {
        BackendGuard scope(static_cast<int>(ctx->saved_data["backend"].toInt()));
        gx = call_in_backward(bwd, gx, Mode(mode.toStringRef()), ctx->saved_data["scale_factor"].toInt(),
                              ctx->saved_data["align_corners"].toBool());
      }
    }
    return {gx, gskip, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor concat_skip_autograd(const at::Tensor& x, const at::Tensor& skip, Mode upsample, int64_t scale_factor,
                                bool align_corners, bool skip_first) {
  if (!autograd_records(x, skip))
    return call_below_autograd(public_op(), x, skip, upsample, scale_factor, align_corners, skip_first);
  return ConcatSkip::apply(x, skip, upsample, scale_factor, align_corners, skip_first);
}

// Under torch.autocast, as torch.cat: x and skip of different float dtypes meet in the wider one.
template <c10::DeviceType D>
at::Tensor concat_skip_autocast(const at::Tensor& x, const at::Tensor& skip, Mode upsample, int64_t scale_factor,
                                bool align_corners, bool skip_first) {
  const auto [a, b] = autocast_promote<D>(x, skip);
  AutocastOff<D> off;
  return public_op().call(a, b, upsample, scale_factor, align_corners, skip_first);
}

}  // namespace
}  // namespace dtkernels

DTK_REGISTER_PUBLIC_OP(concat_skip, &dtkernels::concat_skip, &dtkernels::concat_skip_backward, &dtkernels::concat_skip_autograd)
DTK_REGISTER_AUTOCAST(concat_skip, dtkernels::concat_skip_autocast)
