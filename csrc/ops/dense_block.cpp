// dense_block: the DenseNet-BC block on one shared buffer (dtkernels.nn.DenseBlock),
// an ATen composition for any device, with its autograd, in C++: a 12-layer block
// makes ~450 ATen calls per training step, and from Python each cost several times
// what it costs from here (on a GPU the host time exceeded the kernels' time).
//
// torchvision's block concatenates every earlier feature map again in every layer and
// keeps, per layer, the concatenation, the BN1-ReLU output, the bottleneck and the
// BN2-ReLU output for backward: saved memory grows with the square of the depth. Here:
//
// Forward: one (N, C0 + L*g, H, W) buffer in x's memory format, which is also the
// output. x is copied into its first C0 channels; layer i reads the prefix
// buf[:, :C0 + i*g] (a view), computes BN1-ReLU -> 1x1 conv -> BN2-ReLU -> 3x3 conv
// and copies its g new channels into its slice. In training, batch statistics are
// per channel and a channel never changes once written, so each channel's mean and
// variance are computed once, when it is written, and reused by every later layer's
// BN1 (which only differs in its affine weights).
//
// Saved for backward: the buffer (once: it is the output), each layer's bottleneck
// (the 1x1 conv's output, bn_size*g channels: linear in depth), the per-channel
// batch statistics (training) and the weights. Nothing else: BN1-ReLU of the prefix
// and BN2-ReLU of the bottleneck are recomputed in backward from those, with the
// forward's statistics (train) or the running ones (eval), so running statistics are
// updated once, by the module, from the statistics this op returns. (Recomputing the
// 1x1 convolution too would cut saved memory from 0.22x to 0.05x of torchvision's at
// the shape, for one more convolution per layer; the bottleneck is kept.)
//
// Backward: one gradient buffer, a copy of the output's gradient; walking the layers
// backwards, layer i's gradient is complete in its slice when it is reached, and its
// input gradient is added in place into the prefix slice: no per-layer concatenation
// or split, no copy of the prefix. BN1 is recomputed from the prefix view as a dense
// x_hat, and ATen's batch-norm backward runs on x_hat (mean 0, invstd 1, weight
// scaled by invstd), which is exact and avoids ATen's slow strided path.
//
// Mixed precision (what torch.autocast passes, see dense_block_autocast): the conv
// weights may all be one 16-bit dtype below x's. The convolutions then run in it and
// the bottlenecks are kept in it; the buffer, batch norms and statistics stay in x's.
//
// The fake kernels and the double-backward error are in dtkernels/ops/dense_block.py.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../common.h"
#include "../dispatch.h"

namespace dtkernels {
namespace {

constexpr const char* kOp = "dense_block";
// Per layer: norm1.weight, norm1.bias, conv1.weight, norm2.weight, norm2.bias, conv2.weight.
constexpr int64_t kPerLayer = 6;

using at::Tensor;
using at::TensorList;
using Outputs = std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>>;
using Grads = std::tuple<Tensor, std::vector<Tensor>>;

at::MemoryFormat block_format(const Tensor& t) {
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous;
}

// The Python layer's checks (dtkernels/ops/dense_block.py: _check), same order and words.
void check(const Tensor& x, TensorList weights, TensorList running, int64_t g, bool training) {
  check_float(x, "x", kOp);
  TORCH_CHECK_VALUE(x.dim() == 4, kOp, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  const int64_t n_weights = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(n_weights > 0 && n_weights % kPerLayer == 0, kOp, ": weights must hold ", kPerLayer,
                    " tensors per layer, got ", n_weights);
  const int64_t layers = n_weights / kPerLayer;
  TORCH_CHECK_VALUE(static_cast<int64_t>(running.size()) == (training ? 0 : 4 * layers), kOp,
                    ": running must be empty in training mode and hold 4 tensors per layer in eval mode, got ",
                    running.size());
  const int64_t c = x.size(1);
  // The convolutions may run in one 16-bit dtype below x's (torch.autocast's mixed precision).
  const auto conv_dtype = weights[2].scalar_type();
  const bool conv_ok = conv_dtype == x.scalar_type() || conv_dtype == at::kHalf || conv_dtype == at::kBFloat16;
  for (int64_t i = 0; i < layers; ++i) {
    const Tensor& n1w = weights[kPerLayer * i];
    const Tensor& c1w = weights[kPerLayer * i + 2];
    const Tensor& c2w = weights[kPerLayer * i + 5];
    TORCH_CHECK_VALUE(n1w.size(0) == c + i * g && c1w.size(1) == c + i * g, kOp, ": layer ", i + 1, " expects ",
                      c1w.size(1), " input channels, but x has ", c, " and growth_rate is ", g);
    TORCH_CHECK_VALUE(c2w.size(0) == g && c2w.size(1) == c1w.size(0), kOp, ": layer ", i + 1,
                      "'s conv2 must map ", c1w.size(0), " to ", g, " channels, got weight ", c2w.sizes());
    for (int64_t k = 0; k < kPerLayer; ++k) {
      const Tensor& t = weights[kPerLayer * i + k];
      const bool conv = k == 2 || k == 5;
      TORCH_CHECK_VALUE(
          t.device() == x.device() && (conv ? conv_ok && t.scalar_type() == conv_dtype : t.scalar_type() == x.scalar_type()),
          kOp, ": weights must match x's dtype and device (", dtype_name(x.scalar_type()), ", ", x.device(), "), got ",
          dtype_name(t.scalar_type()), " on ", t.device(), " (the conv weights may instead all be one 16-bit dtype)");
    }
  }
  TORCH_CHECK_VALUE(!training || x.size(0) * x.size(2) * x.size(3) > 1, kOp,
                    ": expected more than 1 value per channel when training, got input size ", x.sizes());
}

Tensor per_channel(const Tensor& v) { return v.view({1, -1, 1, 1}); }

// A convolution's operand in the conv weights' dtype (mixed precision; else as is).
Tensor as_dtype(const Tensor& t, const Tensor& like) {
  return t.scalar_type() == like.scalar_type() ? t : t.to(like.scalar_type());
}

Tensor invstd_of(const Tensor& var, double eps) { return at::rsqrt(var + eps); }

// relu(batch_norm(x)) with given statistics, as ATen's CPU kernel computes it
// (x * scale + shift); reads a channel-sliced view without copying it first.
Tensor bn_relu(const Tensor& x, const Tensor& mean, const Tensor& invstd, const Tensor& weight, const Tensor& bias) {
  const Tensor scale = weight * invstd;
  const Tensor shift = bias - mean * scale;
  return at::addcmul(per_channel(shift), x, per_channel(scale)).relu_();
}

// ATen's training-mode batch norm, as torchvision's BatchNorm2d runs it: the
// normalised output and the batch mean, unbiased variance and invstd. The running
// buffers handed to it are zeros with momentum 1, so they come back holding exactly
// the batch mean and unbiased variance ATen folds into running statistics.
struct BatchStats {
  Tensor y, mean, var, invstd;
};

// With mixed precision, t (a bottleneck) is 16-bit and the statistics are in the
// norm weights' dtype, as ATen's mixed-type batch norm keeps them.
BatchStats batch_norm_train(const Tensor& t, const Tensor& weight, const Tensor& bias, double eps,
                            at::ScalarType stats_dtype) {
  BatchStats s;
  s.mean = at::zeros({t.size(1)}, t.options().dtype(stats_dtype));
  s.var = at::zeros({t.size(1)}, t.options().dtype(stats_dtype));
  Tensor saved_mean;
  std::tie(s.y, saved_mean, s.invstd) = at::native_batch_norm(t, weight, bias, s.mean, s.var, true, 1.0, eps);
  return s;
}

Outputs dense_block(const Tensor& x, TensorList weights, TensorList running, int64_t g, bool training,
                    double eps) {
  check(x, weights, running, g, training);
  const int64_t n = x.size(0), c0 = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t layers = static_cast<int64_t>(weights.size()) / kPerLayer;
  const auto fmt = block_format(x);
  Tensor out = new_empty({n, c0 + layers * g, h, w}, x.options(), fmt);  // every channel is written below
  out.narrow(1, 0, c0).copy_(x);
  std::vector<Tensor> bottlenecks, stats;
  Tensor mean1, var1, invstd1, mean2, var2, invstd2;
  if (training) {
    // Per buffer channel (the last layer's features feed no norm1), then per layer's
    // bottleneck: mean, unbiased variance (for the running statistics) and invstd
    // (for backward).
    const int64_t c1 = c0 + (layers - 1) * g, width = weights[2].size(0);
    mean1 = x.new_empty({c1}), var1 = x.new_empty({c1}), invstd1 = x.new_empty({c1});
    mean2 = x.new_empty({layers, width}), var2 = x.new_empty({layers, width}), invstd2 = x.new_empty({layers, width});
    const BatchStats s = batch_norm_train(x, {}, {}, eps, x.scalar_type());
    mean1.narrow(0, 0, c0).copy_(s.mean);
    var1.narrow(0, 0, c0).copy_(s.var);
    invstd1.narrow(0, 0, c0).copy_(s.invstd);
  }
  for (int64_t i = 0; i < layers; ++i) {
    const int64_t ci = c0 + i * g;
    const Tensor &n1w = weights[kPerLayer * i], &n1b = weights[kPerLayer * i + 1], &c1w = weights[kPerLayer * i + 2],
                 &n2w = weights[kPerLayer * i + 3], &n2b = weights[kPerLayer * i + 4], &c2w = weights[kPerLayer * i + 5];
    const Tensor m1 = training ? mean1.narrow(0, 0, ci) : running[4 * i];
    const Tensor is1 = training ? invstd1.narrow(0, 0, ci) : invstd_of(running[4 * i + 1], eps);
    Tensor z = at::conv2d(as_dtype(bn_relu(out.narrow(1, 0, ci), m1, is1, n1w, n1b), c1w), c1w).contiguous(fmt);
    Tensor a2;
    if (training) {
      BatchStats s = batch_norm_train(z, n2w, n2b, eps, x.scalar_type());
      mean2.select(0, i).copy_(s.mean);
      var2.select(0, i).copy_(s.var);
      invstd2.select(0, i).copy_(s.invstd);
      a2 = s.y.relu_();
    } else {
      a2 = bn_relu(z, running[4 * i + 2], invstd_of(running[4 * i + 3], eps), n2w, n2b);
    }
    Tensor fresh = as_dtype(at::conv2d(as_dtype(a2, c2w), c2w, {}, 1, 1), x);
    a2.reset();
    out.narrow(1, ci, g).copy_(fresh);
    if (training && i + 1 < layers) {  // the new channels' statistics, for every later norm1
      const BatchStats s = batch_norm_train(fresh, {}, {}, eps, x.scalar_type());
      mean1.narrow(0, ci, g).copy_(s.mean);
      var1.narrow(0, ci, g).copy_(s.var);
      invstd1.narrow(0, ci, g).copy_(s.invstd);
    }
    bottlenecks.push_back(std::move(z));
  }
  if (training) stats = {mean1, var1, invstd1, mean2, var2, invstd2};
  return {out, bottlenecks, stats};
}

// Gradients of relu(batch_norm(x)) = y w.r.t. x, weight and bias, by ATen's own ReLU
// and batch-norm backward kernels.
std::tuple<Tensor, Tensor, Tensor> bn_relu_backward(const Tensor& grad, const Tensor& y, const Tensor& x,
                                                    const Tensor& weight, const Tensor& mean, const Tensor& invstd,
                                                    const Tensor& running_mean, const Tensor& running_var,
                                                    bool training, double eps) {
  const Tensor gy = at::threshold_backward(grad, y, 0);
  if (training)
    return at::native_batch_norm_backward(gy, x, weight, {}, {}, mean, invstd, true, eps, {true, true, true});
  // Eval: empty saved statistics, as autograd passes them (ATen's CUDA kernel asserts
  // they are defined, then recomputes invstd from the running variance).
  const Tensor none = weight.new_empty({0});  // in the statistics' dtype (16-bit x: mixed precision)
  return at::native_batch_norm_backward(gy, x, weight, running_mean, running_var, none, none, false, eps,
                                        {true, true, true});
}

// x_hat = (x - mean) * invstd, dense, from a (channel-sliced) view.
Tensor normalized(const Tensor& x, const Tensor& mean, const Tensor& invstd) {
  return at::addcmul(per_channel(-mean * invstd), x, per_channel(invstd));
}

// Gradients of y = relu(xhat * weight + bias), xhat = (x - mean) * invstd, w.r.t. x,
// weight and bias from the recomputed dense xhat, so the prefix is never copied.
// Training: ATen's batch-norm backward run on xhat as if its mean were 0 and its
// invstd 1, with weight * invstd, is exactly the batch-statistics gradient. Eval: the
// statistics are constants, x's gradient a per-channel scale.
std::tuple<Tensor, Tensor, Tensor> bn_relu_backward_normalized(const Tensor& grad, const Tensor& y, const Tensor& xhat,
                                                               const Tensor& weight, const Tensor& invstd,
                                                               bool training) {
  const Tensor gy = at::threshold_backward(grad, y, 0);
  if (training) {
    const Tensor ones = xhat.new_ones({xhat.size(1)});
    return at::native_batch_norm_backward(gy, xhat, weight * invstd, {}, {}, ones * 0, ones, true, 0.0,
                                          {true, true, true});
  }
  const std::vector<int64_t> dims{0, 2, 3};
  return {gy * per_channel(weight * invstd), (gy * xhat).sum(dims), gy.sum(dims)};
}

std::tuple<Tensor, Tensor> conv_backward(const Tensor& grad, const Tensor& input, const Tensor& weight,
                                         int64_t padding) {
  auto r = at::convolution_backward(grad, input, weight, std::nullopt, {1, 1}, {padding, padding}, {1, 1}, false,
                                    {0, 0}, 1, {true, true, false});
  return {std::get<0>(r), std::get<1>(r)};
}

// The gradient in its weight's layout (what the fake kernel promises).
Tensor like_weight(const Tensor& grad, const Tensor& weight) {
  return grad.strides() == weight.strides() ? grad : at::empty_like(weight).copy_(grad);
}

// The backward op's contract, for direct calls: autograd passes the forward's own
// lists, but the op indexes them unchecked.
void check_backward(const Tensor& grad_out, const Tensor& out, TensorList bottlenecks, TensorList stats,
                    TensorList weights, TensorList running, int64_t g, bool training) {
  const int64_t layers = static_cast<int64_t>(bottlenecks.size());
  const int64_t n_stats = training ? 6 : 0, n_running = training ? 0 : 4 * layers;
  TORCH_CHECK_VALUE(layers >= 1 && static_cast<int64_t>(weights.size()) == kPerLayer * layers &&
                        static_cast<int64_t>(stats.size()) == n_stats &&
                        static_cast<int64_t>(running.size()) == n_running,
                    kOp, "_backward: for ", layers, " bottlenecks expected ", kPerLayer * layers, " weights, ", n_stats,
                    " statistics and ", n_running, " running statistics, got ", weights.size(), ", ", stats.size(),
                    " and ", running.size());
  TORCH_CHECK_VALUE(out.dim() == 4 && grad_out.sizes() == out.sizes() && grad_out.scalar_type() == out.scalar_type() &&
                        grad_out.device() == out.device(),
                    kOp, "_backward: grad_out must match out's 4-D shape, dtype and device, got ", grad_out.sizes(),
                    " and ", out.sizes());
  const int64_t c0 = out.size(1) - layers * g;
  TORCH_CHECK_VALUE(g >= 1 && c0 >= 1, kOp, "_backward: out's ", out.size(1), " channels cannot hold ", layers,
                    " layers of growth_rate ", g, " after the input's");
  check(out.narrow(1, 0, c0), weights, running, g, training);
  const std::vector<int64_t> bottleneck{out.size(0), weights[2].size(0), out.size(2), out.size(3)};
  for (const Tensor& b : bottlenecks)
    TORCH_CHECK_VALUE(b.sizes() == bottleneck && b.scalar_type() == weights[2].scalar_type() && b.device() == out.device(),
                      kOp, "_backward: bottlenecks must be ", at::IntArrayRef(bottleneck), " in the conv weights' dtype, got ",
                      b.sizes());
  if (training) {
    const std::vector<int64_t> c1{c0 + (layers - 1) * g}, per_layer{layers, weights[2].size(0)};
    for (size_t k = 0; k < 6; ++k)
      TORCH_CHECK_VALUE(stats[k].sizes() == at::IntArrayRef(k < 3 ? c1 : per_layer) &&
                            stats[k].scalar_type() == out.scalar_type() && stats[k].device() == out.device(),
                        kOp, "_backward: statistic ", k, " must be ", at::IntArrayRef(k < 3 ? c1 : per_layer),
                        " in out's dtype, got ", stats[k].sizes());
  }
}

Grads dense_block_backward(const Tensor& grad_out, const Tensor& out, TensorList bottlenecks, TensorList stats,
                           TensorList weights, TensorList running, int64_t g, bool training, double eps) {
  check_backward(grad_out, out, bottlenecks, stats, weights, running, g, training);
  const int64_t layers = static_cast<int64_t>(bottlenecks.size());
  const int64_t c0 = out.size(1) - layers * g;
  const auto fmt = block_format(out);
  // One gradient buffer for the whole block: each layer's input gradient is added
  // into its prefix, so a layer's own slice is complete when the walk reaches it.
  Tensor gbuf = at::empty_like(out, fmt).copy_(grad_out);
  std::vector<Tensor> grads(weights.size());
  for (int64_t i = layers - 1; i >= 0; --i) {
    const int64_t ci = c0 + i * g;
    const Tensor &n1w = weights[kPerLayer * i], &n1b = weights[kPerLayer * i + 1], &c1w = weights[kPerLayer * i + 2],
                 &n2w = weights[kPerLayer * i + 3], &n2b = weights[kPerLayer * i + 4], &c2w = weights[kPerLayer * i + 5];
    Tensor m1, is1, m2, is2, rm2, rv2;
    if (training) {
      m1 = stats[0].narrow(0, 0, ci), is1 = stats[2].narrow(0, 0, ci);
      m2 = stats[3].select(0, i), is2 = stats[5].select(0, i);
    } else {
      m1 = running[4 * i], is1 = invstd_of(running[4 * i + 1], eps);
      rm2 = running[4 * i + 2], rv2 = running[4 * i + 3];
      m2 = rm2, is2 = invstd_of(rv2, eps);
    }
    const Tensor& z = bottlenecks[i];
    Tensor a2 = as_dtype(bn_relu(z, m2, is2, n2w, n2b), c2w);  // recomputed, not saved
    auto [ga2, gw2] = conv_backward(as_dtype(gbuf.narrow(1, ci, g), c2w), a2, c2w, 1);
    auto [gz, gn2w, gn2b] = bn_relu_backward(ga2, a2, z, n2w, m2, is2, rm2, rv2, training, eps);
    a2.reset();
    ga2.reset();
    // BN1 is recomputed from the prefix view as a dense x_hat (ATen's batch-norm
    // backward is several times slower on a channel-sliced view), then ReLU.
    Tensor xhat = normalized(out.narrow(1, 0, ci), m1, is1);
    Tensor a1 = at::addcmul(per_channel(n1b), xhat, per_channel(n1w)).relu_();
    auto [ga1, gw1] = conv_backward(gz, as_dtype(a1, c1w), c1w, 0);
    gz.reset();
    ga1 = as_dtype(ga1, n1w);
    auto [gp, gn1w, gn1b] = bn_relu_backward_normalized(ga1, a1, xhat, n1w, is1, training);
    a1.reset();
    ga1.reset();
    xhat.reset();
    gbuf.narrow(1, 0, ci).add_(gp);
    const Tensor layer[kPerLayer] = {gn1w, gn1b, gw1, gn2w, gn2b, gw2};
    for (int64_t k = 0; k < kPerLayer; ++k) grads[kPerLayer * i + k] = like_weight(layer[k], weights[kPerLayer * i + k]);
  }
  return {gbuf.narrow(1, 0, c0).clone(fmt), grads};
}

// ---- autograd ----------------------------------------------------------------------------

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Fwd = Outputs(const Tensor&, TensorList, TensorList, int64_t, bool, double);
using Bwd = Grads(const Tensor&, const Tensor&, TensorList, TensorList, TensorList, TensorList, int64_t, bool, double);

const c10::TypedOperatorHandle<Fwd>& public_op() {
  static const auto op = op_handle<Fwd>("dtkernels::dense_block");
  return op;
}

struct DenseBlock : torch::autograd::Function<DenseBlock> {
  // Outputs flattened: [out, bottlenecks..., stats...]; inputs x, weights..., running...
  static variable_list forward(AutogradContext* ctx, const Tensor& x, TensorList weights, TensorList running,
                               int64_t g, bool training, double eps) {
    auto [out, bottlenecks, stats] = call_below_autograd(public_op(), x, weights, running, g, training, eps);
    variable_list res{out};
    res.insert(res.end(), bottlenecks.begin(), bottlenecks.end());
    res.insert(res.end(), stats.begin(), stats.end());
    ctx->mark_non_differentiable(variable_list(res.begin() + 1, res.end()));  // for backward's sake only
    // The buffer once (it is the output), the bottlenecks, the statistics, the weights.
    variable_list saved(res);
    saved.insert(saved.end(), weights.begin(), weights.end());
    saved.insert(saved.end(), running.begin(), running.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["counts"] = std::vector<int64_t>{static_cast<int64_t>(bottlenecks.size()),
                                                     static_cast<int64_t>(stats.size()),
                                                     static_cast<int64_t>(weights.size())};
    ctx->saved_data["g"] = g;
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    return res;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op_handle<Bwd>("dtkernels::dense_block_backward");
    const auto counts = ctx->saved_data["counts"].toIntVector();
    const int64_t nb = counts[0], ns = counts[1], nw = counts[2];
    const variable_list saved = ctx->get_saved_variables();
    const auto part = [&](int64_t from, int64_t count) {
      return std::vector<Tensor>(saved.begin() + from, saved.begin() + from + count);
    };
    const auto bottlenecks = part(1, nb), stats = part(1 + nb, ns), weights = part(1 + nb + ns, nw);
    const auto running = part(1 + nb + ns + nw, static_cast<int64_t>(saved.size()) - 1 - nb - ns - nw);
    auto [gx, gw] = call_in_backward(bwd, grads[0], saved[0], bottlenecks, stats, weights, running,
                                     ctx->saved_data["g"].toInt(), ctx->saved_data["training"].toBool(),
                                     ctx->saved_data["eps"].toDouble());
    // One gradient per forward argument, lists flattened: x, weights, running, g, training, eps.
    variable_list res{gx};
    res.insert(res.end(), gw.begin(), gw.end());
    res.resize(res.size() + running.size() + 3);
    return res;
  }
};

Outputs dense_block_autograd(const Tensor& x, TensorList weights, TensorList running, int64_t g, bool training,
                             double eps) {
  if (!autograd_records(x, weights, running))
    return call_below_autograd(public_op(), x, weights, running, g, training, eps);
  const variable_list r = DenseBlock::apply(x, weights, running, g, training, eps);
  const int64_t layers = static_cast<int64_t>(weights.size()) / kPerLayer;
  return {r[0], std::vector<Tensor>(r.begin() + 1, r.begin() + 1 + layers),
          std::vector<Tensor>(r.begin() + 1 + layers, r.end())};
}

// Under torch.autocast, mixed precision as in a torchvision block under autocast:
// the convolutions run in the autocast dtype (their weights cast, once per autocast
// region, as ATen's conv2d casts them), the batch norms with float32 statistics and
// weights on a float32 buffer, which is the output. A 16-bit x is widened into it.
// A float64 x is left alone, as autocast leaves float64.
template <c10::DeviceType D>
Outputs dense_block_autocast(const Tensor& x, TensorList weights, TensorList running, int64_t g, bool training,
                             double eps) {
  AutocastOff<D> off;
  if (!at::autocast::is_eligible(x, D)) return public_op().call(x, weights, running, g, training, eps);
  const auto low = at::autocast::get_autocast_dtype(D);
  std::vector<Tensor> w(weights.begin(), weights.end());
  for (size_t k = 0; k < w.size(); ++k) {
    const bool conv = k % kPerLayer == 2 || k % kPerLayer == 5;
    w[k] = at::autocast::cached_cast(conv ? low : at::kFloat, w[k], D);
  }
  return public_op().call(at::autocast::cached_cast(at::kFloat, x, D), w,
                          at::autocast::cached_cast(at::kFloat, running, D), g, training, eps);
}

}  // namespace
}  // namespace dtkernels

DTK_REGISTER_PUBLIC_OP(dense_block, &dtkernels::dense_block, &dtkernels::dense_block_backward, &dtkernels::dense_block_autograd)
DTK_REGISTER_AUTOCAST(dense_block, dtkernels::dense_block_autocast)
