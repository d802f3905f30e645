// Argument checks of every operator overload (see checks.h). Compiled once, for the baseline
// instruction set, and called by every backend before its kernels run.
//
// Messages follow pyamalgam/ops/_validate.py (shapes as Python tuples, dtypes as torch.float32),
// prefixed with the op, so that a direct torch.ops call and the fake kernels
// (pyamalgam/ops/_meta_checks.py, same wording) fail alike.
#include "checks.h"

#include "common.h"

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>

namespace pyamalgam {
namespace checks {
namespace {

// The dtypes every kernel is instantiated for (AT_DISPATCH_FLOATING_TYPES_AND2(kHalf, kBFloat16)).
bool kernel_dtype(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble;
}

}  // namespace

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

std::string dtype_str(at::ScalarType dtype) {
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(kernel_dtype(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
              dtype_str(t.scalar_type()));
}

void check_dims(const char* op, const char* name, const at::Tensor& t, int64_t dims) {
  TORCH_CHECK(t.dim() == dims, op, ": ", name, " must have ", dims, " dimensions, got shape ", shape_str(t.sizes()));
}

void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected, const char* what) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", shape_str(expected), " (", what, "), got ",
              shape_str(t.sizes()));
}

void check_shape_of(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                    const at::Tensor& ref) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of ", ref_name, " ",
              shape_str(ref.sizes()), ", got ", shape_str(t.sizes()));
}

void check_dtype_of(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                    const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the same dtype as ", ref_name, " (",
              dtype_str(ref.scalar_type()), "), got ", dtype_str(t.scalar_type()));
}

// A kernel dereferences every pointer on its own device: a tensor elsewhere is never read.
void check_device_of(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                     const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must have the same device as ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

// One element (0-d from autograd). Gradients may have any floating dtype: the kernels convert
// them to the input's.
void check_scalar_grad(const char* op, const at::Tensor& grad, const char* ref_name, const at::Tensor& ref) {
  check_floating(op, "grad", grad);
  TORCH_CHECK(grad.numel() == 1, op, ": grad must have one element (the loss is a scalar), got shape ",
              shape_str(grad.sizes()));
  check_device_of(op, "grad", grad, ref_name, ref);
}

void check_feature_pair(const char* op, const at::Tensor& fs, const at::Tensor& ft) {
  check_floating(op, "fs", fs);
  check_dims(op, "fs", fs, 4);
  check_dims(op, "ft", ft, 4);
  TORCH_CHECK(fs.size(0) == ft.size(0) && fs.size(2) == ft.size(2) && fs.size(3) == ft.size(3), op,
              ": fs and ft must have the same batch and spatial sizes (channels may differ): fs is ",
              shape_str(fs.sizes()), ", ft is ", shape_str(ft.sizes()));
  check_dtype_of(op, "ft", ft, "fs", fs);
  check_device_of(op, "ft", ft, "fs", fs);
}

void check_saved(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef expected,
                 const char* what, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be a ", c10::getDtypeNames(dtype).first,
              " tensor (the forward's), got ", dtype_str(t.scalar_type()));
  check_shape(op, name, t, expected, what);
  check_device_of(op, name, t, ref_name, ref);
}

}  // namespace checks

namespace {
using namespace checks;

void channel_coding_args(const char* op, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                         const at::Tensor& w2, const at::Tensor& b2) {
  check_floating(op, "x", x);
  check_dims(op, "x", x, 4);
  check_dims(op, "w1", w1, 2);
  const int64_t C = x.size(1), R = w1.size(0);
  check_shape(op, "w1", w1, {R, C}, "(R, C) with C = x.shape[1]");
  check_shape(op, "b1", b1, {R}, "(R,) with R = w1.shape[0]");
  check_shape(op, "w2", w2, {C, R}, "(C, R)");
  check_shape(op, "b2", b2, {C}, "(C,)");
  // The kernels read the weights as x's scalar type.
  auto like_x = [&](const char* name, const at::Tensor& t) {
    check_dtype_of(op, name, t, "x", x);
    check_device_of(op, name, t, "x", x);
  };
  like_x("w1", w1);
  like_x("b1", b1);
  like_x("w2", w2);
  like_x("b2", b2);
}

void soft_argmax_depth_args(const char* op, const at::Tensor& logits, double bin_size) {
  check_floating(op, "logits", logits);
  check_dims(op, "logits", logits, 4);
  // A softmax over no bins has no value (the kernels would return 0 / 0): refused, even for an
  // otherwise empty tensor.
  TORCH_CHECK(logits.size(1) >= 1, op, ": logits must have at least one depth bin (logits.shape[1] >= 1), got shape ",
              shape_str(logits.sizes()));
  TORCH_CHECK(std::isfinite(bin_size) && bin_size > 0, op, ": bin_size must be a finite number > 0, got ", bin_size);
}

void si_depth_loss_args(const char* op, const at::Tensor& pred, const at::Tensor& target,
                        const std::optional<at::Tensor>& mask) {
  check_floating(op, "pred", pred);
  TORCH_CHECK(pred.dim() == 3 || pred.dim() == 4, op, ": pred must have 3 or 4 dimensions, got shape ",
              shape_str(pred.sizes()));
  TORCH_CHECK(pred.dim() == 3 || pred.size(1) == 1, op, ": pred must be (B, H, W) or (B, 1, H, W), got shape ",
              shape_str(pred.sizes()));
  check_shape_of(op, "target", target, "pred", pred);
  check_dtype_of(op, "target", target, "pred", pred);
  check_device_of(op, "target", target, "pred", pred);
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": mask must be a bool tensor, got ",
                dtype_str(mask->scalar_type()));
    check_shape_of(op, "mask", *mask, "pred", pred);
    check_device_of(op, "mask", *mask, "pred", pred);
  }
}

void pairwise_affinity_loss_args(const char* op, const at::Tensor& fs, const at::Tensor& ft, int64_t patch) {
  check_feature_pair(op, fs, ft);
  // The node grid is ceil(H / patch) x ceil(W / patch): patch 0 would divide by zero. A patch
  // beyond the map is legal: one node per image (the kernels clamp it to max(H, W), see
  // csrc/pairwise_affinity.cpp, so that no size computation overflows).
  TORCH_CHECK(patch >= 1, op, ": patch must be >= 1, got ", patch);
}

}  // namespace

void check_channel_coding(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                          const at::Tensor& b2) {
  channel_coding_args("channel_coding", x, w1, b1, w2, b2);
}

void check_channel_coding_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1,
                                   const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
  constexpr const char* op = "channel_coding_backward";
  channel_coding_args(op, x, w1, b1, w2, b2);
  check_floating(op, "grad", grad);
  check_shape_of(op, "grad", grad, "x", x);
  check_device_of(op, "grad", grad, "x", x);
}

void check_soft_argmax_depth(const at::Tensor& logits, double bin_size) {
  soft_argmax_depth_args("soft_argmax_depth", logits, bin_size);
}

void check_soft_argmax_depth_backward(const at::Tensor& grad, const at::Tensor& logits, double bin_size) {
  constexpr const char* op = "soft_argmax_depth_backward";
  soft_argmax_depth_args(op, logits, bin_size);
  check_floating(op, "grad", grad);
  check_shape(op, "grad", grad, {logits.size(0), logits.size(2), logits.size(3)}, "(B, H, W) of logits");
  check_device_of(op, "grad", grad, "logits", logits);
}

void check_si_depth_loss(const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& mask) {
  si_depth_loss_args("si_depth_loss", pred, target, mask);
}

void check_si_depth_loss_backward(const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& target,
                                  const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "si_depth_loss_backward";
  si_depth_loss_args(op, pred, target, mask);
  check_scalar_grad(op, grad, "pred", pred);
}

void check_pairwise_affinity_loss(const at::Tensor& fs, const at::Tensor& ft, int64_t patch, const char* op) {
  pairwise_affinity_loss_args(op, fs, ft, patch);
}

void check_pairwise_affinity_loss_backward(const at::Tensor& grad, const at::Tensor& fs, const at::Tensor& ft,
                                           int64_t patch) {
  constexpr const char* op = "pairwise_affinity_loss_backward";
  pairwise_affinity_loss_args(op, fs, ft, patch);
  check_scalar_grad(op, grad, "fs", fs);
}

void check_pairwise_affinity_loss_saved_backward(const at::Tensor& grad, const at::Tensor& fs, const at::Tensor& ft,
                                                 const at::Tensor& s_hat, const at::Tensor& s_inv,
                                                 const at::Tensor& t_hat, const at::Tensor& t_inv,
                                                 const at::Tensor& pd, const at::Tensor& coef, int64_t patch) {
  constexpr const char* op = "pairwise_affinity_loss_saved_backward";
  pairwise_affinity_loss_args(op, fs, ft, patch);
  check_scalar_grad(op, grad, "fs", fs);
  const int64_t B = fs.size(0), n = node_count(fs, patch);
  const int64_t cs = fs.size(1), ct = ft.size(1), cb = std::max(cs, ct), ca = std::min(cs, ct);
  const auto gram = fs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_saved(op, "s_hat", s_hat, at::kDouble, {B, n, cs}, "(B, N, Cs): N nodes of fs", "fs", fs);
  check_saved(op, "s_inv", s_inv, at::kDouble, {B, n, 1}, "(B, N, 1)", "fs", fs);
  check_saved(op, "t_hat", t_hat, at::kDouble, {B, n, ct}, "(B, N, Ct)", "fs", fs);
  check_saved(op, "t_inv", t_inv, at::kDouble, {B, n, 1}, "(B, N, 1)", "fs", fs);
  check_saved(op, "pd", pd, gram, {B, n, 2 * cb}, "(B, N, 2 max(Cs, Ct))", "fs", fs);
  check_saved(op, "coef", coef, gram, {B, 2 * cb, cb + ca}, "(B, 2 max(Cs, Ct), Cs + Ct)", "fs", fs);
}

}  // namespace pyamalgam
