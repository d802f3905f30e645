// Channel-wise distillation loss on CPU (thesis 003, Eqs. 4.3-4.4), forward and backward.
//
// One task per (image, channel) plane, u = yt / T and v = ys / T over its P pixels. The forward
// reads each plane once from memory: a block of kBlock pixels (L1-resident) is scanned for its
// maxima, the running sums are rescaled when a maximum grows (online softmax), then the block's
// exponentials are summed. A plane ends with three numbers,
//   lse_t = log sum e^u,   lse_s = log sum e^v,   m = E_pt[u - v],
// and KL(pt || ps) = m - (lse_t - lse_s). Those (B, C, 3) float64 "stats" are all the backward
// keeps; it reads the plane once more and writes both gradients:
//   d KL / d v = ps - pt,   d KL / d u = pt (u - v - m),   times T^2 / (B C) and 1 / T.
// u - v is formed from yt - ys, never as the difference of two rounded quotients, so a student
// close to its teacher keeps the digits of the difference.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "cpu/kernels.h"
#include "cpu/vec.h"

namespace pyamalgam::cpu::PYAMALGAM_CPU_ISA {
namespace {

constexpr int64_t kBlock = 1024;  // 4 KiB of float exponentials on the stack

// One plane of ys and of yt: pixel p at s[p * ss], t[p * st]. kDense: both steps are 1, known at
// compile time so that the loops vectorise (NCHW); otherwise channels_last, read with a stride.
template <typename scalar_t, bool kDense>
struct Pair {
  const scalar_t* s;
  const scalar_t* t;
  int64_t ss, st;
  template <typename acc_t>
  acc_t v(int64_t p, acc_t inv) const { return static_cast<acc_t>(s[kDense ? p : p * ss]) * inv; }
  template <typename acc_t>
  acc_t u(int64_t p, acc_t inv) const { return static_cast<acc_t>(t[kDense ? p : p * st]) * inv; }
  template <typename acc_t>
  acc_t delta(int64_t p, acc_t inv) const {
    return (static_cast<acc_t>(t[kDense ? p : p * st]) - static_cast<acc_t>(s[kDense ? p : p * ss])) * inv;
  }
};

// max_{p < n} f(p) over kLanes independent lanes (elementwise max vectorises, a chain does not).
// std::max(m, NaN) keeps m: a NaN pixel is not the maximum, and turns the sums into NaN later.
template <typename acc_t, typename F>
__attribute__((always_inline)) inline acc_t lane_max(int64_t n, const F& f) {
  constexpr int kL = 2 * 32 / static_cast<int>(sizeof(acc_t));
  acc_t m[kL];
  std::fill(m, m + kL, -std::numeric_limits<acc_t>::infinity());
  int64_t p = 0;
  for (; p + kL <= n; p += kL) {
    for (int j = 0; j < kL; ++j) m[j] = std::max(m[j], f(p + j));
  }
  for (; p < n; ++p) m[0] = std::max(m[0], f(p));
  for (int j = 1; j < kL; ++j) m[0] = std::max(m[0], m[j]);
  return m[0];
}

struct Online {  // running max and sum of e^{x - max} (and, for the teacher, of e^{u - max} (u - v))
  double sum = 0, weighted = 0;
  template <typename acc_t>
  void raise_max(acc_t& max, acc_t block_max) {
    if (block_max > max) {  // max = -inf at first: the factor is 0 and the (empty) sums stay 0
      const double f = std::exp(static_cast<double>(max) - static_cast<double>(block_max));
      sum *= f;
      weighted *= f;
      max = block_max;
    }
  }
};

struct PlaneStats {
  double lse_t, lse_s, mean, kl;
};

template <typename acc_t, typename scalar_t, bool kDense>
PlaneStats plane_stats(const Pair<scalar_t, kDense>& x, int64_t P, acc_t inv) {
  acc_t mt = -std::numeric_limits<acc_t>::infinity(), ms = mt;
  Online t, s;
  acc_t e[kBlock];
  for (int64_t q = 0; q < P; q += kBlock) {
    const int64_t n = std::min(kBlock, P - q);
    t.raise_max(mt, lane_max<acc_t>(n, [&](int64_t p) { return x.u(q + p, inv); }));
    s.raise_max(ms, lane_max<acc_t>(n, [&](int64_t p) { return x.v(q + p, inv); }));
    for (int64_t p = 0; p < n; ++p) e[p] = exp_nonpositive<acc_t>(x.u(q + p, inv) - mt);
    t.sum += lane_sum<acc_t>(n, [&](int64_t p) { return e[p]; });
    t.weighted += lane_sum<acc_t>(n, [&](int64_t p) { return e[p] * x.delta(q + p, inv); });
    s.sum += lane_sum<acc_t>(n, [&](int64_t p) { return exp_nonpositive<acc_t>(x.v(q + p, inv) - ms); });
  }
  PlaneStats r;
  r.lse_t = static_cast<double>(mt) + std::log(t.sum);
  r.lse_s = static_cast<double>(ms) + std::log(s.sum);
  r.mean = t.weighted / t.sum;
  // lse_t - lse_s from the max difference and one log of a ratio: no cancellation of two lse's.
  r.kl = r.mean - (static_cast<double>(mt) - static_cast<double>(ms)) - std::log(t.sum / s.sum);
  return r;
}

template <typename acc_t, typename scalar_t, bool kDense>
void plane_backward(const Pair<scalar_t, kDense>& x, int64_t P, acc_t inv, const double* stats, acc_t k,
                    scalar_t* gs, int64_t gss, scalar_t* gt, int64_t gst) {
  const double lse_t = stats[0], lse_s = stats[1];
  const acc_t mean = static_cast<acc_t>(stats[2]);
  for (int64_t p = 0; p < P; ++p) {
    // x - lse <= 0 (lse >= the max), formed in double: the exponent keeps its digits.
    const acc_t pt = exp_nonpositive<acc_t>(static_cast<acc_t>(static_cast<double>(x.u(p, inv)) - lse_t));
    const acc_t ps = exp_nonpositive<acc_t>(static_cast<acc_t>(static_cast<double>(x.v(p, inv)) - lse_s));
    gs[kDense ? p : p * gss] = static_cast<scalar_t>(k * (ps - pt));
    gt[kDense ? p : p * gst] = static_cast<scalar_t>(k * pt * (x.delta(p, inv) - mean));
  }
}

// Runs fn(pair, plane) over the B * C planes in parallel, with the dense loops when both inputs
// are NCHW. `pair` is a Pair<scalar_t, kDense> for plane (b, c).
template <typename scalar_t, typename F>
void for_planes(const at::Tensor& ys, const at::Tensor& yt, const F& fn) {
  const int64_t B = ys.size(0), C = ys.size(1), P = ys.size(2) * ys.size(3);
  const PlaneIndex is(ys, dense_format(ys)), it(yt, dense_format(yt));
  const scalar_t* s = ys.const_data_ptr<scalar_t>();
  const scalar_t* t = yt.const_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(P, 1));
  at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / C, c = plane % C;
      if (is.sp == 1 && it.sp == 1) {
        fn(Pair<scalar_t, true>{s + is(b, c, 0), t + it(b, c, 0), 1, 1}, plane, b, c);
      } else {
        fn(Pair<scalar_t, false>{s + is(b, c, 0), t + it(b, c, 0), is.sp, it.sp}, plane, b, c);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> channel_wise_loss(const at::Tensor& ys_in, const at::Tensor& yt_in,
                                                     double temperature) {
  const auto ys = ys_in.contiguous(dense_format(ys_in));
  const auto yt = yt_in.contiguous(dense_format(yt_in));
  const int64_t B = ys.size(0), C = ys.size(1), P = ys.size(2) * ys.size(3);
  auto stats = at::empty({B, C, 3}, ys.options().dtype(at::kDouble));
  std::vector<double> kl(B * C);
  double* st = stats.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ys.scalar_type(), "channel_wise_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv = static_cast<acc_t>(1.0 / temperature);
    for_planes<scalar_t>(ys, yt, [&](const auto& pair, int64_t plane, int64_t, int64_t) {
      const PlaneStats r = plane_stats<acc_t>(pair, P, inv);
      st[3 * plane] = r.lse_t;
      st[3 * plane + 1] = r.lse_s;
      st[3 * plane + 2] = r.mean;
      kl[plane] = r.kl;
    });
  });
  double total = 0;  // a fixed order: the same result for any number of threads
  for (double v : kl) total += v;
  auto loss = at::empty({}, ys.options());
  loss.fill_(B > 0 ? temperature * temperature * total / static_cast<double>(B * C) : 0.0);
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> channel_wise_loss_backward(const at::Tensor& grad, const at::Tensor& ys_in,
                                                              const at::Tensor& yt_in, const at::Tensor& stats_in,
                                                              double temperature) {
  const auto ys = ys_in.contiguous(dense_format(ys_in));
  const auto yt = yt_in.contiguous(dense_format(yt_in));
  const auto stats = stats_in.contiguous();
  const int64_t B = ys.size(0), C = ys.size(1), P = ys.size(2) * ys.size(3);
  auto gs = at::empty(ys.sizes(), ys.options().memory_format(dense_format(ys)));
  auto gt = at::empty(yt.sizes(), yt.options().memory_format(dense_format(yt)));
  if (B == 0) return {gs, gt};
  const double* st = stats.const_data_ptr<double>();
  // d loss = g T^2 / (B C) d KL, and d/dy = (1/T) d/du.
  const double k = grad.item<double>() * temperature / static_cast<double>(B * C);
  const PlaneIndex is(gs, dense_format(ys)), it(gt, dense_format(yt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ys.scalar_type(), "channel_wise_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv = static_cast<acc_t>(1.0 / temperature);
    scalar_t* out_s = gs.data_ptr<scalar_t>();
    scalar_t* out_t = gt.data_ptr<scalar_t>();
    for_planes<scalar_t>(ys, yt, [&](const auto& pair, int64_t plane, int64_t b, int64_t c) {
      plane_backward<acc_t>(pair, P, inv, st + 3 * plane, static_cast<acc_t>(k), out_s + is(b, c, 0), is.sp,
                            out_t + it(b, c, 0), it.sp);
    });
  });
  return {gs, gt};
}

}  // namespace pyamalgam::cpu::PYAMALGAM_CPU_ISA
