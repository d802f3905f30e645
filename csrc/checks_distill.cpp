// Argument checks of the distillation operators (see checks_distill.h). Compiled once, for the
// baseline instruction set. Messages use the wording of csrc/checks.cpp (shapes as Python tuples,
// dtypes as torch.float32); its helpers are private to that file, so the few needed live here too.
#include "checks_distill.h"

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

namespace pyamalgam {
namespace {

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

std::string dtype_str(at::ScalarType dtype) { return "torch." + std::string(c10::getDtypeNames(dtype).first); }

void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kHalf || d == at::kBFloat16 || d == at::kFloat || d == at::kDouble, op, ": ", name,
              " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ", dtype_str(d));
}

void check_dims(const char* op, const char* name, const at::Tensor& t, int64_t dims) {
  TORCH_CHECK(t.dim() == dims, op, ": ", name, " must have ", dims, " dimensions, got shape ", shape_str(t.sizes()));
}

void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the same dtype as ", ref_name, " (",
              dtype_str(ref.scalar_type()), "), got ", dtype_str(t.scalar_type()));
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must have the same device as ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

void check_scalar_grad(const char* op, const at::Tensor& grad, const char* ref_name, const at::Tensor& ref) {
  check_floating(op, "grad", grad);
  TORCH_CHECK(grad.numel() == 1, op, ": grad must have one element (the loss is a scalar), got shape ",
              shape_str(grad.sizes()));
  TORCH_CHECK(grad.device() == ref.device(), op, ": grad must have the same device as ", ref_name, " (",
              ref.device(), "), got ", grad.device());
}

void channel_wise_args(const char* op, const at::Tensor& ys, const at::Tensor& yt, double temperature) {
  check_floating(op, "ys", ys);
  check_dims(op, "ys", ys, 4);
  // A channel distribution needs a pixel to live on, and T^2 / C a channel.
  TORCH_CHECK(ys.size(1) >= 1 && ys.size(2) * ys.size(3) >= 1, op,
              ": ys must have at least one channel and one pixel, got shape ", shape_str(ys.sizes()));
  TORCH_CHECK(yt.sizes() == ys.sizes(), op, ": yt must have the shape of ys ", shape_str(ys.sizes()), ", got ",
              shape_str(yt.sizes()));
  check_like(op, "yt", yt, "ys", ys);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be a finite number > 0, got ",
              temperature);
}

void pairwise_local_args(const char* op, const at::Tensor& fs, const at::Tensor& ft, int64_t radius, int64_t patch) {
  check_floating(op, "fs", fs);
  check_dims(op, "fs", fs, 4);
  check_dims(op, "ft", ft, 4);
  TORCH_CHECK(fs.size(0) == ft.size(0) && fs.size(2) == ft.size(2) && fs.size(3) == ft.size(3), op,
              ": fs and ft must have the same batch and spatial sizes (channels may differ): fs is ",
              shape_str(fs.sizes()), ", ft is ", shape_str(ft.sizes()));
  check_like(op, "ft", ft, "fs", fs);
  TORCH_CHECK(radius >= 0, op, ": radius must be >= 0, got ", radius);
  TORCH_CHECK(patch >= 1, op, ": patch must be >= 1, got ", patch);
}

}  // namespace

void check_channel_wise_loss(const at::Tensor& ys, const at::Tensor& yt, double temperature) {
  channel_wise_args("channel_wise_loss", ys, yt, temperature);
}

void check_channel_wise_loss_backward(const at::Tensor& grad, const at::Tensor& ys, const at::Tensor& yt,
                                      const at::Tensor& stats, double temperature) {
  constexpr const char* op = "channel_wise_loss_backward";
  channel_wise_args(op, ys, yt, temperature);
  check_scalar_grad(op, grad, "ys", ys);
  const std::vector<int64_t> want{ys.size(0), ys.size(1), 3};
  TORCH_CHECK(stats.scalar_type() == at::kDouble, op, ": stats must be a float64 tensor (the forward's), got ",
              dtype_str(stats.scalar_type()));
  TORCH_CHECK(stats.sizes() == at::IntArrayRef(want), op, ": stats must have shape ", shape_str(want),
              " ((B, C, 3) of ys), got ", shape_str(stats.sizes()));
  TORCH_CHECK(stats.device() == ys.device(), op, ": stats must have the same device as ys (", ys.device(), "), got ",
              stats.device());
}

void check_pairwise_local_loss(const at::Tensor& fs, const at::Tensor& ft, int64_t radius, int64_t patch) {
  pairwise_local_args("pairwise_local_loss", fs, ft, radius, patch);
}

void check_pairwise_local_loss_backward(const at::Tensor& grad, const at::Tensor& fs, const at::Tensor& ft,
                                        int64_t radius, int64_t patch) {
  constexpr const char* op = "pairwise_local_loss_backward";
  pairwise_local_args(op, fs, ft, radius, patch);
  check_scalar_grad(op, grad, "fs", fs);
}

}  // namespace pyamalgam
