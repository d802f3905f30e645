// Argument checks of the temporal operators (see checks_temporal.h). Compiled once, for the
// baseline instruction set. The building blocks, and so the wording of every message, are those of
// csrc/checks.cpp (pyamalgam::checks).
#include "checks_temporal.h"

#include <c10/util/Exception.h>

#include <algorithm>

#include "checks.h"
#include "common.h"

namespace pyamalgam {
namespace {
using namespace checks;

void pairwise_frames_args(const char* op, const at::Tensor& fs_t, const at::Tensor& fs_k, const at::Tensor& ft_t,
                          const at::Tensor& ft_k, int64_t patch) {
  check_floating(op, "fs_t", fs_t);
  check_dims(op, "fs_t", fs_t, 4);
  check_shape_of(op, "fs_k", fs_k, "fs_t", fs_t);
  check_dims(op, "ft_t", ft_t, 4);
  TORCH_CHECK(fs_t.size(0) == ft_t.size(0) && fs_t.size(2) == ft_t.size(2) && fs_t.size(3) == ft_t.size(3), op,
              ": fs_t and ft_t must have the same batch and spatial sizes (channels may differ): fs_t is ",
              shape_str(fs_t.sizes()), ", ft_t is ", shape_str(ft_t.sizes()));
  check_shape_of(op, "ft_k", ft_k, "ft_t", ft_t);
  const auto like_fs_t = [&](const char* name, const at::Tensor& t) {
    check_dtype_of(op, name, t, "fs_t", fs_t);
    check_device_of(op, name, t, "fs_t", fs_t);
  };
  like_fs_t("fs_k", fs_k);
  like_fs_t("ft_t", ft_t);
  like_fs_t("ft_k", ft_k);
  TORCH_CHECK(patch >= 1, op, ": patch must be >= 1, got ", patch);
}

}  // namespace

void check_pairwise_frames_loss(const at::Tensor& fs_t, const at::Tensor& fs_k, const at::Tensor& ft_t,
                                const at::Tensor& ft_k, int64_t patch, const char* op) {
  pairwise_frames_args(op, fs_t, fs_k, ft_t, ft_k, patch);
}

void check_pairwise_frames_loss_backward(const at::Tensor& grad, const at::Tensor& fs_t, const at::Tensor& fs_k,
                                         const at::Tensor& ft_t, const at::Tensor& ft_k, int64_t patch) {
  constexpr const char* op = "pairwise_frames_loss_backward";
  pairwise_frames_args(op, fs_t, fs_k, ft_t, ft_k, patch);
  check_scalar_grad(op, grad, "fs_t", fs_t);
}

void check_pairwise_frames_loss_saved_backward(const at::Tensor& grad, const at::Tensor& fs_t, const at::Tensor& fs_k,
                                               const at::Tensor& ft_t, const at::Tensor& ft_k,
                                               const at::Tensor& s_hat, const at::Tensor& s_inv,
                                               const at::Tensor& t_hat, const at::Tensor& t_inv,
                                               const at::Tensor& pd, const at::Tensor& coef, int64_t patch) {
  constexpr const char* op = "pairwise_frames_loss_saved_backward";
  pairwise_frames_args(op, fs_t, fs_k, ft_t, ft_k, patch);
  check_scalar_grad(op, grad, "fs_t", fs_t);
  const int64_t b2 = 2 * fs_t.size(0), n = node_count(fs_t, patch);
  const int64_t cs = fs_t.size(1), ct = ft_t.size(1), cb = std::max(cs, ct), ca = std::min(cs, ct);
  const auto gram = fs_t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_saved(op, "s_hat", s_hat, at::kDouble, {b2, n, cs}, "(2B, N, Cs): N nodes of fs_t and fs_k", "fs_t", fs_t);
  check_saved(op, "s_inv", s_inv, at::kDouble, {b2, n, 1}, "(2B, N, 1)", "fs_t", fs_t);
  check_saved(op, "t_hat", t_hat, at::kDouble, {b2, n, ct}, "(2B, N, Ct)", "fs_t", fs_t);
  check_saved(op, "t_inv", t_inv, at::kDouble, {b2, n, 1}, "(2B, N, 1)", "fs_t", fs_t);
  check_saved(op, "pd", pd, gram, {b2, n, 2 * cb}, "(2B, N, 2 max(Cs, Ct))", "fs_t", fs_t);
  check_saved(op, "coef", coef, gram, {b2, 2 * cb, cb + ca}, "(2B, 2 max(Cs, Ct), Cs + Ct)", "fs_t", fs_t);
}

}  // namespace pyamalgam
