// The schemas of every dtkernels operator, declared once.
//
// Public ops (no underscore) are what users, autograd and torch.compile see; their
// CPU/CUDA kernels and autograd are in csrc/ops/<op>.cpp, which route each call
// (csrc/dispatch.h) to the native kernel `_<op>` (csrc/cpu/<op>.cpp,
// csrc/cuda/<op>.cu) or to `_<op>_py`, whose kernels are registered from Python
// (dtkernels/backends.py: Triton and the reference). Both take the full schema.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include "common.h"
#include "dispatch.h"
#include "unboxed.h"
#include "concat_skip.h"
#include "max_pool2d.h"
#include "cpu/simd.h"

#ifdef DTK_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace {

// Declares a kernel schema "_<op>(...)" twice: the native kernel and its Python twin.
void def_kernel(torch::Library& m, const std::string& schema) {
  const auto paren = schema.find('(');
  m.def(schema.c_str());
  m.def((schema.substr(0, paren) + "_py" + schema.substr(paren)).c_str());
}

}  // namespace

TORCH_LIBRARY(dtkernels, m) {
  // residual_add: act(x + alpha * fx); backward: scale * grad where out > 0.
  m.def("residual_add(Tensor x, Tensor fx, float alpha=1., bool relu=True) -> Tensor");
  m.def("residual_add_backward(Tensor grad_out, Tensor out, float scale=1.) -> Tensor");
  def_kernel(m, "_residual_add(Tensor x, Tensor fx, float alpha, bool relu) -> Tensor");
  def_kernel(m, "_residual_add_backward(Tensor grad_out, Tensor out, float scale) -> Tensor");

  // concat_skip: cat([up(x), skip], 1) (skip_first: cat([skip, up(x)], 1)), up = None
  // (identity), "nearest" or "bilinear" (align_corners as F.interpolate's, bilinear
  // only) by the integer scale_factor. Its backward is views except
  // for the upsample's adjoint, concat_skip_backward: grad_up is the x-part of the
  // output gradient (N, Cx, H*s, W*s), the result x's gradient (N, Cx, H, W).
  m.def("concat_skip(Tensor x, Tensor skip, str? upsample=None, int scale_factor=2, bool align_corners=False, "
        "bool skip_first=False) -> Tensor");
  m.def("concat_skip_backward(Tensor grad_up, str? upsample, int scale_factor, bool align_corners=False) -> Tensor");
  def_kernel(m, "_concat_skip(Tensor x, Tensor skip, str? upsample, int scale_factor, bool align_corners=False, "
        "bool skip_first=False) -> Tensor");
  def_kernel(m, "_concat_skip_backward(Tensor grad_up, str? upsample, int scale_factor, bool align_corners=False) "
        "-> Tensor");

  // dense_block: a DenseNet-BC block (dtkernels.nn.DenseBlock) writing every layer's
  // features into one preallocated buffer, which is also its output. weights: per
  // layer [norm1.weight, norm1.bias, conv1.weight, norm2.weight, norm2.bias,
  // conv2.weight]; running: per layer [norm1 mean, var, norm2 mean, var] in eval
  // mode, empty in training mode. Besides the output it returns what backward needs:
  // each layer's bottleneck (conv1 output) and, in training, the batch statistics
  // (mean and biased var of the buffer's channels, then of each bottleneck).
  m.def("dense_block(Tensor x, Tensor[] weights, Tensor[] running, int growth_rate, bool training, "
        "float eps) -> (Tensor, Tensor[], Tensor[])");
  m.def("dense_block_backward(Tensor grad_out, Tensor out, Tensor[] bottlenecks, Tensor[] stats, "
        "Tensor[] weights, Tensor[] running, int growth_rate, bool training, float eps) -> (Tensor, Tensor[])");
  // max_pool2d: F.max_pool2d -> (out, int64 indices or empty, window offsets or empty);
  // backward keeps the offsets (the tap i*kw+j inside the window; int8 up to 128 taps),
  // which are made whenever autograd records, whatever return_offsets says.
  m.def("max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
        "bool ceil_mode=False, bool channels_last=False, bool return_indices=False, bool return_offsets=False) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("max_pool2d_backward(Tensor grad_out, Tensor offsets, SymInt[] input_size, int[2] kernel_size, "
        "int[2] stride, int[2] padding, int[2] dilation, bool channels_last=False) -> Tensor");
  def_kernel(m, "_max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
        "bool ceil_mode, bool channels_last, bool return_indices, bool return_offsets) -> (Tensor, Tensor, Tensor)");
  def_kernel(m, "_max_pool2d_backward(Tensor grad_out, Tensor offsets, SymInt[] input_size, int[2] kernel_size, "
        "int[2] stride, int[2] padding, int[2] dilation, bool channels_last) -> Tensor");
}

namespace {

const char* cpu_isa() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4 (AVX-512)";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2)";
  return "x86-64 (SSE2)";
#else
  return "unknown";
#endif
}

pybind11::dict build_info() {
  pybind11::dict d;
  d["torch_built_with"] = TORCH_VERSION;
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = "unknown";
#endif
#ifdef _OPENMP
  d["openmp"] = _OPENMP;
#else
  d["openmp"] = pybind11::none();
#endif
#if defined(DTK_NO_CLONES)
  d["cpu_dispatch"] = "none (DTK_NO_CLONES)";
#elif defined(__x86_64__)
  d["cpu_dispatch"] = "target_clones: x86-64-v4, x86-64-v3, default";
#else
  d["cpu_dispatch"] = "none";
#endif
  d["cpu_isa_selected"] = cpu_isa();
#ifdef DTK_WITH_CUDA
  d["cuda"] = true;
  d["cuda_runtime_built_with"] = CUDART_VERSION;
#else
  d["cuda"] = false;
  d["cuda_runtime_built_with"] = pybind11::none();
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dtkernels native kernels (operators live in torch.ops.dtkernels)";
  m.def("build_info", &build_info, "How this native library was compiled.");
  m.def("_set_backend", [](int code) { dtkernels::backend_setting().store(code); },
        "The backend code (dtkernels.backends.BACKENDS index, -1 unknown) public ops route by.");
  m.def("_backend", []() { return dtkernels::current_backend(); });
  m.def("_set_auto_cuda_native", [](const std::string& op, bool native) {
        auto& routes = dtkernels::Route::registry();
        auto it = routes.find(op);
        TORCH_CHECK(it != routes.end(), "dtkernels: no C++ route for op ", op);
        it->second->set_auto_cuda_native(native);
      }, "Whether backend 'auto' runs op's native kernel on CUDA tensors (else the registry decides).");
  m.def("_routed_ops", []() {
        std::vector<std::string> names;
        for (const auto& kv : dtkernels::Route::registry()) names.push_back(kv.first);
        return names;
      });
  namespace py = pybind11;
  m.def("_emulate_cuda_max_pool2d_forward_vec", &dtkernels::cpu::emulate_cuda_forward_vec,
        "Test aid: the CUDA NCHW max_pool2d vec forward's per-thread code, run on the host.",
        py::arg("input"), py::arg("kernel_size"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("ceil_mode"), py::arg("return_indices"), py::arg("return_offsets"), py::arg("rows"),
        py::arg("pairs"), py::arg("tile_bytes") = 0);
#ifdef DTK_WITH_CUDA
  m.def("_cuda_max_pool2d_vec_variant", &dtkernels::cuda::max_pool2d_vec_variant,
        "Benchmark and test aid: the CUDA NCHW max_pool2d vec forward with a given number of output rows "
        "per thread item and grid, 16-bit values compared in pairs or not, through shared-memory tiles or not.",
        py::arg("input"), py::arg("kernel_size"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("ceil_mode"), py::arg("rows"), py::arg("full_grid"), py::arg("pairs"), py::arg("return_indices"),
        py::arg("return_offsets"), py::arg("tile_bytes") = 0);
  m.def("_cuda_max_pool2d_nhwc_variant", &dtkernels::cuda::max_pool2d_nhwc_variant,
        "Benchmark and test aid: the CUDA channels_last max_pool2d forward (out, indices, offsets), 16-bit "
        "channels compared in pairs or not.",
        py::arg("input"), py::arg("kernel_size"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("ceil_mode"), py::arg("pairs"), py::arg("return_indices") = false, py::arg("return_offsets") = false);
  m.def("_cuda_concat_skip_backward_variant", &dtkernels::cuda::concat_skip_backward_variant,
        "Benchmark and test aid: the CUDA concat_skip backward, bilinear packs by the candidate bilinear_pack "
        "when shared_packs.",
        py::arg("grad_up"), py::arg("upsample"), py::arg("scale_factor"), py::arg("align_corners") = false,
        py::arg("shared_packs") = false);
#endif
  m.def("_fast_divmod", [](const at::Tensor& n, int64_t d) {
        TORCH_CHECK(d >= 1 && d < (int64_t(1) << 31), "_fast_divmod: divisor out of range");
        const dtkernels::FastDivmod f(static_cast<uint32_t>(d));
        at::Tensor q = at::empty_like(n);
        auto ni = n.contiguous();
        const int64_t* src = ni.const_data_ptr<int64_t>();
        int64_t* dst = q.mutable_data_ptr<int64_t>();
        for (int64_t i = 0; i < n.numel(); ++i) dst[i] = f.div(static_cast<uint32_t>(src[i]));
        return q;
      }, "Test aid: FastDivmod's quotients (the CUDA kernels' index divisions) for int64 numerators below 2^31.");
  m.def("_emulate_cuda_concat_skip", &dtkernels::cpu::emulate_cuda_concat_skip,
        "Test aid: the CUDA concat_skip forward's per-thread code, run on the host.",
        py::arg("x"), py::arg("skip"), py::arg("upsample"), py::arg("scale_factor"),
        py::arg("align_corners") = false, py::arg("skip_first") = false);
  m.def("_emulate_cuda_concat_skip_backward", &dtkernels::cpu::emulate_cuda_concat_skip_backward,
        "Test aid: the CUDA concat_skip backward's per-thread code, run on the host.",
        py::arg("grad_up"), py::arg("upsample"), py::arg("scale_factor"),
        py::arg("align_corners") = false, py::arg("shared_packs") = false);
  m.def("_emulate_cuda_max_pool2d", &dtkernels::cpu::emulate_cuda_max_pool2d,
        "Test aid: the CUDA max_pool2d forward's per-thread code but the NCHW vec kernel's (fast_split: "
        "channels_last's 32-bit item split, taken below 2^31 items; pairs: channels_last 16-bit packs compared "
        "two channels at a time), run on the host.");
  m.def("_emulate_cuda_max_pool2d_backward", &dtkernels::cpu::emulate_cuda_max_pool2d_backward,
        "Test aid: the CUDA max_pool2d backward's per-thread code for channels_last (and NCHW beyond 2^31 "
        "items), run on the host.");
  m.def("_emulate_cuda_max_pool2d_backward_rows", &dtkernels::cpu::emulate_cuda_backward_rows,
        "Test aid: the CUDA NCHW max_pool2d backward's per-thread code (16 bytes of a row per thread), "
        "run on the host.");
  m.def("_set_cpu_f16c", [](bool on) {
        dtkernels::cpu::f16c_flag().store(on && dtkernels::cpu::cpu_has_f16c());
        return dtkernels::cpu::cpu_f16c();
      }, "Test aid: float16 CPU kernels through F16C (if the CPU has it; returns whether they are) or the clones.");
  m.def("_set_cpu_max_pool2d_whole", &dtkernels::cpu::set_whole_planes,
        "Test aid: whether the CPU max_pool2d kernels take small NCHW planes whole (default) or by rows.");
  m.def("_set_poison", [](bool on) { dtkernels::poison_flag().store(on); },
        "Debug: fill native kernel outputs with NaN / -77 before writing them.");
  m.def("_poison", []() { return dtkernels::poison_flag().load(); });
  for (const auto& def : dtkernels::unboxed_entries()) def(m);
}
