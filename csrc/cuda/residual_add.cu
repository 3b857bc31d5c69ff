// residual_add on CUDA: out = act(x + alpha * fx) over flat storage, 16-byte vector
// accesses in a grid-stride loop on the current stream. Inputs whose layout differs
// from the output's (strided views, mixed memory formats) are first copied into it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../common.h"
#include "utils.cuh"

namespace dtkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, int N>
__global__ void residual_add_kernel(const T* __restrict__ x, const T* __restrict__ fx,
                                    T* __restrict__ out, int64_t n, acc_t<T> alpha,
                                    bool act) {
  using A = acc_t<T>;
  using P = Pack<T, N>;
  const int64_t packs = n / N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += stride) {
    P a = reinterpret_cast<const P*>(x)[p];
    P b = reinterpret_cast<const P*>(fx)[p];
    P o;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      A v = static_cast<A>(a.v[k]) + alpha * static_cast<A>(b.v[k]);
      o.v[k] = static_cast<T>(act ? relu(v) : v);
    }
    reinterpret_cast<P*>(out)[p] = o;
  }
  // The tail that does not fill a pack.
  for (int64_t i = packs * N + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    A v = static_cast<A>(x[i]) + alpha * static_cast<A>(fx[i]);
    out[i] = static_cast<T>(act ? relu(v) : v);
  }
}

template <typename T, int N>
__global__ void residual_add_backward_kernel(const T* __restrict__ g, const T* __restrict__ y,
                                             T* __restrict__ gin, int64_t n, acc_t<T> scale) {
  using A = acc_t<T>;
  using P = Pack<T, N>;
  const int64_t packs = n / N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += stride) {
    P a = reinterpret_cast<const P*>(g)[p];
    P b = reinterpret_cast<const P*>(y)[p];
    P o;
#pragma unroll
    for (int k = 0; k < N; ++k)
      o.v[k] = static_cast<T>(scale * (static_cast<A>(b.v[k]) <= A(0) ? A(0) : static_cast<A>(a.v[k])));
    reinterpret_cast<P*>(gin)[p] = o;
  }
  for (int64_t i = packs * N + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    gin[i] = static_cast<T>(scale * (static_cast<A>(y[i]) <= A(0) ? A(0) : static_cast<A>(g[i])));
}

// Launches `vec` (16-byte packs of vec_width elements) when all three pointers are
// 16-byte aligned, else the one-element `scalar` instantiation.
template <typename T, typename... Args>
void launch_binary(void (*vec)(const T*, const T*, T*, int64_t, Args...),
                   void (*scalar)(const T*, const T*, T*, int64_t, Args...),
                   int vec_width, const T* a, const T* b, T* out, int64_t n, Args... args) {
  const bool vectorise = aligned_to(a, 16) && aligned_to(b, 16) && aligned_to(out, 16);
  auto kernel = vectorise ? vec : scalar;
  const int64_t work = vectorise ? (n + vec_width - 1) / vec_width : n;
  kernel<<<grid_for(work, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a, b, out, n, args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor residual_add(const at::Tensor& x, const at::Tensor& fx_in, double alpha, bool act) {
  check_same_shape_dtype_device(x, "x", fx_in, "fx", "residual_add");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = new_empty_like(x);  // x's layout, as the fake kernel's empty_like
  at::Tensor xd = as_layout_of(x, out);
  at::Tensor fx = as_layout_of(fx_in, out);
  const int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "residual_add_cuda", [&] {
    const auto a = checked_alpha<acc_t<scalar_t>>(alpha);  // ATen's CUDA add: alpha in opmath, checked even if empty
    if (n == 0) return;
    constexpr int N = 16 / sizeof(scalar_t);
    launch_binary<scalar_t, acc_t<scalar_t>, bool>(
        residual_add_kernel<scalar_t, N>, residual_add_kernel<scalar_t, 1>, N,
        xd.const_data_ptr<scalar_t>(), fx.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, a, act);
  });
  return out;
}

at::Tensor residual_add_backward(const at::Tensor& grad_out, const at::Tensor& y_in, double scale) {
  check_same_shape_dtype_device(grad_out, "grad_out", y_in, "out", "residual_add_backward");
  c10::cuda::CUDAGuard guard(y_in.device());
  at::Tensor gin = new_empty_like(y_in);
  at::Tensor y = as_layout_of(y_in, gin);
  at::Tensor g = as_layout_of(grad_out, gin);
  const int64_t n = gin.numel();
  if (n == 0) return gin;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "residual_add_backward_cuda", [&] {
    constexpr int N = 16 / sizeof(scalar_t);
    launch_binary<scalar_t, acc_t<scalar_t>>(
        residual_add_backward_kernel<scalar_t, N>, residual_add_backward_kernel<scalar_t, 1>, N,
        g.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
        gin.mutable_data_ptr<scalar_t>(), n, static_cast<acc_t<scalar_t>>(scale));
  });
  return gin;
}

}  // namespace
}  // namespace cuda
}  // namespace dtkernels

TORCH_LIBRARY_IMPL(dtkernels, CUDA, m) {
  m.impl("_residual_add", &dtkernels::cuda::residual_add);
  m.impl("_residual_add_backward", &dtkernels::cuda::residual_add_backward);
}
