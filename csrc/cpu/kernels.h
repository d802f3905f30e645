// The CPU kernels, one copy per instruction set (ISA).
//
// Each csrc/cpu/<op>.cpp is compiled once for the target's baseline (namespace cpu::base) and, on
// x86-64, once more with -mavx2 -mfma (cpu::avx2): the same source, twice the SIMD width, and
// FMA. csrc/cpu/dispatch.cpp registers, when the module loads, the copy the CPU can run and ATen
// itself uses (ATEN_CPU_CAPABILITY=default therefore selects the baseline for both).
//
// A kernel file puts *everything* it defines in namespace cpu::PYAMALGAM_CPU_ISA (helpers in an
// anonymous namespace inside it), so no AVX2 function can be mistaken for a baseline one at link
// time; tests/ops/test_cpu_isa.py checks the built module for that.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <utility>

#define PYAMALGAM_DECLARE_CPU_KERNELS(isa)                                                                  \
  namespace pyamalgam::cpu::isa {                                                                           \
  at::Tensor channel_coding(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,                 \
                            const at::Tensor& w2, const at::Tensor& b2);                                    \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_coding_backward(            \
      const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,               \
      const at::Tensor& w2, const at::Tensor& b2);                                                          \
  at::Tensor soft_argmax_depth(const at::Tensor& logits, double bin_size);                                  \
  at::Tensor soft_argmax_depth_backward(const at::Tensor& grad, const at::Tensor& logits, double bin_size); \
  at::Tensor si_depth_loss(const at::Tensor& pred, const at::Tensor& target,                                \
                           const std::optional<at::Tensor>& mask);                                          \
  std::tuple<at::Tensor, at::Tensor> si_depth_loss_backward(const at::Tensor& grad, const at::Tensor& pred, \
                                                            const at::Tensor& target,                       \
                                                            const std::optional<at::Tensor>& mask);         \
  std::pair<at::Tensor, at::Tensor> normalized_nodes(const at::Tensor& f, int64_t patch);                   \
  at::Tensor normalized_nodes_backward(const at::Tensor& grad_hat, const at::Tensor& hat,                   \
                                       const at::Tensor& inv, const at::Tensor& f, int64_t patch);          \
  at::Tensor sum_and_difference(const at::Tensor& b, const at::Tensor& a_rot, at::ScalarType dtype);        \
  }

// The distillation losses of thesis 003 (csrc/cpu/channel_wise.cpp, csrc/cpu/pairwise_local.cpp).
#define PYAMALGAM_DECLARE_DISTILL_CPU_KERNELS(isa)                                                          \
  namespace pyamalgam::cpu::isa {                                                                           \
  std::tuple<at::Tensor, at::Tensor> channel_wise_loss(const at::Tensor& ys, const at::Tensor& yt,           \
                                                       double temperature);                                 \
  std::tuple<at::Tensor, at::Tensor> channel_wise_loss_backward(const at::Tensor& grad, const at::Tensor& ys, \
                                                                const at::Tensor& yt, const at::Tensor& stats, \
                                                                double temperature);                        \
  at::Tensor pairwise_local_loss(const at::Tensor& fs, const at::Tensor& ft, int64_t radius, int64_t patch);  \
  std::tuple<at::Tensor, at::Tensor> pairwise_local_loss_backward(const at::Tensor& grad, const at::Tensor& fs, \
                                                                  const at::Tensor& ft, int64_t radius,       \
                                                                  int64_t patch);                             \
  }

// The temporal losses of thesis 003, ch. 5 (csrc/cpu/pairwise_frames.cpp): the pair-wise-frames
// loss and what its backward needs, (loss, s_hat, s_inv, t_hat, t_inv, pd, coef).
namespace pyamalgam::cpu {
using PairwiseFramesSaved = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
}
#define PYAMALGAM_DECLARE_TEMPORAL_CPU_KERNELS(isa)                                                         \
  namespace pyamalgam::cpu::isa {                                                                           \
  PairwiseFramesSaved pairwise_frames_loss_for_backward(const at::Tensor& fs_t, const at::Tensor& fs_k,      \
                                                        const at::Tensor& ft_t, const at::Tensor& ft_k,      \
                                                        int64_t patch);                                     \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pairwise_frames_loss_saved_backward(            \
      const at::Tensor& grad, const at::Tensor& fs_t, const at::Tensor& fs_k, const at::Tensor& ft_t,        \
      const at::Tensor& ft_k, const at::Tensor& s_hat, const at::Tensor& s_inv, const at::Tensor& t_hat,     \
      const at::Tensor& t_inv, const at::Tensor& pd, const at::Tensor& coef, int64_t patch);                 \
  }

PYAMALGAM_DECLARE_CPU_KERNELS(base)
PYAMALGAM_DECLARE_DISTILL_CPU_KERNELS(base)
PYAMALGAM_DECLARE_TEMPORAL_CPU_KERNELS(base)
#ifdef PYAMALGAM_CPU_HAVE_AVX2
PYAMALGAM_DECLARE_CPU_KERNELS(avx2)
PYAMALGAM_DECLARE_DISTILL_CPU_KERNELS(avx2)
PYAMALGAM_DECLARE_TEMPORAL_CPU_KERNELS(avx2)
#endif
