// The public ops' autograd nodes, built as ATen's generated code builds its own:
// a Node subclass that keeps exactly what its backward reads. The
// torch::autograd::Function used before cost ~2 us more per forward (its context,
// a string-keyed map of IValues, per-input and per-output bookkeeping) and ~1-2 us
// more per backward, as much as a small op's kernel and, on a GPU, more.
//
// What Function gave for free and is done here instead: forward-mode tangents and
// torch.func transforms are refused (the Python functions decompose instead), saved
// tensors go through SavedVariable (version checks, saved-tensor hooks, "backward
// through the graph a second time"), and compiled autograd sees each backward as
// one traceable call (apply_with_saved; torch 2.7 and later, whose functional
// compiled-autograd API it uses: on older torch compiled autograd refuses the nodes).
#pragma once

#include <ATen/FuncTorchTLS.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/version.h>

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 7)
#define DTK_COMPILED_AUTOGRAD 1
#include <torch/csrc/dynamo/compiled_autograd.h>
#endif

#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "dispatch.h"

namespace dtkernels {

namespace ag = torch::autograd;
// std::shared_ptr<Node> in torch 2.11 (the GPU machine's), c10::intrusive_ptr<Node> in 2.13.
using NodePtr = decltype(ag::Edge::function);

// What the ops' autograd does not support, refused with a clear error before a
// node is made. Forward-mode tangents: the ops have no jvp formula (dropping one
// would be silently wrong). torch.func transforms: backward under them records
// its own graph through Python autograd, which functorch refuses. In both cases
// the Python function dtkernels.<op> runs the op's ATen decomposition instead.
template <typename... Ts>
void refuse_unsupported(const char* op, const Ts&... xs) {
  const bool tangent = (... || (xs.defined() && xs._fw_grad(/*level=*/0).defined()));
  TORCH_CHECK(!tangent, "dtkernels::", op, ": jvp is not implemented for the op (forward-mode AD); the Python "
              "function dtkernels.", op, " computes it through its ATen decomposition");
  if (const auto& tls = at::functorch::functorchTLSAccessor()) {
    bool active = false;
    try {
      tls->checkSupportsCppAutogradFunction();  // throws while a transform is active
    } catch (const c10::Error&) {
      active = true;
    }
    TORCH_CHECK(!active, "dtkernels::", op, ": the op's autograd does not support torch.func transforms (grad, "
                "vjp, jacrev, ...); call the Python function dtkernels.", op, ", which runs its ATen "
                "decomposition under them");
  }
}

// One op's backward as a Node. Op supplies:
//   struct State: the non-tensor facts backward reads, with
//     template <class F> void fields(F&& f) calling f on each member (compiled
//     autograd collects, swaps and packs them);
//   static constexpr const char* name;         // Node::name(), identifier-safe
//   static ag::variable_list backward(const State&, const ag::variable_list& grads,
//                                     const at::Tensor& saved, const std::vector<bool>& needs);
// and at most one saved tensor (`saved`, undefined when none).
template <class Op>
struct OpNode final : ag::Node {
  using State = typename Op::State;
  State state;
  ag::SavedVariable saved;  // default-constructed: unpacks to an undefined tensor
  bool saved_is_output = false;

  // A node whose next edges are those of `inputs` (the tensors it differentiates).
  template <typename... Ts>
  static auto make(const Ts&... inputs) {
    ag::edge_list edges = ag::collect_next_edges(inputs...);
    if constexpr (std::is_same_v<NodePtr, std::shared_ptr<ag::Node>>) {
      // torch's deleteNode frees long chains without deep recursion; found by ADL
      // (a generic lambda), as newer torch has no such function.
      std::shared_ptr<OpNode> n(new OpNode(), [](auto* p) { deleteNode(p); });
      n->set_next_edges(std::move(edges));
      return n;
    } else {
      auto n = c10::make_intrusive<OpNode>();
      n->set_next_edges(std::move(edges));
      return n;
    }
  }

  // Makes this node out's grad_fn. Call before save() when out is saved.
  void attach(const at::Tensor& out) { ag::set_history(out, getptr()); }

  // Saves t for backward; is_output: t is an output whose grad_fn is this node.
  void save(const at::Tensor& t, bool is_output) {
    saved = ag::SavedVariable(t, is_output);
    saved_is_output = is_output;
  }

  std::string name() const override { return Op::name; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    saved.reset_data();
  }

  ag::variable_list apply(ag::variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return Op::backward(state, grads, unpack_saved(), needs_input_grad());
  }

#ifdef DTK_COMPILED_AUTOGRAD
  // Compiled autograd: the cache key holds the state, and the backward enters the
  // compiled graph as one call of `functional` on the state packed as IValues.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(std::string(Op::name));
    args.collect(saved, saved_is_output);
    const_cast<State&>(state).fields([&](auto& x) { args.collect(x); });
  }

  ag::variable_list apply_with_saved(const ag::variable_list& grads,
                                     torch::dynamo::autograd::SwapSavedVariables& swap) override {
    namespace ca = torch::dynamo::autograd;
    swap.before(saved);
    state.fields([&](auto& x) { swap.before(x); });
    ca::PackedArgs packed;
    const at::Tensor t = unpack_saved();
    packed.pack(t.defined() ? std::optional<at::Tensor>(t) : std::nullopt);
    state.fields([&](auto& x) { packed.pack(x); });
    packed.pack(needs_input_grad());
    const auto args = std::move(packed).vec();
    std::vector<at::TypePtr> schema;
    schema.reserve(args.size());
    for (const auto& v : args) schema.push_back(v.isTensor() ? at::TensorType::get() : v.type());
    const auto& py = ca::getPyCompilerInterface();
    const auto fn = py->bind_function(swap.get_py_compiler(), Op::name, &functional, schema,
                                      /*is_custom_function=*/true, /*is_traceable=*/true);
    const auto metadata = ca::IValuePacker<std::vector<std::optional<ag::InputMetadata>>>::pack(
        ca::get_input_metadata(next_edges()));
    auto res = py->call_function(swap.get_py_compiler(), "apply_functional", fn, grads, args, metadata);
    swap.after(saved);
    state.fields([&](auto& x) { swap.after(x); });
    return res;
  }
#endif

 private:
  // Which of the op's inputs this backward must differentiate.
  std::vector<bool> needs_input_grad() const {
    std::vector<bool> needs(num_outputs());
    for (size_t i = 0; i < needs.size(); ++i) needs[i] = task_should_compute_output(i);
    return needs;
  }

  at::Tensor unpack_saved() const {
    if (!saved_is_output) return saved.unpack();
    return saved.unpack(const_cast<OpNode*>(this)->getptr());
  }

#ifdef DTK_COMPILED_AUTOGRAD
  static ag::variable_list functional(const ag::variable_list& grads, const std::vector<c10::IValue>& args) {
    torch::dynamo::autograd::PackedArgs packed(args);
    const auto t = packed.unpack<std::optional<at::Tensor>>().value_or(at::Tensor());
    State s;
    s.fields([&](auto& x) { x = packed.template unpack<std::decay_t<decltype(x)>>(); });
    return Op::backward(s, grads, t, packed.unpack<std::vector<bool>>());
  }
#endif
};

}  // namespace dtkernels
