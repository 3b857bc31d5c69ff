// Helpers shared by the CPU and CUDA kernels. Header-only, device-agnostic.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <string>

namespace dtkernels {

// Loops that must unroll on the GPU so that register arrays stay in registers
// (host compilers unroll them without being asked).
#if defined(__CUDACC__)
#define DTK_UNROLL _Pragma("unroll")
#else
#define DTK_UNROLL
#endif

// N elements moved as one 16-byte (or narrower) access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

C10_HOST_DEVICE inline bool aligned_to(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Division by a runtime constant in a few instructions (a magic multiplier and a
// shift, as ATen's IntDivider), for GPU index math that would otherwise cost more
// than the bytes it moves. Exact for 0 <= n < 2^31 and 1 <= divisor < 2^31. Host
// code computes the same bits, so CPU emulations of the kernels test it too.
struct FastDivmod {
  uint32_t d = 1, m = 1, shift = 0;
  FastDivmod() = default;
  explicit FastDivmod(uint32_t divisor) : d(divisor) {
    while (shift < 31 && (uint32_t(1) << shift) < divisor) ++shift;
    m = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - divisor)) / divisor + 1);
  }
  C10_HOST_DEVICE C10_ALWAYS_INLINE uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(n, m);
#else
    const uint32_t hi = static_cast<uint32_t>((uint64_t(n) * m) >> 32);
#endif
    return (hi + n) >> shift;
  }
  C10_HOST_DEVICE C10_ALWAYS_INLINE uint32_t mod(uint32_t n) const { return n - div(n) * d; }
};

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

// The argument checks below raise what the Python layer raises (TypeError,
// ValueError, RuntimeError) with the same words: the public ops run them here, on
// the native path, and in Python on the others (dtkernels/ops/_common.py).
inline std::string dtype_name(at::ScalarType s) { return "torch." + std::string(c10::getDtypeNames(s).first); }

inline void check_float(const at::Tensor& t, const char* name, const char* op) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, op, ": ", name,
                   " must be float32, float16, bfloat16 or float64, got ", dtype_name(s));
}

// residual_add's alpha as ATen's add takes it: converted to T with its overflow
// check and message (T is the tensor's dtype on the CPU, the float opmath type on
// CUDA), e.g. "value cannot be converted to type c10::Half without overflow".
template <typename T>
T checked_alpha(double alpha) {
  return c10::checked_convert<T, double>(alpha, c10::demangle_type<T>());
}

inline void check_same_shape_dtype_device(const at::Tensor& a, const char* an,
                                          const at::Tensor& b, const char* bn,
                                          const char* op) {
  check_float(a, an, op);
  check_float(b, bn, op);
  TORCH_CHECK_VALUE(a.sizes().equals(b.sizes()), op, ": ", an, " and ", bn,
                    " must have the same shape, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type(), op, ": ", an, " and ", bn,
                    " must have the same dtype, got ", dtype_name(a.scalar_type()), " and ",
                    dtype_name(b.scalar_type()));
  TORCH_CHECK(a.device() == b.device(), op, ": ", an, " and ", bn,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

// ---- Upsampling (concat_skip; reusable by any op that upsamples) ----------------

enum class Upsample { None, Nearest, Bilinear };

// The schema's `str? upsample`: None, "nearest" or "bilinear".
inline Upsample parse_upsample(const std::optional<c10::string_view>& mode, const char* op) {
  if (!mode.has_value()) return Upsample::None;
  if (*mode == "nearest") return Upsample::Nearest;
  if (*mode == "bilinear") return Upsample::Bilinear;
  TORCH_CHECK_VALUE(false, op, ": upsample must be None, 'nearest' or 'bilinear', got '",
                    std::string(*mode), "'");
}

// align_corners, as F.interpolate, only with an interpolating mode.
inline void check_align_corners(Upsample mode, bool align_corners, const char* op) {
  TORCH_CHECK_VALUE(!align_corners || mode == Upsample::Bilinear, op,
                    ": align_corners=True needs upsample='bilinear' (as F.interpolate, only interpolating modes "
                    "take it)");
}

// Fused multiply-add and floor for the host and the device, in float or double.
C10_HOST_DEVICE inline float fma_op(float a, float b, float c) { return fmaf(a, b, c); }
C10_HOST_DEVICE inline double fma_op(double a, double b, double c) { return ::fma(a, b, c); }
C10_HOST_DEVICE inline float floor_op(float v) { return floorf(v); }
C10_HOST_DEVICE inline double floor_op(double v) { return ::floor(v); }

// ATen's area_pixel_compute_scale for an integer scale factor s, in opmath type A:
// 1 / s (computed in double, as ATen does from the double scale_factor), or with
// align_corners (n_in - 1) / (n_out - 1), 0 for a single output.
template <typename A>
inline A linear_scale(int64_t n_in, int64_t n_out, int64_t s, bool align_corners) {
  if (align_corners) return n_out > 1 ? static_cast<A>(n_in - 1) / static_cast<A>(n_out - 1) : A(0);
  return static_cast<A>(1.0 / static_cast<double>(s));
}

// Source rows/columns of output index `d` for bilinear exactly as ATen's CPU kernel
// computes them (compute_source_index_and_lambda) in its opmath type A (float, or
// double for double), `scale` from linear_scale: without align_corners the source
// position is one fused multiply-add, clamped at 0; with it scale * d. Equal sizes
// map each index onto itself with weights (1, 0). Host and device share it, so every
// backend reads the same pixels with the same weights.
template <typename A>
C10_HOST_DEVICE inline void linear_source(int64_t d, A scale, int64_t n_in, int64_t n_out, int64_t& i0,
                                          int64_t& i1, A& l0, A& l1, bool align_corners = false) {
  if (n_in == n_out) {
    i0 = i1 = d;
    l0 = A(1);
    l1 = A(0);
    return;
  }
  A src = align_corners ? scale * static_cast<A>(d) : fma_op(scale, static_cast<A>(d) + A(0.5), A(-0.5));
  src = src < A(0) ? A(0) : src;
  i0 = static_cast<int64_t>(floor_op(src));
  i0 = i0 < n_in - 1 ? i0 : n_in - 1;
  A lam = src - static_cast<A>(i0);
  lam = lam < A(0) ? A(0) : (lam > A(1) ? A(1) : lam);
  i1 = i0 + (i0 < n_in - 1 ? 1 : 0);
  l1 = lam;
  l0 = A(1) - lam;
}

// ATen's rule for the memory format of torch.cat: channels_last only when every
// input suggests it, NCHW otherwise (so mixed inputs give NCHW).
inline at::MemoryFormat cat_memory_format(const at::Tensor& a, const at::Tensor& b) {
  const auto fa = a.suggest_memory_format(), fb = b.suggest_memory_format();
  return fa == fb ? fa : at::MemoryFormat::Contiguous;
}

// concat_skip's input contract (the Python layer checks the same with friendlier
// types; this keeps direct calls of the native ops safe).
inline void check_concat_skip(const at::Tensor& x, const at::Tensor& skip, Upsample mode,
                              int64_t scale, const char* op) {
  check_float(x, "x", op);
  check_float(skip, "skip", op);
  TORCH_CHECK_VALUE(x.dim() == 4 && skip.dim() == 4, op, ": x and skip must be 4-D (N, C, H, W), got ",
                    x.dim(), "-D and ", skip.dim(), "-D");
  TORCH_CHECK_VALUE(x.scalar_type() == skip.scalar_type(), op, ": x and skip must have the same dtype, got ",
                    dtype_name(x.scalar_type()), " and ", dtype_name(skip.scalar_type()));
  TORCH_CHECK(x.device() == skip.device(), op, ": x and skip must be on the same device, got ",
              x.device(), " and ", skip.device());
  TORCH_CHECK_VALUE(x.size(0) == skip.size(0), op, ": x and skip must have the same batch size, got ",
                    x.size(0), " and ", skip.size(0));
  const int64_t s = mode == Upsample::None ? 1 : scale;
  TORCH_CHECK_VALUE(mode == Upsample::None || scale >= 1, op, ": scale_factor must be a positive integer, got ", scale);
  // Divides rather than multiplies: x's size times a huge scale would wrap and pass.
  TORCH_CHECK_VALUE(skip.size(2) % s == 0 && skip.size(2) / s == x.size(2) && skip.size(3) % s == 0 &&
                        skip.size(3) / s == x.size(3),
                    op,
                    ": x's spatial size ", x.sizes().slice(2), mode == Upsample::None ? "" : " times scale_factor ",
                    mode == Upsample::None ? "" : std::to_string(scale), " must equal skip's ", skip.sizes().slice(2));
}

// The first output channel of concat_skip's two parts: up(x) at x0, skip at s0
// (skip_first: skip, then up(x)).
struct ConcatOffsets {
  int64_t x0, s0;
};
inline ConcatOffsets concat_offsets(int64_t cx, int64_t cs, bool skip_first) {
  return skip_first ? ConcatOffsets{cs, 0} : ConcatOffsets{0, cx};
}

// concat_skip's output, (N, Cx + Cs, skip's H and W) in torch.cat's memory format.
inline at::Tensor new_concat_skip_output(const at::Tensor& x, const at::Tensor& skip) {
  return new_empty({x.size(0), x.size(1) + skip.size(1), skip.size(2), skip.size(3)}, skip.options(),
                   cat_memory_format(x, skip));
}

// The upsample adjoint's checks and output: grad_up (N, C, H*s, W*s) gives x's
// gradient (N, C, H, W) in grad_up's suggested format (as ATen's upsample backward).
inline at::Tensor new_upsample_grad(const at::Tensor& grad_up, Upsample mode, int64_t scale, const char* op) {
  const int64_t s = mode == Upsample::None ? 1 : scale;
  check_float(grad_up, "grad_up", op);
  TORCH_CHECK_VALUE(grad_up.dim() == 4, op, ": grad_up must be 4-D (N, C, H, W), got ", grad_up.dim(), "-D");
  TORCH_CHECK_VALUE(mode == Upsample::None || scale >= 1, op, ": scale_factor must be a positive integer, got ", scale);
  TORCH_CHECK_VALUE(s >= 1 && grad_up.size(2) % s == 0 && grad_up.size(3) % s == 0, op, ": grad_up's spatial size ",
                    grad_up.sizes().slice(2), " must be a multiple of scale_factor ", scale);
  return new_empty({grad_up.size(0), grad_up.size(1), grad_up.size(2) / s, grad_up.size(3) / s}, grad_up.options(),
                   grad_up.suggest_memory_format());
}

}  // namespace dtkernels
