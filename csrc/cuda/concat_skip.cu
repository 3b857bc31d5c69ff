// concat_skip on CUDA: out = cat([up(x), skip], 1), and the upsample's adjoint.
//
// Each thread writes V consecutive elements of the dense output (along W for NCHW,
// along C for channels_last) with one 16-byte store, in a grid-stride loop on the
// current stream. A pack whose elements come from one unit-stride source (a skip
// row, a channels_last pixel) is read with one 16-byte load when aligned; other
// packs gather element by element. Inputs are read through their own strides, so
// channel slices and mixed memory formats need no copy.
//
// The adjoint is a gather in a fixed order (deterministic, no atomics): each x
// element sums, in ATen's CPU order, the output elements that read it. Index and
// weight arithmetic is csrc/common.h's linear_source, shared with the CPU kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../common.h"
#include "utils.cuh"

namespace dtkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct Strided4 {
  const T* p;
  int64_t s0, s1, s2, s3;
  __device__ __forceinline__ const T* at(int64_t n, int64_t c, int64_t h, int64_t w) const {
    return p + n * s0 + c * s1 + h * s2 + w * s3;
  }
};

template <typename T>
Strided4<T> strided4(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Where element (n, c, h, w) of a dense output walked as rows x cols of V-element
// packs lives: NCHW rows are (n, c, h) and columns w; channels_last rows are pixels,
// columns c. Both split a row index r the same way, n = r / outer, t = r / inner,
// mid = t % mid, r - t * inner. Outputs under 2^31 elements (nearly all) use
// FastDivmod: 64-bit divisions would cost more than the 16 bytes a pack moves.
struct Walk {
  int64_t rows, cols, c, h, w, per_row;
  bool cl, small;
  FastDivmod d_row, d_outer, d_inner, d_mid;

  Walk(const at::Tensor& out, bool channels_last, int v)
      : c(out.size(1)), h(out.size(2)), w(out.size(3)), cl(channels_last) {
    const int64_t n = out.size(0);
    rows = cl ? n * h * w : n * c * h;
    cols = cl ? c : w;
    per_row = cols / v;
    small = out.numel() < (int64_t(1) << 31);
    if (small) {
      d_row = FastDivmod(static_cast<uint32_t>(per_row));
      d_outer = FastDivmod(static_cast<uint32_t>(cl ? h * w : c * h));
      d_inner = FastDivmod(static_cast<uint32_t>(cl ? w : h));
      d_mid = FastDivmod(static_cast<uint32_t>(cl ? h : c));
    }
  }

  // Pack q's row r and first column k, and the (n, c, h, w) of that element.
  __device__ __forceinline__ void locate(int64_t q, int v, int64_t& r, int64_t& k, int64_t& n, int64_t& ch,
                                         int64_t& hh, int64_t& ww) const {
    int64_t mid, inner;
    if (small) {
      const uint32_t q32 = static_cast<uint32_t>(q), r32 = d_row.div(q32);
      const uint32_t t = d_inner.div(r32);
      r = r32;
      k = static_cast<int64_t>(q32 - r32 * d_row.d) * v;
      n = d_outer.div(r32);
      mid = d_mid.mod(t);
      inner = r32 - t * d_inner.d;
    } else {
      r = q / per_row;
      const int64_t in = cl ? w : h, t = r / in;
      k = (q - r * per_row) * v;
      n = r / (cl ? h * w : c * h);
      mid = t % (cl ? h : c);
      inner = r - t * in;
    }
    if (cl) {
      ch = k, hh = mid, ww = inner;
    } else {
      ch = mid, hh = inner, ww = k;
    }
  }
};

template <typename T, int V>
__device__ __forceinline__ void load_pack(const T* src, int64_t stride, Pack<T, V>& o) {
  if (stride == 1 && aligned_to(src, sizeof(Pack<T, V>))) {
    o = *reinterpret_cast<const Pack<T, V>*>(src);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = src[j * stride];
  }
}

// Runs over the packs of a dense output: each thread asks `f` for V consecutive
// elements (along W for NCHW, along C for channels_last) and stores them at once.
template <typename T, int V, bool CL, typename F>
__global__ void pack_kernel(T* __restrict__ out, Walk o, F f) {
  const int64_t packs = o.rows * o.per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < packs; q += stride) {
    int64_t r, k0, n, c, h, w;
    o.locate(q, V, r, k0, n, c, h, w);
    reinterpret_cast<Pack<T, V>*>(out + r * o.cols)[k0 / V] = f.template pack<V, CL>(n, c, h, w, o);
  }
}

// The forward's elements: cat([up(x), skip], 1) at (n, c, h, w) of the output.
template <typename T, int MODE>
struct Concat {
  Strided4<T> x, skip;
  int64_t cx, hi, wi;
  int s;
  acc_t<T> scale;
  FastDivmod ds;  // nearest's source index h / s, per element

  __device__ __forceinline__ T up(int64_t n, int64_t c, int64_t h, int64_t w, const Walk& o) const {
    using A = acc_t<T>;
    if constexpr (MODE == 0) return *x.at(n, c, h, w);
    if constexpr (MODE == 1) return *x.at(n, c, ds.div(static_cast<uint32_t>(h)), ds.div(static_cast<uint32_t>(w)));
    int64_t h0, h1, w0, w1;
    A hl0, hl1, wl0, wl1;
    linear_source<A>(h, scale, hi, o.h, h0, h1, hl0, hl1);
    linear_source<A>(w, scale, wi, o.w, w0, w1, wl0, wl1);
    // ATen's generic CPU kernel: rows, then columns, each one fused multiply-add.
    const A t0 = fma_op(static_cast<A>(*x.at(n, c, h0, w0)), wl0, static_cast<A>(*x.at(n, c, h0, w1)) * wl1);
    const A t1 = fma_op(static_cast<A>(*x.at(n, c, h1, w0)), wl0, static_cast<A>(*x.at(n, c, h1, w1)) * wl1);
    return static_cast<T>(fma_op(t0, hl0, t1 * hl1));
  }

  template <int V, bool CL>
  __device__ __forceinline__ Pack<T, V> pack(int64_t n, int64_t c, int64_t h, int64_t w, const Walk& o) const {
    // The pack's single strided source, when it has one.
    const T* src = nullptr;
    int64_t st = 0;
    if (c >= cx) {  // NCHW: the whole pack is one skip row segment; CL: from c on
      src = skip.at(n, c - cx, h, w);
      st = CL ? skip.s1 : skip.s3;
    } else if (!CL && MODE == 0) {
      src = x.at(n, c, h, w);
      st = x.s3;
    } else if (CL && MODE != 2 && c + V <= cx) {  // V channels of one x pixel
      src = MODE == 1 ? x.at(n, c, ds.div(static_cast<uint32_t>(h)), ds.div(static_cast<uint32_t>(w)))
                      : x.at(n, c, h, w);
      st = x.s1;
    }
    Pack<T, V> p;
    if (src != nullptr) {
      load_pack<T, V>(src, st, p);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int64_t cj = CL ? c + j : c, wj = CL ? w : w + j;
        p.v[j] = cj >= cx ? *skip.at(n, cj - cx, h, wj) : up(n, cj, h, wj, o);
      }
    }
    return p;
  }
};

// The backward's elements: x's gradient at (n, c, h, w) from the x-part g of the
// output gradient.
template <typename T, int MODE>
struct Adjoint {
  Strided4<T> g;
  int64_t ho, wo;
  int s;
  acc_t<T> scale;

  // Whether output index o (in range or not) reads input index i through its first
  // / second source index, and the two weights.
  __device__ __forceinline__ static void reads(int64_t o, int64_t i, int64_t n_in, int64_t n_out, acc_t<T> scale,
                                               bool& hit0, bool& hit1, acc_t<T>& l0, acc_t<T>& l1) {
    int64_t i0 = -1, i1 = -1;
    if (o >= 0 && o < n_out) linear_source<acc_t<T>>(o, scale, n_in, n_out, i0, i1, l0, l1);
    hit0 = i0 == i;
    hit1 = i1 == i;
  }

  __device__ __forceinline__ T value(int64_t n, int64_t c, int64_t h, int64_t w, const Walk& o) const {
    using A = acc_t<T>;
    if constexpr (MODE == 0) {
      return *g.at(n, c, h, w);
    } else if constexpr (MODE == 1) {  // the s x s block, row by row, from +0 (ATen's order)
      A acc = A(0);
      for (int dy = 0; dy < s; ++dy)
        for (int dx = 0; dx < s; ++dx) acc += static_cast<A>(*g.at(n, c, h * s + dy, w * s + dx));
      return static_cast<T>(acc);
    } else {
      // Output indices that can read input index i lie in [s*i - s, s*i + 2s). Order:
      // output row, column, then corners 00, 01, 10, 11 (zero weights included, as ATen).
      A acc = A(0), hl0, hl1, wl0, wl1;
      bool a0, a1, b0, b1;
      for (int64_t oh = h * s - s; oh < h * s + 2 * s; ++oh) {
        reads(oh, h, o.h, ho, scale, a0, a1, hl0, hl1);
        if (!a0 && !a1) continue;
        for (int64_t ow = w * s - s; ow < w * s + 2 * s; ++ow) {
          reads(ow, w, o.w, wo, scale, b0, b1, wl0, wl1);
          if (!b0 && !b1) continue;
          const A gv = static_cast<A>(*g.at(n, c, oh, ow));
          if (a0 && b0) acc = fma_op(hl0 * wl0, gv, acc);
          if (a0 && b1) acc = fma_op(hl0 * wl1, gv, acc);
          if (a1 && b0) acc = fma_op(hl1 * wl0, gv, acc);
          if (a1 && b1) acc = fma_op(hl1 * wl1, gv, acc);
        }
      }
      return static_cast<T>(acc);
    }
  }

  template <int V, bool CL>
  __device__ __forceinline__ Pack<T, V> pack(int64_t n, int64_t c, int64_t h, int64_t w, const Walk& o) const {
    Pack<T, V> p;
    if (CL && MODE == 1) {
      // V channels of one pixel: each of the s*s gradient pixels is one pack load.
      using A = acc_t<T>;
      A acc[V];
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] = A(0);
      for (int dy = 0; dy < s; ++dy) {
        for (int dx = 0; dx < s; ++dx) {
          Pack<T, V> gp;
          load_pack<T, V>(g.at(n, c, h * s + dy, w * s + dx), g.s1, gp);
#pragma unroll
          for (int j = 0; j < V; ++j) acc[j] += static_cast<A>(gp.v[j]);
        }
      }
#pragma unroll
      for (int j = 0; j < V; ++j) p.v[j] = static_cast<T>(acc[j]);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) p.v[j] = value(n, CL ? c + j : c, h, CL ? w : w + j, o);
    }
    return p;
  }
};

// Launches pack_kernel over `out` with functor Op<T, MODE>{args...}: V = 16 bytes of
// T when rows are whole packs (the output is always 16-byte aligned), else 1.
template <template <typename, int> class Op, typename T, typename... Args>
void launch(at::Tensor& out, Upsample mode, Args... args) {
  const bool cl = out.is_contiguous(at::MemoryFormat::ChannelsLast) && !out.is_contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto go = [&](auto v, auto m) {
    constexpr int V = decltype(v)::value, M = decltype(m)::value;
    const Op<T, M> f{args...};
    const Walk o(out, cl, V);
    auto kernel = cl ? pack_kernel<T, V, true, Op<T, M>> : pack_kernel<T, V, false, Op<T, M>>;
    kernel<<<grid_for(o.rows * o.per_row, kThreads), kThreads, 0, stream>>>(out.mutable_data_ptr<T>(), o, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  auto with_mode = [&](auto v) {
    switch (mode) {
      case Upsample::None: return go(v, std::integral_constant<int, 0>{});
      case Upsample::Nearest: return go(v, std::integral_constant<int, 1>{});
      default: return go(v, std::integral_constant<int, 2>{});
    }
  };
  constexpr int kPack = 16 / sizeof(T);
  if ((cl ? out.size(1) : out.size(3)) % kPack == 0) with_mode(std::integral_constant<int, kPack>{});
  else with_mode(std::integral_constant<int, 1>{});
}

at::Tensor concat_skip(const at::Tensor& x, const at::Tensor& skip, std::optional<c10::string_view> upsample,
                       int64_t scale_factor) {
  const Upsample mode = parse_upsample(upsample, "concat_skip");
  check_concat_skip(x, skip, mode, scale_factor, "concat_skip");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = new_concat_skip_output(x, skip);
  if (out.numel() == 0) return out;
  TORCH_CHECK(out.size(2) < (int64_t(1) << 31) && out.size(3) < (int64_t(1) << 31),
              "concat_skip: H and W must each be below 2^31 on CUDA, got ", out.sizes());
  const int s = mode == Upsample::None ? 1 : static_cast<int>(scale_factor);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "concat_skip_cuda", [&] {
    using A = acc_t<scalar_t>;
    launch<Concat, scalar_t>(out, mode, strided4<scalar_t>(x), strided4<scalar_t>(skip), x.size(1), x.size(2),
                             x.size(3), s, static_cast<A>(1.0 / s), FastDivmod(static_cast<uint32_t>(s)));
  });
  return out;
}

at::Tensor concat_skip_backward(const at::Tensor& grad_up, std::optional<c10::string_view> upsample,
                                int64_t scale_factor) {
  const Upsample mode = parse_upsample(upsample, "concat_skip_backward");
  c10::cuda::CUDAGuard guard(grad_up.device());
  at::Tensor gx = new_upsample_grad(grad_up, mode, scale_factor, "concat_skip_backward");
  if (gx.numel() == 0) return gx;
  const int s = mode == Upsample::None ? 1 : static_cast<int>(scale_factor);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_up.scalar_type(), "concat_skip_backward_cuda", [&] {
    using A = acc_t<scalar_t>;
    launch<Adjoint, scalar_t>(gx, mode, strided4<scalar_t>(grad_up), grad_up.size(2), grad_up.size(3), s,
                              static_cast<A>(1.0 / s));
  });
  return gx;
}

}  // namespace
}  // namespace cuda
}  // namespace dtkernels

TORCH_LIBRARY_IMPL(dtkernels, CUDA, m) {
  m.impl("_concat_skip", &dtkernels::cuda::concat_skip);
  m.impl("_concat_skip_backward", &dtkernels::cuda::concat_skip_backward);
}
