// residual_add on the CPU: out = act(x + alpha * fx), one read of each input and one
// write, parallel over flat storage when both inputs share a dense layout (NCHW,
// channels_last, ...), and a strided TensorIterator loop otherwise.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <torch/library.h>

#include "../common.h"
#include "simd.h"

#if DTK_HAVE_F16C
#include <immintrin.h>
#endif

#include <cmath>
#include <type_traits>

namespace dtkernels {
namespace cpu {
namespace {

template <typename T>
DTK_INLINE void add_act(const T* DTK_RESTRICT x, const T* DTK_RESTRICT fx,
                        T* DTK_RESTRICT out, int64_t n, acc_t<T> alpha, bool act) {
  using A = acc_t<T>;
  if (act) {
    for (int64_t i = 0; i < n; ++i) out[i] = T(relu(A(x[i]) + alpha * A(fx[i])));
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = T(A(x[i]) + alpha * A(fx[i]));
  }
}

// One strided row (the TensorIterator path): std::fma, one rounding as the flat
// kernels and ATen; an FMA instruction in the clones that have one. Strides in bytes.
template <typename T>
DTK_INLINE void add_act_strided(const T* x, int64_t sx, const T* fx, int64_t sf, T* out, int64_t so, int64_t n,
                                acc_t<T> alpha, bool act) {
  using A = acc_t<T>;
  const char *px = reinterpret_cast<const char*>(x), *pf = reinterpret_cast<const char*>(fx);
  char* po = reinterpret_cast<char*>(out);
  for (int64_t i = 0; i < n; ++i) {
    const A v = std::fma(alpha, A(*reinterpret_cast<const T*>(pf + i * sf)), A(*reinterpret_cast<const T*>(px + i * sx)));
    *reinterpret_cast<T*>(po + i * so) = T(act ? relu(v) : v);
  }
}

// grad_in = scale * (out <= 0 ? 0 : grad): ATen's threshold_backward (a NaN output
// passes its gradient) times alpha, so a blocked element is 0 * alpha as in eager
// (-0 for a negative alpha, NaN for an infinite one).
template <typename T>
DTK_INLINE void masked_scale(const T* DTK_RESTRICT g, const T* DTK_RESTRICT out,
                             T* DTK_RESTRICT gin, int64_t n, acc_t<T> scale) {
  using A = acc_t<T>;
  for (int64_t i = 0; i < n; ++i) gin[i] = T(scale * (A(out[i]) <= A(0) ? A(0) : A(g[i])));
}

#define DTK_RA_CLONES(T)                                                           \
  DTK_CLONES void add_act_k(const T* x, const T* fx, T* out, int64_t n,            \
                            acc_t<T> alpha, bool act) {                            \
    add_act<T>(x, fx, out, n, alpha, act);                                         \
  }                                                                                \
  DTK_CLONES void add_act_strided_k(const T* x, int64_t sx, const T* fx,           \
                                    int64_t sf, T* out, int64_t so, int64_t n,     \
                                    acc_t<T> alpha, bool act) {                    \
    add_act_strided<T>(x, sx, fx, sf, out, so, n, alpha, act);                     \
  }                                                                                \
  DTK_CLONES void masked_scale_k(const T* g, const T* out, T* gin, int64_t n,      \
                                 acc_t<T> scale) {                                 \
    masked_scale<T>(g, out, gin, n, scale);                                        \
  }
DTK_RA_CLONES(float)
DTK_RA_CLONES(double)
DTK_RA_CLONES(c10::Half)
DTK_RA_CLONES(c10::BFloat16)
#undef DTK_RA_CLONES

#if DTK_HAVE_F16C
// float16 with F16C: the x86-64-v3/v4 clones' arithmetic (GCC contracts x + alpha * fx
// into one FMA there) on eight lanes, so the results are theirs bit for bit (NaN
// payloads aside).
DTK_F16C void add_act_f16c(const c10::Half* x, const c10::Half* fx, c10::Half* out, int64_t n, float alpha,
                           bool act) {
  const __m256 a = _mm256_set1_ps(alpha), zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 vx = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
    const __m256 vf = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(fx + i)));
    __m256 v = _mm256_fmadd_ps(a, vf, vx);
    if (act) v = _mm256_max_ps(zero, v);  // 0 > v ? 0 : v, so NaN and -0 pass as relu()
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  add_act<c10::Half>(x + i, fx + i, out + i, n - i, alpha, act);
}

DTK_F16C void masked_scale_f16c(const c10::Half* g, const c10::Half* out, c10::Half* gin, int64_t n, float scale) {
  const __m256 s = _mm256_set1_ps(scale), zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 vo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(out + i)));
    const __m256 vg = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + i)));
    const __m256 v = _mm256_mul_ps(s, _mm256_andnot_ps(_mm256_cmp_ps(vo, zero, _CMP_LE_OQ), vg));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(gin + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  masked_scale<c10::Half>(g + i, out + i, gin + i, n - i, scale);
}
#endif

// The flat kernels per type: F16C for float16 where the CPU has it, else the clones.
template <typename T>
void add_act_flat(const T* x, const T* fx, T* out, int64_t n, acc_t<T> alpha, bool act) {
#if DTK_HAVE_F16C
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (cpu_f16c()) return add_act_f16c(x, fx, out, n, alpha, act);
  }
#endif
  add_act_k(x, fx, out, n, alpha, act);
}

template <typename T>
void masked_scale_flat(const T* g, const T* out, T* gin, int64_t n, acc_t<T> scale) {
#if DTK_HAVE_F16C
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (cpu_f16c()) return masked_scale_f16c(g, out, gin, n, scale);
  }
#endif
  masked_scale_k(g, out, gin, n, scale);
}

// Runs `flat(a, b, out, n)` over matching dense layouts, or `row(a, stride_a, b,
// stride_b, out, stride_out, n)` over a TensorIterator's rows for everything else.
template <typename T, typename Flat, typename Row>
void binary_map(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, Flat flat,
                Row row) {
  if (same_dense_layout(a, b) && same_dense_layout(a, out)) {
    const T* pa = a.const_data_ptr<T>();
    const T* pb = b.const_data_ptr<T>();
    T* po = out.mutable_data_ptr<T>();
    at::parallel_for(0, a.numel(), kGrain, [&](int64_t begin, int64_t end) {
      flat(pa + begin, pb + begin, po + begin, end - begin);
    });
    return;
  }
  auto iter = at::TensorIteratorConfig()
                  .add_output(out)
                  .add_const_input(a)
                  .add_const_input(b)
                  .check_all_same_dtype(true)
                  .resize_outputs(false)
                  .build();
  iter.for_each([&](char** data, const int64_t* strides, int64_t n0, int64_t n1) {
    for (int64_t j = 0; j < n1; ++j)
      row(data[1] + j * strides[4], strides[1], data[2] + j * strides[5], strides[2], data[0] + j * strides[3],
          strides[0], n0);
  }, kGrain);
}

at::Tensor residual_add(const at::Tensor& x, const at::Tensor& fx, double alpha, bool act) {
  check_same_shape_dtype_device(x, "x", fx, "fx", "residual_add");
  at::Tensor out = new_empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "residual_add", [&] {
    using A = acc_t<scalar_t>;
    // ATen's CPU add rounds alpha to the tensor's dtype first (alpha.to<scalar_t>()),
    // and checks it even for empty tensors.
    const A a = static_cast<A>(checked_alpha<scalar_t>(alpha));
    if (out.numel() == 0) return;
    binary_map<scalar_t>(
        x, fx, out,
        [&](const scalar_t* px, const scalar_t* pf, scalar_t* po, int64_t n) {
          add_act_flat(px, pf, po, n, a, act);
        },
        [&](const char* px, int64_t sx, const char* pf, int64_t sf, char* po, int64_t so, int64_t n) {
          add_act_strided_k(reinterpret_cast<const scalar_t*>(px), sx, reinterpret_cast<const scalar_t*>(pf), sf,
                            reinterpret_cast<scalar_t*>(po), so, n, a, act);
        });
  });
  return out;
}

at::Tensor residual_add_backward(const at::Tensor& grad_out, const at::Tensor& out, double scale) {
  check_same_shape_dtype_device(grad_out, "grad_out", out, "out", "residual_add_backward");
  at::Tensor grad_in = new_empty_like(out);
  if (grad_in.numel() == 0) return grad_in;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "residual_add_backward", [&] {
    using A = acc_t<scalar_t>;
    const A s = static_cast<A>(scale);
    binary_map<scalar_t>(
        grad_out, out, grad_in,
        [&](const scalar_t* pg, const scalar_t* po, scalar_t* pi, int64_t n) {
          masked_scale_flat(pg, po, pi, n, s);
        },
        [&](const char* pg, int64_t sg, const char* po, int64_t so, char* pi, int64_t si, int64_t n) {
          for (int64_t i = 0; i < n; ++i) {
            const A o = A(*reinterpret_cast<const scalar_t*>(po + i * so));
            const A g = A(*reinterpret_cast<const scalar_t*>(pg + i * sg));
            *reinterpret_cast<scalar_t*>(pi + i * si) = scalar_t(s * (o <= A(0) ? A(0) : g));
          }
        });
  });
  return grad_in;
}

}  // namespace
}  // namespace cpu
}  // namespace dtkernels

TORCH_LIBRARY_IMPL(dtkernels, CPU, m) {
  m.impl("_residual_add", &dtkernels::cpu::residual_add);
  m.impl("_residual_add_backward", &dtkernels::cpu::residual_add_backward);
}
