// Argument checks of the distillation operators (thesis 003): the channel-wise loss (Eqs. 4.3-4.4)
// and the local pair-wise loss (Eq. 3.2). Same contract as csrc/checks.h: every entry point calls
// its overload's check before it reads any data; a failure raises c10::Error (RuntimeError) whose
// message starts with the op and names the argument; the fake kernels (pyamalgam/ops/
// channel_wise.py, pairwise_local.py) make the same checks with the same messages. Metadata only.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace pyamalgam {

// ys (B, C, H, W) floating with C >= 1 and H * W >= 1; yt of ys's shape, dtype and device;
// temperature finite and > 0.
void check_channel_wise_loss(const at::Tensor& ys, const at::Tensor& yt, double temperature);
// The forward's checks; grad floating with one element on ys's device; stats float64 (B, C, 3)
// on ys's device (what the forward returned).
void check_channel_wise_loss_backward(const at::Tensor& grad, const at::Tensor& ys, const at::Tensor& yt,
                                      const at::Tensor& stats, double temperature);

// fs (B, Cs, H, W) floating; ft (B, Ct, H, W) of fs's dtype and device; radius >= 0; patch >= 1.
void check_pairwise_local_loss(const at::Tensor& fs, const at::Tensor& ft, int64_t radius, int64_t patch);
// The forward's checks, and grad floating with one element, on fs's device.
void check_pairwise_local_loss_backward(const at::Tensor& grad, const at::Tensor& fs, const at::Tensor& ft,
                                        int64_t radius, int64_t patch);

}  // namespace pyamalgam
