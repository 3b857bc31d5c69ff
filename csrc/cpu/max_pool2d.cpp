// max_pool2d on the CPU: forward in one pass, backward as a per-input-row gather,
// both vectorised (runtime ISA dispatch through DTK_CLONES), exact to ATen.
//
// Forward: every output is the fold of its window's taps, in ATen's scan order, with
// ATen's rule (a value replaces the running max when greater or NaN), computed for a
// block of outputs at once with the running max and its tap kept in registers
// (pool_block). The taps of a block must be contiguous runs of input:
//  - NCHW (and channels_last with few channels) works on rows of "pixels" of B
//    elements (1, or C). An input row is split into `sw` residue arrays
//    D_c[t] = pixel t*sw + c (converted to the compute type, padded with -inf), so
//    tap j of output pixels 0..Wo-1 is the contiguous slice D_{c_j}[shift_j ..]
//    whatever the stride, padding or dilation; the -inf padding never wins.
//    Split rows are cached, so overlapping windows split each input row once.
//  - channels_last with many channels reads each tap's C channels in place.
//
// Backward runs the split in reverse: for each input row, the few output rows whose
// windows hold it add their gradient into residue accumulators (kept in cache) in
// ascending (oh, ow) order -- ATen's summation order, so float32 results are
// bit-identical to ATen's -- and the row is stored once. No zero-fill pass over
// memory, no atomics: deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <type_traits>
#include <vector>

#include "../max_pool2d.h"
#include "simd.h"

#if DTK_HAVE_F16C
#include <immintrin.h>
#endif

namespace dtkernels {
namespace cpu {
namespace {

// channels_last with at least this many channels reads taps in place (no split).
constexpr int64_t kDirectC = 32;
// Outputs this large are stored non-temporally: they would not stay in cache anyway,
// and skipping the read-for-ownership saves a sixth of a k2s2 forward's traffic.
constexpr int64_t kStreamBytes = int64_t(8) << 20;
constexpr int64_t kAhead = 6;  // output pixels to prefetch ahead

// Per-call tables, shared by every row.
struct Plan {
  Pool2d g;
  int64_t B = 1;              // elements per pixel: 1 (NCHW) or C (channels_last)
  bool direct = false;        // channels_last with C >= kDirectC: taps read in place, no split
  bool stream = false;        // outputs of kStreamBytes or more: non-temporal stores
  int64_t row_in = 0, row_out = 0;  // elements per input / output row: W*B, Wo*B
  // Residue split: sw arrays of `len` pixels each; tap column j reads the slice at[j].
  int64_t len = 0, lpad = 0;
  std::vector<int64_t> res, shift, at;
  std::vector<int32_t> init_j;  // per output element: code of the first tap column past the left padding
  std::vector<int64_t> col;     // per output element: ow*sw - pw, the window's first column
  std::vector<int64_t> delta;   // tap i*kw + j -> i*dh*W + j*dw
  // What the forward records for the winning tap (i, j): code = i*ci + j*cj. That is
  // the tap i*kw + j when offsets are wanted, else the flat-index offset i*dh*W + j*dw
  // itself (indices then need no table lookup).
  int32_t ci = 0, cj = 1;
  bool codes_are_delta = false;
  // Whole small NCHW planes, `np` at a time (see plan_whole): sub-images of np*R rows
  // by P columns, plane k's rows from k*R, the first row and column of each plane's
  // at tlo and ulo (<= 0) in its own coordinates; `size` elements in all.
  bool whole = false;
  int64_t R = 0, P = 0, tlo = 0, ulo = 0, np = 1, sub = 0, size = 0;
  std::vector<int64_t> wrel;   // tap i*kw + j -> start of its run
  std::vector<int32_t> wcode;  // tap -> the code it records
  std::vector<int32_t> winit;  // output q = (k*R + oh)*P + ow -> code of its first tap past the padding
                               // (plan_whole_init: only a forward that records codes needs it)
};

// ---- small NCHW planes, whole --------------------------------------------------------
// On short rows the per-row work (split, cache look-up, then one vector block, or
// scalar code for rows shorter than a vector) costs more than the pooling itself:
// 1x512x14x14 k2s2 ran at 0.9x ATen's speed forward and 0.6x forward+backward. Small
// planes are instead split by row and column residue at once: sub-image (a, b) holds
// input pixel (t*sh + a, u*sw + b) at row t, column u, with -inf (forward) or 0
// (backward) around it, and np planes are stacked R rows apart. Output (oh, ow) of
// plane k is placed at q = (k*R + oh)*P + ow, and tap (i, j) of every output is the
// element wrel[i*kw + j] + q: each tap is one run over np planes, vectorised across
// output rows and planes (rows R - Ho .. R of each plane and columns past Wo are
// computed from the padding or the next plane, and dropped).

// A plane goes whole when its split takes at most kWholePlane elements and P <=
// kWholeCols; planes are stacked up to about kWholeStack elements (L1-sized).
constexpr int64_t kWholePlane = 16384;
constexpr int64_t kWholeCols = 64;
constexpr int64_t kWholeStack = 4096;

// Tap i's position in window 0, i*d - pad, as shift[i]*s + res[i] (0 <= res < s): at
// output o the tap reads element o + shift[i] of residue res[i] along that dimension.
void residues(int64_t k, int64_t s, int64_t pad, int64_t d, std::vector<int64_t>& shift, std::vector<int64_t>& res) {
  shift.resize(k);
  res.resize(k);
  for (int64_t i = 0; i < k; ++i) {
    const int64_t e = i * d - pad;
    shift[i] = div_floor(e, s);
    res[i] = e - shift[i] * s;
  }
}

// Along one dimension: tap k at output o reads sub-image row (column) o + shift[k] of
// residue res[k]; a plane's rows (columns) span [lo, lo + n).
void whole_axis(int64_t k, int64_t s, int64_t pad, int64_t d, int64_t in, int64_t out, std::vector<int64_t>& shift,
                std::vector<int64_t>& res, int64_t& lo, int64_t& n) {
  residues(k, s, pad, d, shift, res);
  int64_t mx = 0;
  lo = 0;
  for (int64_t i = 0; i < k; ++i) {
    lo = std::min(lo, shift[i]);
    mx = std::max(mx, shift[i]);
  }
  n = std::max((in + s - 1) / s, out + mx) - lo;
}

std::atomic<bool>& whole_planes_flag() {
  static std::atomic<bool> on{true};
  return on;
}

void plan_whole(Plan& p, int64_t planes) {
  const Pool2d& g = p.g;
  if (p.B != 1 || !whole_planes_flag().load(std::memory_order_relaxed)) return;
  std::vector<int64_t> sh_i, rh_i, sh_j, rh_j;
  whole_axis(g.kh, g.sh, g.ph, g.dh, g.H, g.Ho, sh_i, rh_i, p.tlo, p.R);
  whole_axis(g.kw, g.sw, g.pw, g.dw, g.W, g.Wo, sh_j, rh_j, p.ulo, p.P);
  const int64_t split = g.sh * g.sw * p.R * p.P;
  if (p.P > kWholeCols || split > kWholePlane) return;
  p.whole = true;
  p.np = std::max<int64_t>(1, std::min(planes, kWholeStack / split));
  p.sub = p.np * p.R * p.P;
  p.size = g.sh * g.sw * p.sub + p.P;  // the last tap's run may read up to P - 1 elements past the split
  p.wrel.resize(g.taps());
  p.wcode.resize(g.taps());
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) {
      p.wrel[i * g.kw + j] = (rh_i[i] * g.sw + rh_j[j]) * p.sub + (sh_i[i] - p.tlo) * p.P + sh_j[j] - p.ulo;
      p.wcode[i * g.kw + j] = static_cast<int32_t>(i * p.ci + j * p.cj);
    }
}

// winit, for a forward that records codes: one plane's, repeated.
void plan_whole_init(Plan& p) {
  const Pool2d& g = p.g;
  const int64_t plane = p.R * p.P;
  p.winit.assign(p.np * plane, 0);
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    const int64_t ci = Pool2d::first_tap(oh, g.sh, g.ph, g.dh) * p.ci;
    for (int64_t ow = 0; ow < g.Wo; ++ow)
      p.winit[oh * p.P + ow] = static_cast<int32_t>(ci + Pool2d::first_tap(ow, g.sw, g.pw, g.dw) * p.cj);
  }
  for (int64_t k = 1; k < p.np; ++k) std::copy_n(p.winit.begin(), plane, p.winit.begin() + k * plane);
}

bool windows_overlap(const Pool2d& g) {
  return (g.kh - 1) * g.dh + 1 > g.sh || (g.kw - 1) * g.dw + 1 > g.sw;
}

// whole: small planes may go whole (plan_whole).
Plan make_plan(const Pool2d& g, bool delta_codes, int64_t planes, bool whole) {
  Plan p;
  p.g = g;
  p.B = g.channels_last ? g.C : 1;
  p.direct = g.channels_last && g.C >= kDirectC;
  p.row_in = g.W * p.B;
  p.row_out = g.Wo * p.B;
  p.codes_are_delta = delta_codes;
  p.ci = static_cast<int32_t>(delta_codes ? g.dh * g.W : g.kw);
  p.cj = static_cast<int32_t>(delta_codes ? g.dw : 1);
  residues(g.kw, g.sw, g.pw, g.dw, p.shift, p.res);
  p.at.resize(g.kw);
  const int64_t tw = (g.W + g.sw - 1) / g.sw;
  p.lpad = p.shift[0] < 0 ? -p.shift[0] : 0;
  p.len = p.lpad + std::max(tw, g.Wo + p.shift[g.kw - 1]);
  for (int64_t j = 0; j < g.kw; ++j) p.at[j] = (p.res[j] * p.len + p.lpad + p.shift[j]) * p.B;
  p.init_j.resize(p.row_out);
  p.col.resize(p.row_out);
  for (int64_t ow = 0; ow < g.Wo; ++ow) {  // per pixel, not per element: B can be C in the thousands
    std::fill_n(p.init_j.begin() + ow * p.B, p.B, static_cast<int32_t>(Pool2d::first_tap(ow, g.sw, g.pw, g.dw) * p.cj));
    std::fill_n(p.col.begin() + ow * p.B, p.B, ow * g.sw - g.pw);
  }
  p.delta.resize(g.taps());
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) p.delta[i * g.kw + j] = i * g.dh * g.W + j * g.dw;
  if (whole) plan_whole(p, planes);
  return p;
}

// The (oh, i) windows whose tap row i lands on input row ih, in ascending oh.
DTK_INLINE int64_t row_windows(const Pool2d& g, int64_t ih, int64_t* oh, int64_t* ti) {
  int64_t n = 0;
  for (int64_t i = g.kh - 1; i >= 0; --i) {
    const int64_t num = ih + g.ph - i * g.dh;
    if (num >= 0 && num % g.sh == 0 && num / g.sh < g.Ho) {
      oh[n] = num / g.sh;
      ti[n++] = i;
    }
  }
  return n;
}

// ---- vector loops (inlined into each ISA clone) -------------------------------------

// A window's taps: tap k's values for outputs 0, 1, ... are base[shift + rel[k] + o],
// and the tap records code[k] when it wins. `stream`: store the values non-temporally.
template <typename S>
struct Taps {
  const S* base;
  int64_t shift;
  const int64_t* rel;
  const int32_t* code;
  int64_t n;
  bool stream;
};

// The fold of the taps into outputs [o0, o0 + U vectors), ATen's rule: a value
// replaces the running max when it is greater or NaN. The running max and its code
// live in registers across all taps (the fixed-size block vectorises fully).
template <bool TRACK, int U, typename S, typename T>
DTK_INLINE void pool_block(const Taps<S>& tp, const int32_t* DTK_RESTRICT init, int32_t c0, int64_t o0,
                           T* DTK_RESTRICT out, int32_t* DTK_RESTRICT t) {
  using A = acc_t<T>;
  using L = Lanes<A>;
  using V = typename L::V;
  constexpr int N = L::N;
  V mm[U];
  typename L::I tt[U];
  for (int u = 0; u < U; ++u) {
    mm[u] = V{} - std::numeric_limits<A>::infinity();
    if (TRACK) tt[u] = loadu<typename L::I>(init + o0 + u * N) + c0;
  }
  const S* base = tp.base + tp.shift + o0;
  if (TRACK) {
    for (int64_t k = 0; k < tp.n; ++k) {
      const S* v = base + tp.rel[k];
      const int32_t c = tp.code[k];
      for (int u = 0; u < U; ++u) {
        const V x = vload(v + u * N);
        const typename L::M upd = (x > mm[u]) | (x != x);
        mm[u] = upd ? x : mm[u];
        tt[u] = L::narrow(upd) ? typename L::I{} + c : tt[u];
      }
    }
  } else {
    // Values only: the same result in fewer operations. The running max skips NaNs
    // (x > m ? x : m is one maxps, and keeps the first of equal values, so even the
    // sign of a zero is ATen's) and the last NaN seen is kept aside: it wins at the end.
    V nan[U];
    for (int u = 0; u < U; ++u) nan[u] = V{};
    for (int64_t k = 0; k < tp.n; ++k) {
      const S* v = base + tp.rel[k];
      for (int u = 0; u < U; ++u) {
        const V x = vload(v + u * N);
        mm[u] = x > mm[u] ? x : mm[u];
        nan[u] = x != x ? x : nan[u];
      }
    }
    for (int u = 0; u < U; ++u) mm[u] = nan[u] != nan[u] ? nan[u] : mm[u];
  }
  const bool stream = tp.stream && reinterpret_cast<uintptr_t>(out + o0) % 16 == 0;
  for (int u = 0; u < U; ++u) {
    if (stream) vstream(out + o0 + u * N, mm[u]);
    else vstore(out + o0 + u * N, mm[u]);
    if (TRACK) storeu(t + o0 + u * N, tt[u]);
  }
}

// The same for one output, when a span is shorter than a vector.
template <bool TRACK, typename S, typename T>
DTK_INLINE void pool_one(const Taps<S>& tp, const int32_t* init, int32_t c0, int64_t o, T* out, int32_t* t) {
  using A = acc_t<T>;
  A mm = -std::numeric_limits<A>::infinity();
  int32_t tt = TRACK ? c0 + init[o] : 0;
  for (int64_t k = 0; k < tp.n; ++k) {
    const A x = static_cast<A>(tp.base[tp.shift + tp.rel[k] + o]);
    if (x > mm || x != x) {
      mm = x;
      if (TRACK) tt = tp.code[k];
    }
  }
  out[o] = static_cast<T>(mm);
  if (TRACK) t[o] = tt;
}

// Outputs [0, n) in blocks of U vectors, the last block overlapping its predecessor
// (recomputing an output is harmless).
template <bool TRACK, int U, typename S, typename T>
DTK_INLINE void pool_blocks(const Taps<S>& tp, const int32_t* init, int32_t c0, int64_t n, T* out, int32_t* t) {
  constexpr int64_t B = U * Lanes<acc_t<T>>::N;
  for (int64_t o0 = 0;; o0 += B) {
    if (o0 + B > n) o0 = n - B;
    pool_block<TRACK, U>(tp, init, c0, o0, out, t);
    if (o0 + B == n) break;
  }
}

// Outputs [0, n): up to eight vectors at a time (one pass over each tap's run), or
// one element at a time when n is shorter than a vector.
template <bool TRACK, typename S, typename T>
DTK_INLINE void pool_span(const Taps<S>& tp, const int32_t* init, int32_t c0, int64_t n, T* out, int32_t* t) {
  constexpr int64_t N = Lanes<acc_t<T>>::N;
  if (n >= 8 * N && n % (8 * N) == 0) {
    pool_blocks<TRACK, 8>(tp, init, c0, n, out, t);
  } else if (n >= 4 * N) {
    pool_blocks<TRACK, 4>(tp, init, c0, n, out, t);
  } else if (n >= N) {
    pool_blocks<TRACK, 1>(tp, init, c0, n, out, t);
  } else {
    for (int64_t o = 0; o < n; ++o) pool_one<TRACK>(tp, init, c0, o, out, t);
  }
}

template <typename A>
DTK_INLINE void fill(A* DTK_RESTRICT p, int64_t n, A v) {
  for (int64_t o = 0; o < n; ++o) p[o] = v;
}

template <typename D, typename S>
DTK_INLINE void convert(D* DTK_RESTRICT dst, const S* DTK_RESTRICT src, int64_t n) {
  for (int64_t o = 0; o < n; ++o) dst[o] = static_cast<D>(src[o]);
}

// ATen's flat index ih*W + iw = (oh*sh - ph)*W + (ow*sw - pw) + (tap's i*dh*W + j*dw).
DTK_INLINE void store_indices(int64_t* DTK_RESTRICT idx, const int32_t* DTK_RESTRICT t, const Plan& p,
                              const int64_t* DTK_RESTRICT col, int64_t rowbase, int64_t n) {
  if (p.codes_are_delta) {
    for (int64_t o = 0; o < n; ++o) idx[o] = rowbase + col[o] + t[o];
  } else {
    const int64_t* DTK_RESTRICT delta = p.delta.data();
    for (int64_t o = 0; o < n; ++o) idx[o] = rowbase + col[o] + delta[t[o]];
  }
}

DTK_INLINE void store_offsets(void* off, int obytes, const int32_t* t, int64_t n) {
  if (obytes == 1) convert(static_cast<int8_t*>(off), t, n);
  else if (obytes == 2) convert(static_cast<int16_t*>(off), t, n);
  else convert(static_cast<int32_t*>(off), t, n);
}

// N window offsets (int8, int16 or int32) as the lanes of comparison mask type M.
// Written as a vector literal, which GCC 12 turns into one vpmovsx load; its
// __builtin_convertvector of an 8-byte vector went through scalar registers.
template <typename M, int N, typename O>
DTK_INLINE M load_offsets(const O* p) {
  static_assert(N == 4 || N == 8, "4 or 8 lanes");
  if constexpr (N == 8) return M{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]};
  else return M{p[0], p[1], p[2], p[3]};
}

// acc[o] += g[o] where off[o] is `tap`. Adding +0 elsewhere leaves every sum exactly
// as ATen's scatter computes it (acc starts at +0 and so never holds -0).
// Rows are short, so their remainders matter: GCC vectorises this loop 64 and then
// 32 int8 lanes at a time and runs the rest one element at a time, which made the
// backward 3.5x slower per element at W = 56 (rows of 28 outputs) than at W = 64.
// So the compiler's loop covers the largest multiple of 32, and the rest goes in
// explicit vectors whose last block overlaps the one before it, with the lanes
// already added masked off.
template <typename T, typename O, typename A>
DTK_INLINE void gather_add(A* DTK_RESTRICT acc, const T* DTK_RESTRICT g, const O* DTK_RESTRICT off, int64_t n,
                           int32_t tap) {
  using L = Lanes<A>;
  using V = typename L::V;
  using M = typename L::M;
  constexpr int N = L::N;
  // (16-bit gradients all in explicit vectors: GCC's loop would convert them one at a time)
  const int64_t bulk = n < N ? n : sizeof(T) == 2 ? 0 : n & ~int64_t(31);
  for (int64_t o = 0; o < bulk; ++o) acc[o] += static_cast<int32_t>(off[o]) == tap ? static_cast<A>(g[o]) : A(0);
  if (bulk == n) return;
  const auto add = [&](int64_t o, M keep) {
    const M hit = (load_offsets<M, N>(off + o) == tap) & keep;
    storeu(acc + o, loadu<V>(acc + o) + (hit ? vload(g + o) : V{}));
  };
  int64_t o = bulk;
  for (; o + N <= n; o += N) add(o, M{} - 1);
  if (o < n) {
    using E = typename std::remove_reference<decltype(std::declval<M&>()[0])>::type;
    M lane;
    for (int k = 0; k < N; ++k) lane[k] = k;
    add(n - N, lane >= static_cast<E>(o - (n - N)));
  }
}

// row[2o + j] = 0 + g[o] where off[o] is tap0 + j, else 0 (j = 0, 1): columns tiled
// by 2-wide, stride-2 windows, written once. The sum with +0 is ATen's (its -0
// gradients become +0). Explicit vectors, the last block overlapping its predecessor:
// GCC's own vectorisation of this loop took 64 int8 offsets at a time and left rows
// of 28 or 56 outputs to scalar code (and 16-bit types entirely): 14x slower at W = 56.
template <typename T, typename O>
DTK_INLINE void unpool_pairs(T* DTK_RESTRICT row, const T* DTK_RESTRICT g, const O* DTK_RESTRICT off, int64_t n,
                             int32_t tap0) {
  using A = acc_t<T>;
  using L = Lanes<A>;
  using V = typename L::V;
  constexpr int N = L::N;
  if (n < N) {
    for (int64_t o = 0; o < n; ++o) {
      const int32_t t = static_cast<int32_t>(off[o]);
      const A v = static_cast<A>(g[o]) + A(0);
      row[2 * o] = static_cast<T>(t == tap0 ? v : A(0));
      row[2 * o + 1] = static_cast<T>(t == tap0 + 1 ? v : A(0));
    }
    return;
  }
  for (int64_t o = 0;; o += N) {
    if (o + N > n) o = n - N;
    const typename L::M t = load_offsets<typename L::M, N>(off + o);
    const V v = vload(g + o) + A(0);
    const V v0 = t == tap0 ? v : V{}, v1 = t == tap0 + 1 ? v : V{};
    vstore(row + 2 * o, interleave_lo(v0, v1));
    vstore(row + 2 * o + N, interleave_hi(v0, v1));
    if (o + N == n) break;
  }
}

#if DTK_HAVE_F16C
// float16 rows into float with F16C (vcvtph2ps, eight at a time), for the split below:
// c10's branch-free conversion takes about ten vector operations per eight values. The
// values are c10's; a NaN's float payload may differ, but every result goes back to
// float16 through c10's conversion, which turns any NaN into 0x7E00 with its sign.
DTK_F16C DTK_INLINE f32x8 load_half_f16c(const c10::Half* p) {
  return (f32x8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
DTK_F16C void half_to_float_f16c(float* DTK_RESTRICT d, const c10::Half* DTK_RESTRICT row, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) storeu(d + k, load_half_f16c(row + k));
  for (; k < n; ++k) d[k] = static_cast<float>(row[k]);
}
// Pixels 2t into d[t] and 2t + 1 into d1[t] (split_pixels' column stride 2).
DTK_F16C void half_split2_f16c(float* DTK_RESTRICT d, float* DTK_RESTRICT d1, const c10::Half* DTK_RESTRICT row,
                               int64_t W) {
  const int64_t h = W / 2;
  int64_t t = 0;
  for (; t + 8 <= h; t += 8) {
    const f32x8 a = load_half_f16c(row + 2 * t), b = load_half_f16c(row + 2 * t + 8);
    storeu(d + t, __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14));
    storeu(d1 + t, __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15));
  }
  for (; t < h; ++t) {
    d[t] = static_cast<float>(row[2 * t]);
    d1[t] = static_cast<float>(row[2 * t + 1]);
  }
  if (W & 1) d[h] = static_cast<float>(row[W - 1]);
}
#endif

// Residue split of one row of W pixels of B elements each: pixel t*sw + c goes to
// d[c*stride + t*B]. Positions that hold no pixel are never written (the forward's
// -inf or the backward's 0 stays there). No divisions, and no per-pixel copy calls.
// 16-bit types convert a vector at a time (vload): GCC converts c10::Half one element
// at a time, which made float16 forwards slower than float32 ones on half the bytes.
template <typename T, typename A>
DTK_INLINE void split_pixels(const T* DTK_RESTRICT row, A* DTK_RESTRICT d, int64_t W, int64_t sw, int64_t B,
                             int64_t stride) {
  constexpr bool k16 = sizeof(T) == 2;
#if DTK_HAVE_F16C
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (sw == 1 && cpu_f16c()) return half_to_float_f16c(d, row, W * B);
    if (sw == 2 && B == 1 && cpu_f16c()) return half_split2_f16c(d, d + stride, row, W);
  }
#endif
  if (sw == 1) {
    if constexpr (k16) convert_px<A>(d, row, W * B);
    else convert(d, row, W * B);
  } else if (sw == 2 && B == 1) {
    A* d1 = d + stride;
    const int64_t h = W / 2;
    int64_t t = 0;
    if constexpr (k16) {  // 2N pixels into N even and N odd ones
      constexpr int N = Lanes<A>::N;
      for (; t + N <= h; t += N) {
        const auto a = vload(row + 2 * t), b = vload(row + 2 * t + N);
        storeu(d + t, __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14));
        storeu(d1 + t, __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15));
      }
    }
    for (; t < h; ++t) {
      d[t] = static_cast<A>(row[2 * t]);
      d1[t] = static_cast<A>(row[2 * t + 1]);
    }
    if (W & 1) d[h] = static_cast<A>(row[W - 1]);
  } else {
    for (int64_t w0 = 0, t = 0; w0 < W; w0 += sw, ++t)
      for (int64_t c = 0; c < sw && w0 + c < W; ++c) {
        if (B == 1) d[c * stride + t] = static_cast<A>(row[w0 + c]);
        else convert_px<A>(d + c * stride + t * B, row + (w0 + c) * B, B);
      }
  }
}

// The inverse, converting to the output type.
template <typename T, typename A>
DTK_INLINE void merge_pixels(const A* DTK_RESTRICT d, T* DTK_RESTRICT row, int64_t W, int64_t sw, int64_t B,
                             int64_t stride) {
  constexpr bool k16 = sizeof(T) == 2;
  if (sw == 1) {
    if constexpr (k16) convert_px<A>(row, d, W * B);
    else convert(row, d, W * B);
  } else if (sw == 2 && B == 1) {
    const A* d1 = d + stride;
    const int64_t h = W / 2;
    int64_t t = 0;
    if constexpr (k16) {  // N even and N odd pixels into 2N
      constexpr int N = Lanes<A>::N;
      for (; t + N <= h; t += N) {
        const auto a = vload(d + t), b = vload(d1 + t);
        vstore(row + 2 * t, interleave_lo(a, b));
        vstore(row + 2 * t + N, interleave_hi(a, b));
      }
    }
    for (; t < h; ++t) {
      row[2 * t] = static_cast<T>(d[t]);
      row[2 * t + 1] = static_cast<T>(d1[t]);
    }
    if (W & 1) row[W - 1] = static_cast<T>(d[h]);
  } else {
    for (int64_t w0 = 0, t = 0; w0 < W; w0 += sw, ++t)
      for (int64_t c = 0; c < sw && w0 + c < W; ++c) {
        if (B == 1) row[w0 + c] = static_cast<T>(d[c * stride + t]);
        else convert_px<A>(row + (w0 + c) * B, d + c * stride + t * B, B);
      }
  }
}

// One input row into residue arrays D_c (D_c[lpad + t] = pixel t*sw + c), and back.
template <typename T, typename A>
DTK_INLINE void split_row(const T* DTK_RESTRICT row, A* DTK_RESTRICT d, const Plan& p) {
  split_pixels(row, d + p.lpad * p.B, p.g.W, p.g.sw, p.B, p.len * p.B);
}
template <typename T, typename A>
DTK_INLINE void merge_row(const A* DTK_RESTRICT d, T* DTK_RESTRICT row, const Plan& p) {
  merge_pixels(d + p.lpad * p.B, row, p.g.W, p.g.sw, p.B, p.len * p.B);
}

// Plane k of a stack (see plan_whole): pixel (ih, iw) goes to sub-image
// (ih % sh, iw % sw), row k*R + ih / sh, column iw / sw (less tlo, ulo); and back.
DTK_INLINE int64_t plane_row(const Plan& p, int64_t k, int64_t ih) {
  return (ih % p.g.sh) * p.g.sw * p.sub + (k * p.R + ih / p.g.sh - p.tlo) * p.P - p.ulo;
}
template <typename T, typename A>
DTK_INLINE void split_plane(const T* DTK_RESTRICT x, A* DTK_RESTRICT s, const Plan& p, int64_t k) {
  for (int64_t ih = 0; ih < p.g.H; ++ih) split_pixels(x + ih * p.g.W, s + plane_row(p, k, ih), p.g.W, p.g.sw, 1, p.sub);
}
template <typename T, typename A>
DTK_INLINE void merge_plane(const A* DTK_RESTRICT s, T* DTK_RESTRICT x, const Plan& p, int64_t k) {
  for (int64_t ih = 0; ih < p.g.H; ++ih) merge_pixels(s + plane_row(p, k, ih), x + ih * p.g.W, p.g.W, p.g.sw, 1, p.sub);
}

// merge_plane for column stride 2 and rows of one to two vectors (N <= W <= 2N, as
// in 14x14 maps), where merge_pixels' loop would be scalar: each row is one
// interleave of two vectors, stored whole. The store runs 2N - W <= W elements into
// the next row, which is written after it; so `last` (the buffer's last plane) ends
// with merge_pixels. Reads up to N elements past a split row: the stack has
// kMergeSlack elements of slack.
constexpr int64_t kMergeSlack = 16;
template <typename A>
DTK_INLINE void merge_plane_pairs(const A* DTK_RESTRICT s, A* DTK_RESTRICT x, const Plan& p, int64_t k, bool last) {
  constexpr int N = Lanes<A>::N;
  const int64_t H = p.g.H, W = p.g.W;
  for (int64_t ih = 0; ih < H - (last ? 1 : 0); ++ih) {
    const A* d = s + plane_row(p, k, ih);
    const auto a = vload(d), b = vload(d + p.sub);
    vstore(x + ih * W, interleave_lo(a, b));
    vstore(x + ih * W + N, interleave_hi(a, b));
  }
  if (last) merge_pixels(s + plane_row(p, k, H - 1), x + (H - 1) * W, W, 2, 1, p.sub);
}

// ---- forward and backward over rows ------------------------------------------------------

struct FwdOut {
  void* out;
  void* off;  // nullptr when not wanted
  int obytes;
  int64_t* idx;  // nullptr when not wanted
};

template <bool TRACK>
DTK_INLINE void store_codes(const Plan& p, const FwdOut& o, const int32_t* t, int64_t q, int64_t oh,
                            const int64_t* col, int64_t n) {
  if (!TRACK) return;
  if (o.off) store_offsets(static_cast<char*>(o.off) + q * o.obytes, o.obytes, t, n);
  if (o.idx) store_indices(o.idx + q, t, p, col, (oh * p.g.sh - p.g.ph) * p.g.W, n);
}

// Output rows [r0, r1) from residue-split input rows; row r = plane * Ho + oh (plane:
// n*C + c for NCHW, n for channels_last with few channels). Split rows are cached:
// overlapping windows (k3s2) split each input row once.
template <typename T, bool TRACK>
DTK_INLINE void forward_split(const Plan& p, const T* in, const FwdOut& o, int64_t r0, int64_t r1) {
  using A = acc_t<T>;
  const Pool2d& g = p.g;
  const int64_t n = p.row_out, slot = p.len * g.sw * p.B;
  std::vector<A> rows(slot * g.kh, -std::numeric_limits<A>::infinity());
  std::vector<int64_t> tag(g.kh, -1), need(g.kh), rel(g.taps());
  std::vector<int32_t> code(g.taps()), t(TRACK ? n : 0);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t plane = r / g.Ho, oh = r % g.Ho;
    const int64_t i0 = Pool2d::first_tap(oh, g.sh, g.ph, g.dh);
    int64_t nr = 0;
    for (int64_t i = i0, ih = oh * g.sh - g.ph + i0 * g.dh; i < g.kh && ih < g.H; ++i, ih += g.dh)
      need[nr++] = plane * g.H + ih;
    int64_t ntaps = 0;
    for (int64_t k = 0; k < nr; ++k) {
      int64_t s = 0;
      while (s < g.kh && tag[s] != need[k]) ++s;
      if (s == g.kh) {  // not cached: take a slot no row of this window uses
        for (s = 0;; ++s) {
          bool busy = false;
          for (int64_t k2 = 0; k2 < nr; ++k2) busy |= tag[s] == need[k2];
          if (!busy) break;
        }
        split_row(in + need[k] * p.row_in, rows.data() + s * slot, p);
        tag[s] = need[k];
      }
      const int32_t ci = static_cast<int32_t>((i0 + k) * p.ci);
      for (int64_t j = 0; j < g.kw; ++j) {
        rel[ntaps] = s * slot + p.at[j];
        code[ntaps++] = ci + static_cast<int32_t>(j) * p.cj;
      }
    }
    const Taps<A> tp{rows.data(), 0, rel.data(), code.data(), ntaps, p.stream};
    pool_span<TRACK>(tp, p.init_j.data(), static_cast<int32_t>(i0 * p.ci), n, static_cast<T*>(o.out) + r * n,
                     t.data());
    store_codes<TRACK>(p, o, t.data(), r * n, oh, p.col.data(), n);
  }
}

// channels_last output rows [r0, r1), row r = n * Ho + oh, read in place: each tap is
// a contiguous run of C >= kDirectC channels. Taps are offsets from the window's
// first pixel; the interior of a row shares one table, border windows filter it.
template <typename T, bool TRACK>
DTK_INLINE void forward_direct(const Plan& p, const T* in, const FwdOut& o, int64_t r0, int64_t r1) {
  const Pool2d& g = p.g;
  const int64_t C = g.C;
  std::vector<int64_t> rel(g.taps()), brel(g.taps()), pre(g.kh);
  std::vector<int32_t> code(g.taps()), bcode(g.taps()), zeros(C, 0), t(TRACK ? C : 0);
  std::vector<int32_t> tap_j(g.taps());
  // the interior: windows whose columns all lie inside the input
  const int64_t ow_lo = std::min(g.Wo, (g.pw + g.sw - 1) / g.sw);
  const int64_t ow_hi = std::max(ow_lo, std::min(g.Wo, div_floor(g.W - 1 + g.pw - (g.kw - 1) * g.dw, g.sw) + 1));
  const int64_t ahead = static_cast<int64_t>(sizeof(T)) * C * g.sw;  // bytes a window moves right by
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t img = r / g.Ho, oh = r % g.Ho;
    const int64_t i0 = Pool2d::first_tap(oh, g.sh, g.ph, g.dh);
    int64_t ntaps = 0, nr = 0;
    for (int64_t i = i0, ih = oh * g.sh - g.ph + i0 * g.dh; i < g.kh && ih < g.H; ++i, ih += g.dh) {
      pre[nr++] = ((img * g.H + ih) * g.W + (g.kw - 1) * g.dw) * C;  // the row's last tap of window 0
      for (int64_t j = 0; j < g.kw; ++j) {
        rel[ntaps] = ((img * g.H + ih) * g.W + j * g.dw) * C;
        tap_j[ntaps] = static_cast<int32_t>(j);
        code[ntaps++] = static_cast<int32_t>(i * p.ci + j * p.cj);
      }
    }
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      const int64_t w0 = ow * g.sw - g.pw;  // the window's first column (maybe in the padding)
      // Prefetch what window ow + kAhead adds (the hardware prefetchers lose track of
      // the interleaved rows): its last tap column in each row, and the sw-1 before it.
      for (int64_t k = 0; k < nr; ++k) {
        const int64_t col = w0 + kAhead * g.sw;
        if (col + (g.kw - 1) * g.dw < g.W) {
          const char* px = reinterpret_cast<const char*>(in + pre[k] + col * C) - (g.sw - 1) * C * sizeof(T);
          for (int64_t b = 0; b < ahead; b += 64) __builtin_prefetch(px + b);
        }
      }
      Taps<T> tp{in, w0 * C, rel.data(), code.data(), ntaps, p.stream};
      const int64_t j0 = Pool2d::first_tap(ow, g.sw, g.pw, g.dw);
      if (ow < ow_lo || ow >= ow_hi) {  // border: only the taps inside the input
        int64_t nb = 0;
        for (int64_t k = 0; k < ntaps; ++k) {
          const int64_t iw = w0 + tap_j[k] * g.dw;
          if (iw >= 0 && iw < g.W) {
            brel[nb] = rel[k];
            bcode[nb++] = code[k];
          }
        }
        tp = Taps<T>{in, w0 * C, brel.data(), bcode.data(), nb, p.stream};
      }
      const int64_t q = (r * g.Wo + ow) * C;
      pool_span<TRACK>(tp, zeros.data(), static_cast<int32_t>(i0 * p.ci + j0 * p.cj), C,
                       static_cast<T*>(o.out) + q, t.data());
      store_codes<TRACK>(p, o, t.data(), q, oh, p.col.data() + ow * C, C);
    }
  }
}

// Planes [p0, p1), np at a time (plan_whole): every tap is one run over the stack's
// outputs, which are laid out R rows of P apart per plane.
template <typename T, bool TRACK>
DTK_INLINE void forward_whole(const Plan& p, const T* in, const FwdOut& o, int64_t p0, int64_t p1) {
  using A = acc_t<T>;
  const Pool2d& g = p.g;
  const int64_t out_plane = g.Ho * g.Wo, in_plane = g.H * g.W;
  const bool compact = p.P != g.Wo || p.R != g.Ho;  // else the stack's outputs are the planes themselves
  std::vector<A> s(p.size);
  std::vector<T> tmp(compact ? p.np * p.R * p.P : 0);
  std::vector<int32_t> t(TRACK ? p.np * p.R * p.P : 0);
  const Taps<A> tp{s.data(), 0, p.wrel.data(), p.wcode.data(), g.taps(), false};
  for (int64_t c0 = p0; c0 < p1; c0 += p.np) {
    const int64_t cnt = std::min(p.np, p1 - c0);
    fill(s.data(), p.size, -std::numeric_limits<A>::infinity());
    for (int64_t k = 0; k < cnt; ++k) split_plane(in + (c0 + k) * in_plane, s.data(), p, k);
    T* out = static_cast<T*>(o.out) + c0 * out_plane;
    pool_span<TRACK>(tp, p.winit.data(), 0, ((cnt - 1) * p.R + g.Ho) * p.P, compact ? tmp.data() : out, t.data());
    for (int64_t k = 0; k < cnt; ++k)
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        const int64_t q = (k * p.R + oh) * p.P, e = k * out_plane + oh * g.Wo;
        if (compact) std::copy_n(tmp.data() + q, g.Wo, out + e);
        store_codes<TRACK>(p, o, t.data() + q, c0 * out_plane + e, oh, p.col.data(), g.Wo);
      }
  }
}

// Planes [p0, p1), np at a time: the gradient of each tap in turn, as one run over the
// stack, taps in descending (i, j) -- ascending (oh, ow) at any input pixel, ATen's
// order. The gradient is laid out as the outputs, in the compute type.
template <typename T, typename O>
DTK_INLINE void backward_whole(const Plan& p, const T* go, const O* off, T* gi, int64_t p0, int64_t p1) {
  using A = acc_t<T>;
  const Pool2d& g = p.g;
  const int64_t out_plane = g.Ho * g.Wo, in_plane = g.H * g.W;
  const bool expand = p.P != g.Wo || p.R != g.Ho || !std::is_same_v<A, T>;
  std::vector<A> s(p.size + kMergeSlack);
  std::vector<A> gx(expand ? p.np * p.R * p.P : 0, A(0));  // outside the outputs: 0, and no tap matches -1
  std::vector<O> ox(expand ? p.np * p.R * p.P : 0, O(-1));
  std::vector<A> staged(std::is_same_v<A, T> ? 0 : p.np * in_plane);
  for (int64_t c0 = p0; c0 < p1; c0 += p.np) {
    const int64_t cnt = std::min(p.np, p1 - c0), n = ((cnt - 1) * p.R + g.Ho) * p.P;
    fill(s.data(), p.size, A(0));
    const T* gp = go + c0 * out_plane;
    const O* op = off + c0 * out_plane;
    if (expand) {
      for (int64_t k = 0; k < cnt; ++k)
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          const int64_t q = (k * p.R + oh) * p.P, e = k * out_plane + oh * g.Wo;
          convert_px<A>(gx.data() + q, gp + e, g.Wo);
          std::copy_n(op + e, g.Wo, ox.data() + q);
        }
      for (int64_t k = g.taps() - 1; k >= 0; --k)
        gather_add(s.data() + p.wrel[k], gx.data(), ox.data(), n, static_cast<int32_t>(k));
    } else {
      for (int64_t k = g.taps() - 1; k >= 0; --k) gather_add(s.data() + p.wrel[k], gp, op, n, static_cast<int32_t>(k));
    }
    // 16-bit types: merged in the compute type, then rounded a vector at a time
    A* dst = std::is_same_v<A, T> ? reinterpret_cast<A*>(gi + c0 * in_plane) : staged.data();
    if (g.sw == 2 && g.W >= Lanes<A>::N && g.W <= 2 * Lanes<A>::N) {
      for (int64_t k = 0; k < cnt; ++k) merge_plane_pairs(s.data(), dst + k * in_plane, p, k, k == cnt - 1);
    } else {
      for (int64_t k = 0; k < cnt; ++k) merge_plane(s.data(), dst + k * in_plane, p, k);
    }
    if constexpr (!std::is_same_v<A, T>) convert_px<A>(gi + c0 * in_plane, staged.data(), cnt * in_plane);
  }
}

// Input rows [r0, r1); row r = plane * H + ih.
template <typename T, typename O>
DTK_INLINE void backward_rows(const Plan& p, const T* go, const O* off, T* gi, int64_t r0, int64_t r1) {
  using A = acc_t<T>;
  const Pool2d& g = p.g;
  const int64_t n = p.row_out;
  std::vector<A> d(p.len * g.sw * p.B);
  std::vector<A> merged(p.stream ? p.row_in : 0);  // a row, before its non-temporal stores
  std::vector<int64_t> oh(g.kh), ti(g.kh);
  // MaxPool2d(2)'s columns (no ceil_mode window hanging over the right edge)
  const bool pairs = p.B == 1 && g.kw == 2 && g.sw == 2 && g.dw == 1 && g.pw == 0 && 2 * g.Wo <= g.W;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t plane = r / g.H, ih = r % g.H;
    T* dst = gi + r * p.row_in;
    const int64_t nw = row_windows(g, ih, oh.data(), ti.data());
    if (nw == 0) {  // no window reaches this row (stride > kernel)
      fill(dst, p.row_in, T(0));
      continue;
    }
    if (nw == 1 && pairs) {  // 2x2-stride-2 windows tile the row: one pass, each element once
      const int64_t q = (plane * g.Ho + oh[0]) * n;
      unpool_pairs(dst, go + q, off + q, n, static_cast<int32_t>(ti[0] * 2));
      fill(dst + 2 * n, g.W - 2 * n, T(0));
      continue;
    }
    fill(d.data(), static_cast<int64_t>(d.size()), A(0));
    for (int64_t k = 0; k < nw; ++k) {
      const int64_t q = (plane * g.Ho + oh[k]) * n;
      for (int64_t j = g.kw - 1; j >= 0; --j)  // descending j = ascending ow at any input column
        gather_add(d.data() + p.at[j], go + q, off + q, n, static_cast<int32_t>(ti[k] * g.kw + j));
    }
    if (p.stream) {
      merge_row(d.data(), merged.data(), p);
      stream_convert(dst, merged.data(), p.row_in);
    } else {
      merge_row(d.data(), dst, p);
    }
  }
}

// One set of ISA clones per dtype: a cloned function may only call inlined code.
#define DTK_MP_CLONES(T)                                                                            \
  DTK_CLONES void forward_k(const Plan& p, const T* in, const FwdOut& o, int64_t r0, int64_t r1) { \
    const bool track = o.off || o.idx;                                                              \
    if (p.whole) {                                                                                  \
      if (track) forward_whole<T, true>(p, in, o, r0, r1);                                          \
      else forward_whole<T, false>(p, in, o, r0, r1);                                               \
    } else if (p.direct) {                                                                          \
      if (track) forward_direct<T, true>(p, in, o, r0, r1);                                         \
      else forward_direct<T, false>(p, in, o, r0, r1);                                              \
    } else {                                                                                        \
      if (track) forward_split<T, true>(p, in, o, r0, r1);                                          \
      else forward_split<T, false>(p, in, o, r0, r1);                                               \
    }                                                                                               \
    if (p.stream) stream_fence();                                                                   \
  }                                                                                                 \
  DTK_CLONES void backward_k(const Plan& p, const T* go, const void* off, int obytes, T* gi,        \
                             int64_t r0, int64_t r1) {                                              \
    if (p.whole) {                                                                                  \
      if (obytes == 1) backward_whole(p, go, static_cast<const int8_t*>(off), gi, r0, r1);          \
      else if (obytes == 2) backward_whole(p, go, static_cast<const int16_t*>(off), gi, r0, r1);    \
      else backward_whole(p, go, static_cast<const int32_t*>(off), gi, r0, r1);                     \
    } else if (obytes == 1) {                                                                       \
      backward_rows(p, go, static_cast<const int8_t*>(off), gi, r0, r1);                            \
    } else if (obytes == 2) {                                                                       \
      backward_rows(p, go, static_cast<const int16_t*>(off), gi, r0, r1);                           \
    } else {                                                                                        \
      backward_rows(p, go, static_cast<const int32_t*>(off), gi, r0, r1);                           \
    }                                                                                               \
    if (p.stream) stream_fence();                                                                   \
  }
DTK_MP_CLONES(float)
DTK_MP_CLONES(double)
DTK_MP_CLONES(c10::Half)
DTK_MP_CLONES(c10::BFloat16)
#undef DTK_MP_CLONES

// Rows per parallel task: about kGrain elements of work each.
int64_t grain_rows(int64_t work_per_row) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, work_per_row));
}

int64_t planes(const Pool2d& g) { return g.channels_last ? g.N : g.N * g.C; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> max_pool2d(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                                          at::IntArrayRef dilation, bool ceil_mode,
                                                          bool channels_last, bool return_indices,
                                                          bool return_offsets) {
  PoolForward f = prepare_forward(input, kernel_size, stride, padding, dilation, ceil_mode, channels_last,
                                  return_indices, return_offsets);
  const Pool2d& g = f.g;
  PoolOutputs& res = f.res;
  if (res.out.numel() == 0) return {res.out, res.indices, res.offsets};
  // Indices alone: record each tap's flat-index offset directly when it fits int32.
  const bool delta_codes = return_indices && !return_offsets &&
                           (g.kh - 1) * g.dh * g.W + (g.kw - 1) * g.dw <= std::numeric_limits<int32_t>::max();
  // Whole planes, except where rows do better (measured): outputs large enough to
  // stream, and MaxPool2d(2)-like windows on rows of 48 outputs or more.
  const bool stream = res.out.nbytes() >= kStreamBytes;
  Plan p = make_plan(g, delta_codes, planes(g), !stream && (windows_overlap(g) || g.Wo < 48));
  p.stream = stream;
  if (p.whole && (return_indices || return_offsets)) plan_whole_init(p);
  const FwdOut o{res.out.data_ptr(), return_offsets ? res.offsets.data_ptr() : nullptr,
                 static_cast<int>(res.offsets.element_size()),
                 return_indices ? res.indices.mutable_data_ptr<int64_t>() : nullptr};
  // rows, or whole planes; work per unit: outputs x taps
  const int64_t units = p.whole ? planes(g) : planes(g) * g.Ho;
  const int64_t grain = grain_rows(p.row_out * g.taps() * (p.whole ? g.Ho : 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.x.scalar_type(), "max_pool2d", [&] {
    const scalar_t* in = f.x.const_data_ptr<scalar_t>();
    at::parallel_for(0, units, grain, [&](int64_t r0, int64_t r1) { forward_k(p, in, o, r0, r1); });
  });
  return {res.out, res.indices, res.offsets};
}

// Small planes with overlapping windows: a scatter in output order into a plane of
// compute-type accumulators (ATen's own algorithm and order, so the sums are the
// gather's, bit for bit), then one conversion. On planes this small the gather's
// per-row set-up dominates: 17 us against ATen's 5 us at 2x16x16x16. Whole planes
// (plan_whole) cost less from about 16x16 up, and on any plane with stride 1, where
// the scatter's work per input pixel is highest (measured, float32 and bfloat16).
constexpr int64_t kScatterPlane = 1024;  // input elements per plane (pixels x B)
constexpr int64_t kScatterWhole = 256;   // the same where whole planes are the alternative

template <typename T, typename O>
void scatter_planes(const Pool2d& g, int64_t B, const T* go, const O* off, T* gi, int64_t p0, int64_t p1) {
  using A = acc_t<T>;
  constexpr bool in_place = std::is_same_v<A, T>;  // float and double accumulate in the output itself
  const int64_t in_plane = g.H * g.W * B, out_plane = g.Ho * g.Wo * B, taps = g.taps();
  std::vector<A> tmp(in_place ? 0 : in_plane);
  std::vector<int64_t> di(taps), dj(taps);  // tap -> row and column from the window's origin
  for (int64_t t = 0; t < taps; ++t) di[t] = (t / g.kw) * g.dh, dj[t] = (t % g.kw) * g.dw;
  for (int64_t plane = p0; plane < p1; ++plane) {
    A* acc = in_place ? reinterpret_cast<A*>(gi + plane * in_plane) : tmp.data();
    std::fill(acc, acc + in_plane, A(0));
    const T* gp = go + plane * out_plane;
    const O* op = off + plane * out_plane;
    for (int64_t oh = 0, q = 0; oh < g.Ho; ++oh) {
      const int64_t h0 = oh * g.sh - g.ph;
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        const int64_t w0 = ow * g.sw - g.pw;
        for (int64_t b = 0; b < B; ++b, ++q) {
          const int64_t t = op[q];
          if (t < 0 || t >= taps) continue;  // not an offset the forward wrote
          const int64_t ih = h0 + di[t], iw = w0 + dj[t];
          if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) acc[(ih * g.W + iw) * B + b] += static_cast<A>(gp[q]);
        }
      }
    }
    if constexpr (!in_place) {
      T* dst = gi + plane * in_plane;
      for (int64_t e = 0; e < in_plane; ++e) dst[e] = static_cast<T>(acc[e]);
    }
  }
}

at::Tensor max_pool2d_backward(const at::Tensor& grad_out, const at::Tensor& offsets, at::IntArrayRef input_size,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, bool channels_last) {
  PoolBackward b = prepare_backward(grad_out, offsets, input_size, kernel_size, stride, padding, dilation,
                                    channels_last);
  const Pool2d& g = b.g;
  if (b.grad_input.numel() == 0) return b.grad_input;
  const int64_t B = g.channels_last ? g.C : 1;
  // MaxPool2d(2) on rows of more than a vector of outputs: unpool_pairs writes each
  // element once, faster than the whole plane's fill, taps and merge (measured).
  const bool pairs = !windows_overlap(g) && g.kw == 2 && g.sw == 2 && g.dw == 1 && g.pw == 0 && 2 * g.Wo <= g.W;
  Plan p = make_plan(g, false, planes(g), !(pairs && g.Wo > 8));
  // Large gradients (rows): merged rows go out with non-temporal stores.
  p.stream = !p.whole && b.grad_input.nbytes() >= kStreamBytes;
  const bool scatter = windows_overlap(g) && (p.whole ? g.H * g.W <= kScatterWhole && g.sh * g.sw > 1
                                                      : g.H * g.W * B <= kScatterPlane);
  if (scatter) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.grad_out.scalar_type(), "max_pool2d_backward", [&] {
      const scalar_t* pg = b.grad_out.const_data_ptr<scalar_t>();
      scalar_t* pi = b.grad_input.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, planes(g), std::max<int64_t>(1, kGrain / (g.H * g.W * B)), [&](int64_t p0, int64_t p1) {
        const int ob = static_cast<int>(b.offsets.element_size());
        if (ob == 1) scatter_planes(g, B, pg, b.offsets.const_data_ptr<int8_t>(), pi, p0, p1);
        else if (ob == 2) scatter_planes(g, B, pg, b.offsets.const_data_ptr<int16_t>(), pi, p0, p1);
        else scatter_planes(g, B, pg, b.offsets.const_data_ptr<int32_t>(), pi, p0, p1);
      });
    });
    return b.grad_input;
  }
  // input rows, or whole planes; work per row: the output rows reaching it times their width
  const int64_t rows = p.whole ? planes(g) : planes(g) * g.H;
  const int64_t per_row = p.row_out * g.kw * std::max<int64_t>(1, g.kh / g.sh) * (p.whole ? g.H : 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.grad_out.scalar_type(), "max_pool2d_backward", [&] {
    const scalar_t* pg = b.grad_out.const_data_ptr<scalar_t>();
    scalar_t* pi = b.grad_input.mutable_data_ptr<scalar_t>();
    const void* po = b.offsets.const_data_ptr();
    const int ob = static_cast<int>(b.offsets.element_size());
    at::parallel_for(0, rows, grain_rows(per_row),
                     [&](int64_t r0, int64_t r1) { backward_k(p, pg, po, ob, pi, r0, r1); });
  });
  return b.grad_input;
}

}  // namespace

bool set_whole_planes(bool on) {
  whole_planes_flag().store(on);
  return on;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emulate_cuda_max_pool2d(
    const at::Tensor& input, std::vector<int64_t> kernel_size, std::vector<int64_t> stride,
    std::vector<int64_t> padding, std::vector<int64_t> dilation, bool ceil_mode, bool channels_last,
    bool return_indices, bool return_offsets, bool fast_split, bool pairs) {
  PoolForward f = prepare_forward(input, kernel_size, stride, padding, dilation, ceil_mode, channels_last,
                                  return_indices, return_offsets);
  PoolOutputs& res = f.res;
  if (res.out.numel() == 0) return {res.out, res.indices, res.offsets};
  const PoolDims g = pool_dims(f.g);
  int64_t* idx = return_indices ? res.indices.mutable_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.x.scalar_type(), "emulate_cuda_max_pool2d", [&] {
    using T = scalar_t;
    const T* xp = f.x.const_data_ptr<T>();
    T* op = res.out.mutable_data_ptr<T>();
    with_offset_type(res.offsets.element_size(), [&](auto o_type) {
      using O = decltype(o_type);
      O* off = return_offsets ? static_cast<O*>(res.offsets.data_ptr()) : nullptr;
      if (channels_last) {  // as the CUDA launcher, one thread item at a time
        with_pool_layout<T>(true, g.C, res.out.numel(), xp, op, [&](auto n_, auto nhwc_, int64_t n) {
          constexpr int N = decltype(n_)::value;
          const PoolFastSplit fs = pool_fast_split<N>(g, n, fast_split);
          with_nhwc_pairs<T, N>(pairs, idx != nullptr || off != nullptr, g, [&](auto pairs_) {
            constexpr int PAIRS = decltype(pairs_)::value;
            for (int64_t q = 0; q < n; ++q)
              pool_forward_item<T, O, N, decltype(nhwc_)::value, PAIRS>(q, xp, op, idx, off, g, fs);
          });
        });
      } else {
        const int64_t n = pool_rows_items(res.out.numel(), g.Wo);
        for (int64_t q = 0; q < n; ++q) pool_forward_rows<T, O, kPoolRowsV>(q, xp, op, idx, off, g);
      }
    });
  });
  return {res.out, res.indices, res.offsets};
}

at::Tensor emulate_cuda_max_pool2d_backward(const at::Tensor& grad_out, const at::Tensor& offsets,
                                            std::vector<int64_t> input_size, std::vector<int64_t> kernel_size,
                                            std::vector<int64_t> stride, std::vector<int64_t> padding,
                                            std::vector<int64_t> dilation, bool channels_last) {
  PoolBackward b = prepare_backward(grad_out, offsets, input_size, kernel_size, stride, padding, dilation,
                                    channels_last);
  if (b.grad_input.numel() == 0) return b.grad_input;
  const PoolDims g = pool_dims(b.g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.grad_out.scalar_type(),
                                  "emulate_cuda_max_pool2d_backward", [&] {
    using T = scalar_t;
    const T* gp = b.grad_out.const_data_ptr<T>();
    T* ip = b.grad_input.mutable_data_ptr<T>();
    with_offset_type(b.offsets.element_size(), [&](auto o_type) {
      using O = decltype(o_type);
      const O* op = static_cast<const O*>(b.offsets.const_data_ptr());
      with_pool_layout<T>(channels_last, g.C, b.grad_input.numel(), gp, ip, [&](auto n_, auto nhwc_, int64_t n) {
        for (int64_t q = 0; q < n; ++q)
          pool_backward_item<T, O, decltype(n_)::value, decltype(nhwc_)::value>(q, gp, op, ip, g);
      });
    });
  });
  return b.grad_input;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emulate_cuda_forward_vec(
    const at::Tensor& input, std::vector<int64_t> kernel_size, std::vector<int64_t> stride,
    std::vector<int64_t> padding, std::vector<int64_t> dilation, bool ceil_mode, bool return_indices,
    bool return_offsets, int64_t rows, bool pairs, int64_t tile_bytes) {
  PoolForward f = prepare_forward(input, kernel_size, stride, padding, dilation, ceil_mode, false, return_indices,
                                  return_offsets);
  PoolOutputs& res = f.res;
  if (res.out.numel() == 0) return {res.out, res.indices, res.offsets};
  // The CUDA launcher falls back to the default kernel for these (16-byte row loads).
  TORCH_CHECK(aligned_to(f.x.const_data_ptr(), 16), "emulate_cuda_forward_vec: the input must be 16-byte aligned");
  const PoolDims g = pool_dims(f.g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.x.scalar_type(), "emulate_cuda_forward_vec", [&] {
    using T = scalar_t;
    const bool ok = with_pool_vec_kernel<T>(g, static_cast<int>(rows), [&](auto k, auto s, auto p, auto rh) {
      constexpr int K = decltype(k)::value, S = decltype(s)::value, PAD = decltype(p)::value;
      constexpr int RH = decltype(rh)::value;
      const PoolVecItems it = pool_vec_items<T, K, S, PAD, RH>(g, res.out.numel() / (g.Ho * g.Wo));
      TORCH_CHECK(it.n < (int64_t(1) << 31), "emulate_cuda_forward_vec: too many thread items");
      const FastDivmod d_groups(static_cast<uint32_t>(it.groups)), d_blocks(static_cast<uint32_t>(it.blocks));
      T* out = res.out.mutable_data_ptr<T>();
      int8_t* off = return_offsets ? res.offsets.mutable_data_ptr<int8_t>() : nullptr;
      const bool packed = g.Wo % PoolVec<T, K, S, PAD>::V == 0;  // CPU outputs are 64-byte aligned
      int64_t* idx = return_indices ? res.indices.mutable_data_ptr<int64_t>() : nullptr;
      const T* x = f.x.const_data_ptr<T>();
      const auto run = [&](auto pairs_) {  // the pairs' mode, as the CUDA launcher picks it
        constexpr int PAIRS = decltype(pairs_)::value;
        if (tile_bytes == 0) {
          for (uint32_t q = 0; q < static_cast<uint32_t>(it.n); ++q)  // one CUDA thread item each
            pool_forward_vec<T, K, S, PAD, RH, PAIRS>(q, x, out, idx, off, g, d_groups, d_blocks, packed);
          return;
        }
        if constexpr (RH == 0) {  // each block: every thread's loads into the tile, then every thread's items
          const PoolTilePlan tp = pool_tile_plan<T>(g, res.out.numel() / (g.Ho * g.Wo), tile_bytes, it.groups);
          TORCH_CHECK(tp.th > 0, "emulate_cuda_forward_vec: one window's rows do not fit a tile of ", tile_bytes,
                      " bytes");
          const FastDivmod d_tiles(static_cast<uint32_t>(tp.tiles));
          const int n = tp.threads;
          std::vector<T> tile(tp.bytes / sizeof(T));
          for (uint32_t blk = 0; blk < static_cast<uint32_t>(tp.blocks); ++blk) {
            const PoolTile t = pool_tile(blk, g, static_cast<int>(tp.th), d_tiles);
            TORCH_CHECK(static_cast<int64_t>((t.hi - t.lo) * g.W * sizeof(T)) <= tp.bytes,
                        "emulate_cuda_forward_vec: a tile's rows overflow its shared memory");
            // poisoned: the items must read only rows this block's loads wrote
            std::fill(tile.begin(), tile.end(), static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
            for (int tid = 0; tid < n; ++tid) pool_tile_load<T>(tid, n, x, tile.data(), g, t);
            for (int tid = 0; tid < n; ++tid)
              pool_tile_outputs<T, K, S, PAD, PAIRS>(tid, n, tile.data(), out, idx, off, g, t, d_groups, packed);
          }
        }
      };
      TORCH_CHECK(tile_bytes == 0 || rows == 0, "emulate_cuda_forward_vec: tiles take rows 0");
      if (!pairs) {
        run(std::integral_constant<int, 0>{});
        return true;
      }
      if constexpr (sizeof(T) == 2) {
        if (idx == nullptr && off == nullptr) run(std::integral_constant<int, 1>{});
        else run(std::integral_constant<int, 2>{});
        return true;
      }
      return false;
    });
    TORCH_CHECK(ok, "emulate_cuda_forward_vec: the vec forward has no kernel for this geometry with ", rows,
                " output rows per thread item", pairs ? " and 16-bit pairs" : "");
  });
  return {res.out, res.indices, res.offsets};
}

at::Tensor emulate_cuda_backward_rows(const at::Tensor& grad_out, const at::Tensor& offsets,
                                      std::vector<int64_t> input_size, std::vector<int64_t> kernel_size,
                                      std::vector<int64_t> stride, std::vector<int64_t> padding,
                                      std::vector<int64_t> dilation) {
  PoolBackward b = prepare_backward(grad_out, offsets, input_size, kernel_size, stride, padding, dilation, false);
  if (b.grad_input.numel() == 0) return b.grad_input;
  const PoolDims g = pool_dims(b.g);
  const int64_t rows = b.g.N * b.g.C * b.g.H;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.grad_out.scalar_type(), "emulate_cuda_backward_rows", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    constexpr int V = 16 / sizeof(T);  // the CUDA kernel's 16-byte groups
    const T* go = b.grad_out.const_data_ptr<T>();
    T* gi = b.grad_input.mutable_data_ptr<T>();
    const auto run = [&](const auto* off, auto k, auto s, auto p) {
      constexpr int K = decltype(k)::value, S = decltype(s)::value, PAD = decltype(p)::value;
      for (int64_t r = 0; r < rows; ++r)
        for (int iw0 = 0; iw0 < g.W; iw0 += V) {  // one CUDA thread item
          A acc[V];
          pool_backward_columns<V, K, S, PAD>(go, off, g, r / g.H, static_cast<int>(r % g.H), iw0, acc);
          for (int j = 0; j < V && iw0 + j < g.W; ++j) gi[r * g.W + iw0 + j] = static_cast<T>(acc[j]);
        }
    };
    using zero = std::integral_constant<int, 0>;
    const int ob = static_cast<int>(b.offsets.element_size());
    if (ob == 1)  // as the CUDA launch: common square windows compiled in
      with_pool_square_geometry(g, [&](auto k, auto s, auto p) { run(b.offsets.const_data_ptr<int8_t>(), k, s, p); });
    else if (ob == 2) run(b.offsets.const_data_ptr<int16_t>(), zero{}, zero{}, zero{});
    else run(b.offsets.const_data_ptr<int32_t>(), zero{}, zero{}, zero{});
  });
  return b.grad_input;
}

}  // namespace cpu
}  // namespace dtkernels

TORCH_LIBRARY_IMPL(dtkernels, CPU, m) {
  m.impl("_max_pool2d", &dtkernels::cpu::max_pool2d);
  m.impl("_max_pool2d_backward", &dtkernels::cpu::max_pool2d_backward);
}
