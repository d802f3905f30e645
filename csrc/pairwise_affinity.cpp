// Full-graph pair-wise distillation loss (thesis §3.3.1, Eq. 3.2, alpha = all nodes), exact and
// linear in the number of nodes N. Device-generic: built from ATen calls, so both backends share
// one algorithm; what differs per backend is the node kernels (pairwise_affinity.h), and each
// backend registers its own entry points with them (CPU: the fused passes; CUDA: ATen).
//
// With S (N x Cs) and T (N x Ct) the L2-normalised node features, the loss of an image is
// ||S S^T - T T^T||_F^2 / N^2. Expanding it into Gram matrices, ||S^T S||^2 - 2 ||S^T T||^2 +
// ||T^T T||^2, is linear in N but subtracts numbers of size ~N^2 to get a result that goes to 0 as
// the student learns: it loses every digit exactly when distillation matters. Instead:
//   * let A be the side with fewer channels, B the other (the loss is symmetric);
//   * rotate A onto B with the orthogonal Procrustes solution Q = U V^T of A^T B = U S V^T. Q has
//     orthonormal rows, so A' = A Q has the same affinities as A (A' A'^T = A A^T) and lies as
//     close to B as any such rotation allows, also when the two differ by a rotation;
//   * with D = B - A' and P = B + A':  B B^T - A' A'^T = (P D^T + D P^T) / 2, hence
//     ||M||^2 = ( <P^T P, D^T D> + ||D^T P||^2 ) / 2,
//     and both terms are >= 0 (Procrustes makes A'^T B symmetric, so D^T P = B^T B - A'^T A' is
//     symmetric): no cancellation, every quantity is formed from the small difference D.
// Precision: the steps where cancellation lives (normalisation, the rotation A Q and the
// differences D) run in float64. The products of P and D with themselves then only need the
// relative precision of the inputs: float32 for float32/16 inputs, float64 for float64 inputs.
// The work is O(N C^2) and the memory O(N C).
//
// The Python API calls pairwise_affinity_loss_for_backward, which also returns what the backward
// needs (Saved below: the nodes, [P | D] and the backward's C x C factors, O(N C)); its backward,
// pairwise_affinity_loss_saved_backward, is then one product and the adjoint of the pooling. The
// plain pairwise_affinity_loss_backward (direct calls) runs the forward again first.
//
// Edge cases: a patch beyond the map (>= max(H, W)) is clamped to max(H, W), which makes the same
// one node per image, so that no size computation overflows (patch = 2^63 - 1 gave NaN); an empty
// batch or map (B, H or W = 0) has no node pair: the loss is 0 and the gradients are 0 (the mean
// over no pairs would be 0 / 0).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "common.h"
#include "pairwise_affinity.h"

namespace pyamalgam {
namespace {

// No node pair (B, H or W = 0): the loss is 0, with zero gradients.
bool no_pairs(const at::Tensor& f) { return f.size(0) == 0 || f.size(2) == 0 || f.size(3) == 0; }

// Generic (any device) versions of the node kernels in pairwise_affinity.h, built from ATen; the
// CUDA entry points use them (compiled in every build, so a CPU-only build still checks them).
std::pair<at::Tensor, at::Tensor> normalized_nodes_aten(const at::Tensor& f, int64_t patch) {
  auto x = f.to(at::kDouble);
  if (patch > 1) {
    x = at::avg_pool2d(x, {patch, patch}, {patch, patch}, {0, 0}, /*ceil_mode=*/true,
                       /*count_include_pad=*/false);
  }
  auto v = x.flatten(2).transpose(1, 2);
  auto norm = v.norm(2, {-1}, /*keepdim=*/true);
  auto inv = at::where(norm > 0, norm.reciprocal(), at::zeros_like(norm));
  return {(v * inv).contiguous(), inv};
}

at::Tensor normalized_nodes_backward_aten(const at::Tensor& g_hat, const at::Tensor& hat, const at::Tensor& inv,
                                          const at::Tensor& f, int64_t patch) {
  const int64_t B = f.size(0), C = f.size(1), H = f.size(2), W = f.size(3);
  const int64_t hp = (H + patch - 1) / patch, wp = (W + patch - 1) / patch;
  auto g_v = (g_hat - hat * (hat * g_hat).sum(-1, /*keepdim=*/true)) * inv;
  auto g = g_v.transpose(1, 2).reshape({B, C, hp, wp});
  if (patch > 1) {
    g = at::avg_pool2d_backward(g, f.to(at::kDouble), {patch, patch}, {patch, patch}, {0, 0},
                                /*ceil_mode=*/true, /*count_include_pad=*/false, std::nullopt);
  }
  auto out = at::empty(f.sizes(), f.options().memory_format(dense_format(f)));
  out.copy_(g);
  return out;
}

at::Tensor sum_and_difference_aten(const at::Tensor& b, const at::Tensor& a_rot, at::ScalarType dtype) {
  return at::cat({b + a_rot, b - a_rot}, 2).to(dtype);
}

// The memory-bound kernels of one backend (pairwise_affinity.h).
struct NodeKernels {
  std::pair<at::Tensor, at::Tensor> (*nodes)(const at::Tensor& f, int64_t patch);
  at::Tensor (*nodes_backward)(const at::Tensor& g_hat, const at::Tensor& hat, const at::Tensor& inv,
                               const at::Tensor& f, int64_t patch);
  at::Tensor (*sum_and_difference)(const at::Tensor& b, const at::Tensor& a_rot, at::ScalarType dtype);
};

// Everything the backward needs, returned by the forward (pairwise_affinity_loss_for_backward) so
// that the backward does not pool, normalise, decompose and multiply again.
struct Saved {
  at::Tensor s_hat, s_inv, t_hat, t_inv;  // float64 normalised nodes (B, N, C) and 1 / norms (B, N, 1)
  at::Tensor pd;    // (B, N, 2 Cb) in the gram dtype: [P | D], P = B + A Q, D = B - A Q
  at::Tensor coef;  // (B, 2 Cb, Cb + Ca): [P | D] coef = [d||M||^2/dB | d||M||^2/dA] = [4 M B | -4 M A' Q^T]
};

// The side with more channels is B (ties: the student), so Q = U V^T has orthonormal rows.
bool student_is_b(const at::Tensor& fs, const at::Tensor& ft) { return fs.size(1) >= ft.size(1); }

at::ScalarType gram_dtype(const at::Tensor& fs) { return fs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The loss, per image (float64), and what its backward needs. `a`, `b`: float64 normalised nodes.
// d||M||^2/dB = 4 M B, d||M||^2/dA' = -4 M A', with M B and M A' expanded in P and D so that,
// like the forward, they are formed from small quantities:
//   4 M B  = P (G1 + Gdd) + D (Gpp + G1^T),   4 M A' = P (G1 - Gdd) + D (Gpp - G1^T),
// and dA = dA' Q^T (Q is held fixed: the loss is the same for every Q with orthonormal rows).
// The small factors are stacked into `coef` once here, so that the backward is one product.
at::Tensor align_and_expand(const at::Tensor& a, const at::Tensor& b, at::ScalarType gram, const NodeKernels& k,
                            Saved& out) {
  // A non-finite input must reach the loss as NaN, not make the SVD fail: decompose a cleaned
  // matrix (any orthonormal Q keeps the identity exact) and let the NaN flow through A and B.
  const auto ab = at::nan_to_num(at::bmm(a.transpose(1, 2), b), 0.0, 0.0, 0.0);
  auto [u, sv, vh] = at::linalg_svd(ab, /*full_matrices=*/false);
  const auto q = at::bmm(u, vh);  // (B, Ca, Cb)
  const auto a_rot = at::bmm(a, q);
  const int64_t cb = b.size(2);
  out.pd = k.sum_and_difference(b, a_rot, gram);  // in float64, then rounded once to the gram dtype
  const auto p = out.pd.narrow(2, 0, cb), d = out.pd.narrow(2, cb, cb);
  const auto gpp = at::bmm(p.transpose(1, 2), p), gdd = at::bmm(d.transpose(1, 2), d);
  const auto g1 = at::bmm(d.transpose(1, 2), p), g1t = g1.transpose(1, 2);
  const auto qt = q.transpose(1, 2).to(gram);
  out.coef = at::cat({at::cat({g1 + gdd, at::bmm(gdd - g1, qt)}, 2), at::cat({gpp + g1t, at::bmm(g1t - gpp, qt)}, 2)}, 1);
  // Both terms are sums of non-negative numbers (see the top): float64 sums keep them exact.
  return 0.5 * ((gpp * gdd).sum({1, 2}, false, at::kDouble) + (g1 * g1).sum({1, 2}, false, at::kDouble));
}

// The shapes of Saved for an input with no node pair (all empty or zero, never read).
Saved empty_saved(const at::Tensor& fs, const at::Tensor& ft, int64_t n) {
  const int64_t B = fs.size(0), cs = fs.size(1), ct = ft.size(1);
  const int64_t cb = std::max(cs, ct), ca = std::min(cs, ct);
  const auto f64 = fs.options().dtype(at::kDouble), gram = fs.options().dtype(gram_dtype(fs));
  return {at::zeros({B, n, cs}, f64), at::zeros({B, n, 1}, f64), at::zeros({B, n, ct}, f64), at::zeros({B, n, 1}, f64),
          at::zeros({B, n, 2 * cb}, gram), at::zeros({B, 2 * cb, cb + ca}, gram)};
}

// The forward: the loss (in fs's dtype) and what its backward needs.
std::pair<at::Tensor, Saved> forward(const at::Tensor& fs, const at::Tensor& ft, int64_t patch_in,
                                     const NodeKernels& k) {
  if (no_pairs(fs)) return {at::zeros({}, fs.options()), empty_saved(fs, ft, node_count(fs, patch_in))};
  const int64_t patch = node_patch(fs, patch_in);
  Saved sv;
  std::tie(sv.s_hat, sv.s_inv) = k.nodes(fs, patch);
  std::tie(sv.t_hat, sv.t_inv) = k.nodes(ft, patch);
  const bool s_is_b = student_is_b(fs, ft);
  const auto per_image = align_and_expand(s_is_b ? sv.t_hat : sv.s_hat, s_is_b ? sv.s_hat : sv.t_hat, gram_dtype(fs), k, sv);
  const double n = static_cast<double>(sv.s_hat.size(1));
  return {(per_image / (n * n)).mean().to(fs.scalar_type()), sv};
}

// Gradients of grad * loss from the forward's Saved: one product [P | D] coef, then the adjoint of
// the node pooling for each side.
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& fs, const at::Tensor& ft,
                                            const Saved& sv, int64_t patch_in, const NodeKernels& k) {
  if (no_pairs(fs)) {
    return {at::zeros(fs.sizes(), fs.options().memory_format(dense_format(fs))),
            at::zeros(ft.sizes(), ft.options().memory_format(dense_format(ft)))};
  }
  const int64_t patch = node_patch(fs, patch_in);
  const int64_t n = sv.s_hat.size(1), cb = std::max(fs.size(1), ft.size(1)), ca = std::min(fs.size(1), ft.size(1));
  const auto gram = gram_dtype(fs);
  // d loss = grad / (B N^2) d sum_images ||M||^2; the scalar goes into the small factor.
  const auto scale = grad.reshape({}).to(at::kDouble) / (static_cast<double>(fs.size(0)) * n * n);
  const auto g = at::bmm(sv.pd, (sv.coef * scale).to(gram));
  const bool s_is_b = student_is_b(fs, ft);
  const auto g_b = g.narrow(2, 0, cb), g_a = g.narrow(2, cb, ca);
  // The node kernels index the saved nodes densely: a direct call may pass other strides.
  return {k.nodes_backward(s_is_b ? g_b : g_a, sv.s_hat.contiguous(), sv.s_inv.contiguous(), fs, patch),
          k.nodes_backward(s_is_b ? g_a : g_b, sv.t_hat.contiguous(), sv.t_inv.contiguous(), ft, patch)};
}

using ForBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The registered overloads of one backend (csrc/registration.cpp has the schemas).
template <const NodeKernels& k>
struct Entry {
  static at::Tensor loss(const at::Tensor& fs, const at::Tensor& ft, int64_t patch) {
    check_pairwise_affinity_loss(fs, ft, patch);
    return forward(fs, ft, patch, k).first;
  }
  // Without saved tensors: the forward again (a direct call of the op; the Python API saves them).
  static std::tuple<at::Tensor, at::Tensor> loss_backward(const at::Tensor& grad, const at::Tensor& fs,
                                                          const at::Tensor& ft, int64_t patch) {
    check_pairwise_affinity_loss_backward(grad, fs, ft, patch);
    return backward(grad, fs, ft, forward(fs, ft, patch, k).second, patch, k);
  }
  static ForBackward for_backward(const at::Tensor& fs, const at::Tensor& ft, int64_t patch) {
    check_pairwise_affinity_loss(fs, ft, patch, "pairwise_affinity_loss_for_backward");
    auto [loss, sv] = forward(fs, ft, patch, k);
    return {loss, sv.s_hat, sv.s_inv, sv.t_hat, sv.t_inv, sv.pd, sv.coef};
  }
  static std::tuple<at::Tensor, at::Tensor> saved_backward(const at::Tensor& grad, const at::Tensor& fs,
                                                           const at::Tensor& ft, const at::Tensor& s_hat,
                                                           const at::Tensor& s_inv, const at::Tensor& t_hat,
                                                           const at::Tensor& t_inv, const at::Tensor& pd,
                                                           const at::Tensor& coef, int64_t patch) {
    check_pairwise_affinity_loss_saved_backward(grad, fs, ft, s_hat, s_inv, t_hat, t_inv, pd, coef, patch);
    return backward(grad, fs, ft, Saved{s_hat, s_inv, t_hat, t_inv, pd, coef}, patch, k);
  }
  static void register_all(torch::Library& m) {
    m.impl("pairwise_affinity_loss", &loss);
    m.impl("pairwise_affinity_loss_backward", &loss_backward);
    m.impl("pairwise_affinity_loss_for_backward", &for_backward);
    m.impl("pairwise_affinity_loss_saved_backward", &saved_backward);
  }
};

// One set of entry points per backend, registered for its dispatch key: the dispatcher picks the
// node kernels, no run-time test of the device.
constexpr NodeKernels kCpuNodes{&normalized_nodes_cpu, &normalized_nodes_backward_cpu, &sum_and_difference_cpu};
#ifdef PYAMALGAM_WITH_CUDA
constexpr NodeKernels kAtenNodes{&normalized_nodes_aten, &normalized_nodes_backward_aten, &sum_and_difference_aten};
#endif

}  // namespace

TORCH_LIBRARY_IMPL(pyamalgam, CPU, m) { Entry<kCpuNodes>::register_all(m); }

#ifdef PYAMALGAM_WITH_CUDA
TORCH_LIBRARY_IMPL(pyamalgam, CUDA, m) { Entry<kAtenNodes>::register_all(m); }
#endif

}  // namespace pyamalgam
