// Depth-bin soft-argmax (paper 001 Eq. 2) on CPU: D = l * sum_b b * softmax(r)_b, bins 1..N_d.
//
// Pixels are processed in chunks so that the loops over bins read each chunk's logits from cache;
// forward makes two passes over the bins (max, then the two exp-sums), backward a third to write.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/kernels.h"
#include "cpu/vec.h"

namespace pyamalgam::cpu::PYAMALGAM_CPU_ISA {
namespace {

constexpr int64_t kChunk = 64;

// Calls f(stride between neighbouring pixels): a compile-time 1 for NCHW, so that the loops over
// pixels are contiguous and vectorise, ix.sp (= K) for channels_last.
template <typename F>
void with_pixel_stride(const PlaneIndex& ix, const F& f) {
  if (ix.sp == 1) return f(std::integral_constant<int64_t, 1>{});
  f(ix.sp);
}

// For pixels [p0, p0 + n) of image b: m = max_k r_k, s = sum_k e^{r_k - m}, w = sum_k k e^{r_k - m}.
// With KEEP, every e^{r_k - m} is also kept in `keep` (K x kChunk, cache-resident), so that the
// backward pays one exp per logit, not two.
template <bool KEEP, typename scalar_t, typename acc_t, typename Stride>
void softmax_moments(const scalar_t* r, const PlaneIndex& ix, Stride sp, int64_t b, int64_t p0, int64_t n,
                     int64_t K, acc_t* m, acc_t* s, acc_t* w, acc_t* keep = nullptr) {
  for (int64_t t = 0; t < n; ++t) {
    m[t] = -std::numeric_limits<acc_t>::infinity();
    s[t] = 0;
    w[t] = 0;
  }
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* row = r + ix(b, k, p0);
    for (int64_t t = 0; t < n; ++t) m[t] = std::max(m[t], static_cast<acc_t>(row[t * sp]));
  }
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* row = r + ix(b, k, p0);
    const acc_t bin = static_cast<acc_t>(k + 1);
    for (int64_t t = 0; t < n; ++t) {
      const acc_t e = exp_nonpositive<acc_t>(static_cast<acc_t>(row[t * sp]) - m[t]);
      if constexpr (KEEP) keep[k * kChunk + t] = e;
      s[t] += e;
      w[t] += bin * e;
    }
  }
}

// This thread's K x kChunk scratch for softmax_moments (reused across chunks and calls).
template <typename acc_t>
acc_t* chunk_buffer(int64_t K) {
  thread_local std::vector<acc_t> buffer;
  if (static_cast<int64_t>(buffer.size()) < K * kChunk) buffer.resize(K * kChunk);
  return buffer.data();
}

// Runs fn(b, p0, n) over all pixel chunks of all images, in parallel.
template <typename F>
void for_each_chunk(int64_t B, int64_t P, const F& fn) {
  const int64_t chunks = (P + kChunk - 1) / kChunk;
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / chunks, p0 = (i % chunks) * kChunk;
      fn(b, p0, std::min(kChunk, P - p0));
    }
  });
}

}  // namespace

at::Tensor soft_argmax_depth(const at::Tensor& logits_in, double bin_size) {
  const auto format = dense_format(logits_in);
  const auto logits = logits_in.contiguous(format);
  const int64_t B = logits.size(0), K = logits.size(1), H = logits.size(2), W = logits.size(3);
  const PlaneIndex ix(logits, format);
  auto depth = at::empty({B, H, W}, logits.options().memory_format(c10::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "soft_argmax_depth_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* r = logits.const_data_ptr<scalar_t>();
    scalar_t* d = depth.data_ptr<scalar_t>();
    for_each_chunk(B, H * W, [&](int64_t b, int64_t p0, int64_t n) {
      acc_t m[kChunk], s[kChunk], w[kChunk];
      with_pixel_stride(ix, [&](auto sp) { softmax_moments<false>(r, ix, sp, b, p0, n, K, m, s, w); });
      for (int64_t t = 0; t < n; ++t) d[b * H * W + p0 + t] = static_cast<scalar_t>(bin_size * (w[t] / s[t]));
    });
  });
  return depth;
}

// dD/dr_k = l * p_k * (k - E[k]): the softmax Jacobian applied to the bin numbers.
at::Tensor soft_argmax_depth_backward(const at::Tensor& grad_in, const at::Tensor& logits_in, double bin_size) {
  const auto format = dense_format(logits_in);
  const auto logits = logits_in.contiguous(format);
  const auto grad = grad_in.to(logits.scalar_type()).contiguous();
  const int64_t B = logits.size(0), K = logits.size(1), P = logits.size(2) * logits.size(3);
  const PlaneIndex ix(logits, format);
  auto grad_logits = at::empty(logits.sizes(), logits.options().memory_format(format));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "soft_argmax_depth_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* r = logits.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* gr = grad_logits.data_ptr<scalar_t>();
    for_each_chunk(B, P, [&](int64_t b, int64_t p0, int64_t n) {
      acc_t m[kChunk], s[kChunk], w[kChunk], coef[kChunk], mean[kChunk];
      acc_t* keep = chunk_buffer<acc_t>(K);
      with_pixel_stride(ix, [&](auto sp) {
        softmax_moments<true>(r, ix, sp, b, p0, n, K, m, s, w, keep);
        for (int64_t t = 0; t < n; ++t) {
          coef[t] = static_cast<acc_t>(bin_size) * static_cast<acc_t>(g[b * P + p0 + t]) / s[t];
          mean[t] = w[t] / s[t];
        }
        for (int64_t k = 0; k < K; ++k) {
          const int64_t row = ix(b, k, p0);
          const acc_t bin = static_cast<acc_t>(k + 1);
          const acc_t* kept = keep + k * kChunk;
          for (int64_t t = 0; t < n; ++t) {
            gr[row + t * sp] = static_cast<scalar_t>(coef[t] * kept[t] * (bin - mean[t]));
          }
        }
      });
    });
  });
  return grad_logits;
}

}  // namespace pyamalgam::cpu::PYAMALGAM_CPU_ISA
