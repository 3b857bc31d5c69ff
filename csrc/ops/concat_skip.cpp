// concat_skip's public op: routing (csrc/dispatch.h) and autograd. Backward keeps
// no tensor: skip's gradient is a view of the output gradient, and so is x's
// without an upsample; only the upsample's adjoint (concat_skip_backward) runs a
// kernel. A custom op's outputs may not alias its inputs, so the views are made
// here, in the autograd node, where they cost nothing.
#include <torch/library.h>

#include "../autograd.h"
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

// Backward reads the two channel counts and the upsample's arguments; no tensor.
struct ConcatSkipGrad {
  static constexpr const char* name = "dtkernels_ConcatSkipBackward";
  struct State {
    c10::SymInt cx, cs;  // SymInts, so that torch.compile can trace this with dynamic shapes
    std::optional<std::string> upsample;
    int64_t scale_factor = 2;
    bool align_corners = false, skip_first = false;
    int64_t backend = 0;
    template <class F>
    void fields(F&& f) {
      f(cx), f(cs), f(upsample), f(scale_factor), f(align_corners), f(skip_first), f(backend);
    }
  };

  static ag::variable_list backward(const State& st, const ag::variable_list& grads, const at::Tensor&,
                                    const std::vector<bool>& needs) {
    static const auto bwd = op_handle<Bwd>("dtkernels::concat_skip_backward");
    const at::Tensor& grad = grads[0];
    at::Tensor gx, gskip;
    if (!grad.defined()) return {gx, gskip};
    if (needs[1]) gskip = grad.narrow_symint(1, st.skip_first ? c10::SymInt(0) : st.cx, st.cs);
    if (needs[0]) {
      gx = grad.narrow_symint(1, st.skip_first ? st.cs : c10::SymInt(0), st.cx);
      if (st.upsample) {
        BackendGuard scope(static_cast<int>(st.backend));
        gx = call_in_backward(bwd, gx, Mode(*st.upsample), st.scale_factor, st.align_corners);
      }
    }
    return {gx, gskip};
  }
};

at::Tensor concat_skip_autograd(const at::Tensor& x, const at::Tensor& skip, Mode upsample, int64_t scale_factor,
                                bool align_corners, bool skip_first) {
  if (!autograd_records(x, skip))
    return call_below_autograd(public_op(), x, skip, upsample, scale_factor, align_corners, skip_first);
  refuse_unsupported("concat_skip", x, skip);
  at::Tensor out = call_below_autograd(public_op(), x, skip, upsample, scale_factor, align_corners, skip_first);
  auto node = OpNode<ConcatSkipGrad>::make(x, skip);
  node->state = {x.sym_size(1), skip.sym_size(1),
                 upsample ? std::optional<std::string>(std::string(*upsample)) : std::nullopt,
                 scale_factor, align_corners, skip_first, static_cast<int64_t>(current_backend())};
  node->attach(out);
  return out;
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
