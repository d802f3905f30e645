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
#include <string>

namespace pyamalgam {

// The building blocks of every op's checks, here and in csrc/checks_distill.cpp: one wording for
// all messages. `op` prefixes the message, `name` is the argument's name in the schema.
namespace checks {
// (2, 3), (4,), (): what Python prints for tuple(t.shape).
std::string shape_str(at::IntArrayRef sizes);
// torch.float32: what Python prints for a dtype.
std::string dtype_str(at::ScalarType dtype);
// One of the dtypes every kernel is instantiated for (float16, bfloat16, float32, float64).
void check_floating(const char* op, const char* name, const at::Tensor& t);
void check_dims(const char* op, const char* name, const at::Tensor& t, int64_t dims);
// A shape computed from other arguments; `what` says how, e.g. "(R, C) with C = x.shape[1]".
void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected, const char* what);
void check_shape_of(const char* op, const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref);
void check_dtype_of(const char* op, const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref);
void check_device_of(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                     const at::Tensor& ref);
// The gradient of a loss: floating, one element, on the device of `ref`.
void check_scalar_grad(const char* op, const at::Tensor& grad, const char* ref_name, const at::Tensor& ref);
// fs (B, Cs, H, W) floating, ft (B, Ct, H, W) of its dtype and device: the two maps of a pair-wise loss.
void check_feature_pair(const char* op, const at::Tensor& fs, const at::Tensor& ft);
// A tensor a forward returned for its backward: `dtype`, shape `expected` (`what` says whose), on
// the device of `ref`. A direct call could pass anything; the kernels index it blindly.
void check_saved(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef expected,
                 const char* what, const char* ref_name, const at::Tensor& ref);
}  // namespace checks

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
// value too: beyond max(H, W) it means one node per image). `op` names the overload in messages
// (pairwise_affinity_loss_for_backward makes the same checks).
void check_pairwise_affinity_loss(const at::Tensor& fs, const at::Tensor& ft, int64_t patch,
                                  const char* op = "pairwise_affinity_loss");
// The forward's checks, and grad floating with one element, on fs's device.
void check_pairwise_affinity_loss_backward(const at::Tensor& grad, const at::Tensor& fs, const at::Tensor& ft,
                                           int64_t patch);
// The backward's checks, and what pairwise_affinity_loss_for_backward returned, on fs's device:
// s_hat (B, N, Cs), s_inv (B, N, 1), t_hat (B, N, Ct), t_inv (B, N, 1) float64 (N: the nodes of
// the map at this patch); pd (B, N, 2 Cb) and coef (B, 2 Cb, Cb + Ca) with Cb = max(Cs, Ct),
// Ca = min(Cs, Ct), float64 for float64 features and float32 otherwise.
void check_pairwise_affinity_loss_saved_backward(const at::Tensor& grad, const at::Tensor& fs, const at::Tensor& ft,
                                                 const at::Tensor& s_hat, const at::Tensor& s_inv,
                                                 const at::Tensor& t_hat, const at::Tensor& t_inv,
                                                 const at::Tensor& pd, const at::Tensor& coef, int64_t patch);

}  // namespace pyamalgam
