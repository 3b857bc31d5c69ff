// Vectorisation without -march: hot loops are plain C++ over raw pointers, compiled
// once per ISA level by GCC/Clang `target_clones` and picked at load time (ifunc).
// The wheel therefore runs on any x86-64 CPU and still uses AVX-512 where present.
//
// Rules for a cloned function: take raw pointers and scalars, call only
// DTK_INLINE helpers or header-inline code (inlined into each clone), and keep the
// inner loop branch-free so the compiler can vectorise it.
#pragma once

#include <cstdint>

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

}  // namespace cpu
}  // namespace dtkernels
