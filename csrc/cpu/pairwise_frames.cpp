// Pair-wise-frames distillation loss (thesis 003, §5.3.2, Eq. 5.2), exact and linear in the number
// of nodes N, on CPU (built once per instruction set, csrc/cpu/kernels.h; the node kernels are the
// full-graph op's, csrc/cpu/pairwise_nodes.cpp, of the same instruction set).
//
// With S_t, S_k (N x Cs) the L2-normalised nodes of the student at frames t and t+k, and T_t, T_k
// (N x Ct) the teacher's, the loss of an image is ||S_t S_k^T - T_t T_k^T||_F^2 / N^2: the cross-
// frame affinities a_ij = cos(q_t^i, q_{t+k}^j) of student and teacher. The Gram expansion,
// <S_t^T S_t, S_k^T S_k> - 2 <T_t^T S_t, T_k^T S_k> + <T_t^T T_t, T_k^T T_k>, is O(N C^2) but
// subtracts numbers of size ~N^2 to get one that goes to 0 as the student learns (the trap of the
// single-frame op, csrc/pairwise_affinity.cpp). The same cure, with one rotation for both frames:
//   * A is the side with fewer channels, B the other (the loss is symmetric in student/teacher);
//   * Q = U V^T from the SVD of A_t^T B_t + A_k^T B_k (orthogonal Procrustes of the two frames
//     stacked). Q has orthonormal rows, so (A_t Q)(A_k Q)^T = A_t A_k^T: the same affinities, with
//     A' = A Q as close to B as one rotation of both frames allows;
//   * with P = B + A', D = B - A' (per frame): B_t B_k^T - A'_t A'_k^T = (P_t D_k^T + D_t P_k^T) / 2,
//     hence ||M||^2 = ( <P_t^T P_t, D_k^T D_k> + <D_t^T D_t, P_k^T P_k> + 2 <D_t^T P_t, P_k^T D_k> ) / 4.
//     Every product holds a small difference D, so the terms are of the size of the result. (The
//     cross term, unlike the single-frame op's, has no sign: the two frames' D^T P need not be
//     symmetric. It is of the size of the other two, so the relative error stays that of the
//     inputs; tests/ops/test_pairwise_frames.py checks the near-teacher regimes.)
// Gradients: d||M||^2/dB_t = 2 M B_k, d/dA'_t = -2 M A'_k, d/dB_k = 2 M^T B_t, d/dA'_k = -2 M^T A'_t,
// expanded in P and D like the forward:
//   2 M B_k   = ( P_t (G^dp_k + G^dd_k) + D_t (G^pp_k + G^pd_k) ) / 2,
//   -2 M A'_k = ( P_t (G^dd_k - G^dp_k) + D_t (G^pd_k - G^pp_k) ) / 2,
// with G^xy_k = X_k^T Y_k, and the same for frame t+k with the roles of t and k swapped; dA = dA' Q^T
// (Q is held fixed: the loss is the same for every Q with orthonormal rows). So the gradient of
// each frame is [P | D] of that frame times a (2 Cb, Cb + Ca) factor built from the *other*
// frame's Grams, which the forward stacks once (coef), and the backward is one product.
// Precision, as the single-frame op: nodes, the rotation and P, D in float64; P, D are rounded
// once to float32 (float64 for float64 inputs), the Grams' products summed in float64.
// Layout of the saved tensors: frames stacked along the batch, frame t in rows 0..B-1, frame t+k
// in rows B..2B-1 (one node kernel call per side and one batched product for both frames).
// Edge cases: an empty batch or map has no node pair: loss 0, zero gradients; a zero node stays
// zero; a patch beyond the map is clamped (csrc/common.h); NaN/inf inputs give a NaN loss (the SVD
// sees a cleaned matrix), never an error.
#include <ATen/ATen.h>

#include <algorithm>

#include "common.h"
#include "cpu/kernels.h"

namespace pyamalgam::cpu::PYAMALGAM_CPU_ISA {
namespace {

bool no_pairs(const at::Tensor& f) { return f.size(0) == 0 || f.size(2) == 0 || f.size(3) == 0; }

// The side with more channels is B (ties: the student), so Q = U V^T has orthonormal rows.
bool student_is_b(const at::Tensor& fs, const at::Tensor& ft) { return fs.size(1) >= ft.size(1); }

at::ScalarType gram_dtype(const at::Tensor& f) { return f.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The two frames of one side as stacked float64 nodes (2B, N, C) and reciprocal norms (2B, N, 1).
std::pair<at::Tensor, at::Tensor> frame_nodes(const at::Tensor& f_t, const at::Tensor& f_k, int64_t patch) {
  auto [hat_t, inv_t] = normalized_nodes(f_t, patch);
  auto [hat_k, inv_k] = normalized_nodes(f_k, patch);
  return {at::cat({hat_t, hat_k}, 0), at::cat({inv_t, inv_k}, 0)};
}

// Rows b and b + B swapped: each frame's slot then holds the other frame's factor.
at::Tensor other_frame(const at::Tensor& x) {
  const int64_t B = x.size(0) / 2;
  return at::cat({x.narrow(0, B, B), x.narrow(0, 0, B)}, 0);
}

// The loss per image (float64, (B,)); fills pd and coef. `a`, `b`: stacked float64 nodes.
at::Tensor align_and_expand(const at::Tensor& a, const at::Tensor& b, at::ScalarType gram, at::Tensor& pd,
                            at::Tensor& coef) {
  const int64_t B = a.size(0) / 2, cb = b.size(2);
  // One rotation for both frames; a non-finite input reaches the loss as NaN, not the SVD.
  const auto ab = at::bmm(a.transpose(1, 2), b);
  const auto ab_sum = at::nan_to_num(ab.narrow(0, 0, B) + ab.narrow(0, B, B), 0.0, 0.0, 0.0);
  auto [u, sv, vh] = at::linalg_svd(ab_sum, /*full_matrices=*/false);
  const auto q1 = at::bmm(u, vh);  // (B, Ca, Cb)
  const auto q = at::cat({q1, q1}, 0);
  pd = sum_and_difference(b, at::bmm(a, q), gram);  // float64 sum and difference, rounded once
  const auto p = pd.narrow(2, 0, cb), d = pd.narrow(2, cb, cb);
  const auto gpp = at::bmm(p.transpose(1, 2), p), gdd = at::bmm(d.transpose(1, 2), d);
  const auto gdp = at::bmm(d.transpose(1, 2), p);
  const auto gpp_o = other_frame(gpp), gdd_o = other_frame(gdd), gdp_o = other_frame(gdp);
  const auto gpd_o = gdp_o.transpose(1, 2);
  const auto qt = q.transpose(1, 2).to(gram);
  coef = 0.5 * at::cat({at::cat({gdp_o + gdd_o, at::bmm(gdd_o - gdp_o, qt)}, 2),
                        at::cat({gpp_o + gpd_o, at::bmm(gpd_o - gpp_o, qt)}, 2)}, 1);
  // Frame t's rows: <P_t^T P_t, D_k^T D_k> + <D_t^T P_t, P_k^T D_k>; frame t+k's rows give the
  // other two halves of the sum, in float64.
  const auto per_row = (gpp * gdd_o).sum({1, 2}, false, at::kDouble) + (gdp * gpd_o).sum({1, 2}, false, at::kDouble);
  return 0.25 * (per_row.narrow(0, 0, B) + per_row.narrow(0, B, B));
}

}  // namespace

PairwiseFramesSaved pairwise_frames_loss_for_backward(const at::Tensor& fs_t, const at::Tensor& fs_k,
                                                      const at::Tensor& ft_t, const at::Tensor& ft_k,
                                                      int64_t patch_in) {
  const int64_t B = fs_t.size(0), n = node_count(fs_t, patch_in), cs = fs_t.size(1), ct = ft_t.size(1);
  const int64_t cb = std::max(cs, ct), ca = std::min(cs, ct);
  const auto gram = gram_dtype(fs_t);
  if (no_pairs(fs_t)) {
    const auto f64 = fs_t.options().dtype(at::kDouble), g = fs_t.options().dtype(gram);
    return {at::zeros({}, fs_t.options()), at::zeros({2 * B, n, cs}, f64), at::zeros({2 * B, n, 1}, f64),
            at::zeros({2 * B, n, ct}, f64), at::zeros({2 * B, n, 1}, f64), at::zeros({2 * B, n, 2 * cb}, g),
            at::zeros({2 * B, 2 * cb, cb + ca}, g)};
  }
  const int64_t patch = node_patch(fs_t, patch_in);
  auto [s_hat, s_inv] = frame_nodes(fs_t, fs_k, patch);
  auto [t_hat, t_inv] = frame_nodes(ft_t, ft_k, patch);
  const bool s_is_b = student_is_b(fs_t, ft_t);
  at::Tensor pd, coef;
  const auto per_image = align_and_expand(s_is_b ? t_hat : s_hat, s_is_b ? s_hat : t_hat, gram, pd, coef);
  const double nn = static_cast<double>(n) * static_cast<double>(n);
  return {(per_image / nn).mean().to(fs_t.scalar_type()), s_hat, s_inv, t_hat, t_inv, pd, coef};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pairwise_frames_loss_saved_backward(
    const at::Tensor& grad, const at::Tensor& fs_t, const at::Tensor& fs_k, const at::Tensor& ft_t,
    const at::Tensor& ft_k, const at::Tensor& s_hat, const at::Tensor& s_inv, const at::Tensor& t_hat,
    const at::Tensor& t_inv, const at::Tensor& pd, const at::Tensor& coef, int64_t patch_in) {
  const auto zeros = [](const at::Tensor& f) { return at::zeros(f.sizes(), f.options().memory_format(dense_format(f))); };
  if (no_pairs(fs_t)) return {zeros(fs_t), zeros(fs_k), zeros(ft_t), zeros(ft_k)};
  const int64_t patch = node_patch(fs_t, patch_in);
  const int64_t B = fs_t.size(0), n = s_hat.size(1);
  const int64_t cb = std::max(fs_t.size(1), ft_t.size(1)), ca = std::min(fs_t.size(1), ft_t.size(1));
  // d loss = grad / (B N^2) d sum_images ||M||^2; the scalar goes into the small factor.
  const auto scale = grad.reshape({}).to(at::kDouble) / (static_cast<double>(B) * n * n);
  const auto g = at::bmm(pd, (coef * scale).to(gram_dtype(fs_t)));  // (2B, N, Cb + Ca)
  const bool s_is_b = student_is_b(fs_t, ft_t);
  const auto g_s = s_is_b ? g.narrow(2, 0, cb) : g.narrow(2, cb, ca);
  const auto g_t = s_is_b ? g.narrow(2, cb, ca) : g.narrow(2, 0, cb);
  // The node kernels index the saved nodes densely: a direct call may pass other strides.
  const auto sh = s_hat.contiguous(), si = s_inv.contiguous(), th = t_hat.contiguous(), ti = t_inv.contiguous();
  const auto back = [&](const at::Tensor& gh, const at::Tensor& hat, const at::Tensor& inv, int64_t frame,
                        const at::Tensor& f) {
    return normalized_nodes_backward(gh.narrow(0, frame * B, B), hat.narrow(0, frame * B, B),
                                     inv.narrow(0, frame * B, B), f, patch);
  };
  return {back(g_s, sh, si, 0, fs_t), back(g_s, sh, si, 1, fs_k), back(g_t, th, ti, 0, ft_t),
          back(g_t, th, ti, 1, ft_k)};
}

}  // namespace pyamalgam::cpu::PYAMALGAM_CPU_ISA
