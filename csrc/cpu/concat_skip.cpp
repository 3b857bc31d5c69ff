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

// The scales whose interior weights can repeat with period s (power-of-two 1/s is
// exact), and that have compiled loops below; the tables still check the pattern.
constexpr bool periodic_scale(int64_t s) { return s == 2 || s == 4 || s == 8; }

// Forward: for each output index, its two source indices and weights, in the
// opmath type A.
template <typename A>
struct LinearAxis {
  std::vector<int64_t> i0, i1;
  std::vector<A> l0, l1;
  // Scales 2, 4 and 8 (period = s) away from the edges (outputs [s, n_out - s)):
  // output s*m + j reads inputs m - 1, m for j < s/2 and m, m + 1 for the rest,
  // with weights that depend on j only (checked against the table, so the
  // contiguous loops of bilinear_hrow reproduce it exactly). 0 otherwise.
  int64_t period = 0;
  LinearAxis(int64_t n_in, int64_t n_out, int64_t s, bool align_corners)
      : i0(n_out), i1(n_out), l0(n_out), l1(n_out) {
    const A scale = linear_scale<A>(n_in, n_out, s, align_corners);
    for (int64_t d = 0; d < n_out; ++d)
      linear_source(d, scale, n_in, n_out, i0[d], i1[d], l0[d], l1[d], align_corners);
    bool regular = periodic_scale(s) && n_in >= 3 && n_out == s * n_in;
    for (int64_t d = s; regular && d < n_out - s; ++d) {
      const int64_t j = d % s, want = d / s - (j < s / 2 ? 1 : 0);
      regular = i0[d] == want && i1[d] == want + 1 && l0[d] == l0[s + j] && l1[d] == l1[s + j];
    }
    period = regular ? s : 0;
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
  // Scales 2, 4 and 8 (period = s) away from the edges (inputs [lo, hi), which
  // holds [2, n_in - 2)): input i is read by the 2s outputs s*i - s/2 .. s*i + 3s/2
  // - 1, one corner each, with the weights pw[0 .. 2s) (checked against the table,
  // so bilinear_adjoint_row's contiguous loops reproduce it exactly). 0 when the
  // pattern does not hold (other scales, or weights that are not periodic in
  // floating point, as with s = 3).
  int64_t period = 0, lo = 0, hi = 0;
  std::vector<A> pw;
  LinearAdjoint(int64_t n_in, int64_t n_out, int64_t s, bool align_corners) : start(n_in + 1, 0) {
    LinearAxis<A> ax(n_in, n_out, s, align_corners);
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
    if (!(periodic_scale(s) && n_in >= 5 && n_out == s * n_in)) return;
    pw.assign(la.begin() + start[2], la.begin() + start[2] + std::min(2 * s, start[3] - start[2]));
    const auto regular = [&](int64_t i) {
      bool r = start[i + 1] - start[i] == 2 * s;
      for (int64_t k = 0; r && k < 2 * s; ++k) {
        const int64_t b = start[i] + k;
        r = d[b] == s * i - s / 2 + k && cnt[b] == 1 && la[b] == pw[k];
      }
      return r;
    };
    for (int64_t i = 2; i < n_in - 2; ++i)
      if (!regular(i)) return;
    for (lo = 2; lo > 0 && regular(lo - 1);) --lo;
    for (hi = n_in - 2; hi < n_in && regular(hi);) ++hi;
    period = s;
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

// Bilinear NCHW in two passes, ATen's generic kernel's arithmetic exactly: a source
// row interpolated along w (t = fma(x0, w0, x1 * w1): the same for every output row
// that reads it, so it is kept and reused), then each output row from its two
// source rows (fma(t0, h0, t1 * h1)). With a `period` (LinearAxis), contiguous
// loads replace the table's gathers away from the edges.
template <int S, typename T, typename A>
DTK_INLINE void hrow_periodic(const T* DTK_RESTRICT r, A* DTK_RESTRICT t, int64_t w_in, const int64_t* iw0,
                              const int64_t* iw1, const A* w0, const A* w1) {
  const auto edge = [&](int64_t o) { t[o] = fma_op(A(r[iw0[o]]), w0[o], A(r[iw1[o]]) * w1[o]); };
  for (int j = 0; j < S; ++j) edge(j);  // the edges from the table
  for (int j = 0; j < S; ++j) edge(S * w_in - S + j);
  A a[S], b[S];
  for (int j = 0; j < S; ++j) a[j] = w0[S + j], b[j] = w1[S + j];
  for (int64_t m = 1; m < w_in - 1; ++m) {
    const A rm = A(r[m]), left = A(r[m - 1]), right = A(r[m + 1]);
    for (int j = 0; j < S; ++j)
      t[S * m + j] = j < S / 2 ? fma_op(left, a[j], rm * b[j]) : fma_op(rm, a[j], right * b[j]);
  }
}

template <typename T, typename A = acc_t<T>>
DTK_INLINE void bilinear_hrow(const T* DTK_RESTRICT r, A* DTK_RESTRICT t, int64_t w_in, int64_t w_out,
                              int64_t period, const int64_t* iw0, const int64_t* iw1, const A* w0, const A* w1) {
  // Periods 4 and 8 are bilinear_hrow_wide's: with their code in this function the
  // scale-2 rows measured a few percent slower (not resolved above this machine's
  // noise; kept apart as a cheap precaution).
  if (period != 2) {
    for (int64_t o = 0; o < w_out; ++o) t[o] = fma_op(A(r[iw0[o]]), w0[o], A(r[iw1[o]]) * w1[o]);
    return;
  }
  for (int64_t o : {int64_t(0), int64_t(1), w_out - 2, w_out - 1})
    t[o] = fma_op(A(r[iw0[o]]), w0[o], A(r[iw1[o]]) * w1[o]);
  const A e0 = w0[2], e1 = w1[2], d0 = w0[3], d1 = w1[3];
  for (int64_t i = 1; i < w_in - 1; ++i) {
    t[2 * i] = fma_op(A(r[i - 1]), e0, A(r[i]) * e1);
    t[2 * i + 1] = fma_op(A(r[i]), d0, A(r[i + 1]) * d1);
  }
}

template <typename T, typename A = acc_t<T>>
DTK_INLINE void bilinear_hrow_wide(const T* DTK_RESTRICT r, A* DTK_RESTRICT t, int64_t w_in, int64_t period,
                                   const int64_t* iw0, const int64_t* iw1, const A* w0, const A* w1) {
  if (period == 4) hrow_periodic<4>(r, t, w_in, iw0, iw1, w0, w1);
  else hrow_periodic<8>(r, t, w_in, iw0, iw1, w0, w1);
}

template <typename T, typename A = acc_t<T>>
DTK_INLINE void bilinear_vmix(const A* DTK_RESTRICT t0, const A* DTK_RESTRICT t1, T* DTK_RESTRICT o, int64_t n,
                              A h0, A h1) {
  using L = Lanes<A>;
  constexpr int N = L::N;
  int64_t k = 0;
  for (; k + N <= n; k += N) {  // explicit vectors: GCC rounds to the 16-bit types one at a time
    const typename L::V a = loadu<typename L::V>(t0 + k), b = loadu<typename L::V>(t1 + k);
    typename L::V v;
    for (int j = 0; j < N; ++j) v[j] = fma_op(a[j], h0, b[j] * h1);
    vstore(o + k, v);
  }
  for (; k < n; ++k) o[k] = T(fma_op(t0[k], h0, t1[k] * h1));
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

// The NCHW bilinear adjoint's tables for one call: both axes', the gradient's row
// stride, and, when both axes have a period, the edge columns (outside [aw.lo,
// aw.hi), at most four) of the regular rows (ah's [lo, hi)) as flat lists: per
// column, its table walk's (offset from the row's first gradient row, weight
// product) in the walk's order. Regular rows share those lists, so their edge
// columns are summed for several rows at once (bilinear_adjoint_edges): one chain
// per row, side by side, where a single row's chain would wait on each fma.
template <typename A>
struct AdjointNchw {
  const LinearAdjoint<A>& ah;
  const LinearAdjoint<A>& aw;
  int64_t row;
  std::vector<int64_t> edges, flat_start, flat_off;
  std::vector<A> flat_w;
  AdjointNchw(const LinearAdjoint<A>& h, const LinearAdjoint<A>& w, int64_t row_stride)
      : ah(h), aw(w), row(row_stride) {
    if (!aw.period) return;
    for (int64_t i = 0; i < static_cast<int64_t>(aw.start.size()) - 1; ++i)
      if (i < aw.lo || i >= aw.hi) edges.push_back(i);
    if (!ah.period) return;
    flat_start.push_back(0);
    for (int64_t i : edges) {
      for (int64_t k = 0; k < 2 * ah.period; ++k) {
        for (int64_t b = aw.start[i]; b < aw.start[i + 1]; ++b) {
          flat_off.push_back(k * row + aw.d[b]);
          flat_w.push_back(ah.pw[k] * aw.la[b]);
          if (aw.cnt[b] == 2) {
            flat_off.push_back(k * row + aw.d[b]);
            flat_w.push_back(ah.pw[k] * aw.lb[b]);
          }
        }
      }
      flat_start.push_back(static_cast<int64_t>(flat_off.size()));
    }
  }
  // Whether x row ih's edge columns are bilinear_adjoint_edges' (else the row's own).
  bool flat_row(int64_t ih) const { return !flat_start.empty() && ih >= ah.lo && ih < ah.hi; }
};

// The edge columns of `rows` (at most kEdgeRows) consecutive regular x rows of one
// plane: row l's gradient rows start at g + l * step (step = s gradient rows), its
// x row at o + l * w_in.
constexpr int64_t kEdgeRows = 16;
template <typename T, typename A = acc_t<T>>
DTK_INLINE void bilinear_adjoint_edges(const T* DTK_RESTRICT g, int64_t step, T* DTK_RESTRICT o, int64_t w_in,
                                       int64_t rows, const AdjointNchw<A>& p) {
  for (size_t e = 0; e < p.edges.size(); ++e) {
    A sum[kEdgeRows] = {};
    for (int64_t j = p.flat_start[e]; j < p.flat_start[e + 1]; ++j) {
      const A w = p.flat_w[j];
      const T* gj = g + p.flat_off[j];
      for (int64_t l = 0; l < rows; ++l) sum[l] = fma_op(w, A(gj[l * step]), sum[l]);
    }
    for (int64_t l = 0; l < rows; ++l) o[l * w_in + p.edges[e]] = T(sum[l]);
  }
}

// The regular columns [lo, hi) of one gradient row into acc: per column, the 2S
// gradient columns S*i - S/2 + k that read it, in ascending k, weighted x[k] (and
// then y[k] when both row corners land on the x row: `twice`), one fma each, in
// the table walk's order.
template <int S, typename T, typename A>
DTK_INLINE void adjoint_columns(const T* DTK_RESTRICT g, A* DTK_RESTRICT acc, int64_t lo, int64_t hi,
                                const A* DTK_RESTRICT x, const A* DTK_RESTRICT y, bool twice) {
  A xs[2 * S], ys[2 * S];  // local copies: the loops below keep them in registers
  for (int k = 0; k < 2 * S; ++k) xs[k] = x[k], ys[k] = y[k];
  if (twice) {
    for (int64_t i = lo; i < hi; ++i) {
      const T* gi = g + S * i - S / 2;
      A v = acc[i];
      for (int k = 0; k < 2 * S; ++k) v = fma_op(ys[k], A(gi[k]), fma_op(xs[k], A(gi[k]), v));
      acc[i] = v;
    }
  } else {
    for (int64_t i = lo; i < hi; ++i) {
      const T* gi = g + S * i - S / 2;
      A v = acc[i];
      for (int k = 0; k < 2 * S; ++k) v = fma_op(xs[k], A(gi[k]), v);
      acc[i] = v;
    }
  }
}

// The table walk of x column i's entries under h-entry a (an index into ah's
// tables), added to sum: per x element, the sum over its h-entries, then w-entries,
// then corners, as ATen's backward adds them. N planes at once, lane l reading
// cols[d * N + l] for gradient column d (N = 1: a gradient row itself).
template <int N, typename E, typename A>
DTK_INLINE void adjoint_walk(const E* DTK_RESTRICT cols, const LinearAdjoint<A>& ah, const LinearAdjoint<A>& aw,
                             int64_t a, int64_t i, A (&sum)[N]) {
  const A hla = ah.la[a], hlb = ah.lb[a];
  const auto add = [&](A w, const E* gv) {
    for (int l = 0; l < N; ++l) sum[l] = fma_op(w, A(gv[l]), sum[l]);
  };
  for (int64_t b = aw.start[i]; b < aw.start[i + 1]; ++b) {
    const E* gv = cols + aw.d[b] * N;
    add(hla * aw.la[b], gv);
    if (aw.cnt[b] == 2) add(hla * aw.lb[b], gv);
    if (ah.cnt[a] == 2) {
      add(hlb * aw.la[b], gv);
      if (aw.cnt[b] == 2) add(hlb * aw.lb[b], gv);
    }
  }
}

// Bilinear adjoint, NCHW, for w axes without a period (align_corners, scales other
// than 2, 4 and 8), whose table walk alone is one latency-bound fma chain per
// element, and for rows too short for bilinear_adjoint_row (adjoint_nchw decides):
// Lanes<A>::N planes at once, one per vector lane, since all planes share the
// tables. Their gradient rows are transposed (a row of column vectors, cols[d * N + l]
// = plane l's column d), so that each walk step is one vector load and fma; every
// lane runs the scalar walk's chain exactly (5x the walk's speed on DeepLabV3+'s
// align_corners skip). planes/outs: the N planes' gradient and x-gradient bases
// (lanes past `real` repeat a real plane and are not stored); group: the first
// plane's index. ring: `nring` transposed rows (w_out * N each), keyed by group and
// gradient row in key (-1: none yet).
template <typename T, typename A = acc_t<T>>
DTK_INLINE void bilinear_adjoint_planes(const T* const* planes, T* const* outs, int real, int64_t group, int64_t ih,
                                        const AdjointNchw<A>& p, int64_t w_out, A* DTK_RESTRICT acc,
                                        A* DTK_RESTRICT ring, int64_t nring, int64_t* key) {
  constexpr int N = Lanes<A>::N;
  using V = typename Lanes<A>::V;
  const LinearAdjoint<A>&ah = p.ah, &aw = p.aw;
  const int64_t w_in = static_cast<int64_t>(aw.start.size()) - 1;
  for (int64_t j = 0; j < w_in * N; ++j) acc[j] = A(0);
  for (int64_t a = ah.start[ih]; a < ah.start[ih + 1]; ++a) {
    const int64_t off = ah.d[a] * p.row;
    A* DTK_RESTRICT cols = ring + (ah.d[a] % nring) * w_out * N;
    const int64_t row_key = (group << 32) | ah.d[a];  // planes and rows both fewer than 2^31
    if (key[ah.d[a] % nring] != row_key) {
      key[ah.d[a] % nring] = row_key;
      int64_t d = 0;
      for (; d + N <= w_out; d += N) {
        V v[N];
        for (int l = 0; l < N; ++l) v[l] = vload(planes[l] + off + d);
        transpose(v);
        for (int l = 0; l < N; ++l) storeu(cols + (d + l) * N, v[l]);
      }
      for (; d < w_out; ++d)
        for (int l = 0; l < N; ++l) cols[d * N + l] = A(planes[l][off + d]);
    }
    for (int64_t i = 0; i < w_in; ++i) {
      A sum[N];
      for (int l = 0; l < N; ++l) sum[l] = acc[i * N + l];
      adjoint_walk<N>(cols, ah, aw, a, i, sum);
      for (int l = 0; l < N; ++l) acc[i * N + l] = sum[l];
    }
  }
  int64_t i = 0;
  for (; i + N <= w_in; i += N) {  // back to rows: the same transpose
    V v[N];
    for (int l = 0; l < N; ++l) v[l] = loadu<V>(acc + (i + l) * N);
    transpose(v);
    for (int l = 0; l < real; ++l) vstore(outs[l] + ih * w_in + i, v[l]);
  }
  for (; i < w_in; ++i)
    for (int l = 0; l < real; ++l) outs[l][ih * w_in + i] = T(acc[i * N + l]);
}

// Bilinear adjoint, NCHW, w axis with a period and long rows (adjoint_nchw; else
// bilinear_adjoint_planes): x row ih of one plane from the gradient plane. The
// regular columns go in contiguous loops per h-entry (summed in `acc`), and the edge
// columns of regular rows are left to bilinear_adjoint_edges; everything else walks
// the tables. acc holds w_in elements, wide s * w_in (16-bit types' widened gradient
// row).
template <typename T, typename A = acc_t<T>>
DTK_INLINE void bilinear_adjoint_row(const T* DTK_RESTRICT plane, T* DTK_RESTRICT o, int64_t ih,
                                     const AdjointNchw<A>& p, A* DTK_RESTRICT acc, A* DTK_RESTRICT wide) {
  const LinearAdjoint<A>&ah = p.ah, &aw = p.aw;
  const int64_t a0 = ah.start[ih], nh = ah.start[ih + 1] - a0, row = p.row;
  const int64_t* hd = ah.d.data() + a0;
  const A *hla = ah.la.data() + a0, *hlb = ah.lb.data() + a0;
  const int32_t* hcnt = ah.cnt.data() + a0;
  const auto walk = [&](int64_t i, int64_t a, A sum) {
    A s1[1] = {sum};
    adjoint_walk<1>(plane + hd[a] * row, ah, aw, a0 + a, i, s1);
    return s1[0];
  };
  const int64_t w_in = static_cast<int64_t>(aw.start.size()) - 1;
  const int64_t ne = static_cast<int64_t>(p.edges.size());
  if (!p.flat_row(ih)) {
    // The edge columns' chains interleaved, h-entry by h-entry, so that their fma
    // latencies overlap; each chain is still summed in its own order.
    A sums[4] = {A(0), A(0), A(0), A(0)};
    for (int64_t a = 0; a < nh; ++a)
      for (int64_t e = 0; e < ne; ++e) sums[e] = walk(p.edges[e], a, sums[e]);
    for (int64_t e = 0; e < ne; ++e) o[p.edges[e]] = T(sums[e]);
  }
  const int64_t lo = aw.lo, hi = aw.hi;
  for (int64_t i = lo; i < hi; ++i) acc[i] = A(0);
  for (int64_t a = 0; a < nh; ++a) {
    const T* g16 = plane + hd[a] * row;
    // 16-bit rows are widened first (exactly), so that the loops below run at the
    // float vector width: GCC leaves converting strided 16-bit loads scalar.
    const A* DTK_RESTRICT g;
    if constexpr (std::is_same_v<T, A>) {
      g = g16;
    } else {
      convert_px<A>(wide, g16, w_in * aw.period);
      g = wide;
    }
    A x[16], y[16];  // the weight products, as the table walk forms them
    for (int64_t k = 0; k < 2 * aw.period; ++k) x[k] = hla[a] * aw.pw[k], y[k] = hlb[a] * aw.pw[k];
    const bool twice = hcnt[a] == 2;  // both row corners on ih (an edge row)
    if (aw.period == 2) adjoint_columns<2>(g, acc, lo, hi, x, y, twice);
    else if (aw.period == 4) adjoint_columns<4>(g, acc, lo, hi, x, y, twice);
    else adjoint_columns<8>(g, acc, lo, hi, x, y, twice);
  }
  convert_px<A>(o + lo, acc + lo, hi - lo);
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
  DTK_CLONES void bilinear_hrow_k(const T* r, acc_t<T>* t, int64_t w_in, int64_t w_out, int64_t period, \
                                  const int64_t* iw0, const int64_t* iw1, const acc_t<T>* w0,        \
                                  const acc_t<T>* w1) {                                             \
    bilinear_hrow<T>(r, t, w_in, w_out, period, iw0, iw1, w0, w1);                                  \
  }                                                                                                 \
  DTK_CLONES void bilinear_hrow_wide_k(const T* r, acc_t<T>* t, int64_t w_in, int64_t period,        \
                                       const int64_t* iw0, const int64_t* iw1, const acc_t<T>* w0,   \
                                       const acc_t<T>* w1) {                                        \
    bilinear_hrow_wide<T>(r, t, w_in, period, iw0, iw1, w0, w1);                                    \
  }                                                                                                 \
  DTK_CLONES void bilinear_vmix_k(const acc_t<T>* t0, const acc_t<T>* t1, T* o, int64_t n,           \
                                  acc_t<T> h0, acc_t<T> h1) {                                       \
    bilinear_vmix<T>(t0, t1, o, n, h0, h1);                                                         \
  }                                                                                                 \
  DTK_CLONES void bilinear_pixel_k(const T* p00, const T* p01, const T* p10, const T* p11, T* o,    \
                                   int64_t c, acc_t<T> w0, acc_t<T> w1, acc_t<T> h0, acc_t<T> h1) { \
    bilinear_pixel<T>(p00, p01, p10, p11, o, c, w0, w1, h0, h1);                                    \
  }                                                                                                 \
  DTK_CLONES void nearest_adjoint_row_k(const T* g, int64_t row, T* o, int64_t w_in, int64_t s) {   \
    nearest_adjoint_row<T>(g, row, o, w_in, s);                                                     \
  }                                                                                                 \
  DTK_CLONES void bilinear_adjoint_row_k(const T* plane, T* o, int64_t ih,                          \
                                         const AdjointNchw<acc_t<T>>& p, acc_t<T>* acc,            \
                                         acc_t<T>* wide) {                                          \
    bilinear_adjoint_row<T>(plane, o, ih, p, acc, wide);                                            \
  }                                                                                                 \
  DTK_CLONES void bilinear_adjoint_planes_k(const T* const* planes, T* const* outs, int real, int64_t group, \
                                            int64_t ih, const AdjointNchw<acc_t<T>>& p, int64_t w_out, \
                                            acc_t<T>* acc, acc_t<T>* ring, int64_t nring,           \
                                            int64_t* key) {                                        \
    bilinear_adjoint_planes<T>(planes, outs, real, group, ih, p, w_out, acc, ring, nring, key);     \
  }                                                                                                 \
  DTK_CLONES void bilinear_adjoint_edges_k(const T* g, int64_t step, T* o, int64_t w_in, int64_t rows, \
                                           const AdjointNchw<acc_t<T>>& p) {                        \
    bilinear_adjoint_edges<T>(g, step, o, w_in, rows, p);                                           \
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
       int64_t ho, int64_t wo, bool align_corners)
      : a(unit_stride(a_in, cl ? 1 : 3, cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous)),
        b(b_in.defined() ? unit_stride(b_in, cl ? 1 : 3, cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous)
                         : a),
        av(a),
        bv(b) {
    if (mode == Upsample::Bilinear) {
      ah = std::make_unique<Axis<acc_t<T>>>(hi, ho, s, align_corners);
      aw = std::make_unique<Axis<acc_t<T>>>(wi, wo, s, align_corners);
    }
  }
};

// ---- forward -----------------------------------------------------------------------

template <typename T>
void forward_nchw(const at::Tensor& x_in, const at::Tensor& skip_in, at::Tensor& out, Upsample mode, int64_t s,
                  bool align, bool skip_first) {
  using E = typename bits_of<T>::type;
  const int64_t cx = x_in.size(1), ct = out.size(1), ho = out.size(2), wo = out.size(3), wi = x_in.size(3);
  const ConcatOffsets at = concat_offsets(cx, ct - cx, skip_first);
  const int64_t x0 = at.x0, s0 = at.s0;
  const Plan<T, LinearAxis> p(x_in, skip_in, false, mode, s, x_in.size(2), wi, ho, wo, align);
  const View4<const T>&xv = p.av, &sv = p.bv;
  T* po = out.mutable_data_ptr<T>();
  const int64_t rows = out.size(0) * ct * ho;
  using A = acc_t<T>;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(wo, 1)), [&](int64_t begin, int64_t end) {
    std::vector<A> hrow(mode == Upsample::Bilinear ? 2 * wo : 0);
    int64_t tag[2] = {-1, -1};
    for (int64_t r = begin; r < end;) {
      const int64_t n = r / (ct * ho), c = r / ho % ct, oh = r % ho;
      const int64_t k = std::min(end - r, ho - oh);  // rows of this plane in this chunk
      T* o = po + r * wo;
      const bool from_skip = c >= s0 && c < s0 + (ct - cx);
      const int64_t cc = from_skip ? c - s0 : c - x0;  // the channel in its input
      if (from_skip || mode == Upsample::None) {  // a plain copy of k rows
        const View4<const T>& v = from_skip ? sv : xv;
        const T* src = v.at(n, cc, oh, 0);
        if (v.sh == wo || k == 1) {
          std::memcpy(o, src, sizeof(T) * k * wo);
        } else {
          for (int64_t j = 0; j < k; ++j) std::memcpy(o + j * wo, src + j * v.sh, sizeof(T) * wo);
        }
      } else if (mode == Upsample::Nearest) {
        for (int64_t j = 0; j < k; ++j)
          repeat_row_k(reinterpret_cast<const E*>(xv.at(n, cc, (oh + j) / s, 0)), reinterpret_cast<E*>(o + j * wo), wi, s);
      } else {
        const auto &ah = *p.ah, &aw = *p.aw;
        // Source rows interpolated along w, two kept: consecutive output rows share them.
        const auto row = [&](int64_t h, int64_t keep) -> const A* {
          for (int u = 0; u < 2; ++u)
            if (tag[u] == h) return hrow.data() + u * wo;
          const int u = tag[0] == keep ? 1 : 0;
          if (aw.period >= 4)
            bilinear_hrow_wide_k(xv.at(n, cc, h, 0), hrow.data() + u * wo, wi, aw.period, aw.i0.data(), aw.i1.data(),
                                 aw.l0.data(), aw.l1.data());
          else
            bilinear_hrow_k(xv.at(n, cc, h, 0), hrow.data() + u * wo, wi, wo, aw.period, aw.i0.data(), aw.i1.data(),
                            aw.l0.data(), aw.l1.data());
          tag[u] = h;
          return hrow.data() + u * wo;
        };
        tag[0] = tag[1] = -1;  // a new plane
        for (int64_t j = 0; j < k; ++j) {
          const int64_t h = oh + j, h0 = ah.i0[h], h1 = ah.i1[h];
          const A* t0 = row(h0, h1);
          const A* t1 = row(h1, h0);
          bilinear_vmix_k(t0, t1, o + j * wo, wo, ah.l0[h], ah.l1[h]);
        }
      }
      r += k;
    }
  });
}

template <typename T>
void forward_channels_last(const at::Tensor& x_in, const at::Tensor& skip_in, at::Tensor& out, Upsample mode,
                           int64_t s, bool align, bool skip_first) {
  const int64_t cx = x_in.size(1), cs = skip_in.size(1), ct = out.size(1), ho = out.size(2), wo = out.size(3);
  const ConcatOffsets at = concat_offsets(cx, cs, skip_first);
  const int64_t x0 = at.x0, s0 = at.s0;
  const Plan<T, LinearAxis> p(x_in, skip_in, true, mode, s, x_in.size(2), x_in.size(3), ho, wo, align);
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
          bilinear_pixel_k(xv.at(n, 0, h0, w0), xv.at(n, 0, h0, w1), xv.at(n, 0, h1, w0), xv.at(n, 0, h1, w1),
                           o + x0, cx, aw.l0[ow], aw.l1[ow], ah.l0[oh], ah.l1[oh]);
        } else {
          const int64_t d = mode == Upsample::Nearest ? s : 1;
          std::memcpy(o + x0, xv.at(n, 0, oh / d, ow / d), sizeof(T) * cx);
        }
      }
      if (cs > 0) std::memcpy(o + s0, sv.at(n, 0, oh, ow), sizeof(T) * cs);
    }
  });
}

at::Tensor concat_skip(const at::Tensor& x, const at::Tensor& skip, std::optional<c10::string_view> upsample,
                       int64_t scale_factor, bool align_corners, bool skip_first) {
  const Upsample mode = parse_upsample(upsample, "concat_skip");
  check_align_corners(mode, align_corners, "concat_skip");
  check_concat_skip(x, skip, mode, scale_factor, "concat_skip");
  at::Tensor out = new_concat_skip_output(x, skip);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "concat_skip", [&] {
    if (out.is_contiguous(at::MemoryFormat::ChannelsLast) && !out.is_contiguous())
      forward_channels_last<scalar_t>(x, skip, out, mode, scale_factor, align_corners, skip_first);
    else
      forward_nchw<scalar_t>(x, skip, out, mode, scale_factor, align_corners, skip_first);
  });
  return out;
}

// ---- backward: the upsample's adjoint ------------------------------------------------

template <typename T>
void adjoint_nchw(const at::Tensor& g_in, at::Tensor& gx, Upsample mode, int64_t s, bool align) {
  const int64_t c = gx.size(1), hi = gx.size(2), wi = gx.size(3);
  const Plan<T, LinearAdjoint> p(g_in, at::Tensor(), false, mode, s, hi, wi, g_in.size(2), g_in.size(3), align);
  const View4<const T>& gv = p.av;
  T* po = gx.mutable_data_ptr<T>();
  const int64_t rows = gx.size(0) * c * hi;
  const int64_t work = mode == Upsample::Bilinear ? 4 * s * s * wi : s * s * wi;
  std::unique_ptr<AdjointNchw<acc_t<T>>> bilinear;
  if (mode == Upsample::Bilinear) bilinear = std::make_unique<AdjointNchw<acc_t<T>>>(*p.ah, *p.aw, gv.sh);
  // Plane groups unless the w axis has a period and rows long enough for
  // bilinear_adjoint_row's contiguous loops to win (measured, float32 and bfloat16,
  // scales 2-8: from 64 columns with fewer than 256 planes, from 128 with any).
  const int64_t nplanes = gx.size(0) * c;
  if (mode == Upsample::Bilinear && (!p.aw->period || wi < 64 || (wi < 128 && nplanes >= 256))) {
    // Groups of L planes (n * c + ch), x row by x row (ih fastest, so that the
    // transposed gradient rows an x row shares with the next are reused).
    constexpr int L = Lanes<acc_t<T>>::N;
    const int64_t groups = (nplanes + L - 1) / L, wo = g_in.size(3);
    int64_t nring = 1;
    for (int64_t i = 0; i < hi; ++i) nring = std::max(nring, p.ah->start[i + 1] - p.ah->start[i]);
    at::parallel_for(0, groups * hi, std::max<int64_t>(1, kGrain / (L * work)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t<T>> acc(wi * L), ring(nring * wo * L);
      std::vector<int64_t> key(nring, -1);
      for (int64_t u = begin; u < end; ++u) {
        const int64_t p0 = u / hi * L, ih = u % hi;
        const int real = static_cast<int>(std::min<int64_t>(L, nplanes - p0));
        const T* planes[L];
        T* outs[L];
        for (int l = 0; l < L; ++l) {
          const int64_t q = p0 + std::min(l, real - 1);
          planes[l] = gv.at(q / c, q % c, 0, 0);
          outs[l] = po + q * hi * wi;
        }
        bilinear_adjoint_planes_k(planes, outs, real, p0, ih, *bilinear, wo, acc.data(), ring.data(), nring,
                                  key.data());
      }
    });
    return;
  }
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(work, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t<T>> acc(mode == Upsample::Bilinear ? wi + s * wi : 0);
    for (int64_t r = begin, rows_left = 0; r < end; ++r, --rows_left) {
      const int64_t n = r / (c * hi), ch = r / hi % c, ih = r % hi;
      T* o = po + r * wi;
      if (mode == Upsample::Bilinear && rows_left <= 0 && bilinear->flat_row(ih)) {
        // the edge columns of the next run of regular rows in this plane, together
        rows_left = std::min({end - r, p.ah->hi - ih, kEdgeRows});
        bilinear_adjoint_edges_k(gv.at(n, ch, s * ih - s / 2, 0), s * gv.sh, o, wi, rows_left, *bilinear);
      }
      if (mode == Upsample::Nearest) {
        nearest_adjoint_row_k(gv.at(n, ch, ih * s, 0), gv.sh, o, wi, s);
      } else if (mode == Upsample::Bilinear) {
        bilinear_adjoint_row_k(gv.at(n, ch, 0, 0), o, ih, *bilinear, acc.data(), acc.data() + wi);
      } else {
        std::memcpy(o, gv.at(n, ch, ih, 0), sizeof(T) * wi);
      }
    }
  });
}

template <typename T>
void adjoint_channels_last(const at::Tensor& g_in, at::Tensor& gx, Upsample mode, int64_t s, bool align) {
  const int64_t c = gx.size(1), hi = gx.size(2), wi = gx.size(3);
  const Plan<T, LinearAdjoint> p(g_in, at::Tensor(), true, mode, s, hi, wi, g_in.size(2), g_in.size(3), align);
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
                                int64_t scale_factor, bool align_corners) {
  const Upsample mode = parse_upsample(upsample, "concat_skip_backward");
  check_align_corners(mode, align_corners, "concat_skip_backward");
  at::Tensor gx = new_upsample_grad(grad_up, mode, scale_factor, "concat_skip_backward");
  if (gx.numel() == 0) return gx;
  const int64_t s = mode == Upsample::None ? 1 : scale_factor;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_up.scalar_type(), "concat_skip_backward", [&] {
    if (gx.is_contiguous(at::MemoryFormat::ChannelsLast) && !gx.is_contiguous())
      adjoint_channels_last<scalar_t>(grad_up, gx, mode, s, align_corners);
    else
      adjoint_nchw<scalar_t>(grad_up, gx, mode, s, align_corners);
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
                                    std::optional<c10::string_view> upsample, int64_t scale_factor,
                                    bool align_corners, bool skip_first) {
  const Upsample mode = parse_upsample(upsample, "concat_skip");
  check_align_corners(mode, align_corners, "concat_skip");
  check_concat_skip(x, skip, mode, scale_factor, "concat_skip");
  at::Tensor out = new_concat_skip_output(x, skip);
  if (out.numel() == 0) return out;
  const int s = mode == Upsample::None ? 1 : static_cast<int>(scale_factor);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "emulate_cuda_concat_skip", [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    for_concat_packs<Concat, T>(out, mode, every_pack<T>(out), strided4<T>(x), strided4<T>(skip), x.size(1),
                                x.size(2), x.size(3), s, linear_scale<A>(x.size(2), out.size(2), s, align_corners),
                                linear_scale<A>(x.size(3), out.size(3), s, align_corners),
                                FastDivmod(static_cast<uint32_t>(s)), align_corners,
                                concat_offsets(x.size(1), skip.size(1), skip_first));
  });
  return out;
}

at::Tensor emulate_cuda_concat_skip_backward(const at::Tensor& grad_up, std::optional<c10::string_view> upsample,
                                             int64_t scale_factor, bool align_corners, bool shared_packs) {
  const Upsample mode = parse_upsample(upsample, "concat_skip_backward");
  check_align_corners(mode, align_corners, "concat_skip_backward");
  at::Tensor gx = new_upsample_grad(grad_up, mode, scale_factor, "concat_skip_backward");
  if (gx.numel() == 0) return gx;
  const int s = mode == Upsample::None ? 1 : static_cast<int>(scale_factor);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_up.scalar_type(), "emulate_cuda_concat_skip_backward",
                                  [&] {
    using T = scalar_t;
    using A = at::opmath_type<T>;
    const auto run = [&](auto bilinear) {
      for_concat_packs<Adjoint, T, decltype(bilinear)::value>(
          gx, mode, every_pack<T>(gx), strided4<T>(grad_up), grad_up.size(2), grad_up.size(3), s,
          linear_scale<A>(gx.size(2), grad_up.size(2), s, align_corners),
          linear_scale<A>(gx.size(3), grad_up.size(3), s, align_corners), align_corners);
    };
    if (shared_packs) run(std::integral_constant<int, 3>{});
    else run(std::integral_constant<int, 2>{});
  });
  return gx;
}

}  // namespace cpu
}  // namespace dtkernels

TORCH_LIBRARY_IMPL(dtkernels, CPU, m) {
  m.impl("_concat_skip", &dtkernels::cpu::concat_skip);
  m.impl("_concat_skip_backward", &dtkernels::cpu::concat_skip_backward);
}
