// concat_skip on the CPU: out = cat([up(x), skip], 1) in one pass that reads each
// input once and writes each output byte once (a fresh 128 MiB output costs more in
// page faults than the copy itself, so nothing is zero-filled or staged). Parallel
// over output rows (NCHW) or output pixels (channels_last), so both cores fault in
// their half of the output. Bilinear computes what ATen's generic CPU kernel does
// (rows, then columns, one fma each), so float32 matches it bit for bit; ATen's
// vectorised channels_last / small-image path rounds differently, by an ulp.
//
// Backward: only the upsample needs a kernel (the concat's adjoint is views). It is
// a gather: each x pixel sums, in a fixed order, the output pixels that read it, so
// it is deterministic and needs no atomics or zero-fill. The order and rounding are
// ATen's CPU kernels': nearest sums its s x s block row by row in opmath; bilinear
// accumulates fma(h_lambda * w_lambda, g, acc) over output rows, then columns,
// then corners (00, 01, 10, 11), zero-weight corners included, so float32 results
// match ATen's backward bit for bit in every layout.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "../common.h"
#include "../concat_skip.h"
#include "simd.h"

namespace dtkernels {
namespace cpu {
namespace {

// ---- per-axis bilinear tables --------------------------------------------------

// Forward: for each output index, its two source indices and weights, in the
// opmath type A.
template <typename A>
struct LinearAxis {
  std::vector<int64_t> i0, i1;
  std::vector<A> l0, l1;
  LinearAxis(int64_t n_in, int64_t n_out, int64_t s) : i0(n_out), i1(n_out), l0(n_out), l1(n_out) {
    const A scale = static_cast<A>(1.0 / static_cast<double>(s));
    for (int64_t d = 0; d < n_out; ++d) linear_source(d, scale, n_in, n_out, i0[d], i1[d], l0[d], l1[d]);
  }
};

// Backward: for each input index i, the output indices d that read it, ascending,
// with the weight of each corner of d that lands on i (two when both do: the
// clamped last index, or equal sizes). Entries [start[i], start[i + 1]).
template <typename A>
struct LinearAdjoint {
  std::vector<int64_t> start, d;
  std::vector<A> la, lb;  // lb is used when cnt == 2
  std::vector<int32_t> cnt;
  LinearAdjoint(int64_t n_in, int64_t n_out, int64_t s) : start(n_in + 1, 0) {
    LinearAxis<A> ax(n_in, n_out, s);
    std::vector<std::vector<int64_t>> by_input(n_in);  // indices into ax
    for (int64_t o = 0; o < n_out; ++o) {
      by_input[ax.i0[o]].push_back(o);
      if (ax.i1[o] != ax.i0[o]) by_input[ax.i1[o]].push_back(o);
    }
    for (int64_t i = 0; i < n_in; ++i) {
      start[i + 1] = start[i] + static_cast<int64_t>(by_input[i].size());
      for (int64_t o : by_input[i]) {
        d.push_back(o);
        if (ax.i0[o] == ax.i1[o]) {
          cnt.push_back(2);
          la.push_back(ax.l0[o]);
          lb.push_back(ax.l1[o]);
        } else {
          cnt.push_back(1);
          la.push_back(ax.i0[o] == i ? ax.l0[o] : ax.l1[o]);
          lb.push_back(A(0));
        }
      }
    }
  }
};

// ---- cloned inner loops ----------------------------------------------------------
// Nearest is a pure copy, so 16-bit types move as uint16_t (no conversion).

template <typename E>
DTK_INLINE void repeat_row(const E* DTK_RESTRICT x, E* DTK_RESTRICT o, int64_t w_in, int64_t s) {
  if (s == 2) {
    for (int64_t i = 0; i < w_in; ++i) {
      o[2 * i] = x[i];
      o[2 * i + 1] = x[i];
    }
  } else {
    for (int64_t i = 0; i < w_in; ++i)
      for (int64_t k = 0; k < s; ++k) o[i * s + k] = x[i];
  }
}

// One output row of bilinear: ATen's generic kernel's arithmetic, fused as it is.
template <typename T, typename A = acc_t<T>>
DTK_INLINE void bilinear_row(const T* DTK_RESTRICT r0, const T* DTK_RESTRICT r1, T* DTK_RESTRICT o,
                             int64_t w_out, const int64_t* iw0, const int64_t* iw1, const A* w0,
                             const A* w1, A h0, A h1) {
  for (int64_t i = 0; i < w_out; ++i) {
    const A t0 = fma_op(A(r0[iw0[i]]), w0[i], A(r0[iw1[i]]) * w1[i]);
    const A t1 = fma_op(A(r1[iw0[i]]), w0[i], A(r1[iw1[i]]) * w1[i]);
    o[i] = T(fma_op(t0, h0, t1 * h1));
  }
}

// channels_last: one output pixel's channels from four source pixels.
template <typename T, typename A = acc_t<T>>
DTK_INLINE void bilinear_pixel(const T* DTK_RESTRICT p00, const T* DTK_RESTRICT p01, const T* DTK_RESTRICT p10,
                               const T* DTK_RESTRICT p11, T* DTK_RESTRICT o, int64_t c, A w0, A w1, A h0, A h1) {
  for (int64_t k = 0; k < c; ++k) {
    const A t0 = fma_op(A(p00[k]), w0, A(p01[k]) * w1);
    const A t1 = fma_op(A(p10[k]), w0, A(p11[k]) * w1);
    o[k] = T(fma_op(t0, h0, t1 * h1));
  }
}

// Nearest adjoint, NCHW: x row = sum of each s x s block of the gradient rows
// g, g + row, ..., in opmath, row by row (ATen's order), starting from +0.
template <typename T, typename A = acc_t<T>>
DTK_INLINE void nearest_adjoint_row(const T* DTK_RESTRICT g, int64_t row, T* DTK_RESTRICT o, int64_t w_in,
                                    int64_t s) {
  if (s == 2) {
    const T* g1 = g + row;
    for (int64_t i = 0; i < w_in; ++i) {
      A acc = A(0);
      acc += A(g[2 * i]);
      acc += A(g[2 * i + 1]);
      acc += A(g1[2 * i]);
      acc += A(g1[2 * i + 1]);
      o[i] = T(acc);
    }
  } else {
    for (int64_t i = 0; i < w_in; ++i) {
      A acc = A(0);
      for (int64_t dy = 0; dy < s; ++dy)
        for (int64_t dx = 0; dx < s; ++dx) acc += A(g[dy * row + i * s + dx]);
      o[i] = T(acc);
    }
  }
}

// Bilinear adjoint, NCHW: one x row (input row ih) from the gradient plane; the
// h-entries are ih's, the w-entries are indexed per input column.
template <typename T, typename A = acc_t<T>>
DTK_INLINE void bilinear_adjoint_row(const T* DTK_RESTRICT plane, int64_t row, T* DTK_RESTRICT o, int64_t w_in,
                                     const int64_t* hd, const A* hla, const A* hlb, const int32_t* hcnt,
                                     int64_t nh, const int64_t* wstart, const int64_t* wd, const A* wla,
                                     const A* wlb, const int32_t* wcnt) {
  for (int64_t i = 0; i < w_in; ++i) {
    A acc = A(0);
    for (int64_t a = 0; a < nh; ++a) {
      const T* grow = plane + hd[a] * row;
      for (int64_t b = wstart[i]; b < wstart[i + 1]; ++b) {
        const A gv = A(grow[wd[b]]);
        acc = fma_op(hla[a] * wla[b], gv, acc);
        if (wcnt[b] == 2) acc = fma_op(hla[a] * wlb[b], gv, acc);
        if (hcnt[a] == 2) {
          acc = fma_op(hlb[a] * wla[b], gv, acc);
          if (wcnt[b] == 2) acc = fma_op(hlb[a] * wlb[b], gv, acc);
        }
      }
    }
    o[i] = T(acc);
  }
}

template <typename T, typename A = acc_t<T>>
DTK_INLINE void acc_add(A* DTK_RESTRICT acc, const T* DTK_RESTRICT g, int64_t n) {
  for (int64_t k = 0; k < n; ++k) acc[k] += A(g[k]);
}

template <typename T, typename A = acc_t<T>>
DTK_INLINE void acc_fma(A* DTK_RESTRICT acc, const T* DTK_RESTRICT g, A w, int64_t n) {
  for (int64_t k = 0; k < n; ++k) acc[k] = fma_op(w, A(g[k]), acc[k]);
}

template <typename T, typename A = acc_t<T>>
DTK_INLINE void acc_store(const A* DTK_RESTRICT acc, T* DTK_RESTRICT o, int64_t n) {
  for (int64_t k = 0; k < n; ++k) o[k] = T(acc[k]);
}

#define DTK_CS_COPY_CLONES(E)                                                        \
  DTK_CLONES void repeat_row_k(const E* x, E* o, int64_t w_in, int64_t s) {          \
    repeat_row<E>(x, o, w_in, s);                                                   \
  }
DTK_CS_COPY_CLONES(uint16_t)
DTK_CS_COPY_CLONES(uint32_t)
DTK_CS_COPY_CLONES(uint64_t)
#undef DTK_CS_COPY_CLONES

#define DTK_CS_CLONES(T)                                                                            \
  DTK_CLONES void bilinear_row_k(const T* r0, const T* r1, T* o, int64_t w_out, const int64_t* iw0,   \
                                 const int64_t* iw1, const acc_t<T>* w0, const acc_t<T>* w1,         \
                                 acc_t<T> h0, acc_t<T> h1) {                                        \
    bilinear_row<T>(r0, r1, o, w_out, iw0, iw1, w0, w1, h0, h1);                                    \
  }                                                                                                 \
  DTK_CLONES void bilinear_pixel_k(const T* p00, const T* p01, const T* p10, const T* p11, T* o,    \
                                   int64_t c, acc_t<T> w0, acc_t<T> w1, acc_t<T> h0, acc_t<T> h1) { \
    bilinear_pixel<T>(p00, p01, p10, p11, o, c, w0, w1, h0, h1);                                    \
  }                                                                                                 \
  DTK_CLONES void nearest_adjoint_row_k(const T* g, int64_t row, T* o, int64_t w_in, int64_t s) {   \
    nearest_adjoint_row<T>(g, row, o, w_in, s);                                                     \
  }                                                                                                 \
  DTK_CLONES void bilinear_adjoint_row_k(                                                           \
      const T* plane, int64_t row, T* o, int64_t w_in, const int64_t* hd, const acc_t<T>* hla,      \
      const acc_t<T>* hlb, const int32_t* hcnt, int64_t nh, const int64_t* wstart, const int64_t* wd, \
      const acc_t<T>* wla, const acc_t<T>* wlb, const int32_t* wcnt) {                              \
    bilinear_adjoint_row<T>(plane, row, o, w_in, hd, hla, hlb, hcnt, nh, wstart, wd, wla, wlb,      \
                            wcnt);                                                                  \
  }                                                                                                 \
  DTK_CLONES void acc_add_k(acc_t<T>* acc, const T* g, int64_t n) { acc_add<T>(acc, g, n); }        \
  DTK_CLONES void acc_fma_k(acc_t<T>* acc, const T* g, acc_t<T> w, int64_t n) {                     \
    acc_fma<T>(acc, g, w, n);                                                                       \
  }                                                                                                 \
  DTK_CLONES void acc_store_k(const acc_t<T>* acc, T* o, int64_t n) { acc_store<T>(acc, o, n); }
DTK_CS_CLONES(float)
DTK_CS_CLONES(double)
DTK_CS_CLONES(c10::Half)
DTK_CS_CLONES(c10::BFloat16)
#undef DTK_CS_CLONES

// The same-size unsigned type: nearest and plain copies move bits, not values.
template <typename T> struct bits_of;
template <> struct bits_of<c10::Half> { using type = uint16_t; };
template <> struct bits_of<c10::BFloat16> { using type = uint16_t; };
template <> struct bits_of<float> { using type = uint32_t; };
template <> struct bits_of<double> { using type = uint64_t; };

// Element (n, c, h, w) of a 4-D tensor whose innermost walk (w for NCHW, c for
// channels_last) has unit stride: channel slices of a larger buffer qualify.
template <typename T>
struct View4 {
  T* p;
  int64_t sn, sc, sh, sw;
  explicit View4(const at::Tensor& t)
      : p(static_cast<T*>(t.data_ptr())), sn(t.stride(0)), sc(t.stride(1)), sh(t.stride(2)), sw(t.stride(3)) {}
  T* at(int64_t n, int64_t c, int64_t h, int64_t w) const { return p + n * sn + c * sc + h * sh + w * sw; }
};

// `t` itself when its dimension `dim` has unit stride (or size 1), else a copy in
// `fmt`: the kernels' inner loops walk that dimension contiguously.
at::Tensor unit_stride(const at::Tensor& t, int64_t dim, at::MemoryFormat fmt) {
  if (t.size(dim) <= 1 || t.stride(dim) == 1) return t;
  return t.contiguous(fmt);
}

// What every loop below starts from: its inputs with the unit stride it walks
// (W for NCHW, C for channels_last), their views, and the bilinear tables
// (forward: per output index; adjoint: per input index) when bilinear.
template <typename T, template <typename> class Axis>
struct Plan {
  at::Tensor a, b;
  View4<const T> av, bv;
  std::unique_ptr<Axis<acc_t<T>>> ah, aw;
  Plan(const at::Tensor& a_in, const at::Tensor& b_in, bool cl, Upsample mode, int64_t s, int64_t hi, int64_t wi,
       int64_t ho, int64_t wo)
      : a(unit_stride(a_in, cl ? 1 : 3, cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous)),
        b(b_in.defined() ? unit_stride(b_in, cl ? 1 : 3, cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous)
                         : a),
        av(a),
        bv(b) {
    if (mode == Upsample::Bilinear) {
      ah = std::make_unique<Axis<acc_t<T>>>(hi, ho, s);
      aw = std::make_unique<Axis<acc_t<T>>>(wi, wo, s);
    }
  }
};

// ---- forward -----------------------------------------------------------------------

template <typename T>
void forward_nchw(const at::Tensor& x_in, const at::Tensor& skip_in, at::Tensor& out, Upsample mode, int64_t s) {
  using E = typename bits_of<T>::type;
  const int64_t cx = x_in.size(1), ct = out.size(1), ho = out.size(2), wo = out.size(3), wi = x_in.size(3);
  const Plan<T, LinearAxis> p(x_in, skip_in, false, mode, s, x_in.size(2), wi, ho, wo);
  const View4<const T>&xv = p.av, &sv = p.bv;
  T* po = out.mutable_data_ptr<T>();
  const int64_t rows = out.size(0) * ct * ho;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(wo, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end;) {
      const int64_t n = r / (ct * ho), c = r / ho % ct, oh = r % ho;
      const int64_t k = std::min(end - r, ho - oh);  // rows of this plane in this chunk
      T* o = po + r * wo;
      const bool from_skip = c >= cx;
      if (from_skip || mode == Upsample::None) {  // a plain copy of k rows
        const View4<const T>& v = from_skip ? sv : xv;
        const T* src = v.at(n, from_skip ? c - cx : c, oh, 0);
        if (v.sh == wo || k == 1) {
          std::memcpy(o, src, sizeof(T) * k * wo);
        } else {
          for (int64_t j = 0; j < k; ++j) std::memcpy(o + j * wo, src + j * v.sh, sizeof(T) * wo);
        }
      } else if (mode == Upsample::Nearest) {
        for (int64_t j = 0; j < k; ++j)
          repeat_row_k(reinterpret_cast<const E*>(xv.at(n, c, (oh + j) / s, 0)), reinterpret_cast<E*>(o + j * wo), wi, s);
      } else {
        const auto &ah = *p.ah, &aw = *p.aw;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t h = oh + j;
          bilinear_row_k(xv.at(n, c, ah.i0[h], 0), xv.at(n, c, ah.i1[h], 0), o + j * wo, wo, aw.i0.data(),
                         aw.i1.data(), aw.l0.data(), aw.l1.data(), ah.l0[h], ah.l1[h]);
        }
      }
      r += k;
    }
  });
}

template <typename T>
void forward_channels_last(const at::Tensor& x_in, const at::Tensor& skip_in, at::Tensor& out, Upsample mode,
                           int64_t s) {
  const int64_t cx = x_in.size(1), cs = skip_in.size(1), ct = out.size(1), ho = out.size(2), wo = out.size(3);
  const Plan<T, LinearAxis> p(x_in, skip_in, true, mode, s, x_in.size(2), x_in.size(3), ho, wo);
  const View4<const T>&xv = p.av, &sv = p.bv;
  T* po = out.mutable_data_ptr<T>();
  const int64_t pixels = out.size(0) * ho * wo;
  at::parallel_for(0, pixels, std::max<int64_t>(1, kGrain / std::max<int64_t>(ct, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q / (ho * wo), oh = q / wo % ho, ow = q % wo;
      T* o = po + q * ct;
      if (cx > 0) {
        if (mode == Upsample::Bilinear) {
          const auto &ah = *p.ah, &aw = *p.aw;
          const int64_t h0 = ah.i0[oh], h1 = ah.i1[oh], w0 = aw.i0[ow], w1 = aw.i1[ow];
          bilinear_pixel_k(xv.at(n, 0, h0, w0), xv.at(n, 0, h0, w1), xv.at(n, 0, h1, w0), xv.at(n, 0, h1, w1), o, cx,
                           aw.l0[ow], aw.l1[ow], ah.l0[oh], ah.l1[oh]);
        } else {
          const int64_t d = mode == Upsample::Nearest ? s : 1;
          std::memcpy(o, xv.at(n, 0, oh / d, ow / d), sizeof(T) * cx);
        }
      }
      if (cs > 0) std::memcpy(o + cx, sv.at(n, 0, oh, ow), sizeof(T) * cs);
    }
  });
}

at::Tensor concat_skip(const at::Tensor& x, const at::Tensor& skip, std::optional<c10::string_view> upsample,
                       int64_t scale_factor) {
  const Upsample mode = parse_upsample(upsample, "concat_skip");
  check_concat_skip(x, skip, mode, scale_factor, "concat_skip");
  at::Tensor out = new_concat_skip_output(x, skip);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "concat_skip", [&] {
    if (out.is_contiguous(at::MemoryFormat::ChannelsLast) && !out.is_contiguous())
      forward_channels_last<scalar_t>(x, skip, out, mode, scale_factor);
    else
      forward_nchw<scalar_t>(x, skip, out, mode, scale_factor);
  });
  return out;
}

// ---- backward: the upsample's adjoint ------------------------------------------------

template <typename T>
void adjoint_nchw(const at::Tensor& g_in, at::Tensor& gx, Upsample mode, int64_t s) {
  const int64_t c = gx.size(1), hi = gx.size(2), wi = gx.size(3);
  const Plan<T, LinearAdjoint> p(g_in, at::Tensor(), false, mode, s, hi, wi, g_in.size(2), g_in.size(3));
  const View4<const T>& gv = p.av;
  T* po = gx.mutable_data_ptr<T>();
  const int64_t rows = gx.size(0) * c * hi;
  const int64_t work = mode == Upsample::Bilinear ? 4 * s * s * wi : s * s * wi;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(work, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / (c * hi), ch = r / hi % c, ih = r % hi;
      T* o = po + r * wi;
      if (mode == Upsample::Nearest) {
        nearest_adjoint_row_k(gv.at(n, ch, ih * s, 0), gv.sh, o, wi, s);
      } else if (mode == Upsample::Bilinear) {
        const auto &ah = *p.ah, &aw = *p.aw;
        const int64_t a0 = ah.start[ih];
        bilinear_adjoint_row_k(gv.at(n, ch, 0, 0), gv.sh, o, wi, ah.d.data() + a0, ah.la.data() + a0,
                               ah.lb.data() + a0, ah.cnt.data() + a0, ah.start[ih + 1] - a0, aw.start.data(),
                               aw.d.data(), aw.la.data(), aw.lb.data(), aw.cnt.data());
      } else {
        std::memcpy(o, gv.at(n, ch, ih, 0), sizeof(T) * wi);
      }
    }
  });
}

template <typename T>
void adjoint_channels_last(const at::Tensor& g_in, at::Tensor& gx, Upsample mode, int64_t s) {
  const int64_t c = gx.size(1), hi = gx.size(2), wi = gx.size(3);
  const Plan<T, LinearAdjoint> p(g_in, at::Tensor(), true, mode, s, hi, wi, g_in.size(2), g_in.size(3));
  const View4<const T>& gv = p.av;
  T* po = gx.mutable_data_ptr<T>();
  const int64_t pixels = gx.size(0) * hi * wi;
  at::parallel_for(0, pixels, std::max<int64_t>(1, kGrain / std::max<int64_t>(c * s * s, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t<T>> acc(c);
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q / (hi * wi), ih = q / wi % hi, iw = q % wi;
      T* o = po + q * c;
      if (mode == Upsample::None) {
        std::memcpy(o, gv.at(n, 0, ih, iw), sizeof(T) * c);
        continue;
      }
      std::fill(acc.begin(), acc.end(), acc_t<T>(0));
      if (mode == Upsample::Nearest) {
        for (int64_t dy = 0; dy < s; ++dy)
          for (int64_t dx = 0; dx < s; ++dx) acc_add_k(acc.data(), gv.at(n, 0, ih * s + dy, iw * s + dx), c);
      } else {
        const auto &ah = *p.ah, &aw = *p.aw;
        for (int64_t a = ah.start[ih]; a < ah.start[ih + 1]; ++a) {
          for (int64_t b = aw.start[iw]; b < aw.start[iw + 1]; ++b) {
            const T* gp = gv.at(n, 0, ah.d[a], aw.d[b]);
            acc_fma_k(acc.data(), gp, ah.la[a] * aw.la[b], c);
            if (aw.cnt[b] == 2) acc_fma_k(acc.data(), gp, ah.la[a] * aw.lb[b], c);
            if (ah.cnt[a] == 2) {
              acc_fma_k(acc.data(), gp, ah.lb[a] * aw.la[b], c);
              if (aw.cnt[b] == 2) acc_fma_k(acc.data(), gp, ah.lb[a] * aw.lb[b], c);
            }
          }
        }
      }
      acc_store_k(acc.data(), o, c);
    }
  });
}

at::Tensor concat_skip_backward(const at::Tensor& grad_up, std::optional<c10::string_view> upsample,
                                int64_t scale_factor) {
  const Upsample mode = parse_upsample(upsample, "concat_skip_backward");
  at::Tensor gx = new_upsample_grad(grad_up, mode, scale_factor, "concat_skip_backward");
  if (gx.numel() == 0) return gx;
  const int64_t s = mode == Upsample::None ? 1 : scale_factor;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_up.scalar_type(), "concat_skip_backward", [&] {
    if (gx.is_contiguous(at::MemoryFormat::ChannelsLast) && !gx.is_contiguous())
      adjoint_channels_last<scalar_t>(grad_up, gx, mode, s);
    else
      adjoint_nchw<scalar_t>(grad_up, gx, mode, s);
  });
  return gx;
}

}  // namespace
namespace {
// What the CUDA launch does with a functor, one pack after another.
template <typename T>
auto every_pack(at::Tensor& out) {
  return [&out](auto v, auto cl, const auto& f, const Walk& o) {
    T* po = out.mutable_data_ptr<T>();
    for (int64_t q = 0; q < o.rows * o.per_row; ++q)
      concat_pack_item<T, decltype(v)::value, decltype(cl)::value>(po, o, f, q);
  };
}
}  // namespace

at::Tensor emulate_cuda_concat_skip(const at::Tensor& x, const at::Tensor& skip,
                                    std::optional<c10::string_view> upsample, int64_t scale_factor, bool next) {
  const Upsample mode = parse_upsample(upsample, "concat_skip");
  check_concat_skip(x, skip, mode, scale_factor, "concat_skip");
  at::Tensor out = new_concat_skip_output(x, skip);
  if (out.numel() == 0) return out;
  const int s = mode == Upsample::None ? 1 : static_cast<int>(scale_factor);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "emulate_cuda_concat_skip", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    for_concat_packs<Concat, T>(out, mode, next, every_pack<T>(out), strided4<T>(x), strided4<T>(skip), x.size(1),
                                x.size(2), x.size(3), s, static_cast<A>(1.0 / s), FastDivmod(static_cast<uint32_t>(s)));
  });
  return out;
}

at::Tensor emulate_cuda_concat_skip_backward(const at::Tensor& grad_up, std::optional<c10::string_view> upsample,
                                             int64_t scale_factor, bool next) {
  const Upsample mode = parse_upsample(upsample, "concat_skip_backward");
  at::Tensor gx = new_upsample_grad(grad_up, mode, scale_factor, "concat_skip_backward");
  if (gx.numel() == 0) return gx;
  const int s = mode == Upsample::None ? 1 : static_cast<int>(scale_factor);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_up.scalar_type(), "emulate_cuda_concat_skip_backward",
                                  [&] {
    using T = scalar_t;
    for_concat_packs<Adjoint, T>(gx, mode, next, every_pack<T>(gx), strided4<T>(grad_up), grad_up.size(2),
                                 grad_up.size(3), s, static_cast<at::opmath_type<T>>(1.0 / s));
  });
  return gx;
}

}  // namespace cpu
}  // namespace dtkernels

TORCH_LIBRARY_IMPL(dtkernels, CPU, m) {
  m.impl("_concat_skip", &dtkernels::cpu::concat_skip);
  m.impl("_concat_skip_backward", &dtkernels::cpu::concat_skip_backward);
}
