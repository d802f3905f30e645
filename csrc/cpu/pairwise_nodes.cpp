// Node kernels of the pair-wise affinity loss on CPU (see csrc/pairwise_affinity.h).
//
// One row of cells at a time: the row's pixels are read once, summed per cell in float64, then
// each node is averaged, normalised and written; the backward walks the same rows in reverse.
// sum_and_difference forms the full-graph op's [P | D] in one pass (ATen: a temporary and a copy each).
// NCHW and channels_last differ only in the loop order over (channel, column).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "cpu/kernels.h"

namespace pyamalgam::cpu::PYAMALGAM_CPU_ISA {
namespace {

struct Cells {
  int64_t B, C, H, W, patch, hp, wp;
  // The patch clamped to the map (csrc/common.h): no size computation below can overflow.
  Cells(const at::Tensor& f, int64_t patch_)
      : B(f.size(0)), C(f.size(1)), H(f.size(2)), W(f.size(3)), patch(node_patch(f, patch_)),
        hp((H + patch - 1) / patch), wp((W + patch - 1) / patch) {}
  int64_t nodes() const { return hp * wp; }
  // Offset of column w's cell in a row buffer of wp * C values; precomputed because an integer
  // division per element would dominate the pass.
  std::vector<int64_t> cell_offsets() const {
    std::vector<int64_t> o(W);
    for (int64_t w = 0; w < W; ++w) o[w] = (w / patch) * C;
    return o;
  }
  int64_t row_end(int64_t i) const { return std::min(H, (i + 1) * patch); }
  // Pixels in cell (i, j): a ragged border cell counts only what it covers.
  double count(int64_t i, int64_t j) const {
    return static_cast<double>((row_end(i) - i * patch) * (std::min(W, (j + 1) * patch) - j * patch));
  }
};

// Calls fn(c, w, element_index) over every pixel of image row h, in the layout's memory order.
template <typename F>
inline void for_row(const PlaneIndex& ix, const Cells& g, int64_t b, int64_t h, const F& fn) {
  if (ix.sp == 1) {
    for (int64_t c = 0; c < g.C; ++c) {
      const int64_t base = ix(b, c, h * g.W);
      for (int64_t w = 0; w < g.W; ++w) fn(c, w, base + w);
    }
  } else {
    for (int64_t w = 0; w < g.W; ++w) {
      const int64_t base = ix(b, 0, h * g.W + w);
      for (int64_t c = 0; c < g.C; ++c) fn(c, w, base + c);
    }
  }
}

}  // namespace

std::pair<at::Tensor, at::Tensor> normalized_nodes(const at::Tensor& f_in, int64_t patch) {
  const auto format = dense_format(f_in);
  const auto f = f_in.contiguous(format);
  const Cells g(f, patch);
  const PlaneIndex ix(f, format);
  auto hat = at::empty({g.B, g.nodes(), g.C}, f.options().dtype(at::kDouble));
  auto inv = at::empty({g.B, g.nodes(), 1}, f.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "normalized_nodes_cpu", [&] {
    const scalar_t* x = f.const_data_ptr<scalar_t>();
    double* out = hat.data_ptr<double>();
    double* out_inv = inv.data_ptr<double>();
    const auto cell = g.cell_offsets();
    at::parallel_for(0, g.B * g.hp, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> sums(g.wp * g.C);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / g.hp, i = r % g.hp;
        std::fill(sums.begin(), sums.end(), 0.0);
        for (int64_t h = i * g.patch; h < g.row_end(i); ++h) {
          for_row(ix, g, b, h, [&](int64_t c, int64_t w, int64_t e) {
            sums[cell[w] + c] += static_cast<double>(x[e]);
          });
        }
        for (int64_t j = 0; j < g.wp; ++j) {
          const double* s = sums.data() + j * g.C;
          const double scale = 1.0 / g.count(i, j);
          double sq = 0;
          for (int64_t c = 0; c < g.C; ++c) sq += (s[c] * scale) * (s[c] * scale);
          const double norm = std::sqrt(sq);
          // A zero node stays zero; NaN/inf still reach the output (NaN * 0 is NaN).
          const double k = norm > 0 ? 1.0 / norm : 0.0;
          const int64_t node = b * g.nodes() + i * g.wp + j;
          out_inv[node] = k;
          for (int64_t c = 0; c < g.C; ++c) out[node * g.C + c] = s[c] * scale * k;
        }
      }
    });
  });
  return {hat, inv};
}

namespace {

// Row `node` of the gradient w.r.t. the normalised nodes, read in place: the caller's (B, N, C)
// slice of a wider product (the full-graph op's [g_b | g_a]) in float or double, no copy.
template <typename grad_t>
struct GradRows {
  const grad_t* g;
  int64_t sb, sn, nodes;
  const grad_t* row(int64_t node) const { return g + (node / nodes) * sb + (node % nodes) * sn; }
};

template <typename scalar_t, typename grad_t>
void nodes_backward_pass(const Cells& g, const PlaneIndex& ix, const GradRows<grad_t>& gh, const double* v,
                         const double* k, scalar_t* o) {
  const auto cell = g.cell_offsets();
  at::parallel_for(0, g.B * g.hp, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> cell_grad(g.wp * g.C);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / g.hp, i = r % g.hp;
      for (int64_t j = 0; j < g.wp; ++j) {
        // d(v / |v|) = (g - v_hat (v_hat . g)) / |v|, spread evenly over the cell's pixels.
        const int64_t node = b * g.nodes() + i * g.wp + j;
        const grad_t* gn = gh.row(node);
        const double* vn = v + node * g.C;
        double dot = 0;
        for (int64_t c = 0; c < g.C; ++c) dot += vn[c] * static_cast<double>(gn[c]);
        const double scale = k[node] / g.count(i, j);
        for (int64_t c = 0; c < g.C; ++c) cell_grad[j * g.C + c] = (static_cast<double>(gn[c]) - vn[c] * dot) * scale;
      }
      for (int64_t h = i * g.patch; h < g.row_end(i); ++h) {
        for_row(ix, g, b, h, [&](int64_t c, int64_t w, int64_t e) {
          o[e] = static_cast<scalar_t>(cell_grad[cell[w] + c]);
        });
      }
    }
  });
}

}  // namespace

at::Tensor normalized_nodes_backward(const at::Tensor& grad_hat_in, const at::Tensor& hat,
                                     const at::Tensor& inv, const at::Tensor& f, int64_t patch) {
  const auto format = dense_format(f);
  const Cells g(f, patch);
  auto out = at::empty(f.sizes(), f.options().memory_format(format));
  const PlaneIndex ix(out, format);
  // Float and double rows with unit channel stride are read where they are; anything else is
  // converted once.
  const bool in_place = (grad_hat_in.scalar_type() == at::kFloat || grad_hat_in.scalar_type() == at::kDouble) &&
                        (grad_hat_in.stride(2) == 1 || g.C <= 1);
  const auto grad_hat = in_place ? grad_hat_in : grad_hat_in.to(at::kDouble).contiguous();
  const double* v = hat.const_data_ptr<double>();
  const double* k = inv.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "normalized_nodes_backward_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t sb = grad_hat.stride(0), sn = grad_hat.stride(1);
    if (grad_hat.scalar_type() == at::kFloat) {
      nodes_backward_pass(g, ix, GradRows<float>{grad_hat.const_data_ptr<float>(), sb, sn, g.nodes()}, v, k, o);
    } else {
      nodes_backward_pass(g, ix, GradRows<double>{grad_hat.const_data_ptr<double>(), sb, sn, g.nodes()}, v, k, o);
    }
  });
  return out;
}

at::Tensor sum_and_difference(const at::Tensor& b_in, const at::Tensor& a_rot_in, at::ScalarType dtype) {
  const auto b = b_in.contiguous(), a = a_rot_in.contiguous();
  const int64_t rows = b.size(0) * b.size(1), C = b.size(2);
  auto out = at::empty({b.size(0), b.size(1), 2 * C}, b.options().dtype(dtype));
  const double* x = b.const_data_ptr<double>();
  const double* y = a.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(dtype, "sum_and_difference_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const double* xr = x + r * C;
        const double* yr = y + r * C;
        scalar_t* p = o + r * 2 * C;
        for (int64_t c = 0; c < C; ++c) p[c] = static_cast<scalar_t>(xr[c] + yr[c]);
        for (int64_t c = 0; c < C; ++c) p[C + c] = static_cast<scalar_t>(xr[c] - yr[c]);
      }
    });
  });
  return out;
}

}  // namespace pyamalgam::cpu::PYAMALGAM_CPU_ISA
