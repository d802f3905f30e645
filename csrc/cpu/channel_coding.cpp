// Channel coding (paper 001 §5.1.1, Fig. 3) on CPU.
//
// Forward: one reduction pass over x (sum per plane), the two tiny FC layers, one rescale pass.
// Backward: one pass computing sum(x) and sum(grad * x) per plane together, the FC backward, one
// pass for grad_x. Both run image group by image group (for_image_groups), so that the second pass
// reads a group's planes from cache. Sums run in short op-math blocks added into doubles
// (csrc/cpu/vec.h), so float32 planes of any size keep ~double accuracy.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "cpu/kernels.h"
#include "cpu/vec.h"

namespace pyamalgam::cpu::PYAMALGAM_CPU_ISA {
namespace {

// Per-plane sums over H*W: sum(x) and, when `grad` is given, sum(grad * x).
// NCHW sums each contiguous plane; channels_last sums fixed chunks of pixels (C running sums per
// chunk, combined in chunk order, so the result does not depend on the thread count). Both read x
// exactly once.
template <typename scalar_t>
void plane_sums(const scalar_t* x, const scalar_t* grad, const PlaneIndex& ix, int64_t B, int64_t C,
                int64_t P, double* sum_x, double* sum_gx) {
  using acc_t = at::opmath_type<scalar_t>;
  if (ix.sp == 1) {
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        const scalar_t* xp = x + bc * P;
        sum_x[bc] = lane_sum<acc_t>(P, [&](int64_t p) { return static_cast<acc_t>(xp[p]); });
        // A run of 16 values summed in float overflows from ~2e37 (float32) although the plane's
        // double sum does not: a sum that is not finite is done again in double (the same
        // non-finite value when the plane holds inf or NaN; finite sums keep their bits).
        if (!std::isfinite(sum_x[bc])) {
          sum_x[bc] = lane_sum<double>(P, [&](int64_t p) { return static_cast<double>(xp[p]); });
        }
        if (grad) {
          const scalar_t* gp = grad + bc * P;
          sum_gx[bc] = lane_sum<acc_t>(P, [&](int64_t p) { return static_cast<acc_t>(gp[p]) * static_cast<acc_t>(xp[p]); });
          if (!std::isfinite(sum_gx[bc])) {
            sum_gx[bc] = lane_sum<double>(P, [&](int64_t p) { return static_cast<double>(gp[p]) * static_cast<double>(xp[p]); });
          }
        }
      }
    });
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));  // pixels
  const int64_t chunks = (P + chunk - 1) / chunk;
  std::vector<double> part_x(B * chunks * C), part_gx(grad ? B * chunks * C : 0);
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / chunks, p0 = (i % chunks) * chunk, p1 = std::min(P, p0 + chunk);
      double* sx = part_x.data() + i * C;
      double* sgx = grad ? part_gx.data() + i * C : nullptr;
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* xp = x + (b * P + p) * C;
        for (int64_t c = 0; c < C; ++c) sx[c] += static_cast<double>(xp[c]);
        if (sgx) {
          const scalar_t* gp = grad + (b * P + p) * C;
          for (int64_t c = 0; c < C; ++c) sgx[c] += static_cast<double>(gp[c]) * static_cast<double>(xp[c]);
        }
      }
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      double sx = 0, sgx = 0;
      for (int64_t k = 0; k < chunks; ++k) {
        sx += part_x[(b * chunks + k) * C + c];
        if (grad) sgx += part_gx[(b * chunks + k) * C + c];
      }
      sum_x[b * C + c] = sx;
      if (grad) sum_gx[b * C + c] = sgx;
    }
  }
}

// out = a * scale[b, c] + shift[b, c] over a dense layout, in the op-math type (float for float
// inputs: twice the SIMD width of double, and the same rounding as eager). shift may be null (0);
// a may be null (0), which makes it a fill.
template <typename scalar_t>
void rescale(const scalar_t* a, const double* scale, const double* shift, const PlaneIndex& ix, int64_t B,
             int64_t C, int64_t P, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  auto coef = [](const double* v, int64_t i) { return v ? static_cast<acc_t>(v[i]) : acc_t(0); };
  if (ix.sp == 1) {  // NCHW: one (scale, shift) per contiguous plane
    at::parallel_for(0, B * C, std::max<int64_t>(1, 4096 / std::max<int64_t>(P, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        const acc_t s = coef(scale, bc), t = coef(shift, bc);
        scalar_t* o = out + bc * P;
        if (!a) {
          std::fill(o, o + P, static_cast<scalar_t>(t));
          continue;
        }
        const scalar_t* ap = a + bc * P;
        for (int64_t p = 0; p < P; ++p) o[p] = static_cast<scalar_t>(static_cast<acc_t>(ap[p]) * s + t);
      }
    });
    return;
  }
  // channels_last: each pixel is a contiguous row of C values, scaled by its image's C coefficients.
  at::parallel_for(0, B * P, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(C), t(C);
    int64_t loaded = -1;  // the image whose coefficients s and t hold
    for (int64_t r = begin; r < end; ++r) {
      if (const int64_t b = r / P; b != loaded) {
        for (int64_t c = 0; c < C; ++c) {
          s[c] = coef(scale, b * C + c);
          t[c] = coef(shift, b * C + c);
        }
        loaded = b;
      }
      scalar_t* o = out + r * C;
      const scalar_t* ar = a ? a + r * C : nullptr;
      for (int64_t c = 0; c < C; ++c) {
        o[c] = static_cast<scalar_t>(ar ? static_cast<acc_t>(ar[c]) * s[c] + t[c] : t[c]);
      }
    }
  });
}

// y[i] += alpha * x[i]: sums over rows of a matrix, vectorised along the row, in row order.
inline void axpy(double alpha, const double* x, double* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// The two FC layers of Fig. 3, s = sigmoid(w2 relu(w1 m + b1) + b2), and their backward, in double,
// one image at a time. They cost C x R multiply-adds per image: plain loops over double copies of
// the weights beat the dozen ATen calls (and allocations) they would take. Every product is written
// as a sum of scaled rows (axpy), which vectorises along the row without reordering any sum.
struct Excitation {
  int64_t C, R;
  std::vector<double> w1, w1t, b1, w2, w2t, b2;  // (R, C), (C, R), (R), (C, R), (R, C), (C)

  template <typename scalar_t>
  static Excitation of(const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
    auto dense = [](const at::Tensor& t) {
      const auto d = t.contiguous();
      const scalar_t* p = d.const_data_ptr<scalar_t>();
      return std::vector<double>(p, p + d.numel());
    };
    auto transposed = [](const std::vector<double>& m, int64_t rows, int64_t cols) {
      std::vector<double> t(m.size());
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < cols; ++j) t[j * rows + i] = m[i * cols + j];
      }
      return t;
    };
    const int64_t C = w1.size(1), R = w1.size(0);
    auto w1d = dense(w1), w2d = dense(w2);
    return {C, R, w1d, transposed(w1d, R, C), dense(b1), w2d, transposed(w2d, C, R), dense(b2)};
  }

  // pooled = sum_x / P (C), hidden (R), scale (C).
  void forward(const double* sum_x, int64_t P, double* pooled, double* hidden, double* scale) const {
    for (int64_t c = 0; c < C; ++c) pooled[c] = sum_x[c] / static_cast<double>(P);
    std::copy(b1.begin(), b1.end(), hidden);
    for (int64_t c = 0; c < C; ++c) axpy(pooled[c], &w1t[c * R], hidden, R);  // b1 + w1 pooled
    for (int64_t r = 0; r < R; ++r) hidden[r] = std::max(hidden[r], 0.0);  // max(NaN, 0) is NaN, as in eager
    std::copy(b2.begin(), b2.end(), scale);
    for (int64_t r = 0; r < R; ++r) axpy(hidden[r], &w2t[r * C], scale, C);  // b2 + w2 hidden
    for (int64_t c = 0; c < C; ++c) scale[c] = 1.0 / (1.0 + std::exp(-scale[c]));
  }

  // From dL/ds = sum_p g x per plane: dz2 (C) and dz1 (R), the gradients at the two layers'
  // pre-activations, and shift (C) = d(pooled) / P, which the mean spreads over the plane.
  void backward(const double* sum_gx, int64_t P, const double* hidden, const double* scale, double* dz2,
                double* dz1, double* shift) const {
    for (int64_t c = 0; c < C; ++c) dz2[c] = sum_gx[c] * scale[c] * (1.0 - scale[c]);  // sigmoid'
    std::fill(dz1, dz1 + R, 0.0);
    for (int64_t c = 0; c < C; ++c) axpy(dz2[c], &w2[c * R], dz1, R);  // w2^T dz2
    for (int64_t r = 0; r < R; ++r) dz1[r] *= hidden[r] > 0 ? 1.0 : 0.0;  // relu'; NaN stays NaN
    std::fill(shift, shift + C, 0.0);
    for (int64_t r = 0; r < R; ++r) axpy(dz1[r] / static_cast<double>(P), &w1[r * C], shift, C);  // w1^T dz1 / P
  }
};

// grad_w = sum over images of outer(dz, in), grad_b = sum over images of dz, added in image order
// (deterministic), written in the weights' dtype. dz is (B, rows), in is (B, cols).
template <typename scalar_t>
std::pair<at::Tensor, at::Tensor> weight_grads(const std::vector<double>& dz, const std::vector<double>& in,
                                               int64_t B, const at::Tensor& w, const at::Tensor& b) {
  const int64_t rows = w.size(0), cols = w.size(1);
  std::vector<double> sw(rows * cols), sb(rows);
  for (int64_t n = 0; n < B; ++n) {
    axpy(1.0, &dz[n * rows], sb.data(), rows);
    for (int64_t i = 0; i < rows; ++i) axpy(dz[n * rows + i], &in[n * cols], &sw[i * cols], cols);
  }
  auto as_tensor = [](const std::vector<double>& v, const at::Tensor& like) {
    auto t = at::empty(like.sizes(), like.options());
    std::transform(v.begin(), v.end(), t.data_ptr<scalar_t>(), [](double x) { return static_cast<scalar_t>(x); });
    return t;
  };
  return {as_tensor(sw, w), as_tensor(sb, b)};
}

// A gradient that is constant over each plane (that of out.sum() or out.mean(): an expanded
// tensor) is read as its B x C values rather than copied out to B x C x H x W.
bool constant_per_plane(const at::Tensor& g) {
  return (g.size(2) == 1 || g.stride(2) == 0) && (g.size(3) == 1 || g.stride(3) == 0);
}

// Calls fn(b0, n) for consecutive groups of n images that cover the batch. Each group makes both
// passes (sums, rescale) before the next, so the second pass finds the group's planes in cache.
// With two images or more per thread, each thread takes whole images: one parallel region, and an
// image stays in one core's cache. Otherwise groups of ~1 MiB run one after another, each pass
// parallel over planes.
template <typename F>
void for_image_groups(int64_t B, int64_t C, int64_t P, const F& fn) {
  if (B >= 2 * at::get_num_threads()) {
    // at::parallel_for runs nested calls (those inside fn) inline on the calling thread.
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) fn(b, 1);
    });
    return;
  }
  constexpr int64_t kGroupElements = int64_t{1} << 18;  // 1 MiB of float32
  const int64_t G = std::max<int64_t>(1, kGroupElements / std::max<int64_t>(C * P, 1));
  for (int64_t b0 = 0; b0 < B; b0 += G) fn(b0, std::min(G, B - b0));
}

}  // namespace

at::Tensor channel_coding(const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& b1,
                          const at::Tensor& w2, const at::Tensor& b2) {
  const auto format = dense_format(x_in);
  const auto x = x_in.contiguous(format);
  const int64_t B = x.size(0), C = x.size(1), R = w1.size(0), P = x.size(2) * x.size(3);
  const PlaneIndex ix(x, format);
  auto out = at::empty(x.sizes(), x.options().memory_format(format));
  if (out.numel() == 0) return out;  // an empty batch, no channel or an empty map: nothing to scale
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_coding_cpu", [&] {
    const auto se = Excitation::of<scalar_t>(w1, b1, w2, b2);
    std::vector<double> sum_x(B * C), pooled(B * C), hidden(B * R), scale(B * C);
    for_image_groups(B, C, P, [&](int64_t b0, int64_t n) {
      const int64_t offset = b0 * C * P;  // both layouts store images whole
      const scalar_t* xg = x.const_data_ptr<scalar_t>() + offset;
      plane_sums<scalar_t>(xg, nullptr, ix, n, C, P, &sum_x[b0 * C], nullptr);
      for (int64_t b = b0; b < b0 + n; ++b) se.forward(&sum_x[b * C], P, &pooled[b * C], &hidden[b * R], &scale[b * C]);
      rescale<scalar_t>(xg, &scale[b0 * C], nullptr, ix, n, C, P, out.data_ptr<scalar_t>() + offset);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_coding_backward(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2) {
  const auto format = dense_format(x_in);
  const auto x = x_in.contiguous(format);
  const int64_t B = x.size(0), C = x.size(1), R = w1.size(0), P = x.size(2) * x.size(3);
  const PlaneIndex ix(x, format);
  const auto grad_same_dtype = grad_in.to(x.scalar_type());
  const bool per_plane = constant_per_plane(grad_same_dtype);
  const auto grad = per_plane ? grad_same_dtype : grad_same_dtype.contiguous(format);
  auto grad_x = at::empty(x.sizes(), x.options().memory_format(format));
  if (x.numel() == 0) {
    // An empty result depends on no weight: zero gradients. (With planes of no pixel, H or W = 0,
    // the pooled mean would be 0 / 0 = NaN and reach them through the FC backward.)
    return {grad_x, at::zeros_like(w1, at::MemoryFormat::Contiguous), at::zeros_like(b1, at::MemoryFormat::Contiguous),
            at::zeros_like(w2, at::MemoryFormat::Contiguous), at::zeros_like(b2, at::MemoryFormat::Contiguous)};
  }
  at::Tensor gw1, gb1, gw2, gb2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_coding_backward_cpu", [&] {
    const auto se = Excitation::of<scalar_t>(w1, b1, w2, b2);
    std::vector<double> sum_x(B * C), sum_gx(B * C), pooled(B * C), hidden(B * R), scale(B * C);
    std::vector<double> dz2(B * C), dz1(B * R), shift(B * C), g_plane;
    if (per_plane) {  // the gradient's one value per plane
      const auto g = grad.accessor<scalar_t, 4>();
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t c = 0; c < C; ++c) g_plane.push_back(static_cast<double>(g[b][c][0][0]));
      }
    }
    for_image_groups(B, C, P, [&](int64_t b0, int64_t n) {
      const int64_t offset = b0 * C * P;
      const scalar_t* xg = x.const_data_ptr<scalar_t>() + offset;
      const scalar_t* gg = per_plane ? nullptr : grad.const_data_ptr<scalar_t>() + offset;
      plane_sums<scalar_t>(xg, gg, ix, n, C, P, &sum_x[b0 * C], &sum_gx[b0 * C]);
      for (int64_t b = b0; b < b0 + n; ++b) {
        // y = x * s. A gradient g constant per plane gives dL/ds = g * sum(x), and a grad_x that is
        // constant per plane too: g * s + shift (a fill, below).
        if (per_plane) {
          for (int64_t i = b * C; i < (b + 1) * C; ++i) sum_gx[i] = g_plane[i] * sum_x[i];
        }
        se.forward(&sum_x[b * C], P, &pooled[b * C], &hidden[b * R], &scale[b * C]);
        se.backward(&sum_gx[b * C], P, &hidden[b * R], &scale[b * C], &dz2[b * C], &dz1[b * R], &shift[b * C]);
        if (per_plane) {
          for (int64_t i = b * C; i < (b + 1) * C; ++i) shift[i] += g_plane[i] * scale[i];
        }
      }
      rescale<scalar_t>(gg, &scale[b0 * C], &shift[b0 * C], ix, n, C, P, grad_x.data_ptr<scalar_t>() + offset);
    });
    std::tie(gw1, gb1) = weight_grads<scalar_t>(dz1, pooled, B, w1, b1);
    std::tie(gw2, gb2) = weight_grads<scalar_t>(dz2, hidden, B, w2, b2);
  });
  return {grad_x, gw1, gb1, gw2, gb2};
}

}  // namespace pyamalgam::cpu::PYAMALGAM_CPU_ISA
