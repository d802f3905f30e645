// Local pair-wise distillation loss on CPU (thesis 003, §3.3.1, Eq. 3.2 with a Chebyshev window).
//
// Nodes are the patch x patch average pools of each map, L2-normalised, in float64: the pass of
// the full-graph op (normalized_nodes, csrc/cpu/pairwise_nodes.cpp), (B, N, Cs) and (B, N, Ct).
// Node i is connected to the nodes j within Chebyshev distance r of it on the hp x wp grid, itself
// included, and
//   loss = 1 / (B N alpha) sum_b sum_i sum_{j in W(i)} d_ij^2,   d_ij = s_i . s_j - t_i . t_j,
//   alpha = min(2r + 1, hp) * min(2r + 1, wp),
// the thesis' normaliser beta / (W'H' alpha) (a border node's missing neighbours count as 0).
//
// Memory O(N C): the neighbourhoods are never gathered (an unfold would hold N alpha C values);
// each affinity is a dot product of two node rows, and a window's rows stay in cache. Time
// O(N alpha (Cs + Ct)). The forward visits each unordered pair once (j after i in raster order)
// and counts it twice, plus the diagonal. The backward: i is the first and the second node of each
// of its pairs, so d loss / d s_i = 4 k sum_{j in W(i)} d_ij s_j and d loss / d t_i =
// -4 k sum_{j in W(i)} d_ij t_j, k = grad / (B N alpha). Each node gathers its own gradient: rows
// run in parallel without atomics, and every sum has a fixed order (deterministic for any number
// of threads). The pooling's adjoint is the full-graph op's (normalized_nodes_backward).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "cpu/kernels.h"
#include "cpu/vec.h"

namespace pyamalgam::cpu::PYAMALGAM_CPU_ISA {
namespace {

// The node grid and the window on it. The radius is clipped to the grid first, so that 2r + 1
// and i + r cannot overflow for a huge radius (any r >= max(hp, wp) is the same graph).
struct Window {
  int64_t B, hp, wp, r;
  Window(const at::Tensor& f, int64_t radius, int64_t patch)
      : B(f.size(0)), hp((f.size(2) + patch - 1) / patch), wp((f.size(3) + patch - 1) / patch),
        r(std::min(radius, std::max(hp, wp))) {}
  int64_t nodes() const { return hp * wp; }
  double alpha() const { return static_cast<double>(std::min(2 * r + 1, hp) * std::min(2 * r + 1, wp)); }
  // k = 1 / (B N alpha); 0 for an empty batch or map (the loss of nothing is 0, not NaN).
  double scale() const { return B * nodes() > 0 ? 1.0 / (static_cast<double>(B * nodes()) * alpha()) : 0.0; }
  int64_t lo(int64_t x) const { return std::max<int64_t>(0, x - r); }
  int64_t hi(int64_t x, int64_t n) const { return std::min(n - 1, x + r); }
};

struct Nodes {  // one map's normalised nodes: node n of image b at v + (b N + n) C
  at::Tensor hat, inv;
  const double* v;
  int64_t C;
  Nodes(const at::Tensor& f, int64_t patch) {
    std::tie(hat, inv) = normalized_nodes(f, patch);
    v = hat.const_data_ptr<double>();
    C = f.size(1);
  }
  const double* row(int64_t node) const { return v + node * C; }
};

__attribute__((always_inline)) inline double dot(const double* a, const double* b, int64_t n) {
  return lane_sum<double>(n, [&](int64_t c) { return a[c] * b[c]; });
}

// d_ij for nodes n, m (indices into the batch's node rows).
inline double diff(const Nodes& s, const Nodes& t, int64_t n, int64_t m) {
  return dot(s.row(n), s.row(m), s.C) - dot(t.row(n), t.row(m), t.C);
}

// sum_{j in W(i)} d_ij^2 over the nodes of grid row i of image b.
double row_loss(const Nodes& s, const Nodes& t, const Window& g, int64_t b, int64_t i) {
  const int64_t base = b * g.nodes();
  double diag = 0, pairs = 0;
  for (int64_t j = 0; j < g.wp; ++j) {
    const int64_t n = base + i * g.wp + j;
    const double d0 = diff(s, t, n, n);  // 0 unless one side's node is zero and the other's not
    diag += d0 * d0;
    for (int64_t jj = j + 1; jj <= g.hi(j, g.wp); ++jj) {
      const double d = diff(s, t, n, n + (jj - j));
      pairs += d * d;
    }
    for (int64_t ii = i + 1; ii <= g.hi(i, g.hp); ++ii) {
      for (int64_t jj = g.lo(j); jj <= g.hi(j, g.wp); ++jj) {
        const double d = diff(s, t, n, base + ii * g.wp + jj);
        pairs += d * d;
      }
    }
  }
  return diag + 2 * pairs;
}

// Gradients w.r.t. the normalised nodes of grid row i of image b, written to gs, gt.
void row_backward(const Nodes& s, const Nodes& t, const Window& g, int64_t b, int64_t i, double k4, double* gs,
                  double* gt) {
  const int64_t base = b * g.nodes();
  for (int64_t j = 0; j < g.wp; ++j) {
    const int64_t n = base + i * g.wp + j;
    double* out_s = gs + n * s.C;
    double* out_t = gt + n * t.C;
    std::fill(out_s, out_s + s.C, 0.0);
    std::fill(out_t, out_t + t.C, 0.0);
    for (int64_t ii = g.lo(i); ii <= g.hi(i, g.hp); ++ii) {
      for (int64_t jj = g.lo(j); jj <= g.hi(j, g.wp); ++jj) {
        const int64_t m = base + ii * g.wp + jj;
        const double d = diff(s, t, n, m) * k4;
        const double* sm = s.row(m);
        const double* tm = t.row(m);
        for (int64_t c = 0; c < s.C; ++c) out_s[c] += d * sm[c];
        for (int64_t c = 0; c < t.C; ++c) out_t[c] -= d * tm[c];
      }
    }
  }
}

}  // namespace

at::Tensor pairwise_local_loss(const at::Tensor& fs, const at::Tensor& ft, int64_t radius, int64_t patch_in) {
  const int64_t patch = node_patch(fs, patch_in);
  const Window g(fs, radius, patch);
  auto loss = at::empty({}, fs.options());
  if (g.B * g.nodes() == 0) return loss.fill_(0.0);
  const Nodes s(fs, patch), t(ft, patch);
  std::vector<double> rows(g.B * g.hp);
  at::parallel_for(0, g.B * g.hp, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rows[r] = row_loss(s, t, g, r / g.hp, r % g.hp);
  });
  double total = 0;  // a fixed order: the same result for any number of threads
  for (double v : rows) total += v;
  return loss.fill_(total * g.scale());
}

std::tuple<at::Tensor, at::Tensor> pairwise_local_loss_backward(const at::Tensor& grad, const at::Tensor& fs,
                                                                const at::Tensor& ft, int64_t radius, int64_t patch_in) {
  const int64_t patch = node_patch(fs, patch_in);
  const Window g(fs, radius, patch);
  if (g.B * g.nodes() == 0) {
    return {at::zeros(fs.sizes(), fs.options()), at::zeros(ft.sizes(), ft.options())};
  }
  const Nodes s(fs, patch), t(ft, patch);
  auto gs = at::empty(s.hat.sizes(), s.hat.options());
  auto gt = at::empty(t.hat.sizes(), t.hat.options());
  const double k4 = 4.0 * grad.item<double>() * g.scale();
  double* ps = gs.data_ptr<double>();
  double* pt = gt.data_ptr<double>();
  at::parallel_for(0, g.B * g.hp, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row_backward(s, t, g, r / g.hp, r % g.hp, k4, ps, pt);
  });
  return {normalized_nodes_backward(gs, s.hat, s.inv, fs, patch),
          normalized_nodes_backward(gt, t.hat, t.inv, ft, patch)};
}

}  // namespace pyamalgam::cpu::PYAMALGAM_CPU_ISA
