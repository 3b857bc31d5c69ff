// Helpers shared by the CUDA kernels; Pack and FastDivmod live in ../common.h,
// since CPU emulations of some kernels run them too. Only ATen/ATen.h,
// torch/library.h and c10/cuda headers are used, so every .cu compiles against a
// CPU torch's headers too (CI checks them with nvcc even without a GPU).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <unordered_map>

#include "../common.h"

namespace dtkernels {
namespace cuda {

// The type a kernel computes in: float for the 16-bit types (as ATen's opmath).
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <typename T> using acc_t = typename acc_type<T>::type;

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


// Blocks for a grid-stride loop that all fit on the GPU at once: the kernel's
// occupancy per SM (registers, threads) times the SMs, never more than the work
// needs. More blocks than fit would run as a second, partial wave that stretches
// the loop's tail; fewer leave bytes in flight on the table. Cached per kernel.
template <typename Kernel>
unsigned resident_grid(Kernel kernel, int64_t work, int threads) {
  static std::mutex mu;
  static std::unordered_map<const void*, int> per_sm;
  const void* key = reinterpret_cast<const void*>(kernel);
  int blocks = 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = per_sm.find(key);
    if (it == per_sm.end()) {
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0));
      it = per_sm.emplace(key, blocks).first;
    }
    blocks = it->second;
  }
  return grid_for(work, threads, blocks > 0 ? blocks : 1);
}

__device__ __forceinline__ float relu(float v) { return v < 0.f ? 0.f : v; }
__device__ __forceinline__ double relu(double v) { return v < 0.0 ? 0.0 : v; }

}  // namespace cuda
}  // namespace dtkernels
