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

// The patch the node kernels get: a patch beyond the map covers it with one cell, as max(H, W)
// does. Every node kernel (CPU and ATen) sees only this one.
int64_t node_patch(const at::Tensor& f, int64_t patch) {
  return std::min(patch, std::max<int64_t>({f.size(2), f.size(3), 1}));
}

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

// The node kernels of one backend.
struct NodeKernels {
  std::pair<at::Tensor, at::Tensor> (*nodes)(const at::Tensor& f, int64_t patch);
  at::Tensor (*nodes_backward)(const at::Tensor& g_hat, const at::Tensor& hat, const at::Tensor& inv,
                               const at::Tensor& f, int64_t patch);
};

struct Aligned {
  at::Tensor q;          // (B, Ca, Cb), orthonormal rows
  at::Tensor p, d;       // (B, N, Cb): B + A Q, B - A Q
  at::Tensor gpp, gdd, g1;  // P^T P, D^T D, D^T P
};

// `a`, `b`: float64 normalised nodes; P, D and their products are kept in `gram_dtype`.
Aligned align(const at::Tensor& a, const at::Tensor& b, at::ScalarType gram_dtype) {
  // A non-finite input must reach the loss as NaN, not make the SVD fail: decompose a cleaned
  // matrix (any orthonormal Q keeps the identity exact) and let the NaN flow through A and B.
  auto k = at::nan_to_num(at::bmm(a.transpose(1, 2), b), 0.0, 0.0, 0.0);
  auto [u, s, vh] = at::linalg_svd(k, /*full_matrices=*/false);
  Aligned r;
  r.q = at::bmm(u, vh);
  auto a_rot = at::bmm(a, r.q);
  r.p = (b + a_rot).to(gram_dtype);
  r.d = (b - a_rot).to(gram_dtype);
  r.gpp = at::bmm(r.p.transpose(1, 2), r.p);
  r.gdd = at::bmm(r.d.transpose(1, 2), r.d);
  r.g1 = at::bmm(r.d.transpose(1, 2), r.p);
  return r;
}

struct Sides {
  at::Tensor s_hat, s_inv, t_hat, t_inv;
  bool student_is_b;  // B is the side with more channels (ties: the student)
  at::ScalarType gram_dtype;
};

Sides prepare(const at::Tensor& fs, const at::Tensor& ft, int64_t patch, const NodeKernels& k) {
  Sides r;
  std::tie(r.s_hat, r.s_inv) = k.nodes(fs, patch);
  std::tie(r.t_hat, r.t_inv) = k.nodes(ft, patch);
  r.student_is_b = fs.size(1) >= ft.size(1);
  r.gram_dtype = fs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return r;
}

at::Tensor pairwise_loss(const at::Tensor& fs, const at::Tensor& ft, int64_t patch_in, const NodeKernels& k) {
  check_pairwise_affinity_loss(fs, ft, patch_in);
  if (no_pairs(fs)) return at::zeros({}, fs.options());
  const int64_t patch = node_patch(fs, patch_in);
  const auto sd = prepare(fs, ft, patch, k);
  const auto& a = sd.student_is_b ? sd.t_hat : sd.s_hat;
  const auto& b = sd.student_is_b ? sd.s_hat : sd.t_hat;
  const auto r = align(a, b, sd.gram_dtype);
  const double n = static_cast<double>(a.size(1));
  // Both terms are sums of non-negative numbers (see the top): float64 sums keep them exact.
  auto per_image = 0.5 * ((r.gpp * r.gdd).sum({1, 2}, false, at::kDouble) + (r.g1 * r.g1).sum({1, 2}, false, at::kDouble)) / (n * n);
  return per_image.mean().to(fs.scalar_type());
}

// d||M||^2/dB = 4 M B, d||M||^2/dA' = -4 M A', with M B and M A' expanded in P and D so that,
// like the forward, they are formed from small quantities:
//   4 M B  = P (G1 + Gdd) + D (Gpp + G1^T),   4 M A' = P (G1 - Gdd) + D (Gpp - G1^T).
// Q is held fixed: the loss is the same for every Q with orthonormal rows.
std::tuple<at::Tensor, at::Tensor> pairwise_loss_backward(const at::Tensor& grad, const at::Tensor& fs,
                                                          const at::Tensor& ft, int64_t patch_in,
                                                          const NodeKernels& k) {
  check_pairwise_affinity_loss_backward(grad, fs, ft, patch_in);
  if (no_pairs(fs)) {
    return {at::zeros(fs.sizes(), fs.options().memory_format(dense_format(fs))),
            at::zeros(ft.sizes(), ft.options().memory_format(dense_format(ft)))};
  }
  const int64_t patch = node_patch(fs, patch_in);
  const auto sd = prepare(fs, ft, patch, k);
  const auto& a = sd.student_is_b ? sd.t_hat : sd.s_hat;
  const auto& b = sd.student_is_b ? sd.s_hat : sd.t_hat;
  const auto r = align(a, b, sd.gram_dtype);
  const double n = static_cast<double>(a.size(1));
  const auto scale = (grad.to(at::kDouble) / (static_cast<double>(fs.size(0)) * n * n)).to(sd.gram_dtype);
  const auto g1t = r.g1.transpose(1, 2);
  auto g_b = (at::bmm(r.p, r.g1 + r.gdd) + at::bmm(r.d, r.gpp + g1t)) * scale;
  auto g_a = at::bmm(at::bmm(r.p, r.g1 - r.gdd) + at::bmm(r.d, r.gpp - g1t), r.q.transpose(1, 2).to(sd.gram_dtype)) * (-scale);
  auto g_s_hat = sd.student_is_b ? g_b : g_a;
  auto g_t_hat = sd.student_is_b ? g_a : g_b;
  auto g_s = k.nodes_backward(g_s_hat, sd.s_hat, sd.s_inv, fs, patch);
  auto g_t = k.nodes_backward(g_t_hat, sd.t_hat, sd.t_inv, ft, patch);
  return {g_s, g_t};
}

// One entry point per backend, registered for its dispatch key: the dispatcher picks the node
// kernels, no run-time test of the device.
constexpr NodeKernels kCpuNodes{&normalized_nodes_cpu, &normalized_nodes_backward_cpu};

at::Tensor pairwise_affinity_loss_cpu(const at::Tensor& fs, const at::Tensor& ft, int64_t patch) {
  return pairwise_loss(fs, ft, patch, kCpuNodes);
}

std::tuple<at::Tensor, at::Tensor> pairwise_affinity_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& fs,
                                                                       const at::Tensor& ft, int64_t patch) {
  return pairwise_loss_backward(grad, fs, ft, patch, kCpuNodes);
}

#ifdef PYAMALGAM_WITH_CUDA
constexpr NodeKernels kAtenNodes{&normalized_nodes_aten, &normalized_nodes_backward_aten};

at::Tensor pairwise_affinity_loss_cuda(const at::Tensor& fs, const at::Tensor& ft, int64_t patch) {
  return pairwise_loss(fs, ft, patch, kAtenNodes);
}

std::tuple<at::Tensor, at::Tensor> pairwise_affinity_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& fs,
                                                                        const at::Tensor& ft, int64_t patch) {
  return pairwise_loss_backward(grad, fs, ft, patch, kAtenNodes);
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(pyamalgam, CPU, m) {
  m.impl("pairwise_affinity_loss", &pairwise_affinity_loss_cpu);
  m.impl("pairwise_affinity_loss_backward", &pairwise_affinity_loss_backward_cpu);
}

#ifdef PYAMALGAM_WITH_CUDA
TORCH_LIBRARY_IMPL(pyamalgam, CUDA, m) {
  m.impl("pairwise_affinity_loss", &pairwise_affinity_loss_cuda);
  m.impl("pairwise_affinity_loss_backward", &pairwise_affinity_loss_backward_cuda);
}
#endif

}  // namespace pyamalgam
