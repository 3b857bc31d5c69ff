// max_pool2d geometry and argument checks, shared by the CPU and CUDA kernels.
//
// Semantics are ATen's CPU kernel's, which every dtkernels backend reproduces:
// taps are scanned row-major; a value replaces the running maximum when it is
// greater or NaN (so ties keep the first maximum and the last NaN wins); the
// running maximum starts at -inf with the window's first tap that is not in the
// left/top padding, so an all -inf window reports that tap. A window with no tap
// inside the input (possible with dilation, e.g. H=2, k=2, d=3, p=1) gives -inf and
// ATen's out-of-range index; backward drops its gradient (ATen writes it out of
// bounds).
//
// Backward does not keep int64 indices but the tap inside the window, i * kw + j
// ("offsets"): int8 up to 128 taps, int16 up to 32768, int32 beyond.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace dtkernels {

struct Pool2d {
  int64_t N, C, H, W, Ho, Wo;  // 3-D inputs have N = 1
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  bool channels_last;

  int64_t taps() const { return kh * kw; }
  // First tap index along a dimension that is not in the leading padding (ATen's
  // `while (ih0 < 0) ih0 += dilation`): i0 = ceil(max(0, p - o*s) / d).
  static int64_t first_tap(int64_t o, int64_t s, int64_t p, int64_t d) {
    int64_t lead = p - o * s;
    return lead > 0 ? (lead + d - 1) / d : 0;
  }
};

inline int64_t div_floor(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// ATen's pooling_output_shape, checks included, in ATen's order and wording.
inline int64_t pool_output_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  TORCH_CHECK(s != 0, "stride should not be zero");
  TORCH_CHECK(p >= 0, "pad must be non-negative, but got pad: ", p);
  TORCH_CHECK(p <= ((k - 1) * d + 1) / 2, "pad should be at most half of effective kernel size, but got pad=", p,
              ", kernel_size=", k, " and dilation=", d);
  int64_t o = div_floor(in + 2 * p - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0), s) + 1;
  // ceil_mode: the last window must start inside the input or its left padding
  if (ceil_mode && (o - 1) * s >= in + p) --o;
  return o;
}

inline at::ScalarType offsets_dtype(int64_t taps) {
  return taps <= 128 ? at::kChar : taps <= 32768 ? at::kShort : at::kInt;
}

inline void check_pool_args(at::IntArrayRef v, const char* name) {
  TORCH_CHECK(v.size() == 2, "max_pool2d: ", name, " must have two elements, got ", v.size());
}

// ATen keeps kernel size, stride, padding and dilation in int (safe_downcast): a larger
// value is its error, where the kernels' int geometry would wrap. Offsets inside a
// window are at most int32, so a window may hold at most 2^31 - 1 taps (padding included).
inline void check_pool_ints(at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d) {
  for (at::IntArrayRef v : {k, s, p, d})
    for (int64_t e : v)
      TORCH_CHECK(e >= std::numeric_limits<int>::min() && e <= std::numeric_limits<int>::max(),
                  "value cannot be converted to type int without overflow");
  TORCH_CHECK(k[0] <= 0 || k[1] <= 0 || k[0] * k[1] <= std::numeric_limits<int>::max(),
              "max_pool2d: windows of more than 2^31 - 1 elements are not supported, got kernel_size ", k);
}

// Validates a forward call (ATen's checks, same order and wording) and returns its geometry.
inline Pool2d pool2d_geometry(const at::Tensor& input, at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p,
                              at::IntArrayRef d, bool ceil_mode, bool channels_last) {
  check_pool_args(k, "kernel_size");
  check_pool_args(s, "stride");
  check_pool_args(p, "padding");
  check_pool_args(d, "dilation");
  check_pool_ints(k, s, p, d);
  check_float(input, "input", "max_pool2d");
  TORCH_CHECK(input.dim() == 3 || input.dim() == 4, "non-empty 3D or 4D (batch mode) tensor expected for input");
  TORCH_CHECK(!channels_last || input.dim() == 4,
              "non-empty 4D (batch mode) tensor expected for input with channels_last layout");
  Pool2d g;
  g.N = input.dim() == 4 ? input.size(0) : 1;
  g.C = input.size(-3);
  g.H = input.size(-2);
  g.W = input.size(-1);
  g.kh = k[0], g.kw = k[1], g.sh = s[0], g.sw = s[1], g.ph = p[0], g.pw = p[1], g.dh = d[0], g.dw = d[1];
  g.channels_last = channels_last;
  g.Ho = pool_output_size(g.H, g.kh, g.sh, g.ph, g.dh, ceil_mode);
  g.Wo = pool_output_size(g.W, g.kw, g.sw, g.pw, g.dw, ceil_mode);
  TORCH_CHECK(g.kh > 0 && g.kw > 0, "kernel size should be greater than zero, but got kH: ", g.kh, " kW: ", g.kw);
  TORCH_CHECK(g.sh > 0 && g.sw > 0, "stride should be greater than zero, but got dH: ", g.sh, " dW: ", g.sw);
  TORCH_CHECK(g.dh > 0 && g.dw > 0, "dilation should be greater than zero, but got dilationH: ", g.dh,
              " dilationW: ", g.dw);
  TORCH_CHECK(g.C != 0 && g.H != 0 && g.W != 0, "Expected 3D or 4D (batch mode) tensor with optional 0 dim batch size for input, but got:",
              input.sizes());
  TORCH_CHECK(g.kw / 2 >= g.pw && g.kh / 2 >= g.ph,
              "pad should be smaller than or equal to half of kernel size, but got padW = ", g.pw, ", padH = ", g.ph,
              ", kW = ", g.kw, ", kH = ", g.kh);
  TORCH_CHECK(g.Wo >= 1 && g.Ho >= 1, "Given input size: (", g.C, "x", g.H, "x", g.W, "). Calculated output size: (",
              g.C, "x", g.Ho, "x", g.Wo, "). Output size is too small");
  return g;
}

inline at::MemoryFormat pool_format(const Pool2d& g) {
  return g.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline std::vector<int64_t> pool_output_sizes(const at::Tensor& input, const Pool2d& g) {
  if (input.dim() == 3) return {g.C, g.Ho, g.Wo};
  return {g.N, g.C, g.Ho, g.Wo};
}

// The forward's outputs: values, int64 indices (or an empty tensor) and offsets (or an
// empty tensor), all in the output's memory format.
struct PoolOutputs {
  at::Tensor out, indices, offsets;
};

inline PoolOutputs new_pool_outputs(const at::Tensor& input, const Pool2d& g, bool want_indices, bool want_offsets) {
  auto sizes = pool_output_sizes(input, g);
  const auto fmt = pool_format(g);
  PoolOutputs o;
  o.out = new_empty(sizes, input.options(), fmt);
  o.indices = want_indices ? new_empty(sizes, input.options().dtype(at::kLong), fmt)
                           : at::empty({0}, input.options().dtype(at::kLong));
  const auto odt = offsets_dtype(g.taps());
  o.offsets = want_offsets ? new_empty(sizes, input.options().dtype(odt), fmt)
                           : at::empty({0}, input.options().dtype(at::kChar));
  return o;
}

// A validated forward call: geometry, fresh outputs, and the input in the layout the
// kernels read (a copy only for odd layouts). Call under the device's guard.
struct PoolForward {
  Pool2d g;
  PoolOutputs res;
  at::Tensor x;
};

inline PoolForward prepare_forward(const at::Tensor& input, at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p,
                                   at::IntArrayRef d, bool ceil_mode, bool channels_last, bool want_indices,
                                   bool want_offsets) {
  PoolForward f;
  f.g = pool2d_geometry(input, k, s, p, d, ceil_mode, channels_last);
  f.res = new_pool_outputs(input, f.g, want_indices, want_offsets);
  if (f.res.out.numel() != 0) f.x = input.contiguous(pool_format(f.g));
  return f;
}

// Validates a backward call and returns its geometry (from the input's sizes).
inline Pool2d pool2d_backward_geometry(const at::Tensor& grad_out, const at::Tensor& offsets, at::IntArrayRef input_size,
                                       at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d,
                                       bool channels_last) {
  check_pool_args(k, "kernel_size");
  check_pool_args(s, "stride");
  check_pool_args(p, "padding");
  check_pool_args(d, "dilation");
  check_pool_ints(k, s, p, d);
  check_float(grad_out, "grad_out", "max_pool2d_backward");
  TORCH_CHECK(input_size.size() == 3 || input_size.size() == 4,
              "max_pool2d_backward: input_size must have 3 or 4 elements, got ", input_size);
  TORCH_CHECK(grad_out.dim() == static_cast<int64_t>(input_size.size()),
              "max_pool2d_backward: grad_out must have as many dimensions as the input, got ", grad_out.sizes(),
              " for input size ", input_size);
  TORCH_CHECK(!channels_last || input_size.size() == 4, "max_pool2d_backward: channels_last needs a 4-D input");
  Pool2d g;
  const bool b = input_size.size() == 4;
  g.N = b ? input_size[0] : 1;
  g.C = input_size[b ? 1 : 0];
  g.H = input_size[b ? 2 : 1];
  g.W = input_size[b ? 3 : 2];
  g.kh = k[0], g.kw = k[1], g.sh = s[0], g.sw = s[1], g.ph = p[0], g.pw = p[1], g.dh = d[0], g.dw = d[1];
  g.channels_last = channels_last;
  TORCH_CHECK(g.kh > 0 && g.kw > 0 && g.sh > 0 && g.sw > 0 && g.dh > 0 && g.dw > 0 && g.ph >= 0 && g.pw >= 0,
              "max_pool2d_backward: kernel_size, stride and dilation must be positive and padding non-negative");
  g.Ho = grad_out.size(-2);
  g.Wo = grad_out.size(-1);
  TORCH_CHECK(grad_out.size(-3) == g.C && (!b || grad_out.size(0) == g.N),
              "max_pool2d_backward: grad_out of size ", grad_out.sizes(), " does not match input size ", input_size);
  TORCH_CHECK(offsets.sizes().equals(grad_out.sizes()),
              "max_pool2d_backward: offsets must have grad_out's shape ", grad_out.sizes(), ", got ", offsets.sizes(),
              " (were they saved by a forward called with return_offsets=True?)");
  TORCH_CHECK(offsets.scalar_type() == offsets_dtype(g.taps()), "max_pool2d_backward: offsets must be ",
              dtype_name(offsets_dtype(g.taps())), " for a ", g.kh, "x", g.kw, " window, got ",
              dtype_name(offsets.scalar_type()));
  TORCH_CHECK(offsets.device() == grad_out.device(), "max_pool2d_backward: offsets and grad_out must be on the same device");
  return g;
}

// A validated backward call: geometry, the fresh grad_input, and grad_out and offsets
// in the layout the kernels read. Call under the device's guard.
struct PoolBackward {
  Pool2d g;
  at::Tensor grad_input, grad_out, offsets;
};

// ---- The CUDA kernels' per-thread work, for host and device --------------------------------
//
// Written C10_HOST_DEVICE so that the CPU build runs the very code the GPU runs
// (the cpu::emulate_cuda_* functions, over every thread item): the tests hold each
// CUDA kernel to the CPU kernel, bit for bit, on every shape without a GPU.

// int32 geometry (the CUDA kernels check that sizes fit).
struct PoolDims {
  int C, H, W, Ho, Wo;
  int kh, kw, sh, sw, ph, pw, dh, dw;
};

inline PoolDims pool_dims(const Pool2d& g) {
  return PoolDims{int(g.C), int(g.H), int(g.W), int(g.Ho), int(g.Wo), int(g.kh), int(g.kw),
                  int(g.sh), int(g.sw), int(g.ph), int(g.pw), int(g.dh), int(g.dw)};
}

// The windows holding input position `i` along one dimension: o in [lo, hi] with
// (i + p - o*s) a multiple of d; the tap is (i + p - o*s) / d.
C10_HOST_DEVICE C10_ALWAYS_INLINE void window_range(int i, int k, int s, int p, int d, int outs, int& lo, int& hi) {
  const int first = i + p - (k - 1) * d;
  lo = first <= 0 ? 0 : (first + s - 1) / s;
  hi = (i + p) / s < outs - 1 ? (i + p) / s : outs - 1;
}

// ATen's scan rule: a value replaces the running maximum when greater, or NaN.
template <typename A>
C10_HOST_DEVICE C10_ALWAYS_INLINE void pool_fold(A a, int t, A& m, int& tap) {
  if (a > m || a != a) {
    m = a;
    tap = t;
  }
}

// ---- 16-bit values in pairs ---------------------------------------------------------------------
//
// 16-bit values can be compared two at a time, as the GPU's paired instructions do:
// one HSET2 and one LOP3 per two values and tap (a second LOP3 carries the taps where
// they are wanted), where the scan spends about six instructions per value and tap.
// The stem forward's item (8 outputs) was ~690 instructions of sm_90 SASS, ~280 in
// pairs: by estimate its kernel was near the issue rate's bound, where the k2s2
// forward (0.96 of copy bandwidth) does less than half the stem's work per byte. A
// 32-bit word holds two outputs' values (NCHW: two columns; NHWC: two channels), the
// first in its low half.
//
// The result stays the scan's, bit for bit: a value replaces the running maximum only
// when strictly greater, so of equal values (-0.0 and +0.0 are the only distinct
// ones) the first stays, and the taps are folded in row-major order (the NCHW vec
// forward folds each row left to right, then the rows top to bottom). The scan also
// takes a NaN (the last one); the pairs look for NaN among every word an item reads,
// and an item that read one reruns the scan.

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE uint16_t pair_bits(T v) {
  return v.x;
}

// -inf in both lanes: the running maxima's start.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE uint32_t pair_ninf() {
  return static_cast<uint32_t>(pair_bits(static_cast<T>(-std::numeric_limits<float>::infinity()))) * 0x10001u;
}

// Lane 0 or 1 of a pair as a value.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T pair_value(uint32_t w, int lane) {
  return T(static_cast<uint16_t>(w >> (16 * lane)), T::from_bits());
}

#if !defined(__CUDA_ARCH__)
template <typename T>
inline float pair_lane(uint32_t w, int lane) {
  return static_cast<float>(pair_value<T>(w, lane));
}
#else
template <typename T>
struct PairOf;
template <>
struct PairOf<c10::Half> {
  using type = __half2;
};
template <>
struct PairOf<c10::BFloat16> {
  using type = __nv_bfloat162;
};
template <typename T>
__device__ C10_ALWAYS_INLINE typename PairOf<T>::type as_pair(uint32_t w) {
  typename PairOf<T>::type p;
  memcpy(&p, &w, sizeof(w));
  return p;
}
#endif

// 0xFFFF in each lane where b > a (false where either is NaN).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE uint32_t pair_gt_mask(uint32_t b, uint32_t a) {
#if defined(__CUDA_ARCH__)
  return __hgt2_mask(as_pair<T>(b), as_pair<T>(a));
#else
  uint32_t r = 0;
  for (int lane = 0; lane < 2; ++lane)
    if (pair_lane<T>(b, lane) > pair_lane<T>(a, lane)) r |= 0xFFFFu << (16 * lane);
  return r;
#endif
}

// b's lanes where mask has 0xFFFF, a's elsewhere (one LOP3): values and taps alike.
C10_HOST_DEVICE C10_ALWAYS_INLINE uint32_t pair_select(uint32_t mask, uint32_t b, uint32_t a) {
  return (b & mask) | (a & ~mask);
}

// The running maximum of a pair: each lane of b replaces a's where strictly greater.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE uint32_t pair_fold(uint32_t b, uint32_t a) {
  return pair_select(pair_gt_mask<T>(b, a), b, a);
}

// A lane that is NaN when either input's is (so a running one is NaN once any value
// folded into it was), else some value that is not NaN.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE uint32_t pair_nan(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  const auto p = __hmax2_nan(as_pair<T>(a), as_pair<T>(b));
  memcpy(&r, &p, sizeof(r));
  return r;
#else
  uint32_t r = 0;
  for (int lane = 0; lane < 2; ++lane) {
    const float x = pair_lane<T>(a, lane), y = pair_lane<T>(b, lane);
    const uint32_t lane_bits = x != x || y != y ? 0x7FFFu : (a >> (16 * lane)) & 0xFFFFu;
    r |= lane_bits << (16 * lane);
  }
  return r;
#endif
}

// Whether either lane is NaN (a magnitude above infinity's).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE bool pair_has_nan(uint32_t w) {
  constexpr uint32_t inf = std::is_same_v<T, c10::Half> ? 0x7C00u : 0x7F80u;
  return (w & 0x7FFFu) > inf || ((w >> 16) & 0x7FFFu) > inf;
}

// ---- The CUDA default kernels -------------------------------------------------------------------

C10_HOST_DEVICE C10_ALWAYS_INLINE int pool_first_tap(int o, int s, int p, int d) {
  const int lead = p - o * s;
  return lead > 0 ? (lead + d - 1) / d : 0;
}

// Writes a window's offset and ATen's flat index (h0, w0: the window's first tap,
// maybe in the padding) where asked for.
template <typename O>
C10_HOST_DEVICE C10_ALWAYS_INLINE void pool_store_results(int64_t* idx, O* off, int64_t o, int tap, int h0, int w0,
                                                          const PoolDims& g) {
  if (off) off[o] = static_cast<O>(tap);
  if (idx) idx[o] = static_cast<int64_t>(h0 + (tap / g.kw) * g.dh) * g.W + w0 + (tap % g.kw) * g.dw;
}

// Both layouts as rows of pixels of B elements: NCHW planes are n*C + c with B = 1,
// NHWC planes are images with B = C. Thread item q is one pixel of a Hs x Ws plane and
// one pack of N of its elements (C % N == 0).
struct PoolItem {
  int c, x, y;    // first element in the pixel, column, row
  int64_t plane;
  int64_t pix;    // pixel index over all planes
};

// pool_split's divisors as 32-bit multiply-shifts, for launches of fewer than 2^31
// items (larger ones divide in 64 bits).
struct PoolFastSplit {
  bool on = false;
  FastDivmod packs, ws, hs;  // C / N, Ws, Hs
};

// The fast split for n items of N elements, when asked for (the CUDA launcher always
// asks; the host emulation tests both) and n fits.
template <int N>
PoolFastSplit pool_fast_split(const PoolDims& g, int64_t n, bool want) {
  if (!want || n >= (int64_t(1) << 31)) return PoolFastSplit{};
  return PoolFastSplit{true, FastDivmod(static_cast<uint32_t>(g.C / N)), FastDivmod(static_cast<uint32_t>(g.Wo)),
                       FastDivmod(static_cast<uint32_t>(g.Ho))};
}

template <int N, bool NHWC>
C10_HOST_DEVICE C10_ALWAYS_INLINE PoolItem pool_split(int64_t q, const PoolDims& g, int Hs, int Ws,
                                                      const PoolFastSplit& f) {
  PoolItem it;
  if (f.on) {
    const uint32_t q32 = static_cast<uint32_t>(q), pix = NHWC ? f.packs.div(q32) : q32;
    const uint32_t r = f.ws.div(pix), plane = f.hs.div(r);
    it.c = NHWC ? static_cast<int>(q32 - pix * f.packs.d) * N : 0;
    it.pix = pix;
    it.x = static_cast<int>(pix - r * f.ws.d);
    it.y = static_cast<int>(r - plane * f.hs.d);
    it.plane = plane;
    return it;
  }
  it.c = NHWC ? static_cast<int>(q % (g.C / N)) * N : 0;
  it.pix = NHWC ? q / (g.C / N) : q;
  it.x = static_cast<int>(it.pix % Ws);
  const int64_t r = it.pix / Ws;
  it.y = static_cast<int>(r % Hs);
  it.plane = r / Hs;
  return it;
}

// Forward item q: one output pixel and a pack of N of its elements (NHWC; N = 1 for
// NCHW), taps row-major from the window's first tap inside the input.
// PAIRS (16-bit T, NHWC packs): compare two channels at a time, 1 for the values only
// (taken without indices and offsets), 2 with their taps in 16-bit lanes too (the
// caller keeps to windows of up to 2^16 taps: with_nhwc_pairs); an item that reads a
// NaN falls back to the scan.
template <typename T, typename O, int N, bool NHWC, int PAIRS = 0>
C10_HOST_DEVICE C10_ALWAYS_INLINE void pool_forward_item(int64_t q, const T* x, T* out, int64_t* idx, O* off,
                                                         const PoolDims& g, const PoolFastSplit& fs) {
  using A = at::opmath_type<T>;
  using P = Pack<T, N>;
  static_assert(PAIRS == 0 || (NHWC && sizeof(T) == 2 && N % 2 == 0), "pairs of 16-bit channels");
  const int B = NHWC ? g.C : 1;
  const PoolItem it = pool_split<N, NHWC>(q, g, g.Ho, g.Wo, fs);
  const int oh = it.y, ow = it.x;
  const T* xp = x + it.plane * g.H * g.W * B + it.c;
  const int h0 = oh * g.sh - g.ph, w0 = ow * g.sw - g.pw;
  const int i0 = pool_first_tap(oh, g.sh, g.ph, g.dh), j0 = pool_first_tap(ow, g.sw, g.pw, g.dw);
  const int64_t o = it.pix * B + it.c;
  // f(tap, address of the tap's pack) over the window's taps inside the input, row-major
  const auto scan = [&](auto f) {
    for (int i = i0, ih = h0 + i0 * g.dh; i < g.kh && ih < g.H; ++i, ih += g.dh)
      for (int j = j0, iw = w0 + j0 * g.dw; j < g.kw && iw < g.W; ++j, iw += g.dw)
        f(i * g.kw + j, xp + (static_cast<int64_t>(ih) * g.W + iw) * B);
  };
  if constexpr (PAIRS > 0) {
    constexpr bool TAPS = PAIRS == 2;
    if (TAPS || (idx == nullptr && off == nullptr)) {
      constexpr int W2 = N / 2;
      uint32_t m2[W2], t2[TAPS ? W2 : 1], nan = 0;
      DTK_UNROLL
      for (int k = 0; k < W2; ++k) {
        m2[k] = pair_ninf<T>();
        if (TAPS) t2[k] = static_cast<uint32_t>(i0 * g.kw + j0) * 0x10001u;
      }
      scan([&](int t, const T* at) {
        const Pack<uint32_t, W2> v = *reinterpret_cast<const Pack<uint32_t, W2>*>(at);
        DTK_UNROLL
        for (int k = 0; k < W2; ++k) {
          nan = pair_nan<T>(nan, v.v[k]);
          const uint32_t gt = pair_gt_mask<T>(v.v[k], m2[k]);
          m2[k] = pair_select(gt, v.v[k], m2[k]);
          if (TAPS) t2[k] = pair_select(gt, static_cast<uint32_t>(t) * 0x10001u, t2[k]);
        }
      });
      if (!pair_has_nan<T>(nan)) {
        P res;
        DTK_UNROLL
        for (int k = 0; k < N; ++k) res.v[k] = pair_value<T>(m2[k / 2], k % 2);
        *reinterpret_cast<P*>(out + o) = res;
        if (TAPS) {
          DTK_UNROLL
          for (int k = 0; k < N; ++k)
            pool_store_results(idx, off, o + k, static_cast<int>((t2[k / 2] >> (16 * (k % 2))) & 0xFFFFu), h0, w0, g);
        }
        return;
      }
    }
  }
  A m[N];
  int tap[N];
  DTK_UNROLL
  for (int k = 0; k < N; ++k) {
    m[k] = -std::numeric_limits<A>::infinity();
    tap[k] = i0 * g.kw + j0;
  }
  scan([&](int t, const T* at) {
    const P v = *reinterpret_cast<const P*>(at);
    DTK_UNROLL
    for (int k = 0; k < N; ++k) pool_fold(static_cast<A>(v.v[k]), t, m[k], tap[k]);
  });
  P res;
  DTK_UNROLL
  for (int k = 0; k < N; ++k) res.v[k] = static_cast<T>(m[k]);
  *reinterpret_cast<P*>(out + o) = res;
  DTK_UNROLL
  for (int k = 0; k < N; ++k) pool_store_results(idx, off, o + k, tap[k], h0, w0, g);
}

// The NCHW forward's outputs per thread item, and its items for `numel` outputs.
constexpr int kPoolRowsV = 4;
inline int64_t pool_rows_items(int64_t numel, int64_t Wo) { return numel / Wo * ((Wo + kPoolRowsV - 1) / kPoolRowsV); }

// NCHW forward item q: V outputs of a row (V independent loads in flight per tap,
// strided by sw, so not one vector load; the index arithmetic shared).
template <typename T, typename O, int V>
C10_HOST_DEVICE C10_ALWAYS_INLINE void pool_forward_rows(int64_t q, const T* x, T* out, int64_t* idx, O* off,
                                                         const PoolDims& g) {
  using A = at::opmath_type<T>;
  const int groups = (g.Wo + V - 1) / V;
  const int ow0 = static_cast<int>(q % groups) * V;
  const int64_t r = q / groups;  // plane * Ho + oh
  const int oh = static_cast<int>(r % g.Ho);
  const T* xp = x + (r / g.Ho) * g.H * g.W;
  const int h0 = oh * g.sh - g.ph, i0 = pool_first_tap(oh, g.sh, g.ph, g.dh);
  const int nv = g.Wo - ow0 < V ? g.Wo - ow0 : V;
  A m[V];
  int tap[V];
  DTK_UNROLL
  for (int v = 0; v < V; ++v) {
    m[v] = -std::numeric_limits<A>::infinity();
    tap[v] = i0 * g.kw + pool_first_tap(ow0 + v, g.sw, g.pw, g.dw);
  }
  const int w0 = ow0 * g.sw - g.pw;
  for (int i = i0, ih = h0 + i0 * g.dh; i < g.kh && ih < g.H; ++i, ih += g.dh) {
    const T* row = xp + static_cast<int64_t>(ih) * g.W;
    for (int j = 0; j < g.kw; ++j) {
      DTK_UNROLL
      for (int v = 0; v < V; ++v) {
        const int iw = w0 + v * g.sw + j * g.dw;
        if (v < nv && iw >= 0 && iw < g.W) pool_fold(static_cast<A>(row[iw]), i * g.kw + j, m[v], tap[v]);
      }
    }
  }
  const int64_t o = r * g.Wo + ow0;
  DTK_UNROLL
  for (int v = 0; v < V; ++v)
    if (v < nv) {
      out[o + v] = static_cast<T>(m[v]);
      pool_store_results(idx, off, o + v, tap[v], h0, w0 + v * g.sw, g);
    }
}

// Backward item q: one input pixel and a pack of N of its elements (NHWC; N = 1 for
// NCHW), gathering in ascending (oh, ow) order, ATen's summation order.
template <typename T, typename O, int N, bool NHWC>
C10_HOST_DEVICE C10_ALWAYS_INLINE void pool_backward_item(int64_t q, const T* go, const O* off, T* gi,
                                                          const PoolDims& g) {
  using A = at::opmath_type<T>;
  using P = Pack<T, N>;
  const int B = NHWC ? g.C : 1;
  const PoolItem it = pool_split<N, NHWC>(q, g, g.H, g.W, PoolFastSplit{});
  const int ih = it.y, iw = it.x;
  const int64_t base = it.plane * g.Ho * g.Wo;
  int ohl, ohh, owl, owh;
  window_range(ih, g.kh, g.sh, g.ph, g.dh, g.Ho, ohl, ohh);
  window_range(iw, g.kw, g.sw, g.pw, g.dw, g.Wo, owl, owh);
  A acc[N];
  DTK_UNROLL
  for (int k = 0; k < N; ++k) acc[k] = A(0);
  for (int oh = ohl; oh <= ohh; ++oh) {
    const int ni = ih + g.ph - oh * g.sh;
    if (ni % g.dh) continue;
    const int ti = (ni / g.dh) * g.kw;
    for (int ow = owl; ow <= owh; ++ow) {
      const int nj = iw + g.pw - ow * g.sw;
      if (nj % g.dw) continue;
      const int tap = ti + nj / g.dw;
      const int64_t o = (base + static_cast<int64_t>(oh) * g.Wo + ow) * B + it.c;
      const P gv = *reinterpret_cast<const P*>(go + o);
      DTK_UNROLL
      for (int k = 0; k < N; ++k)
        if (static_cast<int>(off[o + k]) == tap) acc[k] += static_cast<A>(gv.v[k]);
    }
  }
  P res;
  DTK_UNROLL
  for (int k = 0; k < N; ++k) res.v[k] = static_cast<T>(acc[k]);
  *reinterpret_cast<P*>(gi + it.pix * B + it.c) = res;
}

// The pack the default kernels take, as launch(N, NHWC, items): NCHW one element per
// item; NHWC 16-byte packs when C allows and both pointers are 16-byte aligned.
template <typename T, typename Launch>
void with_pool_layout(bool nhwc, int64_t C, int64_t elems, const void* a, const void* b, Launch launch) {
  constexpr int N = 16 / sizeof(T);
  if (!nhwc) launch(std::integral_constant<int, 1>{}, std::false_type{}, elems);
  else if (C % N == 0 && aligned_to(a, 16) && aligned_to(b, 16))
    launch(std::integral_constant<int, N>{}, std::true_type{}, elems / N);
  else launch(std::integral_constant<int, 1>{}, std::true_type{}, elems);
}

// Calls f(PAIRS) with the pairs mode (pool_forward_item) of a channels_last forward
// in packs of N that asked for pairs: 1 without taps (indices, offsets), 2 with them
// where tap numbers fit 16 bits; 0, the scan, where 16-bit packs of two do not apply.
template <typename T, int N, typename F>
void with_nhwc_pairs(bool pairs, bool taps, const PoolDims& g, F f) {
  if constexpr (sizeof(T) == 2 && N % 2 == 0) {
    if (pairs && !taps) return f(std::integral_constant<int, 1>{});
    if (pairs && g.kh * g.kw <= 0x10000) return f(std::integral_constant<int, 2>{});
  }
  f(std::integral_constant<int, 0>{});
}

// Calls f(O{}) with the offsets' integer type (int8 when the forward kept none).
template <typename F>
void with_offset_type(int64_t elem_size, F f) {
  if (elem_size == 2) f(int16_t{});
  else if (elem_size == 4) f(int32_t{});
  else f(int8_t{});
}

// ---- The CUDA NCHW backward "rows", per thread ------------------------------------------------
//
// NCHW backward of V consecutive input columns iw0.. of input row ih of a plane:
// acc[v] = the sum of grad_out over the windows whose maximum is column iw0 + v, in
// ascending (oh, ow) order (ATen's order, so results are bit-identical to a gather
// per element). Each window's gradient and offset are read once for all V columns,
// and the only divisions are per thread, not per element or window.
// K > 0: a square window of side K, stride S, padding PAD and dilation 1 in both
// dimensions, known at compile time (the caller checked g), so every division by the
// stride and the dilation is by a constant.
template <int V, int K = 0, int S = 0, int PAD = 0, typename T, typename O, typename A>
C10_HOST_DEVICE C10_ALWAYS_INLINE void pool_backward_columns(const T* go, const O* off, const PoolDims& g_in,
                                                             int64_t plane, int ih, int iw0, A (&acc)[V]) {
  PoolDims g = g_in;
  if constexpr (K > 0) {
    g.kh = g.kw = K;
    g.sh = g.sw = S;
    g.ph = g.pw = PAD;
    g.dh = g.dw = 1;
  }
  DTK_UNROLL
  for (int v = 0; v < V; ++v) acc[v] = A(0);
  int ohl, ohh, owl, owh, unused;
  window_range(ih, g.kh, g.sh, g.ph, g.dh, g.Ho, ohl, ohh);
  window_range(iw0, g.kw, g.sw, g.pw, g.dw, g.Wo, owl, unused);
  const int last = iw0 + V - 1 < g.W - 1 ? iw0 + V - 1 : g.W - 1;
  window_range(last, g.kw, g.sw, g.pw, g.dw, g.Wo, unused, owh);
  for (int oh = ohl; oh <= ohh; ++oh) {
    const int ni = ih + g.ph - oh * g.sh;
    if (ni % g.dh) continue;
    const int ti = (ni / g.dh) * g.kw;  // tap number of this row's first column
    const int64_t base = (plane * g.Ho + oh) * g.Wo;
    for (int ow = owl; ow <= owh; ++ow) {
      const int j = static_cast<int>(off[base + ow]) - ti;  // the winning tap's column, if in this row
      const int v = ow * g.sw - g.pw + j * g.dw - iw0;
      if (j < 0 || j >= g.kw) continue;
      const A gv = static_cast<A>(go[base + ow]);
      DTK_UNROLL  // constant indices: acc stays in registers
      for (int k = 0; k < V; ++k)
        if (v == k) acc[k] += gv;
    }
  }
}

// ---- The CUDA NCHW forward "vec", per thread --------------------------------------------------
//
// A thread computes V consecutive outputs of one output row from 16-byte loads: per
// window row, the 32 input bytes at columns [ow0*S, ow0*S + V*S) plus one 16-byte
// vector on each side that the windows reach into. The column geometry (kernel K,
// stride S, padding PAD, dilation 1) is a template, so every tap is a register;
// rows stay general. Rows must be whole 16-byte vectors (W % P == 0), so a vector is
// either inside the row or outside it; outside ones read as -inf, which the scan
// rule never takes, so they act as skipped taps. The result is the generic kernel's
// (and ATen's), bit for bit.
template <typename T, int K, int S, int PAD>
struct PoolVec {
  static constexpr int P = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
  static constexpr int V = 2 * P / S;                          // outputs per thread
  static constexpr int L = PAD > 0 ? 1 : 0;                    // vectors left of the 32 bytes
  static constexpr int R = K - 1 - PAD >= S ? 1 : 0;           // and right of them
  static constexpr int NV = L + 2 + R;
  static_assert(PAD <= P && K - 1 - PAD - S < P, "windows reach one vector beyond at most");
  // The first and the last element of the NV vectors that the windows read, and for
  // 16-bit pairs (pool_vec_pairs_row) the words of vector u that hold them.
  static constexpr int E0 = L * P - PAD, E1 = E0 + (V - 1) * S + K - 1;
  C10_HOST_DEVICE static constexpr int first_word(int u) { return E0 / 2 > u * P / 2 ? E0 / 2 : u * P / 2; }
  C10_HOST_DEVICE static constexpr int words_of(int u) {
    const int last = E1 / 2 < (u + 1) * P / 2 - 1 ? E1 / 2 : (u + 1) * P / 2 - 1;
    return last >= first_word(u) ? last - first_word(u) + 1 : 0;
  }
};

// Returns f(K, S, PAD) (std::integral_constants; f says whether it ran) when the vec
// forward has this geometry: the column shapes of common encoders, rows of whole
// vectors; false otherwise.
template <typename T, typename F>
bool with_pool_vec_geometry(const PoolDims& g, F f) {
  if (g.dw != 1 || g.W % PoolVec<T, 2, 2, 0>::P != 0 || g.kh * g.kw > 128) return false;
  using two = std::integral_constant<int, 2>;
  using three = std::integral_constant<int, 3>;
  using zero = std::integral_constant<int, 0>;
  using one = std::integral_constant<int, 1>;
  if (g.kw == 2 && g.sw == 2 && g.pw == 0) return f(two{}, two{}, zero{});
  if (g.kw == 3 && g.sw == 2 && g.pw == 1) return f(three{}, two{}, one{});
  if (g.kw == 3 && g.sw == 2 && g.pw == 0) return f(three{}, two{}, zero{});
  if (g.kw == 3 && g.sw == 1 && g.pw == 1) return f(three{}, one{}, one{});
  return false;
}

// Returns f(K, S, PAD) (std::integral_constants) for a square window of a common
// shape (side K, stride S, padding PAD, dilation 1, in both dimensions), else
// f(0, 0, 0): the geometry stays a runtime value.
template <typename F>
auto with_pool_square_geometry(const PoolDims& g, F f) {
  using two = std::integral_constant<int, 2>;
  using three = std::integral_constant<int, 3>;
  using zero = std::integral_constant<int, 0>;
  using one = std::integral_constant<int, 1>;
  const bool square = g.kh == g.kw && g.sh == g.sw && g.ph == g.pw && g.dh == 1 && g.dw == 1;
  if (square && g.kw == 2 && g.sw == 2 && g.pw == 0) return f(two{}, two{}, zero{});
  if (square && g.kw == 3 && g.sw == 2 && g.pw == 1) return f(three{}, two{}, one{});
  if (square && g.kw == 3 && g.sw == 2 && g.pw == 0) return f(three{}, two{}, zero{});
  if (square && g.kw == 3 && g.sw == 1 && g.pw == 1) return f(three{}, one{}, one{});
  return f(zero{}, zero{}, zero{});
}

// The ResNet stem's window: 3x3, stride 2, padding 1, dilation 1, in both dimensions.
inline bool pool_is_stem(const PoolDims& g) {
  return g.kh == 3 && g.kw == 3 && g.sh == 2 && g.sw == 2 && g.ph == 1 && g.pw == 1 && g.dh == 1 && g.dw == 1;
}

// Calls f(K, S, PAD, RH) (std::integral_constants; f says whether it ran) for the vec
// forward of this geometry with RH output rows per thread item: RH = 0 is the default
// kernel (any row geometry, one output row); RH = 1 or 2 (`rows`) compiles the rows in
// too, for the ResNet stem's square k3s2p1 window only. false when there is no such
// kernel. The RH > 0 kernels are candidates for the stem forward, not yet measured on
// a GPU: only benchmarks/ and the tests ask for them (the op would, through kStemRows
// in csrc/cuda/max_pool2d.cu).
template <typename T, typename F>
bool with_pool_vec_kernel(const PoolDims& g, int rows, F f) {
  return with_pool_vec_geometry<T>(g, [&](auto k, auto s, auto p) {
    using zero = std::integral_constant<int, 0>;
    constexpr int K = decltype(k)::value, S = decltype(s)::value, PAD = decltype(p)::value;
    if (rows == 0) return f(k, s, p, zero{});
    if constexpr (K == 3 && S == 2 && PAD == 1) {
      if (!pool_is_stem(g)) return false;
      if (rows == 1) return f(k, s, p, std::integral_constant<int, 1>{});
      if (rows == 2) return f(k, s, p, std::integral_constant<int, 2>{});
    }
    return false;
  });
}

// The vec forward's thread items: q = (plane * blocks + block) * groups + ow0 / V, a
// block being one output row (RH = 0, 1) or RH of them.
struct PoolVecItems {
  int64_t groups, blocks, n;
};

template <typename T, int K, int S, int PAD, int RH>
PoolVecItems pool_vec_items(const PoolDims& g, int64_t planes) {
  constexpr int V = PoolVec<T, K, S, PAD>::V, R = RH > 0 ? RH : 1;
  const int64_t groups = (g.Wo + V - 1) / V, blocks = (g.Ho + R - 1) / R;
  return PoolVecItems{groups, blocks, planes * blocks * groups};
}

// One window row i (input row loaded in buf) folded into V outputs' running maxima.
template <typename T, int K, int S, int PAD, typename A, typename Shape = PoolVec<T, K, S, PAD>>
C10_HOST_DEVICE C10_ALWAYS_INLINE void pool_vec_fold_row(const Pack<T, Shape::P> (&buf)[Shape::NV], int i,
                                                         A (&m)[Shape::V], int (&tap)[Shape::V]) {
  constexpr int P = Shape::P, V = Shape::V;
  DTK_UNROLL
  for (int j = 0; j < K; ++j) {
    DTK_UNROLL
    for (int v = 0; v < V; ++v) {
      constexpr int base = Shape::L * P - PAD;
      const int e = base + v * S + j;  // constant once unrolled
      pool_fold(static_cast<A>(buf[e / P].v[e % P]), i * K + j, m[v], tap[v]);
    }
  }
}

// Elements e0 and e1 of a row's loaded words (two elements each) as a pair: with
// constant indices a register, or one byte permute.
template <int NW>
C10_HOST_DEVICE C10_ALWAYS_INLINE uint32_t pool_pair(const uint32_t (&wd)[NW], int e0, int e1) {
  if (e0 % 2 == 0 && e1 == e0 + 1) return wd[e0 / 2];
#if defined(__CUDA_ARCH__)
  return __byte_perm(wd[e0 / 2], wd[e1 / 2], (e0 % 2 ? 0x32 : 0x10) | (e1 % 2 ? 0x76 : 0x54) << 8);
#else
  return ((wd[e0 / 2] >> (16 * (e0 % 2))) & 0xFFFFu) | ((wd[e1 / 2] >> (16 * (e1 % 2))) << 16);
#endif
}

// One input row's maxima for V outputs in pairs: r[w] holds outputs 2w and 2w + 1's,
// over their K taps in this row, left to right, and (TAPS) rt[w] their taps in the
// row (0..K-1, the first of equal values). wd: the row's NV vectors as words; nan
// takes in every word the windows read from.
template <typename T, int K, int S, int PAD, bool TAPS = false, typename Shape = PoolVec<T, K, S, PAD>>
C10_HOST_DEVICE C10_ALWAYS_INLINE void pool_vec_pairs_row(const uint32_t (&wd)[Shape::NV * Shape::P / 2],
                                                          uint32_t (&r)[Shape::V / 2], uint32_t (&rt)[Shape::V / 2],
                                                          uint32_t& nan) {
  constexpr int P = Shape::P, V = Shape::V, base = Shape::E0;
  constexpr int first = Shape::E0 / 2, last = Shape::E1 / 2;
  static_assert(V % 2 == 0 && P % 2 == 0 && last < Shape::NV * P / 2, "whole words inside the loaded vectors");
  DTK_UNROLL
  for (int w = first; w <= last; ++w) nan = pair_nan<T>(nan, wd[w]);
  DTK_UNROLL
  for (int w = 0; w < V / 2; ++w) {
    const int e = base + 2 * w * S;  // output 2w's first tap in this row; 2w + 1's is S further
    r[w] = pool_pair(wd, e, e + S);
    if (TAPS) rt[w] = 0;
    DTK_UNROLL
    for (int j = 1; j < K; ++j) {
      const uint32_t x = pool_pair(wd, e + j, e + S + j), gt = pair_gt_mask<T>(x, r[w]);
      r[w] = pair_select(gt, x, r[w]);
      if (TAPS) rt[w] = pair_select(gt, static_cast<uint32_t>(j) * 0x10001u, rt[w]);
    }
  }
}

// V outputs of each of R output rows (RH > 0: RH, else 1) from oh0, ow0 of one plane,
// whose input row ih lies at xp + (ih - row0) * W (row0 > 0: the rows a shared-memory
// tile holds, which are all the rows these windows read inside the input). orow: the
// first output row's number among all planes' rows. Writes out, and when given the int8
// offsets and ATen's int64 indices. `packed`: Wo % V == 0 and the outputs aligned, so
// every group is whole and stores as one pack. RH = 0: rows are any geometry, scanned
// in a loop. RH > 0: the caller checked that the rows are the columns' (K, S, PAD,
// dilation 1), so the (RH - 1) * S + K input rows of RH output rows unroll (their loads
// can issue together), and output rows that share an input row load it once; rows
// outside the input are clamped to its edge rows (row0 must be 0).
// PAIRS (16-bit T): compare values two at a time (see pool_vec_pairs_row), 1 for the
// values only (taken without indices and offsets), 2 with their taps too; an item that
// reads a NaN falls back to the scan.
template <typename T, int K, int S, int PAD, int RH = 0, int PAIRS = 0>
C10_HOST_DEVICE C10_ALWAYS_INLINE void pool_vec_outputs(const T* xp, int row0, int oh0, int ow0, int64_t orow, T* out,
                                                        int64_t* idx, int8_t* off, const PoolDims& g, bool packed) {
  using A = at::opmath_type<T>;
  using Shape = PoolVec<T, K, S, PAD>;
  constexpr int P = Shape::P, V = Shape::V, L = Shape::L, NV = Shape::NV, R = RH > 0 ? RH : 1;
  static_assert(PAIRS == 0 || sizeof(T) == 2, "pairs of 16-bit values");
  const int b = ow0 * S;  // a multiple of P
  const T ninf = static_cast<T>(-std::numeric_limits<A>::infinity());
  // Loads input row ih's vectors; those outside the row read as -inf. RH > 0: rows
  // outside the input read as -inf too, and every load is of a clamped, in-bounds
  // address, unconditional, so that the loads of all rows can issue before any fold.
  const auto load = [&](int ih, Pack<T, P>(&buf)[NV]) {
    const bool row_in = ih >= 0 && ih < g.H;
    const T* row = xp + static_cast<int64_t>((RH > 0 ? (ih < 0 ? 0 : row_in ? ih : g.H - 1) : ih) - row0) * g.W;
    DTK_UNROLL
    for (int u = 0; u < NV; ++u) {
      const int c = b + (u - L) * P;
      const bool in = c >= 0 && c < g.W;
      if constexpr (RH > 0) {
        const Pack<T, P> v = *reinterpret_cast<const Pack<T, P>*>(row + (c < 0 ? 0 : in ? c : g.W - P));
        DTK_UNROLL
        for (int e = 0; e < P; ++e) buf[u].v[e] = in && row_in ? v.v[e] : ninf;
      } else if (in) {
        buf[u] = *reinterpret_cast<const Pack<T, P>*>(row + c);
      } else {
        DTK_UNROLL
        for (int e = 0; e < P; ++e) buf[u].v[e] = ninf;
      }
    }
  };
  const int i0 = pool_first_tap(oh0, g.sh, g.ph, g.dh);
  // The scan's start: -inf at each window's first tap inside the input.
  A m[R][V];
  int tap[R][V];
  DTK_UNROLL
  for (int t = 0; t < R; ++t) {
    const int i0t = t == 0 ? i0 : pool_first_tap(oh0 + t, g.sh, g.ph, g.dh);
    DTK_UNROLL
    for (int v = 0; v < V; ++v) {
      const int j0 = PAD - (ow0 + v) * S;  // taps in the left padding
      m[t][v] = -std::numeric_limits<A>::infinity();
      tap[t][v] = i0t * K + (j0 > 0 ? j0 : 0);
    }
  }
  Pack<T, V> vals[PAIRS > 0 ? R : 1];  // the pairs' maxima, as stored
  bool done = false;   // by the pairs
  if constexpr (PAIRS > 0) {
    if (PAIRS == 2 || (idx == nullptr && off == nullptr)) {
      constexpr bool TAPS = PAIRS == 2;
      constexpr int W2 = V / 2, H = P / 2, NW = NV * H;
      const uint32_t ninf2 = pair_ninf<T>();
      // The vectors' columns: voff[u] from the row's start (RH > 0: clamped in bounds),
      // vin[u] whether inside the row; all_in: every vector the windows read is.
      int voff[NV];
      bool vin[NV], all_in = true;
      DTK_UNROLL
      for (int u = 0; u < NV; ++u) {
        const int c = b + (u - L) * P;
        vin[u] = c >= 0 && c < g.W;
        voff[u] = RH > 0 ? (c < 0 ? 0 : vin[u] ? c : g.W - P) : c;
        if (Shape::words_of(u) > 0) all_in = all_in && vin[u];
      }
      // The words of a row that the windows read (pool_vec_pairs_row), -inf where
      // outside the row or (row_in false) the input. check false: all are inside.
      // (check is a constant at each call. A generic lambda taking it as a type made
      // nvcc 13.0's cicc crash.)
      const auto load_words = [&](const T* row, bool row_in, bool check, uint32_t(&wd)[NW]) {
        DTK_UNROLL
        for (int u = 0; u < NV; ++u) {
          const int lo = Shape::first_word(u), n = Shape::words_of(u);  // constants once unrolled
          const T* at = row + voff[u] + 2 * (lo - u * H);
          const bool in = !check || (vin[u] && row_in);
          if (n == H) {  // the whole vector: one 16-byte load
            Pack<uint32_t, H> v;
            if (RH > 0 || in) v = *reinterpret_cast<const Pack<uint32_t, H>*>(at);
            DTK_UNROLL
            for (int e = 0; e < H; ++e) wd[lo + e] = in ? v.v[e] : ninf2;
          } else {
            DTK_UNROLL
            for (int e = 0; e < H; ++e)
              if (e < n) wd[lo + e] = in ? reinterpret_cast<const uint32_t*>(at)[e] : ninf2;
          }
        }
      };
      // Running maxima and (TAPS) their taps in pairs, from the scan's start.
      uint32_t mp[R][W2], tp[R][W2], nan = 0;
      DTK_UNROLL
      for (int t = 0; t < R; ++t) {
        DTK_UNROLL
        for (int w = 0; w < W2; ++w) {
          mp[t][w] = ninf2;
          tp[t][w] = static_cast<uint32_t>(tap[t][2 * w]) | static_cast<uint32_t>(tap[t][2 * w + 1]) << 16;
        }
      }
      // Folds window row i's maxima (rw) and taps in the row (rt) into output row t's.
      const auto fold = [&](int t, int i, const uint32_t(&rw)[W2], const uint32_t(&rt)[W2]) {
        DTK_UNROLL
        for (int w = 0; w < W2; ++w) {
          const uint32_t gt = pair_gt_mask<T>(rw[w], mp[t][w]);
          mp[t][w] = pair_select(gt, rw[w], mp[t][w]);
          if (TAPS) tp[t][w] = pair_select(gt, rt[w] + static_cast<uint32_t>(i * K) * 0x10001u, tp[t][w]);
        }
      };
      if constexpr (RH == 0) {
        const auto rows = [&](auto check) {
          const int ih0 = oh0 * g.sh - g.ph + i0 * g.dh;
          const T* row = xp + static_cast<int64_t>(ih0 - row0) * g.W;
          const int64_t step = static_cast<int64_t>(g.dh) * g.W;
          for (int i = i0, ih = ih0; i < g.kh && ih < g.H; ++i, ih += g.dh, row += step) {
            uint32_t wd[NW], rw[W2], rt[W2];
            load_words(row, true, check, wd);
            pool_vec_pairs_row<T, K, S, PAD, TAPS>(wd, rw, rt, nan);
            fold(0, i, rw, rt);
          }
        };
        if (all_in) rows(std::false_type{});
        else rows(std::true_type{});
      } else {
        DTK_UNROLL
        for (int u = 0; u < (R - 1) * S + K; ++u) {
          uint32_t wd[NW], rw[W2], rt[W2];
          const int ih = oh0 * S - PAD + u;
          const bool row_in = ih >= 0 && ih < g.H;
          const int at = (ih < 0 ? 0 : row_in ? ih : g.H - 1) - row0;
          load_words(xp + static_cast<int64_t>(at) * g.W, row_in, std::true_type{}, wd);
          pool_vec_pairs_row<T, K, S, PAD, TAPS>(wd, rw, rt, nan);
          DTK_UNROLL
          for (int t = 0; t < R; ++t)
            if (u - t * S >= 0 && u - t * S < K) fold(t, u - t * S, rw, rt);
        }
      }
      done = !pair_has_nan<T>(nan);
      if (done) {
        DTK_UNROLL
        for (int t = 0; t < R; ++t) {
          DTK_UNROLL
          for (int w = 0; w < W2; ++w) {
            vals[t].v[2 * w] = pair_value<T>(mp[t][w], 0);
            vals[t].v[2 * w + 1] = pair_value<T>(mp[t][w], 1);
            if (TAPS) {
              tap[t][2 * w] = static_cast<int>(tp[t][w] & 0xFFFFu);
              tap[t][2 * w + 1] = static_cast<int>(tp[t][w] >> 16);
            }
          }
        }
      }
    }
  }
  if (!done) {  // the scan, ATen's rule in row-major order
    if constexpr (RH == 0) {
      for (int i = i0, ih = oh0 * g.sh - g.ph + i0 * g.dh; i < g.kh && ih < g.H; ++i, ih += g.dh) {
        Pack<T, P> buf[NV];
        load(ih, buf);
        pool_vec_fold_row<T, K, S, PAD>(buf, i, m[0], tap[0]);
      }
    } else {
      DTK_UNROLL
      for (int u = 0; u < (R - 1) * S + K; ++u) {  // input rows in ascending order: each window's taps in scan order
        Pack<T, P> buf[NV];
        load(oh0 * S - PAD + u, buf);  // -inf outside the input: skipped taps
        DTK_UNROLL
        for (int t = 0; t < R; ++t)
          if (u - t * S >= 0 && u - t * S < K) pool_vec_fold_row<T, K, S, PAD>(buf, u - t * S, m[t], tap[t]);
      }
    }
  }
  DTK_UNROLL
  for (int t = 0; t < R; ++t) {
    const int oh = oh0 + t;
    if (RH > 1 && oh >= g.Ho) break;
    const int64_t o = (orow + t) * g.Wo + ow0;
    // the value of output v of row t: the pairs' when they made it, else the scan's
    const auto value = [&](int v) {
      if constexpr (PAIRS > 0) {
        if (done) return vals[t].v[v];
      }
      return static_cast<T>(m[t][v]);
    };
    if (packed) {
      Pack<T, V> pv;
      DTK_UNROLL
      for (int v = 0; v < V; ++v) pv.v[v] = value(v);
      *reinterpret_cast<Pack<T, V>*>(out + o) = pv;
      if (off) {
        Pack<int8_t, V> po;
        DTK_UNROLL
        for (int v = 0; v < V; ++v) po.v[v] = static_cast<int8_t>(tap[t][v]);
        *reinterpret_cast<Pack<int8_t, V>*>(off + o) = po;
      }
    } else {
      DTK_UNROLL
      for (int v = 0; v < V; ++v)
        if (ow0 + v < g.Wo) {
          out[o + v] = value(v);
          if (off) off[o + v] = static_cast<int8_t>(tap[t][v]);
        }
    }
    if (idx) {
      const int h0 = oh * g.sh - g.ph;
      DTK_UNROLL
      for (int v = 0; v < V; ++v)
        if (ow0 + v < g.Wo)
          idx[o + v] = static_cast<int64_t>(h0 + (tap[t][v] / K) * g.dh) * g.W + (ow0 + v) * S - PAD + tap[t][v] % K;
    }
  }
}

// Thread item q of the vec forward (see pool_vec_items): its plane, first output row
// and first output column, then pool_vec_outputs from the input in global memory.
// `blocks` divides by the items' blocks of output rows.
template <typename T, int K, int S, int PAD, int RH = 0, int PAIRS = 0>
C10_HOST_DEVICE C10_ALWAYS_INLINE void pool_forward_vec(uint32_t q, const T* x, T* out, int64_t* idx, int8_t* off,
                                                        const PoolDims& g, const FastDivmod& groups,
                                                        const FastDivmod& blocks, bool packed) {
  constexpr int V = PoolVec<T, K, S, PAD>::V, R = RH > 0 ? RH : 1;
  const uint32_t r = groups.div(q);
  const int ow0 = static_cast<int>(q - r * groups.d) * V;
  const uint32_t plane = blocks.div(r);
  const int oh0 = static_cast<int>(r - plane * blocks.d) * R;
  const int64_t orow = R == 1 ? static_cast<int64_t>(r) : static_cast<int64_t>(plane) * g.Ho + oh0;
  pool_vec_outputs<T, K, S, PAD, RH, PAIRS>(x + static_cast<int64_t>(plane) * g.H * g.W, 0, oh0, ow0, orow, out, idx,
                                            off, g, packed);
}

// ---- A candidate for the NCHW forward: the input through a shared-memory tile ---------------
//
// A block takes th output rows of one plane. Its threads first copy the input rows those
// windows read (clipped to the input; contiguous in NCHW) into shared memory with 16-byte
// loads, several in flight per thread: each input byte crosses from L2 once, where the
// vec forward reads the vectors its neighbours read too and the input rows that two
// output rows share twice. Then each thread item computes V outputs of a row from the
// tile (pool_vec_outputs, RH = 0). The vec forward's geometries; not yet measured on a
// GPU (the op's kernels do not use it; benchmarks/ and the tests ask for it).
constexpr int kPoolTileThreads = 256;  // the most threads a block has

struct PoolTilePlan {
  int64_t th = 0, tiles = 0, blocks = 0, bytes = 0;  // th = 0: no tile fits the budget
  int threads = 0;
};

// Output rows per tile for tiles of at most `budget` bytes, balanced across a plane's
// tiles; each block's shared memory (bytes), the blocks for `planes` planes, and the
// threads of a block: whole warps, as few as take its items (`groups` per output row)
// in as few rounds as 256 threads would (the stem's 392 items: 2 rounds of 224).
template <typename T>
inline PoolTilePlan pool_tile_plan(const PoolDims& g, int64_t planes, int64_t budget, int64_t groups) {
  const int64_t row = static_cast<int64_t>(g.W) * sizeof(T), fit = budget / row;
  const int64_t span = static_cast<int64_t>(g.kh - 1) * g.dh + 1;  // a window's input rows
  PoolTilePlan p;
  if (fit >= g.H) p.th = g.Ho;
  else if (fit >= span) p.th = std::min<int64_t>((fit - span) / g.sh + 1, g.Ho);
  else return p;
  p.tiles = (g.Ho + p.th - 1) / p.th;
  p.th = (g.Ho + p.tiles - 1) / p.tiles;
  p.bytes = std::min<int64_t>((p.th - 1) * g.sh + span, g.H) * row;
  p.blocks = planes * p.tiles;
  const int64_t items = p.th * groups, rounds = (items + kPoolTileThreads - 1) / kPoolTileThreads;
  p.threads = static_cast<int>(std::min<int64_t>(((items + rounds - 1) / rounds + 31) / 32 * 32, kPoolTileThreads));
  return p;
}

struct PoolTile {  // block b's: its plane, output rows [oh0, oh1), input rows [lo, hi)
  uint32_t plane;
  int oh0, oh1, lo, hi;
};

C10_HOST_DEVICE C10_ALWAYS_INLINE PoolTile pool_tile(uint32_t b, const PoolDims& g, int th, const FastDivmod& tiles) {
  PoolTile t;
  t.plane = tiles.div(b);
  t.oh0 = static_cast<int>(b - t.plane * tiles.d) * th;
  t.oh1 = t.oh0 + th < g.Ho ? t.oh0 + th : g.Ho;
  const int lo = t.oh0 * g.sh - g.ph, hi = (t.oh1 - 1) * g.sh - g.ph + (g.kh - 1) * g.dh + 1;
  t.lo = lo > 0 ? lo : 0;  // ATen's output size keeps every window's first row below H
  t.hi = hi < g.H ? hi : g.H;
  return t;
}

// Thread tid of n copies its 16-byte vectors of tile t's input rows to `tile`, B loads
// issued before their stores.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void pool_tile_load(int tid, int n, const T* x, T* tile, const PoolDims& g,
                                                      const PoolTile& t) {
  constexpr int P = 16 / static_cast<int>(sizeof(T)), B = 4;
  using Vec = Pack<T, P>;
  const Vec* src = reinterpret_cast<const Vec*>(x + (static_cast<int64_t>(t.plane) * g.H + t.lo) * g.W);
  Vec* dst = reinterpret_cast<Vec*>(tile);
  const int nv = (t.hi - t.lo) * (g.W / P);
  for (int v = tid; v < nv; v += B * n) {
    Vec r[B];
    DTK_UNROLL
    for (int k = 0; k < B; ++k)
      if (v + k * n < nv) r[k] = src[v + k * n];
    DTK_UNROLL
    for (int k = 0; k < B; ++k)
      if (v + k * n < nv) dst[v + k * n] = r[k];
  }
}

// Thread tid of n computes its items of tile t (V outputs of a row each; `groups`
// divides by the groups of V in an output row) from the tile.
template <typename T, int K, int S, int PAD, int PAIRS = 0>
C10_HOST_DEVICE C10_ALWAYS_INLINE void pool_tile_outputs(int tid, int n, const T* tile, T* out, int64_t* idx,
                                                         int8_t* off, const PoolDims& g, const PoolTile& t,
                                                         const FastDivmod& groups, bool packed) {
  constexpr int V = PoolVec<T, K, S, PAD>::V;
  const uint32_t items = static_cast<uint32_t>(t.oh1 - t.oh0) * groups.d;
  for (uint32_t q = tid; q < items; q += n) {
    const uint32_t r = groups.div(q);
    const int oh = t.oh0 + static_cast<int>(r);
    pool_vec_outputs<T, K, S, PAD, 0, PAIRS>(tile, t.lo, oh, static_cast<int>(q - r * groups.d) * V,
                                             static_cast<int64_t>(t.plane) * g.Ho + oh, out, idx, off, g, packed);
  }
}

inline PoolBackward prepare_backward(const at::Tensor& grad_out, const at::Tensor& offsets,
                                     at::IntArrayRef input_size, at::IntArrayRef k, at::IntArrayRef s,
                                     at::IntArrayRef p, at::IntArrayRef d, bool channels_last) {
  PoolBackward b;
  b.g = pool2d_backward_geometry(grad_out, offsets, input_size, k, s, p, d, channels_last);
  const auto fmt = pool_format(b.g);
  b.grad_input = new_empty(input_size, grad_out.options(), fmt);
  if (b.grad_input.numel() != 0) {
    b.grad_out = grad_out.contiguous(fmt);
    b.offsets = offsets.contiguous(fmt);
  }
  return b;
}

namespace cpu {
// Test aid: whether the CPU kernels take small NCHW planes whole (the default) or by
// rows, as larger planes go; returns the setting.
bool set_whole_planes(bool on);
// The CUDA forward but the vec kernel (pool_forward_item / pool_forward_rows per thread
// item, in the pack with_pool_layout picks; fast_split: channels_last's 32-bit split,
// which the launcher takes below 2^31 items; pairs: channels_last 16-bit packs compared
// two channels at a time, as launch_nhwc_forward) run on the host: (out, indices,
// offsets) as _max_pool2d gives them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> emulate_cuda_max_pool2d(
    const at::Tensor& input, std::vector<int64_t> kernel_size, std::vector<int64_t> stride,
    std::vector<int64_t> padding, std::vector<int64_t> dilation, bool ceil_mode, bool channels_last,
    bool return_indices, bool return_offsets, bool fast_split, bool pairs);
// The CUDA channels_last backward (pool_backward_item per thread item; NCHW too beyond
// 2^31 items) run on the host.
at::Tensor emulate_cuda_max_pool2d_backward(const at::Tensor& grad_out, const at::Tensor& offsets,
                                            std::vector<int64_t> input_size, std::vector<int64_t> kernel_size,
                                            std::vector<int64_t> stride, std::vector<int64_t> padding,
                                            std::vector<int64_t> dilation, bool channels_last);
// The CUDA NCHW "vec" forward with `rows` output rows per thread item
// (pool_forward_vec per item; see with_pool_vec_kernel), comparing 16-bit values in
// pairs where asked (PAIRS), or (tile_bytes > 0) through shared-memory tiles of at
// most that many bytes (each block's threads load, then compute), run on the host:
// (out, indices, offsets) as _max_pool2d gives them; an error for a geometry or dtype
// it lacks.
std::tuple<at::Tensor, at::Tensor, at::Tensor> emulate_cuda_forward_vec(
    const at::Tensor& input, std::vector<int64_t> kernel_size, std::vector<int64_t> stride,
    std::vector<int64_t> padding, std::vector<int64_t> dilation, bool ceil_mode, bool return_indices,
    bool return_offsets, int64_t rows, bool pairs, int64_t tile_bytes);
// The CUDA NCHW "rows" backward (pool_backward_columns per thread item) run on the host.
at::Tensor emulate_cuda_backward_rows(const at::Tensor& grad_out, const at::Tensor& offsets,
                                      std::vector<int64_t> input_size, std::vector<int64_t> kernel_size,
                                      std::vector<int64_t> stride, std::vector<int64_t> padding,
                                      std::vector<int64_t> dilation);
}  // namespace cpu

namespace cuda {
// Benchmark and test aid (CUDA builds): the NCHW vec forward with `rows` output rows
// per thread item, with full_grid a block per 256 items, with pairs 16-bit values
// compared in pairs, with tile_bytes > 0 through shared-memory tiles of at most that
// many bytes; an error where that kernel does not run (the op would take another).
std::tuple<at::Tensor, at::Tensor, at::Tensor> max_pool2d_vec_variant(
    const at::Tensor& input, std::vector<int64_t> kernel_size, std::vector<int64_t> stride,
    std::vector<int64_t> padding, std::vector<int64_t> dilation, bool ceil_mode, int64_t rows, bool full_grid,
    bool pairs, bool return_indices, bool return_offsets, int64_t tile_bytes);
// Benchmark and test aid (CUDA builds): the channels_last forward, with pairs 16-bit
// channels compared two at a time (an error where the packs are not whole, or where
// taps are asked for windows of more than 2^16 taps).
std::tuple<at::Tensor, at::Tensor, at::Tensor> max_pool2d_nhwc_variant(
    const at::Tensor& input, std::vector<int64_t> kernel_size, std::vector<int64_t> stride,
    std::vector<int64_t> padding, std::vector<int64_t> dilation, bool ceil_mode, bool pairs, bool return_indices,
    bool return_offsets);
}  // namespace cuda

}  // namespace dtkernels
