// max_pool2d on CUDA, NCHW and NHWC (channels_last), on the current stream.
//
// Forward, NCHW: V outputs of a row per thread from 16-byte loads where the column
// geometry is one of the common ones compiled in (max_pool2d_vec_kernel), else four
// outputs of a row per thread (max_pool2d_rows_kernel). NHWC (channels_last): one output
// pixel and a pack of channels (16-byte loads when C allows). Taps are scanned
// row-major with ATen's rule (a value replaces the running max when greater or NaN),
// from -inf at the window's first tap past the padding. Writes the values, and when
// asked the window offsets (the tap i*kw + j, for backward) and ATen's int64 indices.
// Backward is a gather: each thread gathers 16 bytes of an input row (NCHW) or one
// element or pack of channels (NHWC), visiting the few windows that can hold it in
// ascending (oh, ow) order and adding the gradient of those whose offset names it.
// Deterministic, no atomics, every element written once.
// H100, fp16 32x64x112x112 k3s2p1 (benchmarks/results/h100-20261127.md): the vec
// forward ran in 31 us against 73 us for the rows kernel, and the row-gather backward
// in 58 us against 483 us for the element-per-thread one it replaced.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>

#include "../max_pool2d.h"
#include "utils.cuh"

namespace dtkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// int32 geometry for the device (sizes are checked to fit).
using Geo = PoolDims;

Geo device_geo(const Pool2d& g) {
  // Below 2^31 with room for a row's last vector (W + V - 1 stays an int).
  constexpr int64_t kMax = (int64_t(1) << 31) - 64;
  TORCH_CHECK(g.H * g.W < kMax && g.Ho * g.Wo < kMax && g.C < kMax,
              "max_pool2d (cuda): planes of 2^31 - 64 or more elements are not supported");
  return pool_dims(g);
}

// The kernels' per-thread work is in csrc/max_pool2d.h, where the CPU tests run it too.
// PAIRS: channels compared two at a time (16-bit packs; a candidate), 1 values only,
// 2 with their taps.
template <typename T, typename O, int N, bool NHWC, int PAIRS = 0>
__global__ void max_pool2d_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t* __restrict__ idx,
                                  O* __restrict__ off, Geo g, int64_t n, PoolFastSplit fs) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < n; q += stride)
    pool_forward_item<T, O, N, NHWC, PAIRS>(q, x, out, idx, off, g, fs);
}

// The channels_last forward: one output pixel and a pack of channels per thread item
// (with_pool_layout). pairs: 16-bit packs compare two channels at a time
// (with_nhwc_pairs).
template <typename T, typename O>
void launch_nhwc_forward(const T* x, T* out, int64_t* idx, O* off, const Geo& g, int64_t numel, cudaStream_t stream,
                         bool pairs) {
  with_pool_layout<T>(true, g.C, numel, x, out, [&](auto n_, auto nhwc_, int64_t n) {
    constexpr int N = decltype(n_)::value;
    const PoolFastSplit fs = pool_fast_split<N>(g, n, true);
    const unsigned grid = grid_for(n, kThreads, 8);
    with_nhwc_pairs<T, N>(pairs, idx != nullptr || off != nullptr, g, [&](auto pairs_) {
      max_pool2d_kernel<T, O, N, decltype(nhwc_)::value, decltype(pairs_)::value>
          <<<grid, kThreads, 0, stream>>>(x, out, idx, off, g, n, fs);
    });
  });
}

template <typename T, typename O, int V>
__global__ void max_pool2d_rows_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t* __restrict__ idx,
                                       O* __restrict__ off, Geo g, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < n; q += stride)
    pool_forward_rows<T, O, V>(q, x, out, idx, off, g);
}

// NCHW "vec": V outputs of a row per thread (RH = 0, the default; candidates RH = 1, 2:
// see with_pool_vec_kernel) from 16-byte loads, the column geometry a template, the
// item split in 32-bit multiply-shifts. PAIRS (a candidate, 16-bit types): values
// compared two at a time, 1 without indices and offsets, 2 with. The per-thread code
// is pool_forward_vec (csrc/max_pool2d.h), which the CPU tests run.
template <typename T, int K, int S, int PAD, int RH, int PAIRS>
__global__ void __launch_bounds__(kThreads)
    max_pool2d_vec_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t* __restrict__ idx,
                          int8_t* __restrict__ off, Geo g, FastDivmod groups, FastDivmod blocks, uint32_t n,
                          bool packed) {
  const uint32_t stride = gridDim.x * blockDim.x;
  for (uint32_t q = blockIdx.x * blockDim.x + threadIdx.x; q < n; q += stride)
    pool_forward_vec<T, K, S, PAD, RH, PAIRS>(q, x, out, idx, off, g, groups, blocks, packed);
}

// The vec forward through a shared-memory tile of input rows per block (a candidate:
// pool_tile_load, then pool_tile_outputs; csrc/max_pool2d.h).
template <typename T, int K, int S, int PAD, int PAIRS>
__global__ void __launch_bounds__(kPoolTileThreads)
    max_pool2d_tile_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t* __restrict__ idx,
                           int8_t* __restrict__ off, Geo g, int th, FastDivmod tiles, FastDivmod groups, bool packed) {
  extern __shared__ __align__(16) unsigned char pool_tile_smem[];
  T* tile = reinterpret_cast<T*>(pool_tile_smem);
  const PoolTile t = pool_tile(blockIdx.x, g, th, tiles);
  pool_tile_load<T>(threadIdx.x, blockDim.x, x, tile, g, t);
  __syncthreads();
  pool_tile_outputs<T, K, S, PAD, PAIRS>(threadIdx.x, blockDim.x, tile, out, idx, off, g, t, groups, packed);
}

// Launches the vec forward with `rows` output rows per thread item when the input is
// 16-byte aligned and there is such a kernel for this geometry; false otherwise (the
// rows kernel then runs). full_grid: a block per 256 items instead of as many blocks
// as fit at once; pairs: 16-bit values compared in pairs, which takes a 16-bit type;
// tile_bytes > 0 (rows 0 only): through shared-memory tiles of at most that many bytes
// (up to 48 KiB), false when one window's rows do not fit (candidates, like rows > 0).
template <typename T>
bool launch_vec_forward(const T* x, T* out, int64_t* idx, void* off, const Geo& g, int64_t planes,
                        cudaStream_t stream, int rows = 0, bool full_grid = false, bool pairs = false,
                        int64_t tile_bytes = 0) {
  if (!aligned_to(x, 16)) return false;
  if (pairs && sizeof(T) != 2) return false;
  if (tile_bytes > 0 && (rows != 0 || tile_bytes > 48 * 1024)) return false;
  return with_pool_vec_kernel<T>(g, rows, [&](auto k, auto s, auto p, auto rh) {
    constexpr int K = decltype(k)::value, S = decltype(s)::value, PAD = decltype(p)::value;
    constexpr int RH = decltype(rh)::value, V = PoolVec<T, K, S, PAD>::V;
    const PoolVecItems it = pool_vec_items<T, K, S, PAD, RH>(g, planes);
    if (it.n >= (int64_t(1) << 31)) return false;
    const bool packed = g.Wo % V == 0 && aligned_to(out, sizeof(Pack<T, V>)) && (off == nullptr || aligned_to(off, V));
    if (tile_bytes > 0) {
      const PoolTilePlan tp = pool_tile_plan<T>(g, planes, tile_bytes, it.groups);
      if (tp.th == 0 || tp.blocks >= (int64_t(1) << 31)) return false;
      const auto launch_tile = [&](auto kernel) {
        kernel<<<static_cast<unsigned>(tp.blocks), tp.threads, tp.bytes, stream>>>(
            x, out, idx, static_cast<int8_t*>(off), g, static_cast<int>(tp.th),
            FastDivmod(static_cast<uint32_t>(tp.tiles)), FastDivmod(static_cast<uint32_t>(it.groups)), packed);
      };
      if constexpr (sizeof(T) == 2) {
        if (pairs) {
          if (idx == nullptr && off == nullptr) launch_tile(max_pool2d_tile_kernel<T, K, S, PAD, 1>);
          else launch_tile(max_pool2d_tile_kernel<T, K, S, PAD, 2>);
          return true;
        }
      }
      launch_tile(max_pool2d_tile_kernel<T, K, S, PAD, 0>);
      return true;
    }
    const auto launch = [&](auto kernel) {
      const unsigned grid = full_grid ? grid_for(it.n, kThreads, 1 << 20) : resident_grid(kernel, it.n, kThreads);
      kernel<<<grid, kThreads, 0, stream>>>(x, out, idx, static_cast<int8_t*>(off), g,
                                            FastDivmod(static_cast<uint32_t>(it.groups)),
                                            FastDivmod(static_cast<uint32_t>(it.blocks)),
                                            static_cast<uint32_t>(it.n), packed);
    };
    if constexpr (sizeof(T) == 2) {
      if (pairs && idx == nullptr && off == nullptr) {
        launch(max_pool2d_vec_kernel<T, K, S, PAD, RH, 1>);
        return true;
      }
      if (pairs) {
        launch(max_pool2d_vec_kernel<T, K, S, PAD, RH, 2>);
        return true;
      }
    }
    launch(max_pool2d_vec_kernel<T, K, S, PAD, RH, 0>);
    return true;
  });
}

// What the op launches for the ResNet stem's window (pool_is_stem): output rows per
// thread item and grid, as launch_vec_forward takes them. 0 and false (the default
// kernel) until an H100 has measured the candidates (the bench's stem forward, impls
// cuda-vec-*).
constexpr int kStemRows = 0;
constexpr bool kStemFullGrid = false;
// Shared-memory tiles of at most this many bytes of input rows for the stem's forward
// (launch_vec_forward's tile_bytes; the bench's cuda-tile-*), 0 for none: 0 until an
// H100 has measured them. The op falls back to the vec kernel where a tile cannot hold
// one window's rows.
constexpr int64_t kStemTileBytes = 0;
static_assert(kStemTileBytes == 0 || kStemRows == 0, "tiles take one output row per thread item");
// Whether the op's 16-bit forwards compare values in pairs: NCHW (the vec forward) and
// channels_last, with or without offsets and indices. false until an H100 has
// measured them (impls cuda-vec-*-pairs*, cuda-nhwc-pairs*).
constexpr bool kVecPairs = false;
constexpr bool kNhwcPairs = false;

template <typename T, typename O, int N, bool NHWC>
__global__ void max_pool2d_backward_kernel(const T* __restrict__ go, const O* __restrict__ off,
                                           T* __restrict__ gi, Geo g, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < n; q += stride)
    pool_backward_item<T, O, N, NHWC>(q, go, off, gi, g);
}

// Backward, NCHW, "rows": one thread per 16 bytes of an input row, V columns, gathered
// by pool_backward_columns (csrc/max_pool2d.h, which the CPU tests also run). The item
// splits are 32-bit multiply-shifts, not the 64-bit divisions per element that the
// kernel above pays (it serves channels_last, and NCHW beyond 2^31 thread items);
// each window is read once per V columns.
// K > 0: a common square window compiled in (with_pool_square_geometry), so its
// divisions by the stride are by constants.
template <typename T, typename O, int V, int K, int S, int PAD>
__global__ void max_pool2d_backward_rows_kernel(const T* __restrict__ go, const O* __restrict__ off,
                                                T* __restrict__ gi, Geo g, FastDivmod groups, FastDivmod height,
                                                uint32_t n, bool vec) {
  using A = acc_t<T>;
  const uint32_t stride = gridDim.x * blockDim.x;
  for (uint32_t q = blockIdx.x * blockDim.x + threadIdx.x; q < n; q += stride) {
    const uint32_t r = groups.div(q);  // input row: plane * H + ih
    const int iw0 = static_cast<int>(q - r * groups.d) * V;
    const uint32_t plane = height.div(r);
    A acc[V];
    pool_backward_columns<V, K, S, PAD>(go, off, g, plane, static_cast<int>(r - plane * height.d), iw0, acc);
    T* dst = gi + static_cast<int64_t>(r) * g.W + iw0;
    if (vec && iw0 + V <= g.W) {
      Pack<T, V> p;
#pragma unroll
      for (int k = 0; k < V; ++k) p.v[k] = static_cast<T>(acc[k]);
      *reinterpret_cast<Pack<T, V>*>(dst) = p;
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k)
        if (iw0 + k < g.W) dst[k] = static_cast<T>(acc[k]);
    }
  }
}

// A forward's shared frame (the op's and the benchmark variants'): the checks, outputs
// and device geometry, then launch(T{}, f, g) for the input's dtype; (out, indices,
// offsets).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_forward(
    const char* name, const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode, bool channels_last, bool return_indices,
    bool return_offsets, Launch launch) {
  TORCH_CHECK(input.is_cuda(), name, ": expected a CUDA tensor, got one on ", input.device());
  c10::cuda::CUDAGuard guard(input.device());
  PoolForward f = prepare_forward(input, kernel_size, stride, padding, dilation, ceil_mode, channels_last,
                                  return_indices, return_offsets);
  PoolOutputs& res = f.res;
  if (res.out.numel() == 0) return {res.out, res.indices, res.offsets};
  const Geo g = device_geo(f.g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.x.scalar_type(), "max_pool2d_cuda", [&] {
    launch(scalar_t{}, f, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {res.out, res.indices, res.offsets};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> max_pool2d(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                                          at::IntArrayRef dilation, bool ceil_mode,
                                                          bool channels_last, bool return_indices,
                                                          bool return_offsets) {
  return run_forward("max_pool2d", input, kernel_size, stride, padding, dilation, ceil_mode, channels_last,
                     return_indices, return_offsets, [&](auto t, PoolForward& f, const Geo& g) {
    using T = decltype(t);
    PoolOutputs& res = f.res;
    int64_t* idx = return_indices ? res.indices.mutable_data_ptr<int64_t>() : nullptr;
    auto stream = c10::cuda::getCurrentCUDAStream();
    const T* xp = f.x.const_data_ptr<T>();
    T* op = res.out.mutable_data_ptr<T>();
    with_offset_type(res.offsets.element_size(), [&](auto o_type) {
      using O = decltype(o_type);
      O* off = return_offsets ? static_cast<O*>(res.offsets.data_ptr()) : nullptr;
      if (channels_last) {
        launch_nhwc_forward<T, O>(xp, op, idx, off, g, res.out.numel(), stream, kNhwcPairs);
      } else if (const int64_t planes = res.out.numel() / (g.Ho * g.Wo);
                 !(kStemTileBytes > 0 && pool_is_stem(g) &&
                   launch_vec_forward<T>(xp, op, idx, off, g, planes, stream, 0, false, kVecPairs, kStemTileBytes)) &&
                 !launch_vec_forward<T>(xp, op, idx, off, g, planes, stream, pool_is_stem(g) ? kStemRows : 0,
                                        pool_is_stem(g) && kStemFullGrid, kVecPairs)) {
        const int64_t n = pool_rows_items(res.out.numel(), g.Wo);
        max_pool2d_rows_kernel<T, O, kPoolRowsV>
            <<<grid_for(n, kThreads, 8), kThreads, 0, stream>>>(xp, op, idx, off, g, n);
      }
    });
  });
}

at::Tensor max_pool2d_backward(const at::Tensor& grad_out, const at::Tensor& offsets, at::IntArrayRef input_size,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, bool channels_last) {
  c10::cuda::CUDAGuard guard(grad_out.device());
  PoolBackward b = prepare_backward(grad_out, offsets, input_size, kernel_size, stride, padding, dilation,
                                    channels_last);
  if (b.grad_input.numel() == 0) return b.grad_input;
  const Geo g = device_geo(b.g);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.grad_out.scalar_type(), "max_pool2d_backward_cuda", [&] {
    using T = scalar_t;
    const T* gp = b.grad_out.const_data_ptr<T>();
    T* ip = b.grad_input.mutable_data_ptr<T>();
    with_offset_type(b.offsets.element_size(), [&](auto o_type) {
      using O = decltype(o_type);
      const O* op = static_cast<const O*>(b.offsets.const_data_ptr());
      constexpr int V = 16 / sizeof(T);
      const int64_t rows = b.grad_input.numel() / g.W, groups = (g.W + V - 1) / V;
      if (!channels_last && rows * groups < (int64_t(1) << 31)) {
        const int64_t n = rows * groups;
        const bool vec = (g.W * sizeof(T)) % 16 == 0 && aligned_to(ip, 16);
        const auto go = [&](auto k, auto s, auto p) {
          const auto kernel =
              max_pool2d_backward_rows_kernel<T, O, V, decltype(k)::value, decltype(s)::value, decltype(p)::value>;
          kernel<<<resident_grid(kernel, n, kThreads), kThreads, 0, stream>>>(
              gp, op, ip, g, FastDivmod(static_cast<uint32_t>(groups)), FastDivmod(static_cast<uint32_t>(g.H)),
              static_cast<uint32_t>(n), vec);
        };
        using zero = std::integral_constant<int, 0>;
        if constexpr (std::is_same_v<O, int8_t>) with_pool_square_geometry(g, go);  // their taps fit int8
        else go(zero{}, zero{}, zero{});
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      with_pool_layout<T>(channels_last, g.C, b.grad_input.numel(), gp, ip, [&](auto n_, auto nhwc_, int64_t n) {
        max_pool2d_backward_kernel<T, O, decltype(n_)::value, decltype(nhwc_)::value>
            <<<grid_for(n, kThreads, 8), kThreads, 0, stream>>>(gp, op, ip, g, n);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return b.grad_input;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> max_pool2d_nhwc_variant(
    const at::Tensor& input, std::vector<int64_t> kernel_size, std::vector<int64_t> stride,
    std::vector<int64_t> padding, std::vector<int64_t> dilation, bool ceil_mode, bool pairs, bool return_indices,
    bool return_offsets) {
  return run_forward("_cuda_max_pool2d_nhwc_variant", input, kernel_size, stride, padding, dilation, ceil_mode, true,
                     return_indices, return_offsets, [&](auto t, PoolForward& f, const Geo& g) {
    using T = decltype(t);
    PoolOutputs& res = f.res;
    TORCH_CHECK(!pairs || (sizeof(T) == 2 && g.C % (16 / sizeof(T)) == 0 && aligned_to(f.x.const_data_ptr(), 16)),
                "_cuda_max_pool2d_nhwc_variant: pairs take 16-bit channels in whole 16-byte aligned packs");
    TORCH_CHECK(!pairs || !(return_indices || return_offsets) || g.kh * g.kw <= 0x10000,
                "_cuda_max_pool2d_nhwc_variant: pairs keep taps of windows of up to 2^16 taps");
    with_offset_type(res.offsets.element_size(), [&](auto o_type) {
      using O = decltype(o_type);
      launch_nhwc_forward<T, O>(f.x.const_data_ptr<T>(), res.out.mutable_data_ptr<T>(),
                                return_indices ? res.indices.mutable_data_ptr<int64_t>() : nullptr,
                                return_offsets ? static_cast<O*>(res.offsets.data_ptr()) : nullptr, g,
                                res.out.numel(), c10::cuda::getCurrentCUDAStream(), pairs);
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> max_pool2d_vec_variant(
    const at::Tensor& input, std::vector<int64_t> kernel_size, std::vector<int64_t> stride,
    std::vector<int64_t> padding, std::vector<int64_t> dilation, bool ceil_mode, int64_t rows, bool full_grid,
    bool pairs, bool return_indices, bool return_offsets, int64_t tile_bytes) {
  return run_forward("_cuda_max_pool2d_vec_variant", input, kernel_size, stride, padding, dilation, ceil_mode, false,
                     return_indices, return_offsets, [&](auto t, PoolForward& f, const Geo& g) {
    using T = decltype(t);
    PoolOutputs& res = f.res;
    const bool ok = launch_vec_forward<T>(
        f.x.const_data_ptr<T>(), res.out.mutable_data_ptr<T>(),
        return_indices ? res.indices.mutable_data_ptr<int64_t>() : nullptr,
        return_offsets ? res.offsets.data_ptr() : nullptr, g, res.out.numel() / (g.Ho * g.Wo),
        c10::cuda::getCurrentCUDAStream(), static_cast<int>(rows), full_grid, pairs, tile_bytes);
    TORCH_CHECK(ok, "_cuda_max_pool2d_vec_variant: no vec kernel with ", rows,
                " output rows per thread item for this geometry, or the input is not 16-byte aligned",
                pairs ? ", or pairs for this dtype" : "",
                tile_bytes > 0 ? ", or tiles of this size (rows 0 only, up to 48 KiB, one window's rows)" : "");
  });
}

}  // namespace cuda
}  // namespace dtkernels

TORCH_LIBRARY_IMPL(dtkernels, CUDA, m) {
  m.impl("_max_pool2d", &dtkernels::cuda::max_pool2d);
  m.impl("_max_pool2d_backward", &dtkernels::cuda::max_pool2d_backward);
}
