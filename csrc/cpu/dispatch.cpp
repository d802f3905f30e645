// Registers the CPU kernels of the instruction set this CPU runs (csrc/cpu/kernels.h).
//
// The choice is made once, when the module loads, and follows ATen's own (at::get_cpu_capability,
// which honours ATEN_CPU_CAPABILITY): our kernels then use the same vector width as the ATen ops
// around them, and forcing the baseline for ATen forces it for pyamalgam too.
#include <ATen/Version.h>
#include <torch/library.h>

#include <string>

#include "cpu/dispatch.h"
#include "cpu/kernels.h"
#include "pairwise_affinity.h"

namespace pyamalgam::cpu {
namespace {

bool runs_avx2() {
#ifdef PYAMALGAM_CPU_HAVE_AVX2
  const std::string aten = at::get_cpu_capability();
  return (aten == "AVX2" || aten == "AVX512") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool use_avx2() {
  static const bool chosen = runs_avx2();
  return chosen;
}

}  // namespace

const char* isa() { return use_avx2() ? "avx2" : "base"; }

const char* compiled_isas() {
#ifdef PYAMALGAM_CPU_HAVE_AVX2
  return "base,avx2";
#else
  return "base";
#endif
}

}  // namespace pyamalgam::cpu

#ifdef PYAMALGAM_CPU_HAVE_AVX2
#define PYAMALGAM_CPU_KERNEL(name) (pyamalgam::cpu::use_avx2() ? &pyamalgam::cpu::avx2::name : &pyamalgam::cpu::base::name)
#else
#define PYAMALGAM_CPU_KERNEL(name) (&pyamalgam::cpu::base::name)
#endif

namespace pyamalgam {

std::pair<at::Tensor, at::Tensor> normalized_nodes_cpu(const at::Tensor& f, int64_t patch) {
  static const auto kernel = PYAMALGAM_CPU_KERNEL(normalized_nodes);
  return kernel(f, patch);
}

at::Tensor normalized_nodes_backward_cpu(const at::Tensor& grad_hat, const at::Tensor& hat, const at::Tensor& inv,
                                         const at::Tensor& f, int64_t patch) {
  static const auto kernel = PYAMALGAM_CPU_KERNEL(normalized_nodes_backward);
  return kernel(grad_hat, hat, inv, f, patch);
}

TORCH_LIBRARY_IMPL(pyamalgam, CPU, m) {
  m.impl("channel_coding", PYAMALGAM_CPU_KERNEL(channel_coding));
  m.impl("channel_coding_backward", PYAMALGAM_CPU_KERNEL(channel_coding_backward));
  m.impl("soft_argmax_depth", PYAMALGAM_CPU_KERNEL(soft_argmax_depth));
  m.impl("soft_argmax_depth_backward", PYAMALGAM_CPU_KERNEL(soft_argmax_depth_backward));
  m.impl("si_depth_loss", PYAMALGAM_CPU_KERNEL(si_depth_loss));
  m.impl("si_depth_loss_backward", PYAMALGAM_CPU_KERNEL(si_depth_loss_backward));
}

}  // namespace pyamalgam
