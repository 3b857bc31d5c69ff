// Unboxed entries: a public op called from Python without torch.ops' boxed call.
//
// torch.ops.dtkernels.<op>(...) parses its arguments against the schema into an
// IValue stack and unboxes them again for the C++ kernel: about 2 us a call, as
// much as a small max_pool2d's whole kernel (ATen's own functions are generated
// bindings and skip this). dtkernels._C._unboxed_<op> makes the same dispatcher
// call, so autograd, dispatch modes, the profiler and the backend routing see the
// same op; what it skips is torch.ops' __torch_function__ handling, and SymInts.
// The Python wrappers therefore take it only for plain tensors outside
// torch.compile and torch-function modes (dtkernels/ops/_common.py: unboxed_ok).
#pragma once

#include <pybind11/stl.h>
#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>

#include <functional>
#include <string>
#include <vector>

#include "dispatch.h"

namespace dtkernels {

using UnboxedDef = std::function<void(pybind11::module_&)>;

// Filled by static initialisers in csrc/ops/<op>.cpp; defined into _C at import.
inline std::vector<UnboxedDef>& unboxed_entries() {
  static std::vector<UnboxedDef> v;
  return v;
}

template <typename Sig>
struct UnboxedEntry;

// Declares _C._unboxed_<op>: the public op dtkernels::<op> called through its typed
// handle, with torch's error translation (ATen's exception types and messages,
// warnings as Python warnings) and without the GIL, as torch.ops calls it.
template <typename R, typename... A>
struct UnboxedEntry<R(A...)> {
  explicit UnboxedEntry(std::string op) {
    unboxed_entries().push_back([op](pybind11::module_& m) {
      const auto handle = op_handle<R(A...)>(("dtkernels::" + op).c_str());
      m.def(("_unboxed_" + op).c_str(),
            torch::wrap_pybind_function_no_gil([handle](A... a) -> R { return handle.call(a...); }),
            ("dtkernels::" + op + ", called unboxed (csrc/unboxed.h)").c_str());
    });
  }
};

}  // namespace dtkernels
