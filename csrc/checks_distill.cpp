// Argument checks of the distillation operators (see checks_distill.h). Compiled once, for the
// baseline instruction set. The building blocks, and so the wording of every message (shapes as
// Python tuples, dtypes as torch.float32), are those of csrc/checks.cpp (pyamalgam::checks).
#include "checks_distill.h"

#include <c10/util/Exception.h>

#include <cmath>

#include "checks.h"

namespace pyamalgam {
namespace {
using namespace checks;

void channel_wise_args(const char* op, const at::Tensor& ys, const at::Tensor& yt, double temperature) {
  check_floating(op, "ys", ys);
  check_dims(op, "ys", ys, 4);
  // A channel distribution needs a pixel to live on, and T^2 / C a channel.
  TORCH_CHECK(ys.size(1) >= 1 && ys.size(2) * ys.size(3) >= 1, op,
              ": ys must have at least one channel and one pixel, got shape ", shape_str(ys.sizes()));
  check_shape_of(op, "yt", yt, "ys", ys);
  check_dtype_of(op, "yt", yt, "ys", ys);
  check_device_of(op, "yt", yt, "ys", ys);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be a finite number > 0, got ",
              temperature);
}

void pairwise_local_args(const char* op, const at::Tensor& fs, const at::Tensor& ft, int64_t radius, int64_t patch) {
  check_feature_pair(op, fs, ft);
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
  check_saved(op, "stats", stats, at::kDouble, {ys.size(0), ys.size(1), 3}, "(B, C, 3) of ys", "ys", ys);
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
