// Registers the CPU kernels of the instruction set this CPU runs (csrc/cpu/kernels.h), behind the
// argument checks every backend shares (csrc/checks.h).
//
// The choice is made once, when the module loads, and follows ATen's own (at::get_cpu_capability,
// which honours ATEN_CPU_CAPABILITY): our kernels then use the same vector width as the ATen ops
// around them, and forcing the baseline for ATen forces it for pyamalgam too.
#include <ATen/Version.h>
#include <torch/library.h>

#include <string>

#include "checks.h"
#include "checks_distill.h"
#include "checks_temporal.h"
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

at::Tensor sum_and_difference_cpu(const at::Tensor& b, const at::Tensor& a_rot, at::ScalarType dtype) {
  static const auto kernel = PYAMALGAM_CPU_KERNEL(sum_and_difference);
  return kernel(b, a_rot, dtype);
}

namespace {

// The registered CPU entry points: the shared argument checks (csrc/checks.h), then the kernel of
// the chosen instruction set. The checks live here, in baseline code, not in the kernel files,
// which are compiled once per instruction set.
at::Tensor channel_coding(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                          const at::Tensor& b2) {
  check_channel_coding(x, w1, b1, w2, b2);
  static const auto kernel = PYAMALGAM_CPU_KERNEL(channel_coding);
  return kernel(x, w1, b1, w2, b2);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_coding_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2) {
  check_channel_coding_backward(grad, x, w1, b1, w2, b2);
  static const auto kernel = PYAMALGAM_CPU_KERNEL(channel_coding_backward);
  return kernel(grad, x, w1, b1, w2, b2);
}

at::Tensor soft_argmax_depth(const at::Tensor& logits, double bin_size) {
  check_soft_argmax_depth(logits, bin_size);
  static const auto kernel = PYAMALGAM_CPU_KERNEL(soft_argmax_depth);
  return kernel(logits, bin_size);
}

at::Tensor soft_argmax_depth_backward(const at::Tensor& grad, const at::Tensor& logits, double bin_size) {
  check_soft_argmax_depth_backward(grad, logits, bin_size);
  static const auto kernel = PYAMALGAM_CPU_KERNEL(soft_argmax_depth_backward);
  return kernel(grad, logits, bin_size);
}

at::Tensor si_depth_loss(const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& mask) {
  check_si_depth_loss(pred, target, mask);
  static const auto kernel = PYAMALGAM_CPU_KERNEL(si_depth_loss);
  return kernel(pred, target, mask);
}

std::tuple<at::Tensor, at::Tensor> si_depth_loss_backward(const at::Tensor& grad, const at::Tensor& pred,
                                                          const at::Tensor& target,
                                                          const std::optional<at::Tensor>& mask) {
  check_si_depth_loss_backward(grad, pred, target, mask);
  static const auto kernel = PYAMALGAM_CPU_KERNEL(si_depth_loss_backward);
  return kernel(grad, pred, target, mask);
}

std::tuple<at::Tensor, at::Tensor> channel_wise_loss(const at::Tensor& ys, const at::Tensor& yt, double temperature) {
  check_channel_wise_loss(ys, yt, temperature);
  static const auto kernel = PYAMALGAM_CPU_KERNEL(channel_wise_loss);
  return kernel(ys, yt, temperature);
}

std::tuple<at::Tensor, at::Tensor> channel_wise_loss_backward(const at::Tensor& grad, const at::Tensor& ys,
                                                              const at::Tensor& yt, const at::Tensor& stats,
                                                              double temperature) {
  check_channel_wise_loss_backward(grad, ys, yt, stats, temperature);
  static const auto kernel = PYAMALGAM_CPU_KERNEL(channel_wise_loss_backward);
  return kernel(grad, ys, yt, stats, temperature);
}

at::Tensor pairwise_local_loss(const at::Tensor& fs, const at::Tensor& ft, int64_t radius, int64_t patch) {
  check_pairwise_local_loss(fs, ft, radius, patch);
  static const auto kernel = PYAMALGAM_CPU_KERNEL(pairwise_local_loss);
  return kernel(fs, ft, radius, patch);
}

std::tuple<at::Tensor, at::Tensor> pairwise_local_loss_backward(const at::Tensor& grad, const at::Tensor& fs,
                                                                const at::Tensor& ft, int64_t radius, int64_t patch) {
  check_pairwise_local_loss_backward(grad, fs, ft, radius, patch);
  static const auto kernel = PYAMALGAM_CPU_KERNEL(pairwise_local_loss_backward);
  return kernel(grad, fs, ft, radius, patch);
}

// Thesis 003, Eq. 5.2 (csrc/cpu/pairwise_frames.cpp). The plain loss and backward (direct calls)
// run the forward that keeps what the backward needs; the Python API calls the two halves itself.
cpu::PairwiseFramesSaved pairwise_frames_loss_for_backward(const at::Tensor& fs_t, const at::Tensor& fs_k,
                                                      const at::Tensor& ft_t, const at::Tensor& ft_k, int64_t patch) {
  check_pairwise_frames_loss(fs_t, fs_k, ft_t, ft_k, patch, "pairwise_frames_loss_for_backward");
  static const auto kernel = PYAMALGAM_CPU_KERNEL(pairwise_frames_loss_for_backward);
  return kernel(fs_t, fs_k, ft_t, ft_k, patch);
}

at::Tensor pairwise_frames_loss(const at::Tensor& fs_t, const at::Tensor& fs_k, const at::Tensor& ft_t,
                                const at::Tensor& ft_k, int64_t patch) {
  check_pairwise_frames_loss(fs_t, fs_k, ft_t, ft_k, patch);
  static const auto kernel = PYAMALGAM_CPU_KERNEL(pairwise_frames_loss_for_backward);
  return std::get<0>(kernel(fs_t, fs_k, ft_t, ft_k, patch));
}

using FourGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

FourGrads pairwise_frames_loss_saved_backward(const at::Tensor& grad, const at::Tensor& fs_t, const at::Tensor& fs_k,
                                              const at::Tensor& ft_t, const at::Tensor& ft_k, const at::Tensor& s_hat,
                                              const at::Tensor& s_inv, const at::Tensor& t_hat, const at::Tensor& t_inv,
                                              const at::Tensor& pd, const at::Tensor& coef, int64_t patch) {
  check_pairwise_frames_loss_saved_backward(grad, fs_t, fs_k, ft_t, ft_k, s_hat, s_inv, t_hat, t_inv, pd, coef, patch);
  static const auto kernel = PYAMALGAM_CPU_KERNEL(pairwise_frames_loss_saved_backward);
  return kernel(grad, fs_t, fs_k, ft_t, ft_k, s_hat, s_inv, t_hat, t_inv, pd, coef, patch);
}

FourGrads pairwise_frames_loss_backward(const at::Tensor& grad, const at::Tensor& fs_t, const at::Tensor& fs_k,
                                        const at::Tensor& ft_t, const at::Tensor& ft_k, int64_t patch) {
  check_pairwise_frames_loss_backward(grad, fs_t, fs_k, ft_t, ft_k, patch);
  static const auto forward = PYAMALGAM_CPU_KERNEL(pairwise_frames_loss_for_backward);
  static const auto backward = PYAMALGAM_CPU_KERNEL(pairwise_frames_loss_saved_backward);
  const auto [loss, s_hat, s_inv, t_hat, t_inv, pd, coef] = forward(fs_t, fs_k, ft_t, ft_k, patch);
  return backward(grad, fs_t, fs_k, ft_t, ft_k, s_hat, s_inv, t_hat, t_inv, pd, coef, patch);
}

}  // namespace

// The pair-wise loss registers its CPU implementation in csrc/pairwise_affinity.cpp.
TORCH_LIBRARY_IMPL(pyamalgam, CPU, m) {
  cpu::use_avx2();  // the kernels' first calls read this choice: make it now, when the module loads
  m.impl("channel_coding", &channel_coding);
  m.impl("channel_coding_backward", &channel_coding_backward);
  m.impl("soft_argmax_depth", &soft_argmax_depth);
  m.impl("soft_argmax_depth_backward", &soft_argmax_depth_backward);
  m.impl("si_depth_loss", &si_depth_loss);
  m.impl("si_depth_loss_backward", &si_depth_loss_backward);
  m.impl("channel_wise_loss", &channel_wise_loss);
  m.impl("channel_wise_loss_backward", &channel_wise_loss_backward);
  m.impl("pairwise_local_loss", &pairwise_local_loss);
  m.impl("pairwise_local_loss_backward", &pairwise_local_loss_backward);
  m.impl("pairwise_frames_loss", &pairwise_frames_loss);
  m.impl("pairwise_frames_loss_backward", &pairwise_frames_loss_backward);
  m.impl("pairwise_frames_loss_for_backward", &pairwise_frames_loss_for_backward);
  m.impl("pairwise_frames_loss_saved_backward", &pairwise_frames_loss_saved_backward);
}

}  // namespace pyamalgam
