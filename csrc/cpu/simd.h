// Vectorisation without -march: hot loops are plain C++ over raw pointers, compiled
// once per ISA level by GCC/Clang `target_clones` and picked at load time (ifunc).
// The wheel therefore runs on any x86-64 CPU and still uses AVX-512 where present.
//
// Rules for a cloned function: take raw pointers and scalars, call only
// DTK_INLINE helpers or header-inline code (inlined into each clone), and keep the
// inner loop branch-free so the compiler can vectorise it.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(DTK_NO_CLONES)
#define DTK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DTK_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define DTK_INLINE __attribute__((always_inline)) inline
#define DTK_RESTRICT __restrict__
#else
#define DTK_INLINE inline
#define DTK_RESTRICT
#endif

namespace dtkernels {
namespace cpu {

// The type a kernel computes in: float for the 16-bit types (as ATen's opmath).
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <typename T> using acc_t = typename acc_type<T>::type;

// Elements per parallel chunk: large enough to amortise a task, small enough that
// both cores get work on mid-sized tensors.
constexpr int64_t kGrain = 32768;

// max(v, 0) that keeps NaN (ATen's relu propagates it).
template <typename A> DTK_INLINE A relu(A v) { return v < A(0) ? A(0) : v; }

// ---- explicit vectors (GCC vector extensions) -----------------------------------------
// For loops the autovectoriser gives up on, e.g. a running maximum kept in registers
// across a runtime number of inputs. 32-byte vectors: native on x86-64-v3 and v4 (on
// Zen 4 and most Intel parts as fast as 64-byte ones); the baseline clone lowers them
// to SSE. Elements are loaded into and stored from the compute type (acc_t): 16-bit
// floats convert exactly as c10::Half / c10::BFloat16 do, eight at a time.
#pragma GCC diagnostic ignored "-Wpsabi"  // the vector helpers are always inlined: no ABI to keep
typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef int64_t i64x4 __attribute__((vector_size(32)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

// The vector of a compute type: V holds N values, M is a comparison's result, I holds
// N int32s (one per value).
template <typename A> struct Lanes;
template <> struct Lanes<float> {
  using V = f32x8; using M = i32x8; using I = i32x8;
  static constexpr int N = 8;
  static DTK_INLINE I narrow(M m) { return m; }
};
template <> struct Lanes<double> {
  using V = f64x4; using M = i64x4; using I = i32x4;
  static constexpr int N = 4;
  static DTK_INLINE I narrow(M m) { return __builtin_convertvector(m, i32x4); }
};

template <typename V, typename S> DTK_INLINE V loadu(const S* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
template <typename V, typename D> DTK_INLINE void storeu(D* p, V v) { __builtin_memcpy(p, &v, sizeof v); }

// IEEE half <-> float, c10's branch-free algorithms (fp16_ieee_to_fp32_value /
// fp16_ieee_from_fp32_value) on eight lanes.
DTK_INLINE f32x8 half_to_float(u16x8 h) {
  const u32x8 w = __builtin_convertvector(h, u32x8) << 16;
  const u32x8 sign = w & 0x80000000u;
  const u32x8 two_w = w + w;
  const f32x8 normalized = (f32x8)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const f32x8 denormalized = (f32x8)((two_w >> 17) | (126u << 23)) - 0.5f;
  const u32x8 bits = two_w < (1u << 27) ? (u32x8)denormalized : (u32x8)normalized;
  return (f32x8)(sign | bits);
}
DTK_INLINE u16x8 float_to_half(f32x8 f) {
  const u32x8 w = (u32x8)f;
  f32x8 base = ((f32x8)(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  const u32x8 shl1_w = w + w;
  const u32x8 sign = w & 0x80000000u;
  u32x8 bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = (f32x8)((bias >> 1) + 0x07800000u) + base;
  const u32x8 bits = (u32x8)base;
  const u32x8 nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0xFFFu);
  const u32x8 nan = u32x8{} + 0x7E00u;
  return __builtin_convertvector((sign >> 16) | (shl1_w > 0xFF000000u ? nan : nonsign), u16x8);
}
// bfloat16: the upper half of a float; rounding to nearest even, NaN -> 0x7FC0 (c10's).
DTK_INLINE f32x8 bf16_to_float(u16x8 h) { return (f32x8)(__builtin_convertvector(h, u32x8) << 16); }
DTK_INLINE u16x8 float_to_bf16(f32x8 f) {
  const u32x8 u = (u32x8)f;
  const u32x8 nan = u32x8{} + 0x7FC0u;
  const u32x8 r = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  return __builtin_convertvector(f != f ? nan : r, u16x8);
}

DTK_INLINE f32x8 vload(const float* p) { return loadu<f32x8>(p); }
DTK_INLINE f64x4 vload(const double* p) { return loadu<f64x4>(p); }
DTK_INLINE f32x8 vload(const c10::Half* p) { return half_to_float(loadu<u16x8>(p)); }
DTK_INLINE f32x8 vload(const c10::BFloat16* p) { return bf16_to_float(loadu<u16x8>(p)); }
DTK_INLINE void vstore(float* p, f32x8 v) { storeu(p, v); }
DTK_INLINE void vstore(double* p, f64x4 v) { storeu(p, v); }
DTK_INLINE void vstore(c10::Half* p, f32x8 v) { storeu(p, float_to_half(v)); }
DTK_INLINE void vstore(c10::BFloat16* p, f32x8 v) { storeu(p, float_to_bf16(v)); }

// n elements converted between a type and its compute type A (or copied): a vector
// at a time (GCC converts to and from the 16-bit types one element at a time), the
// rest of a copy with a fixed bound (GCC turns a copy loop of runtime length into a
// memmove call: 10 ns for one pixel's few channels).
template <typename A, typename D, typename S>
DTK_INLINE void convert_px(D* DTK_RESTRICT dst, const S* DTK_RESTRICT src, int64_t n) {
  constexpr int N = Lanes<A>::N;
  int64_t k = 0;
  for (; k + N <= n; k += N) vstore(dst + k, vload(src + k));
  if constexpr (std::is_same_v<D, S>) {  // a copy: kept from becoming a memmove call
    if (k == n) return;
    for (int j = 0; j < N - 1; ++j)
      if (k + j < n) dst[k + j] = src[k + j];
  } else {
    for (; k < n; ++k) dst[k] = static_cast<D>(static_cast<A>(src[k]));
  }
}

// The first (lo) or second (hi) halves of a and b interleaved: {a0, b0, a1, b1, ...}.
DTK_INLINE f32x8 interleave_lo(f32x8 a, f32x8 b) { return __builtin_shufflevector(a, b, 0, 8, 1, 9, 2, 10, 3, 11); }
DTK_INLINE f32x8 interleave_hi(f32x8 a, f32x8 b) { return __builtin_shufflevector(a, b, 4, 12, 5, 13, 6, 14, 7, 15); }
DTK_INLINE f64x4 interleave_lo(f64x4 a, f64x4 b) { return __builtin_shufflevector(a, b, 0, 4, 1, 5); }
DTK_INLINE f64x4 interleave_hi(f64x4 a, f64x4 b) { return __builtin_shufflevector(a, b, 2, 6, 3, 7); }

// An N x N block (N = Lanes<A>::N vectors of N) transposed in place: log2(N) rounds of
// interleaving vector l with vector l + N/2 (each round rotates the index bits).
template <typename V, int N>
DTK_INLINE void transpose(V (&v)[N]) {
  for (int round = 1; round < N; round *= 2) {
    V t[N];
    for (int l = 0; l < N / 2; ++l) {
      t[2 * l] = interleave_lo(v[l], v[l + N / 2]);
      t[2 * l + 1] = interleave_hi(v[l], v[l + N / 2]);
    }
    for (int l = 0; l < N; ++l) v[l] = t[l];
  }
}

// Non-temporal stores, for outputs too large to stay in cache: no read-for-ownership
// of the destination lines, no eviction of the inputs. `p` must be 16-byte aligned;
// call stream_fence() before the data is handed to another thread.
#if defined(__x86_64__)
typedef float f32x4 __attribute__((vector_size(16)));
typedef double f64x2 __attribute__((vector_size(16)));
typedef long long i64x2 __attribute__((vector_size(16)));
template <typename H, typename V> DTK_INLINE H half_of(V v, int k) {
  H h;
  __builtin_memcpy(&h, reinterpret_cast<const char*>(&v) + k * sizeof(H), sizeof(H));
  return h;
}
DTK_INLINE void vstream(float* p, f32x8 v) {
  __builtin_ia32_movntps(p, half_of<f32x4>(v, 0));
  __builtin_ia32_movntps(p + 4, half_of<f32x4>(v, 1));
}
DTK_INLINE void vstream(double* p, f64x4 v) {
  __builtin_ia32_movntpd(p, half_of<f64x2>(v, 0));
  __builtin_ia32_movntpd(p + 2, half_of<f64x2>(v, 1));
}
DTK_INLINE void vstream(c10::Half* p, f32x8 v) {
  __builtin_ia32_movntdq(reinterpret_cast<i64x2*>(p), half_of<i64x2>(float_to_half(v), 0));
}
DTK_INLINE void vstream(c10::BFloat16* p, f32x8 v) {
  __builtin_ia32_movntdq(reinterpret_cast<i64x2*>(p), half_of<i64x2>(float_to_bf16(v), 0));
}
DTK_INLINE void stream_fence() { __builtin_ia32_sfence(); }
#else
template <typename T, typename V> DTK_INLINE void vstream(T* p, V v) { vstore(p, v); }
DTK_INLINE void stream_fence() {}
#endif

// dst[0, n) = src[0, n) converted, with non-temporal stores from the first 16-byte
// boundary on (whole vectors; the ends plainly). For rows of outputs too large to
// stay in cache. Call stream_fence() before the data is handed to another thread.
template <typename A, typename T>
DTK_INLINE void stream_convert(T* DTK_RESTRICT dst, const A* DTK_RESTRICT src, int64_t n) {
  constexpr int N = Lanes<A>::N;
  int64_t k = 0;
  for (; k < n && reinterpret_cast<uintptr_t>(dst + k) % 16 != 0; ++k) dst[k] = static_cast<T>(src[k]);
  for (; k + N <= n; k += N) vstream(dst + k, vload(src + k));
  for (; k < n; ++k) dst[k] = static_cast<T>(src[k]);
}

// ---- float16 through F16C ---------------------------------------------------------------
// GCC 12 converts c10::Half (and _Float16) one element at a time even in the x86-64-v3/v4
// clones, and c10's bit tricks on eight lanes are slower still; F16C's vcvtph2ps and
// vcvtps2ph convert eight at once. A function marked DTK_F16C may use them (with AVX2
// and FMA), must be called only when cpu_f16c() is true, and has a name ending in _f16c,
// which is what the build test's check for wide-vector code outside dispatched clones
// allows.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(DTK_NO_CLONES)
#define DTK_HAVE_F16C 1
#define DTK_F16C __attribute__((target("avx2,fma,f16c")))
#else
#define DTK_HAVE_F16C 0
#endif

inline bool cpu_has_f16c() {
#if DTK_HAVE_F16C
  static const bool has =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

// Whether the F16C kernels run: the CPU has F16C, AVX2 and FMA, and no test has turned them
// off (to compare them with the generic clones).
inline std::atomic<bool>& f16c_flag() {
  static std::atomic<bool> on{cpu_has_f16c()};
  return on;
}
inline bool cpu_f16c() { return f16c_flag().load(std::memory_order_relaxed); }

}  // namespace cpu
}  // namespace dtkernels
