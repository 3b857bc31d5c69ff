// The public ops' dispatch and autograd, in C++ so that a call on the default path
// never enters Python: PyTorch's eager ops cost ~2 us of host time per call, and a
// Python kernel plus a Python autograd wrapper cost ~10-20 us more, which on a GPU
// is longer than the kernels themselves.
//
// The backend setting lives here (Python's dtkernels.use_backend writes it). A
// public op's CPU/CUDA kernel calls its native kernel (`_<op>`) when the setting
// resolves to it, and otherwise its Python-registered twin (`_<op>_py`), which runs
// the backend registry (dtkernels/backends.py): Triton, the reference, and every
// error about a backend that cannot run.
#pragma once

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/Device.h>
#include <torch/library.h>

#include <atomic>
#include <map>
#include <string>

namespace dtkernels {

// Codes shared with dtkernels/backends.py (BACKENDS order; -1 = an unknown name
// from DTKERNELS_BACKEND, reported by Python at the first op).
enum class Backend : int { Unknown = -1, Auto = 0, Cpu = 1, Cuda = 2, Triton = 3, Reference = 4 };

inline std::atomic<int>& backend_setting() {
  static std::atomic<int> code{static_cast<int>(Backend::Auto)};
  return code;
}

inline int current_backend() { return backend_setting().load(std::memory_order_relaxed); }

// Restores the forward's backend while its backward runs (backward uses the same
// kernel family as the forward, as the Python layer always did).
class BackendGuard {
 public:
  explicit BackendGuard(int code) : prev_(backend_setting().exchange(code)) {}
  ~BackendGuard() { backend_setting().store(prev_); }
  BackendGuard(const BackendGuard&) = delete;
  BackendGuard& operator=(const BackendGuard&) = delete;

 private:
  int prev_;
};

// One public op's routing facts. "auto" on CUDA tensors takes the native kernel
// unless the registry lists Triton first for the op (set from Python).
class Route {
 public:
  explicit Route(const char* op) { registry()[op] = this; }

  bool native(const c10::Device& device) const {
    const int b = current_backend();
    if (device.is_cpu()) return b == int(Backend::Auto) || b == int(Backend::Cpu);
#ifdef DTK_WITH_CUDA
    if (device.is_cuda())
      return b == int(Backend::Cuda) || (b == int(Backend::Auto) && auto_cuda_native_.load(std::memory_order_relaxed));
#endif
    return false;
  }

  void set_auto_cuda_native(bool v) { auto_cuda_native_.store(v); }

  static std::map<std::string, Route*>& registry() {
    static std::map<std::string, Route*> r;
    return r;
  }

 private:
  std::atomic<bool> auto_cuda_native_{true};
};

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* qualified_name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(qualified_name, "").typed<Sig>();
}

// The route of one public op: its native kernel and its Python twin, looked up once.
template <typename Sig>
struct Routed {
  Route& route;
  c10::TypedOperatorHandle<Sig> native, python;

  Routed(Route& r, const char* native_name, const char* python_name)
      : route(r), native(op_handle<Sig>(native_name)), python(op_handle<Sig>(python_name)) {}

  const c10::TypedOperatorHandle<Sig>& pick(const c10::Device& device) const {
    return route.native(device) ? native : python;
  }
};

// Calls an op past its autograd kernel, straight to the kernels below.
template <typename Sig, typename... Args>
decltype(auto) call_below_autograd(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(std::forward<Args>(args)...);
}

// Calls a backward op from an autograd node's backward. Without create_graph,
// grad mode is off and no graph is recorded, so the call goes straight to the
// kernel; with it, through the op's own autograd (double backward, in Python).
template <typename Sig, typename... Args>
decltype(auto) call_in_backward(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  if (at::GradMode::is_enabled()) return op.call(std::forward<Args>(args)...);
  return call_below_autograd(op, std::forward<Args>(args)...);
}

// Whether autograd has anything to record for a call with these tensor arguments:
// one requires grad (in grad mode), or carries a forward-mode tangent (which the
// autograd kernel then refuses: csrc/autograd.h). When not, a public op's autograd
// kernel calls the op below autograd and builds no node.
inline bool autograd_records(const at::Tensor& t) {
  return t.defined() && ((t.requires_grad() && at::GradMode::is_enabled()) || t._fw_grad(/*level=*/0).defined());
}

inline bool autograd_records(at::TensorList ts) {
  for (const at::Tensor& t : ts)
    if (autograd_records(t)) return true;
  return false;
}

template <typename A, typename B, typename... Rest>
bool autograd_records(const A& a, const B& b, const Rest&... rest) {
  return autograd_records(a) || autograd_records(b, rest...);
}

// torch.autocast. The ops that join two tensors follow ATen's "promote" policy, as
// torch.cat does under autocast: an autocast-made float16/bfloat16 tensor next to a
// float32 one (a skip that went through softmax, say) is cast to the wider dtype,
// where outside autocast a dtype mismatch stays an error. Float16 with bfloat16
// gives float32, as eager type promotion does (ATen's autocast raises there).
template <c10::DeviceType D>
std::pair<at::Tensor, at::Tensor> autocast_promote(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == b.scalar_type() || !at::autocast::is_eligible(a, D) || !at::autocast::is_eligible(b, D))
    return {a, b};
  const auto t = c10::promoteTypes(a.scalar_type(), b.scalar_type());
  return {at::autocast::cached_cast(t, a, D), at::autocast::cached_cast(t, b, D)};
}

// The op's own call from its autocast kernel, with that autocast key off.
template <c10::DeviceType D>
struct AutocastOff {
  c10::impl::ExcludeDispatchKeyGuard guard{at::autocast::get_autocast_dispatch_key_from_device_type(D)};
};

}  // namespace dtkernels

// Registers a public op and its backward op: their CPU and CUDA kernels (the routes
// above, or an ATen composition) and the op's autograd kernel.
#define DTK_REGISTER_PUBLIC_OP(op, forward, backward, autograd) \
  TORCH_LIBRARY_IMPL(dtkernels, CPU, m) {                       \
    m.impl(#op, forward);                                       \
    m.impl(#op "_backward", backward);                          \
  }                                                             \
  TORCH_LIBRARY_IMPL(dtkernels, CUDA, m) {                      \
    m.impl(#op, forward);                                       \
    m.impl(#op "_backward", backward);                          \
  }                                                             \
  TORCH_LIBRARY_IMPL(dtkernels, Autograd, m) { m.impl(#op, autograd); }

// Registers a public op's autocast kernel, a template over the device type.
#define DTK_REGISTER_AUTOCAST(op, kernel)                                               \
  TORCH_LIBRARY_IMPL(dtkernels, AutocastCPU, m) { m.impl(#op, kernel<c10::DeviceType::CPU>); } \
  TORCH_LIBRARY_IMPL(dtkernels, AutocastCUDA, m) { m.impl(#op, kernel<c10::DeviceType::CUDA>); }
