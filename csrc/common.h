// Helpers shared by the CPU and CUDA kernels. Header-only, device-agnostic.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <limits>

namespace dtkernels {

// Debug mode for the test suite: outputs are filled with a poison value (NaN, or
// a large negative integer) before a kernel writes them, so an element a kernel
// forgets to write shows up instead of hiding behind whatever memory held.
inline std::atomic<bool>& poison_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

inline void poison(at::Tensor& t) {
  if (!poison_flag().load(std::memory_order_relaxed) || t.numel() == 0) return;
  if (at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<double>::quiet_NaN());
  else if (t.scalar_type() != at::kBool) t.fill_(-77);
}

// at::empty_like, poisoned in debug mode. Every kernel output comes from here or
// from new_empty().
inline at::Tensor new_empty_like(const at::Tensor& like) {
  at::Tensor t = at::empty_like(like);
  poison(t);
  return t;
}

inline at::Tensor new_empty(at::IntArrayRef sizes, const at::TensorOptions& opts,
                            at::MemoryFormat fmt = at::MemoryFormat::Contiguous) {
  at::Tensor t = at::empty(sizes, opts.memory_format(fmt));
  poison(t);
  return t;
}

// True when `a` covers its storage without gaps or overlaps and `b` has the very
// same sizes and strides: the kernels may then treat both as flat arrays in the
// same element order (NCHW, channels_last or any other dense permutation).
inline bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.is_non_overlapping_and_dense() && a.sizes().equals(b.sizes()) &&
         a.strides().equals(b.strides());
}

// A copy of `t` laid out like `like` (whose layout must be dense), or `t` itself
// when it already is. Only the odd layouts (strided views, mixed memory formats)
// pay for this; NCHW and channels_last pairs never do.
inline at::Tensor as_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (same_dense_layout(like, t)) return t;
  at::Tensor r = at::empty_like(like);
  r.copy_(t);
  return r;
}

inline void check_same_shape_dtype_device(const at::Tensor& a, const char* an,
                                          const at::Tensor& b, const char* bn,
                                          const char* op) {
  TORCH_CHECK(a.sizes().equals(b.sizes()), op, ": ", an, " and ", bn,
              " must have the same shape, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", an, " and ", bn,
              " must have the same dtype, got ", a.scalar_type(), " and ",
              b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), op, ": ", an, " and ", bn,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

}  // namespace dtkernels
