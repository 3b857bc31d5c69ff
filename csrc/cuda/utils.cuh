// Helpers shared by the CUDA kernels. Only ATen/ATen.h, torch/library.h and
// c10/cuda headers are used, so every .cu compiles against a CPU torch's headers
// too (CI checks them with nvcc even without a GPU).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dtkernels {
namespace cuda {

// The type a kernel computes in: float for the 16-bit types (as ATen's opmath).
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <typename T> using acc_t = typename acc_type<T>::type;

// N elements moved as one 16-byte (or narrower) access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

inline int sm_count() {
  int dev = 0, n = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

// Blocks for a grid-stride loop over `work` items: enough to fill every SM a few
// times over, never more than the work needs.
inline unsigned grid_for(int64_t work, int threads, int blocks_per_sm = 4) {
  int64_t need = (work + threads - 1) / threads;
  int64_t cap = static_cast<int64_t>(sm_count()) * blocks_per_sm;
  int64_t g = need < cap ? need : cap;
  return static_cast<unsigned>(g < 1 ? 1 : g);
}

__host__ __device__ inline bool aligned_to(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Division by a runtime constant in a few instructions (a magic multiplier and a
// shift, as ATen's IntDivider), for index math that would otherwise cost more than
// the bytes it moves. Exact for 0 <= n < 2^31 and 1 <= divisor < 2^31.
struct FastDivmod {
  uint32_t d = 1, m = 1, shift = 0;
  FastDivmod() = default;
  explicit FastDivmod(uint32_t divisor) : d(divisor) {
    while (shift < 31 && (uint32_t(1) << shift) < divisor) ++shift;
    m = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - divisor)) / divisor + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, m) + n) >> shift; }
  __device__ __forceinline__ uint32_t mod(uint32_t n) const { return n - div(n) * d; }
};

__device__ __forceinline__ float relu(float v) { return v < 0.f ? 0.f : v; }
__device__ __forceinline__ double relu(double v) { return v < 0.0 ? 0.0 : v; }

}  // namespace cuda
}  // namespace dtkernels
