// Channel coding (paper 001 §5.1.1, Fig. 3) on CPU.
//
// Forward: one reduction pass over x (mean per plane), the two tiny FC layers, one rescale pass.
// Backward: one pass computing sum(x) and sum(grad * x) per plane together, the FC backward, one
// pass for grad_x. Sums run in short op-math blocks added into doubles (csrc/cpu/vec.h), so float32
// planes of any size keep ~double accuracy.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "cpu/vec.h"

namespace pyamalgam {
namespace {

// Per-plane sums over H*W: sum(x) and, when `grad` is given, sum(grad * x).
// NCHW walks each plane contiguously; channels_last walks pixels and keeps C running sums, so
// both read x exactly once.
template <typename scalar_t>
void plane_sums(const scalar_t* x, const scalar_t* grad, const PlaneIndex& ix, int64_t B, int64_t C,
                int64_t P, double* sum_x, double* sum_gx) {
  using acc_t = at::opmath_type<scalar_t>;
  if (ix.sp == 1) {
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        const scalar_t* xp = x + bc * P;
        sum_x[bc] = cpu::lane_sum<acc_t>(P, [&](int64_t p) { return static_cast<acc_t>(xp[p]); });
        if (grad) {
          const scalar_t* gp = grad + bc * P;
          sum_gx[bc] = cpu::lane_sum<acc_t>(P, [&](int64_t p) { return static_cast<acc_t>(gp[p]) * static_cast<acc_t>(xp[p]); });
        }
      }
    });
    return;
  }
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double* sx = sum_x + b * C;
      double* sgx = grad ? sum_gx + b * C : nullptr;
      std::fill(sx, sx + C, 0.0);
      if (sgx) std::fill(sgx, sgx + C, 0.0);
      for (int64_t p = 0; p < P; ++p) {
        const scalar_t* xp = x + (b * P + p) * C;
        for (int64_t c = 0; c < C; ++c) sx[c] += static_cast<double>(xp[c]);
        if (sgx) {
          const scalar_t* gp = grad + (b * P + p) * C;
          for (int64_t c = 0; c < C; ++c) sgx[c] += static_cast<double>(gp[c]) * static_cast<double>(xp[c]);
        }
      }
    }
  });
}

// out = a * scale[b, c] (+ shift[b, c] when given), elementwise over a dense layout, in the op-math
// type (float for float inputs: twice the SIMD width of double, and the same rounding as eager).
template <typename scalar_t>
void rescale(const scalar_t* a, const double* scale, const double* shift, const PlaneIndex& ix,
             int64_t B, int64_t C, int64_t P, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  // Rows of contiguous elements sharing one (b, c) [NCHW] or one (b, p) [channels_last].
  const bool planar = ix.sp == 1;
  const int64_t rows = planar ? B * C : B * P, len = planar ? P : C;
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(len, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s_row(planar ? 0 : C), t_row(planar ? 0 : C);
    int64_t row_image = -1;  // the image whose scale/shift s_row/t_row hold
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* ar = a + r * len;
      scalar_t* orow = out + r * len;
      if (planar) {
        const acc_t s = static_cast<acc_t>(scale[r]), t = shift ? static_cast<acc_t>(shift[r]) : acc_t(0);
        for (int64_t i = 0; i < len; ++i) orow[i] = static_cast<scalar_t>(static_cast<acc_t>(ar[i]) * s + t);
      } else {
        const int64_t b = r / P;
        if (b != row_image) {
          for (int64_t c = 0; c < C; ++c) {
            s_row[c] = static_cast<acc_t>(scale[b * C + c]);
            t_row[c] = shift ? static_cast<acc_t>(shift[b * C + c]) : acc_t(0);
          }
          row_image = b;
        }
        for (int64_t c = 0; c < len; ++c) orow[c] = static_cast<scalar_t>(static_cast<acc_t>(ar[c]) * s_row[c] + t_row[c]);
      }
    }
  });
}

// The two FC layers on the pooled (B, C) means, in double: returns (hidden, scale).
std::tuple<at::Tensor, at::Tensor> squeeze_excite(const at::Tensor& pooled, const at::Tensor& w1,
                                                  const at::Tensor& b1, const at::Tensor& w2,
                                                  const at::Tensor& b2) {
  auto hidden = at::relu(at::addmm(b1.to(at::kDouble), pooled, w1.to(at::kDouble).t()));
  auto scale = at::sigmoid(at::addmm(b2.to(at::kDouble), hidden, w2.to(at::kDouble).t()));
  return {hidden, scale};
}

at::Tensor channel_coding_cpu(const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& b1,
                              const at::Tensor& w2, const at::Tensor& b2) {
  const auto format = dense_format(x_in);
  const auto x = x_in.contiguous(format);
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const PlaneIndex ix(x, format);
  auto sum_x = at::empty({B, C}, x.options().dtype(at::kDouble));
  auto out = at::empty(x.sizes(), x.options().memory_format(format));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_coding_cpu", [&] {
    plane_sums<scalar_t>(x.const_data_ptr<scalar_t>(), nullptr, ix, B, C, P, sum_x.data_ptr<double>(), nullptr);
    auto [hidden, scale] = squeeze_excite(sum_x / static_cast<double>(P), w1, b1, w2, b2);
    scale = scale.contiguous();
    rescale<scalar_t>(x.const_data_ptr<scalar_t>(), scale.const_data_ptr<double>(), nullptr, ix, B, C, P,
                      out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_coding_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2) {
  const auto format = dense_format(x_in);
  const auto x = x_in.contiguous(format);
  const auto grad = grad_in.to(x.scalar_type()).contiguous(format);
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const PlaneIndex ix(x, format);
  auto sum_x = at::empty({B, C}, x.options().dtype(at::kDouble));
  auto sum_gx = at::empty({B, C}, x.options().dtype(at::kDouble));
  auto grad_x = at::empty(x.sizes(), x.options().memory_format(format));
  at::Tensor gw1, gb1, gw2, gb2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_coding_backward_cpu", [&] {
    plane_sums<scalar_t>(x.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), ix, B, C, P,
                         sum_x.data_ptr<double>(), sum_gx.data_ptr<double>());
    const auto pooled = sum_x / static_cast<double>(P);
    auto [hidden, scale] = squeeze_excite(pooled, w1, b1, w2, b2);
    // y = x * s:  dL/ds = sum_p g * x;  s = sigmoid(z2):  dz2 = ds * s * (1 - s).
    const auto dz2 = sum_gx * scale * (1 - scale);
    gw2 = dz2.t().mm(hidden);
    gb2 = dz2.sum(0);
    const auto dz1 = dz2.mm(w2.to(at::kDouble)) * (hidden > 0);
    gw1 = dz1.t().mm(pooled);
    gb1 = dz1.sum(0);
    // The mean spreads d(pooled) evenly over the plane: grad_x = g * s + d(pooled) / P.
    const auto shift = (dz1.mm(w1.to(at::kDouble)) / static_cast<double>(P)).contiguous();
    scale = scale.contiguous();
    rescale<scalar_t>(grad.const_data_ptr<scalar_t>(), scale.const_data_ptr<double>(),
                      shift.const_data_ptr<double>(), ix, B, C, P, grad_x.data_ptr<scalar_t>());
  });
  return {grad_x, gw1.to(w1.scalar_type()), gb1.to(b1.scalar_type()), gw2.to(w2.scalar_type()),
          gb2.to(b2.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyamalgam, CPU, m) {
  m.impl("channel_coding", &channel_coding_cpu);
  m.impl("channel_coding_backward", &channel_coding_backward_cpu);
}

}  // namespace pyamalgam
