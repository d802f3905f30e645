// Argument checks of every operator overload, shared by all backends.
//
// Each backend's entry point calls the check of its overload before it touches any data: the CPU
// kernels through csrc/cpu/dispatch.cpp, the CUDA kernels in csrc/cuda/*.cu, and the pair-wise
// loss (both backends) in csrc/pairwise_affinity.cpp. A direct torch.ops.pyamalgam.* call skips
// the Python API's checks (pyamalgam/ops/_validate.py), so without these a wrong shape reached the
// kernels: out-of-bounds reads, segfaults, a division by zero.
//
// A failed check raises c10::Error (RuntimeError in Python) whose message starts with the op and
// names the argument, e.g. "si_depth_loss: target must have the shape of pred (2, 3, 4), got (1, 4)".
// The fake kernels make the same checks with the same messages (pyamalgam/ops/_meta_checks.py).
// The checks read metadata only (sizes, dtypes, devices): no data, so no host synchronisation.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace pyamalgam {

// x (B, C, H, W) floating; w1 (R, C), b1 (R,), w2 (C, R), b2 (C,), all of x's dtype and device.
void check_channel_coding(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                          const at::Tensor& b2);
// The forward's checks, and grad floating with x's shape and device.
void check_channel_coding_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1,
                                   const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2);

// logits (B, K, H, W) floating with K >= 1 (at least one depth bin); bin_size finite and > 0.
void check_soft_argmax_depth(const at::Tensor& logits, double bin_size);
// The forward's checks, and grad floating with the result's shape (B, H, W) and logits' device.
void check_soft_argmax_depth_backward(const at::Tensor& grad, const at::Tensor& logits, double bin_size);

// pred (B, H, W) or (B, 1, H, W) floating; target of pred's shape, dtype and device; mask, when
// given, bool of pred's shape and device.
void check_si_depth_loss(const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& mask);
// The forward's checks, and grad floating with one element, on pred's device.
void check_si_depth_loss_backward(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target,
                                  const std::optional<at::Tensor>& mask);

// fs (B, Cs, H, W) floating; ft (B, Ct, H, W) of fs's dtype and device; patch >= 1 (any larger
// value too: beyond max(H, W) it means one node per image).
void check_pairwise_affinity_loss(const at::Tensor& fs, const at::Tensor& ft, int64_t patch);
// The forward's checks, and grad floating with one element, on fs's device.
void check_pairwise_affinity_loss_backward(const at::Tensor& grad, const at::Tensor& fs, const at::Tensor& ft,
                                           int64_t patch);

}  // namespace pyamalgam
