// Argument checks of the temporal operators (thesis 003, ch. 5): the pair-wise-frames loss
// (Eq. 5.2). Same contract as csrc/checks.h: every entry point calls its overload's check before it
// reads any data; a failure raises c10::Error (RuntimeError) whose message starts with the op and
// names the argument; the fake kernels (pyamalgam/ops/pairwise_frames.py) make the same checks with
// the same messages. Metadata only.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace pyamalgam {

// fs_t (B, Cs, H, W) floating; fs_k of fs_t's shape; ft_t (B, Ct, H, W) (Ct may differ from Cs);
// ft_k of ft_t's shape; all of fs_t's dtype and device; patch >= 1. `op` names the overload.
void check_pairwise_frames_loss(const at::Tensor& fs_t, const at::Tensor& fs_k, const at::Tensor& ft_t,
                                const at::Tensor& ft_k, int64_t patch, const char* op = "pairwise_frames_loss");
// The forward's checks, and grad floating with one element, on fs_t's device.
void check_pairwise_frames_loss_backward(const at::Tensor& grad, const at::Tensor& fs_t, const at::Tensor& fs_k,
                                         const at::Tensor& ft_t, const at::Tensor& ft_k, int64_t patch);
// The backward's checks, and what pairwise_frames_loss_for_backward returned, on fs_t's device
// (frame t in rows 0..B-1, frame t+k in rows B..2B-1): s_hat (2B, N, Cs), s_inv (2B, N, 1),
// t_hat (2B, N, Ct), t_inv (2B, N, 1) float64; pd (2B, N, 2 Cb) and coef (2B, 2 Cb, Cb + Ca) with
// Cb = max(Cs, Ct), Ca = min(Cs, Ct), float64 for float64 features and float32 otherwise.
void check_pairwise_frames_loss_saved_backward(const at::Tensor& grad, const at::Tensor& fs_t, const at::Tensor& fs_k,
                                               const at::Tensor& ft_t, const at::Tensor& ft_k,
                                               const at::Tensor& s_hat, const at::Tensor& s_inv,
                                               const at::Tensor& t_hat, const at::Tensor& t_inv,
                                               const at::Tensor& pd, const at::Tensor& coef, int64_t patch);

}  // namespace pyamalgam
