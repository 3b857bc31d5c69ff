// concat_skip's CUDA kernels, per thread: where a pack of the output lives (Walk) and
// what goes in it (Concat for the forward, Adjoint for the upsample's adjoint).
// Written C10_HOST_DEVICE so that the CPU build runs the very code the GPU runs
// (cpu::emulate_cuda_concat_skip): the tests check it against the CPU kernel, bit for
// bit, without a GPU. csrc/cuda/concat_skip.cu launches it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <type_traits>

#include "common.h"

namespace dtkernels {

template <typename T>
struct Strided4 {
  const T* p;
  int64_t s0, s1, s2, s3;
  C10_HOST_DEVICE C10_ALWAYS_INLINE const T* at(int64_t n, int64_t c, int64_t h, int64_t w) const {
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
  C10_HOST_DEVICE C10_ALWAYS_INLINE void locate(int64_t q, int v, int64_t& r, int64_t& k, int64_t& n, int64_t& ch,
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
C10_HOST_DEVICE C10_ALWAYS_INLINE void load_pack(const T* src, int64_t stride, Pack<T, V>& o) {
  if (stride == 1 && aligned_to(src, sizeof(Pack<T, V>))) {
    o = *reinterpret_cast<const Pack<T, V>*>(src);
  } else {
    DTK_UNROLL
    for (int j = 0; j < V; ++j) o.v[j] = src[j * stride];
  }
}

// The forward's elements: cat([up(x), skip], 1) at (n, c, h, w) of the output, or
// cat([skip, up(x)], 1) with skip_first.
template <typename T, int MODE>
struct Concat {
  Strided4<T> x, skip;
  int64_t cx, hi, wi;
  int s;
  at::opmath_type<T> scale_h, scale_w;  // linear_scale per axis (bilinear)
  FastDivmod ds;  // nearest's source index h / s, per element
  bool align;     // bilinear's align_corners
  ConcatOffsets at;  // where up(x) and skip start in the output's channels
  // MODE: the upsample (0 none, 1 nearest, 2 bilinear). The upsampled part is made a
  // pack at a time where it can be: one load for a nearest NCHW pack at s = 2, row
  // pointers and per-pack vertical weights for bilinear, four pack loads for a
  // bilinear channels_last pack; up()'s arithmetic, so the same bits.
  static constexpr int M = MODE;

  C10_HOST_DEVICE C10_ALWAYS_INLINE T up(int64_t n, int64_t c, int64_t h, int64_t w, const Walk& o) const {
    using A = at::opmath_type<T>;
    if constexpr (M == 0) return *x.at(n, c, h, w);
    if constexpr (M == 1) return *x.at(n, c, ds.div(static_cast<uint32_t>(h)), ds.div(static_cast<uint32_t>(w)));
    int64_t h0, h1, w0, w1;
    A hl0, hl1, wl0, wl1;
    linear_source<A>(h, scale_h, hi, o.h, h0, h1, hl0, hl1, align);
    linear_source<A>(w, scale_w, wi, o.w, w0, w1, wl0, wl1, align);
    // ATen's generic CPU kernel: rows, then columns, each one fused multiply-add.
    const A t0 = fma_op(static_cast<A>(*x.at(n, c, h0, w0)), wl0, static_cast<A>(*x.at(n, c, h0, w1)) * wl1);
    const A t1 = fma_op(static_cast<A>(*x.at(n, c, h1, w0)), wl0, static_cast<A>(*x.at(n, c, h1, w1)) * wl1);
    return static_cast<T>(fma_op(t0, hl0, t1 * hl1));
  }

  // V bilinear outputs: along w at one (n, c, h) for NCHW, along c at one pixel for
  // channels_last; up()'s arithmetic, with what the V outputs share computed once.
  template <int V, bool CL>
  C10_HOST_DEVICE C10_ALWAYS_INLINE Pack<T, V> bilinear_pack(int64_t n, int64_t c, int64_t h, int64_t w,
                                                             const Walk& o) const {
    using A = at::opmath_type<T>;
    int64_t h0, h1, w0, w1;
    A hl0, hl1, wl0, wl1;
    linear_source<A>(h, scale_h, hi, o.h, h0, h1, hl0, hl1, align);
    Pack<T, V> p;
    if constexpr (CL) {
      linear_source<A>(w, scale_w, wi, o.w, w0, w1, wl0, wl1, align);
      Pack<T, V> a, b, d, e;
      load_pack<T, V>(x.at(n, c, h0, w0), x.s1, a);
      load_pack<T, V>(x.at(n, c, h0, w1), x.s1, b);
      load_pack<T, V>(x.at(n, c, h1, w0), x.s1, d);
      load_pack<T, V>(x.at(n, c, h1, w1), x.s1, e);
      DTK_UNROLL
      for (int j = 0; j < V; ++j) {
        const A t0 = fma_op(static_cast<A>(a.v[j]), wl0, static_cast<A>(b.v[j]) * wl1);
        const A t1 = fma_op(static_cast<A>(d.v[j]), wl0, static_cast<A>(e.v[j]) * wl1);
        p.v[j] = static_cast<T>(fma_op(t0, hl0, t1 * hl1));
      }
    } else {
      const T* r0 = x.at(n, c, h0, 0);
      const T* r1 = x.at(n, c, h1, 0);
      DTK_UNROLL
      for (int j = 0; j < V; ++j) {
        linear_source<A>(w + j, scale_w, wi, o.w, w0, w1, wl0, wl1, align);
        const A t0 = fma_op(static_cast<A>(r0[w0 * x.s3]), wl0, static_cast<A>(r0[w1 * x.s3]) * wl1);
        const A t1 = fma_op(static_cast<A>(r1[w0 * x.s3]), wl0, static_cast<A>(r1[w1 * x.s3]) * wl1);
        p.v[j] = static_cast<T>(fma_op(t0, hl0, t1 * hl1));
      }
    }
    return p;
  }

  template <int V, bool CL>
  C10_HOST_DEVICE C10_ALWAYS_INLINE Pack<T, V> pack(int64_t n, int64_t c, int64_t h, int64_t w, const Walk& o) const {
    // up(x) fills output channels [x0, x0 + cx), skip [s0, s0 + cs). A channels_last
    // pack (V channels from c) may straddle the two; an NCHW pack is one channel's.
    const int64_t cs = o.c - cx, x0 = at.x0, s0 = at.s0;
    const bool in_x = c >= x0 && c < x0 + cx;
    const bool all_x = CL ? c >= x0 && c + V <= x0 + cx : in_x;
    const bool all_skip = CL ? c >= s0 && c + V <= s0 + cs : !in_x;
    if (in_x) {
      if constexpr (!CL && M == 1 && V % 2 == 0) {
        if (s == 2 && x.s3 == 1) {  // w is a multiple of V: source columns w/2 .. w/2 + V/2 - 1
          Pack<T, V / 2> half;
          load_pack<T, V / 2>(x.at(n, c - x0, ds.div(static_cast<uint32_t>(h)), w / 2), 1, half);
          Pack<T, V> p;
          DTK_UNROLL
          for (int j = 0; j < V; ++j) p.v[j] = half.v[j / 2];
          return p;
        }
      }
      if constexpr (M == 2) {
        if (all_x) return bilinear_pack<V, CL>(n, c - x0, h, w, o);
      }
    }
    // The pack's single strided source, when it has one.
    const T* src = nullptr;
    int64_t st = 0;
    if (all_skip) {  // NCHW: one skip row segment; CL: V channels of one skip pixel
      src = skip.at(n, c - s0, h, w);
      st = CL ? skip.s1 : skip.s3;
    } else if (!CL && M == 0) {
      src = x.at(n, c - x0, h, w);
      st = x.s3;
    } else if (CL && M != 2 && all_x) {  // V channels of one x pixel
      src = M == 1 ? x.at(n, c - x0, ds.div(static_cast<uint32_t>(h)), ds.div(static_cast<uint32_t>(w)))
                   : x.at(n, c - x0, h, w);
      st = x.s1;
    }
    Pack<T, V> p;
    if (src != nullptr) {
      load_pack<T, V>(src, st, p);
    } else {
      DTK_UNROLL
      for (int j = 0; j < V; ++j) {
        const int64_t cj = CL ? c + j : c, wj = CL ? w : w + j;
        p.v[j] = cj >= x0 && cj < x0 + cx ? up(n, cj - x0, h, wj, o) : *skip.at(n, cj - s0, h, wj);
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
  at::opmath_type<T> scale_h, scale_w;  // as Concat's
  bool align;
  // MODE as Concat's; a nearest NCHW pack at s = 2 sums row packs. MODE 3: bilinear
  // too, packs by bilinear_pack (a candidate, not yet measured on a GPU: only the
  // tests and benchmarks/ ask for it).
  static constexpr int M = MODE;

  // Whether output index o (in range or not) reads input index i through its first
  // / second source index, and the two weights.
  using A = at::opmath_type<T>;
  C10_HOST_DEVICE C10_ALWAYS_INLINE static void reads(int64_t o, int64_t i, int64_t n_in, int64_t n_out, A scale,
                                                      bool align, bool& hit0, bool& hit1, A& l0, A& l1) {
    int64_t i0 = -1, i1 = -1;
    if (o >= 0 && o < n_out) linear_source<A>(o, scale, n_in, n_out, i0, i1, l0, l1, align);
    hit0 = i0 == i;
    hit1 = i1 == i;
  }

  // Gradient gv's terms for the corners that read the element (a: its row, b: its
  // column is the first / second source), in ATen's order 00, 01, 10, 11.
  C10_HOST_DEVICE C10_ALWAYS_INLINE static void add_corners(A& acc, A gv, bool a0, bool a1, bool b0, bool b1, A hl0,
                                                            A hl1, A wl0, A wl1) {
    if (a0 && b0) acc = fma_op(hl0 * wl0, gv, acc);
    if (a0 && b1) acc = fma_op(hl0 * wl1, gv, acc);
    if (a1 && b0) acc = fma_op(hl1 * wl0, gv, acc);
    if (a1 && b1) acc = fma_op(hl1 * wl1, gv, acc);
  }

  C10_HOST_DEVICE C10_ALWAYS_INLINE T value(int64_t n, int64_t c, int64_t h, int64_t w, const Walk& o) const {
    if constexpr (M == 0) {
      return *g.at(n, c, h, w);
    } else if constexpr (M == 1) {  // the s x s block, row by row, from +0 (ATen's order)
      A acc = A(0);
      for (int dy = 0; dy < s; ++dy)
        for (int dx = 0; dx < s; ++dx) acc += static_cast<A>(*g.at(n, c, h * s + dy, w * s + dx));
      return static_cast<T>(acc);
    } else {
      // Output indices that can read input index i lie in [s*i - s, s*i + 2s), with
      // align_corners (a source step of (n_in - 1) / (s * n_in - 1) < 1 / s) in
      // [s*i - s, s*i + 3s). Order: output row, column, then corners 00, 01, 10, 11
      // (zero weights included, as ATen).
      A acc = A(0), hl0 = A(0), hl1 = A(0), wl0 = A(0), wl1 = A(0);  // set by reads() where used
      bool a0, a1, b0, b1;
      const int64_t end = (align ? 3 : 2) * s;
      for (int64_t oh = h * s - s; oh < h * s + end; ++oh) {
        reads(oh, h, o.h, ho, scale_h, align, a0, a1, hl0, hl1);
        if (!a0 && !a1) continue;
        for (int64_t ow = w * s - s; ow < w * s + end; ++ow) {
          reads(ow, w, o.w, wo, scale_w, align, b0, b1, wl0, wl1);
          if (!b0 && !b1) continue;
          add_corners(acc, static_cast<A>(*g.at(n, c, oh, ow)), a0, a1, b0, b1, hl0, hl1, wl0, wl1);
        }
      }
      return static_cast<T>(acc);
    }
  }

  // V bilinear elements, value()'s sums in value()'s order (per element: output row,
  // column, corners), with what they share done once: the rows' weights, and for
  // channels_last (V channels of one pixel) the columns' too and one pack load per
  // gradient pixel; for NCHW (V columns) each gradient element is read once and
  // added to the columns its two sources name.
  template <int V, bool CL>
  C10_HOST_DEVICE C10_ALWAYS_INLINE Pack<T, V> bilinear_pack(int64_t n, int64_t c, int64_t h, int64_t w,
                                                             const Walk& o) const {
    A acc[V];
    DTK_UNROLL
    for (int j = 0; j < V; ++j) acc[j] = A(0);
    const int64_t end = (align ? 3 : 2) * s;  // value()'s window: [i*s - s, i*s + end)
    for (int64_t oh = h * s - s; oh < h * s + end; ++oh) {
      bool a0, a1;
      A hl0 = A(0), hl1 = A(0);
      reads(oh, h, o.h, ho, scale_h, align, a0, a1, hl0, hl1);
      if (!a0 && !a1) continue;
      if constexpr (CL) {
        for (int64_t ow = w * s - s; ow < w * s + end; ++ow) {
          bool b0, b1;
          A wl0 = A(0), wl1 = A(0);
          reads(ow, w, o.w, wo, scale_w, align, b0, b1, wl0, wl1);
          if (!b0 && !b1) continue;
          Pack<T, V> gp;
          load_pack<T, V>(g.at(n, c, oh, ow), g.s1, gp);
          DTK_UNROLL
          for (int j = 0; j < V; ++j)
            add_corners(acc[j], static_cast<A>(gp.v[j]), a0, a1, b0, b1, hl0, hl1, wl0, wl1);
        }
      } else {
        const int64_t lo = w * s - s > 0 ? w * s - s : 0;
        const int64_t hi = (w + V - 1) * s + end < wo ? (w + V - 1) * s + end : wo;
        const T* row = g.at(n, c, oh, 0);
        for (int64_t ow = lo; ow < hi; ++ow) {  // every column any of the V reads from
          int64_t i0, i1;
          A wl0, wl1;
          linear_source<A>(ow, scale_w, o.w, wo, i0, i1, wl0, wl1, align);
          const A gv = static_cast<A>(row[ow * g.s3]);
          DTK_UNROLL
          for (int j = 0; j < V; ++j) add_corners(acc[j], gv, a0, a1, i0 == w + j, i1 == w + j, hl0, hl1, wl0, wl1);
        }
      }
    }
    Pack<T, V> p;
    DTK_UNROLL
    for (int j = 0; j < V; ++j) p.v[j] = static_cast<T>(acc[j]);
    return p;
  }

  template <int V, bool CL>
  C10_HOST_DEVICE C10_ALWAYS_INLINE Pack<T, V> pack(int64_t n, int64_t c, int64_t h, int64_t w, const Walk& o) const {
    // 16-bit NCHW packs (8 columns) stay per element: bilinear_pack's V compares per
    // gradient column cost more than they save there (host emulation, 0.6-0.8x).
    if constexpr (M == 3 && (CL || V <= 4)) return bilinear_pack<V, CL>(n, c, h, w, o);
    Pack<T, V> p;
    if constexpr (!CL && M == 1) {
      if (s == 2 && g.s3 == 1) {
        // V columns w.. of x's gradient: two gradient rows, 2V columns each (two packs
        // a row); per element the order of value(): row by row, from +0.
        A acc[V];
        DTK_UNROLL
        for (int j = 0; j < V; ++j) acc[j] = A(0);
        for (int dy = 0; dy < 2; ++dy) {
          const T* row = g.at(n, c, h * 2 + dy, w * 2);
          Pack<T, V> lo, hi;
          load_pack<T, V>(row, 1, lo);
          load_pack<T, V>(row + V, 1, hi);
          DTK_UNROLL
          for (int j = 0; j < V; ++j) {
            acc[j] += static_cast<A>(2 * j < V ? lo.v[2 * j] : hi.v[2 * j - V]);
            acc[j] += static_cast<A>(2 * j + 1 < V ? lo.v[2 * j + 1] : hi.v[2 * j + 1 - V]);
          }
        }
        DTK_UNROLL
        for (int j = 0; j < V; ++j) p.v[j] = static_cast<T>(acc[j]);
        return p;
      }
    }
    if (CL && M == 1) {
      // V channels of one pixel: each of the s*s gradient pixels is one pack load.
      A acc[V];
      DTK_UNROLL
      for (int j = 0; j < V; ++j) acc[j] = A(0);
      for (int dy = 0; dy < s; ++dy) {
        for (int dx = 0; dx < s; ++dx) {
          Pack<T, V> gp;
          load_pack<T, V>(g.at(n, c, h * s + dy, w * s + dx), g.s1, gp);
          DTK_UNROLL
          for (int j = 0; j < V; ++j) acc[j] += static_cast<A>(gp.v[j]);
        }
      }
      DTK_UNROLL
      for (int j = 0; j < V; ++j) p.v[j] = static_cast<T>(acc[j]);
    } else {
      DTK_UNROLL
      for (int j = 0; j < V; ++j) p.v[j] = value(n, CL ? c + j : c, h, CL ? w : w + j, o);
    }
    return p;
  }
};

// One thread item: pack q of the output.
template <typename T, int V, bool CL, typename F>
C10_HOST_DEVICE C10_ALWAYS_INLINE void concat_pack_item(T* out, const Walk& o, const F& f, int64_t q) {
  int64_t r, k0, n, c, h, w;
  o.locate(q, V, r, k0, n, c, h, w);
  reinterpret_cast<Pack<T, V>*>(out + r * o.cols)[k0 / V] = f.template pack<V, CL>(n, c, h, w, o);
}

// Calls run(V, CL, f, walk) (V and CL std::integral_constants) for functor
// Op<T, MODE>{args...} over `out`: V = 16 bytes of T when rows are whole packs (the
// output is always 16-byte aligned), else 1; MODE the upsample.
// BILINEAR: the MODE bilinear takes (Adjoint's candidate: 3).
template <template <typename, int> class Op, typename T, int BILINEAR = 2, typename Run, typename... Args>
void for_concat_packs(const at::Tensor& out, Upsample mode, Run run, Args... args) {
  const bool cl = out.is_contiguous(at::MemoryFormat::ChannelsLast) && !out.is_contiguous();
  auto go = [&](auto v, auto m) {
    constexpr int V = decltype(v)::value, M = decltype(m)::value;
    const Op<T, M> f{args...};
    const Walk o(out, cl, V);
    if (cl) run(v, std::true_type{}, f, o);
    else run(v, std::false_type{}, f, o);
  };
  auto with_mode = [&](auto v) {
    switch (mode) {
      case Upsample::None: return go(v, std::integral_constant<int, 0>{});
      case Upsample::Nearest: return go(v, std::integral_constant<int, 1>{});
      default: return go(v, std::integral_constant<int, BILINEAR>{});
    }
  };
  constexpr int kPack = 16 / sizeof(T);
  if ((cl ? out.size(1) : out.size(3)) % kPack == 0) with_mode(std::integral_constant<int, kPack>{});
  else with_mode(std::integral_constant<int, 1>{});
}

namespace cpu {
// The CUDA kernels (concat_pack_item over every pack) run on the host.
at::Tensor emulate_cuda_concat_skip(const at::Tensor& x, const at::Tensor& skip,
                                    std::optional<c10::string_view> upsample, int64_t scale_factor,
                                    bool align_corners, bool skip_first);
// shared_packs: bilinear packs by Adjoint's candidate bilinear_pack (MODE 3).
at::Tensor emulate_cuda_concat_skip_backward(const at::Tensor& grad_up, std::optional<c10::string_view> upsample,
                                             int64_t scale_factor, bool align_corners, bool shared_packs);
}  // namespace cpu

namespace cuda {
// Benchmark and test aid (CUDA builds): the CUDA backward, bilinear packs by
// bilinear_pack when shared_packs.
at::Tensor concat_skip_backward_variant(const at::Tensor& grad_up, std::optional<c10::string_view> upsample,
                                        int64_t scale_factor, bool align_corners, bool shared_packs);
}  // namespace cuda

}  // namespace dtkernels
