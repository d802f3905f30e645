// Scale-invariant depth loss (paper 001 Eq. 3) on CPU.
//
// Per image, over the N valid pixels with d = target - pred: S1 = sum d, S2 = sum d^2, and
// L = S2 / N - S1^2 / (2 N^2); the result is the mean over images with N > 0 (0 if none, and for
// an empty batch or map). Sums are accumulated in double, which keeps float32 images of any size
// exact; the loss is rounded to the dtype only at the end, as a cast rounds (inf beyond its range).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/vec.h"

namespace pyamalgam::cpu::PYAMALGAM_CPU_ISA {
namespace {

struct Moments {
  double n = 0, s1 = 0, s2 = 0;
  Moments operator+(const Moments& o) const { return {n + o.n, s1 + o.s1, s2 + o.s2}; }
};

// Moments of pixels [begin, end) of one image, in kLanes independent accumulators so that
// the loop vectorises. A masked-out pixel is removed by a select, never a multiply, so a NaN
// there cannot reach the sums.
template <bool MASKED, typename scalar_t>
Moments chunk_moments(const scalar_t* pred, const scalar_t* target, const bool* mask, int64_t begin, int64_t end) {
  double n[kLanes] = {}, s1[kLanes] = {}, s2[kLanes] = {};
  auto add = [&](int j, int64_t p) {
    const bool valid = !MASKED || mask[p];
    const double d = valid ? static_cast<double>(target[p]) - static_cast<double>(pred[p]) : 0.0;
    n[j] += valid ? 1.0 : 0.0;
    s1[j] += d;
    s2[j] += d * d;
  };
  int64_t p = begin;
  for (; p + kLanes <= end; p += kLanes) {
    for (int j = 0; j < kLanes; ++j) add(j, p + j);
  }
  for (int j = 0; p < end; ++p, ++j) add(j, p);
  return {lane_total(n), lane_total(s1), lane_total(s2)};
}

// Moments of each image; pred/target/mask are (B, P) contiguous, mask may be null.
template <typename scalar_t>
std::vector<Moments> image_moments(const scalar_t* pred, const scalar_t* target, const bool* mask, int64_t B,
                                   int64_t P) {
  std::vector<Moments> out(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t off = b * P;
    out[b] = at::parallel_reduce(
        0, P, 4096, Moments{},
        [&](int64_t begin, int64_t end, Moments acc) {
          return acc + (mask ? chunk_moments<true>(pred + off, target + off, mask + off, begin, end)
                             : chunk_moments<false>(pred + off, target + off, mask, begin, end));
        },
        [](const Moments& a, const Moments& b) { return a + b; });
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flat(const at::Tensor& pred, const at::Tensor& target,
                                                    const std::optional<at::Tensor>& mask) {
  // (B, P) with P spelled out: reshape({B, -1}) is ambiguous for an empty batch.
  const int64_t B = pred.size(0), P = c10::multiply_integers(pred.sizes().slice(1));
  auto m = mask.has_value() ? mask->reshape({B, P}).contiguous() : at::Tensor();
  return {pred.reshape({B, P}).contiguous(), target.reshape({B, P}).contiguous(), m};
}

}  // namespace

at::Tensor si_depth_loss(const at::Tensor& pred_in, const at::Tensor& target_in,
                         const std::optional<at::Tensor>& mask_in) {
  auto [pred, target, mask] = flat(pred_in, target_in, mask_in);
  const int64_t B = pred.size(0), P = pred.size(1);
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "si_depth_loss_cpu", [&] {
    const auto mom = image_moments<scalar_t>(pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(),
                                             mask.defined() ? mask.const_data_ptr<bool>() : nullptr, B, P);
    double total = 0;
    int64_t images = 0;
    for (const auto& m : mom) {
      if (m.n == 0) continue;
      total += m.s2 / m.n - m.s1 * m.s1 / (2 * m.n * m.n);
      ++images;
    }
    // Rounded to the dtype here, as a float64 -> dtype cast (.to()) rounds: a value beyond its
    // range becomes inf, which at::scalar_tensor would refuse with an overflow error. In range,
    // the rounded value converts back exactly: the same bits as before.
    loss = static_cast<double>(static_cast<scalar_t>(images ? total / images : 0.0));
  });
  return at::scalar_tensor(loss, pred.options());
}

// dL/dd_p = (2 d_p / N - S1 / N^2) / M for valid p (M = images with a valid pixel);
// d = target - pred, so grad_target = +that and grad_pred = -that.
std::tuple<at::Tensor, at::Tensor> si_depth_loss_backward(const at::Tensor& grad, const at::Tensor& pred_in,
                                                          const at::Tensor& target_in,
                                                          const std::optional<at::Tensor>& mask_in) {
  auto [pred, target, mask] = flat(pred_in, target_in, mask_in);
  const int64_t B = pred.size(0), P = pred.size(1);
  auto grad_pred = at::empty_like(pred);
  auto grad_target = at::empty_like(pred);
  const double g = grad.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "si_depth_loss_backward_cpu", [&] {
    const scalar_t* pp = pred.const_data_ptr<scalar_t>();
    const scalar_t* tp = target.const_data_ptr<scalar_t>();
    const bool* mp = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
    const auto mom = image_moments<scalar_t>(pp, tp, mp, B, P);
    int64_t images = 0;
    for (const auto& m : mom) images += m.n > 0;
    scalar_t* gp = grad_pred.data_ptr<scalar_t>();
    scalar_t* gt = grad_target.data_ptr<scalar_t>();
    // dL/dd = A d + C on valid pixels of image b: A = 2 g / (N M), C = -g S1 / (N^2 M).
    std::vector<double> A(B), Cb(B);
    std::vector<char> any_valid(B);
    for (int64_t b = 0; b < B; ++b) {
      const auto& m = mom[b];
      any_valid[b] = m.n > 0;
      A[b] = m.n > 0 ? 2 * g / (m.n * images) : 0.0;
      Cb[b] = m.n > 0 ? -g * m.s1 / (m.n * m.n * images) : 0.0;
    }
    at::parallel_for(0, B * P, 4096, [&](int64_t begin, int64_t end) {
      // Walk [begin, end) image by image so the inner loop has no division and vectorises.
      for (int64_t i = begin; i < end;) {
        const int64_t b = i / P, stop = std::min(end, (b + 1) * P);
        const double a = A[b], c = Cb[b];
        const bool any = any_valid[b];
        for (; i < stop; ++i) {
          const bool valid = any && (!mp || mp[i]);
          const double d = static_cast<double>(tp[i]) - static_cast<double>(pp[i]);
          const double v = valid ? a * d + c : 0.0;
          gp[i] = static_cast<scalar_t>(-v);
          gt[i] = static_cast<scalar_t>(v);
        }
      }
    });
  });
  return {grad_pred.view(pred_in.sizes()), grad_target.view(target_in.sizes())};
}

}  // namespace pyamalgam::cpu::PYAMALGAM_CPU_ISA
