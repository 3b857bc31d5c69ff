// concat_skip on CUDA: out = cat([up(x), skip], 1), and the upsample's adjoint.
//
// Each thread writes V consecutive elements of the dense output (along W for NCHW,
// along C for channels_last) with one 16-byte store, in a grid-stride loop on the
// current stream. A pack whose elements come from one unit-stride source (a skip
// row, a channels_last pixel) is read with one 16-byte load when aligned; an
// upsampled pack is made at once where it can be (one load for a nearest NCHW pack at
// s = 2, four pack loads for a bilinear channels_last pack); other packs gather
// element by element. Inputs are read through their own strides, so channel slices
// and mixed memory formats need no copy. On an H100 the nearest U-Net skip runs at
// 0.88 of copy bandwidth (benchmarks/results/h100-20261127.md).
//
// The adjoint is a gather in a fixed order (deterministic, no atomics): each x
// element sums, in ATen's CPU order, the output elements that read it. Index and
// weight arithmetic is csrc/common.h's linear_source, shared with the CPU kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <type_traits>

#include "../concat_skip.h"
#include "utils.cuh"

namespace dtkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Every pack of a dense output, one thread item each (concat_pack_item).
template <typename T, int V, bool CL, typename F>
__global__ void pack_kernel(T* __restrict__ out, Walk o, F f) {
  const int64_t packs = o.rows * o.per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < packs; q += stride)
    concat_pack_item<T, V, CL>(out, o, f, q);
}

// Launches pack_kernel over `out` with functor Op<T, MODE>{args...}, as many blocks
// as fit at once (resident_grid: up to 8 of 256 threads per SM).
template <template <typename, int> class Op, typename T, int BILINEAR = 2, typename... Args>
void launch(at::Tensor& out, Upsample mode, Args... args) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  for_concat_packs<Op, T, BILINEAR>(out, mode, [&](auto v, auto cl, const auto& f, const Walk& o) {
    const auto kernel = pack_kernel<T, decltype(v)::value, decltype(cl)::value, std::decay_t<decltype(f)>>;
    const int64_t packs = o.rows * o.per_row;
    const unsigned grid = resident_grid(kernel, packs, kThreads);
    kernel<<<grid, kThreads, 0, stream>>>(out.mutable_data_ptr<T>(), o, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }, args...);
}

at::Tensor concat_skip(const at::Tensor& x, const at::Tensor& skip, std::optional<c10::string_view> upsample,
                       int64_t scale_factor, bool align_corners, bool skip_first) {
  const Upsample mode = parse_upsample(upsample, "concat_skip");
  check_align_corners(mode, align_corners, "concat_skip");
  check_concat_skip(x, skip, mode, scale_factor, "concat_skip");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = new_concat_skip_output(x, skip);
  if (out.numel() == 0) return out;
  TORCH_CHECK(out.size(2) < (int64_t(1) << 31) && out.size(3) < (int64_t(1) << 31),
              "concat_skip: H and W must each be below 2^31 on CUDA, got ", out.sizes());
  const int s = mode == Upsample::None ? 1 : static_cast<int>(scale_factor);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "concat_skip_cuda", [&] {
    using A = acc_t<scalar_t>;
    launch<Concat, scalar_t>(out, mode, strided4<scalar_t>(x), strided4<scalar_t>(skip), x.size(1),
                             x.size(2), x.size(3), s, linear_scale<A>(x.size(2), out.size(2), s, align_corners),
                             linear_scale<A>(x.size(3), out.size(3), s, align_corners),
                             FastDivmod(static_cast<uint32_t>(s)), align_corners,
                             concat_offsets(x.size(1), skip.size(1), skip_first));
  });
  return out;
}

// shared_packs: bilinear packs by Adjoint's candidate bilinear_pack (concat_skip_backward_variant).
at::Tensor backward(const at::Tensor& grad_up, std::optional<c10::string_view> upsample, int64_t scale_factor,
                    bool align_corners, bool shared_packs) {
  const Upsample mode = parse_upsample(upsample, "concat_skip_backward");
  check_align_corners(mode, align_corners, "concat_skip_backward");
  c10::cuda::CUDAGuard guard(grad_up.device());
  at::Tensor gx = new_upsample_grad(grad_up, mode, scale_factor, "concat_skip_backward");
  if (gx.numel() == 0) return gx;
  const int s = mode == Upsample::None ? 1 : static_cast<int>(scale_factor);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_up.scalar_type(), "concat_skip_backward_cuda", [&] {
    using A = acc_t<scalar_t>;
    const auto run = [&](auto bilinear) {
      launch<Adjoint, scalar_t, decltype(bilinear)::value>(
          gx, mode, strided4<scalar_t>(grad_up), grad_up.size(2), grad_up.size(3), s,
          linear_scale<A>(gx.size(2), grad_up.size(2), s, align_corners),
          linear_scale<A>(gx.size(3), grad_up.size(3), s, align_corners), align_corners);
    };
    if (shared_packs) run(std::integral_constant<int, 3>{});
    else run(std::integral_constant<int, 2>{});
  });
  return gx;
}

at::Tensor concat_skip_backward(const at::Tensor& grad_up, std::optional<c10::string_view> upsample,
                                int64_t scale_factor, bool align_corners) {
  return backward(grad_up, upsample, scale_factor, align_corners, false);
}

}  // namespace

at::Tensor concat_skip_backward_variant(const at::Tensor& grad_up, std::optional<c10::string_view> upsample,
                                        int64_t scale_factor, bool align_corners, bool shared_packs) {
  TORCH_CHECK(grad_up.is_cuda(), "_cuda_concat_skip_backward_variant: expected a CUDA tensor, got one on ",
              grad_up.device());
  return backward(grad_up, upsample, scale_factor, align_corners, shared_packs);
}
}  // namespace cuda
}  // namespace dtkernels

TORCH_LIBRARY_IMPL(dtkernels, CUDA, m) {
  m.impl("_concat_skip", &dtkernels::cuda::concat_skip);
  m.impl("_concat_skip_backward", &dtkernels::cuda::concat_skip_backward);
}
