// Scale-invariant depth loss (paper 001 Eq. 3) on CUDA; semantics of csrc/cpu/si_depth_loss.cpp.
//
// Per image, over the N valid pixels with d = target - pred: S1 = sum d, S2 = sum d^2 and
// L = S2 / N - S1^2 / (2 N^2); the result is the mean over images with N > 0 (0 if none).
//
// Deterministic, atomic-free reductions:
//   moments_kernel   one block per (image, pixel chunk) writes its (N, S1, S2) partial;
//   loss_kernel      one block adds each image's partials in chunk order and the per-image losses
//                    by a fixed tree, and writes the 0-d result;
// and for the backward
//   coef_kernel      one block: per image  dL/dd = A d + B'  with A = 2 g / (N M), B' = -g S1 / (N^2 M)
//                    (M = images with a valid pixel; g read on the device: no host sync);
//   grad_kernel      grad_target = A d + B' on valid pixels, 0 elsewhere; grad_pred = -grad_target.
// The moments are float64 throughout (d = target - pred, its square and the per-thread sums), for
// every dtype, as on CPU: d^2 of float32 depths beyond ~1e19 (or below ~1e-19) leaves the float
// range although the loss may be well inside it. The loss is rounded to the dtype once, as a cast
// rounds (inf beyond its range). An empty batch or map gives 0 (and zero-size gradients).
// Pixels outside the mask are skipped with a select, so a NaN there never reaches a sum; a NaN
// on a valid pixel propagates.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

#include "checks.h"
#include "cuda/common.cuh"

namespace pyamalgam {
namespace {

using namespace cuda;  // NOLINT: the shared device helpers

constexpr int kThreads = 256;
constexpr int kFlush = 16;

template <int VEC, bool MASK>
__device__ __forceinline__ Vec<uint8_t, VEC> load_mask(const bool* mask, int64_t i) {
  Vec<uint8_t, VEC> m;
  if constexpr (MASK) {
    m = load_vec<VEC>(reinterpret_cast<const uint8_t*>(mask) + i);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) m.v[j] = 1;
  }
  return m;
}

// Block (b, s) covers pixels [s * chunk, min(P, (s + 1) * chunk)) of image b.
struct Range {
  int64_t b, begin, end;
};

__device__ __forceinline__ Range block_range(int64_t P, int S, int64_t chunk) {
  const int64_t blk = blockIdx.x;
  const int64_t b = blk / S;
  const int64_t begin = (blk - b * S) * chunk;
  return {b, begin, std::min<int64_t>(P, begin + chunk)};
}

// part[blk * 3 + {0, 1, 2}] = (N, S1, S2) of the block's pixels.
template <typename scalar_t, int VEC, bool MASK>
__global__ void __launch_bounds__(kThreads)
    moments_kernel(const scalar_t* __restrict__ pred, const scalar_t* __restrict__ target,
                   const bool* __restrict__ mask, int64_t P, int S, int64_t chunk, double* __restrict__ part) {
  using acc_t = double;  // not the op-math type: see the top of the file
  const Range rg = block_range(P, S, chunk);
  const int64_t base = rg.b * P;
  constexpr int64_t step = int64_t(kThreads) * VEC;
  double acc[3] = {0.0, 0.0, 0.0};
  int64_t count = 0;
  for (int64_t i = rg.begin + int64_t(threadIdx.x) * VEC; i < rg.end;) {
    acc_t s1 = 0, s2 = 0;
#pragma unroll 4
    for (int k = 0; k < kFlush; ++k, i += step) {
      if (i >= rg.end) break;
      const auto pv = load_vec<VEC>(pred + base + i);
      const auto tv = load_vec<VEC>(target + base + i);
      const auto mv = load_mask<VEC, MASK>(mask, base + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const bool valid = mv.v[j] != 0;
        const acc_t d = valid ? static_cast<acc_t>(tv.v[j]) - static_cast<acc_t>(pv.v[j]) : acc_t(0);
        s1 += d;
        s2 += d * d;
        count += valid;
      }
    }
    acc[1] += static_cast<double>(s1);
    acc[2] += static_cast<double>(s2);
  }
  acc[0] = static_cast<double>(count);
  block_sum(acc);
  if (threadIdx.x == 0) {
    double* o = part + static_cast<int64_t>(blockIdx.x) * 3;
    o[0] = acc[0];
    o[1] = acc[1];
    o[2] = acc[2];
  }
}

// (N, S1, S2) of image b: its S partials added in order.
__device__ __forceinline__ void image_moments(const double* part, int64_t b, int S, double& n, double& s1,
                                              double& s2) {
  n = s1 = s2 = 0;
  const double* p = part + b * S * 3;
  for (int q = 0; q < S; ++q) {
    n += p[3 * q];
    s1 += p[3 * q + 1];
    s2 += p[3 * q + 2];
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    loss_kernel(const double* __restrict__ part, int64_t B, int S, scalar_t* __restrict__ out) {
  double acc[2] = {0.0, 0.0};  // sum of per-image losses, images with a valid pixel
  for (int64_t b = threadIdx.x; b < B; b += kThreads) {
    double n, s1, s2;
    image_moments(part, b, S, n, s1, s2);
    if (n > 0) {
      acc[0] += s2 / n - s1 * s1 / (2 * n * n);
      acc[1] += 1;
    }
  }
  block_sum(acc);
  if (threadIdx.x == 0) out[0] = static_cast<scalar_t>(acc[1] > 0 ? acc[0] / acc[1] : 0.0);
}

// coef[b * 3 + {0, 1, 2}] = (A, B', image has a valid pixel).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    coef_kernel(const double* __restrict__ part, int64_t B, int S, const scalar_t* __restrict__ grad,
                double* __restrict__ coef) {
  __shared__ double images_sh;
  double cnt[1] = {0.0};
  for (int64_t b = threadIdx.x; b < B; b += kThreads) {
    double n, s1, s2;
    image_moments(part, b, S, n, s1, s2);
    cnt[0] += n > 0;
  }
  block_sum(cnt);
  if (threadIdx.x == 0) images_sh = cnt[0];
  __syncthreads();
  const double images = images_sh;
  const double g = static_cast<double>(grad[0]);
  for (int64_t b = threadIdx.x; b < B; b += kThreads) {
    double n, s1, s2;
    image_moments(part, b, S, n, s1, s2);
    double* c = coef + b * 3;
    if (n > 0) {
      c[0] = g * 2 / n / images;
      c[1] = -(g * (s1 / (n * n)) / images);
      c[2] = 1;
    } else {
      c[0] = c[1] = c[2] = 0;
    }
  }
}

template <typename scalar_t, int VEC, bool MASK>
__global__ void __launch_bounds__(kThreads)
    grad_kernel(const scalar_t* __restrict__ pred, const scalar_t* __restrict__ target, const bool* __restrict__ mask,
                const double* __restrict__ coef, int64_t P, int S, int64_t chunk, scalar_t* __restrict__ grad_pred,
                scalar_t* __restrict__ grad_target) {
  using acc_t = at::opmath_type<scalar_t>;
  const Range rg = block_range(P, S, chunk);
  const int64_t base = rg.b * P;
  const acc_t a = static_cast<acc_t>(coef[rg.b * 3]);
  const acc_t c = static_cast<acc_t>(coef[rg.b * 3 + 1]);
  const bool has = coef[rg.b * 3 + 2] != 0;
  constexpr int64_t step = int64_t(kThreads) * VEC;
  for (int64_t i = rg.begin + int64_t(threadIdx.x) * VEC; i < rg.end; i += step) {
    const auto pv = load_vec<VEC>(pred + base + i);
    const auto tv = load_vec<VEC>(target + base + i);
    const auto mv = load_mask<VEC, MASK>(mask, base + i);
    Vec<scalar_t, VEC> gp, gt;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const bool valid = has && mv.v[j] != 0;
      const acc_t d = static_cast<acc_t>(tv.v[j]) - static_cast<acc_t>(pv.v[j]);
      const acc_t v = valid ? a * d + c : acc_t(0);
      gp.v[j] = static_cast<scalar_t>(-v);
      gt.v[j] = static_cast<scalar_t>(v);
    }
    store_vec<VEC>(grad_pred + base + i, gp);
    store_vec<VEC>(grad_target + base + i, gt);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

struct Flat {
  at::Tensor pred, target, mask;  // (B, P) contiguous; mask undefined when absent
  int64_t B, P;
};

// The arguments passed check_si_depth_loss (csrc/checks.h): same shapes, dtypes and device.
Flat flatten(const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& mask) {
  Flat f;
  f.B = pred.size(0);
  f.P = c10::multiply_integers(pred.sizes().slice(1));  // not -1: ambiguous for an empty batch
  f.pred = pred.reshape({f.B, f.P}).contiguous();
  f.target = target.reshape({f.B, f.P}).contiguous();
  if (mask.has_value() && mask->defined()) {
    f.mask = mask->reshape({f.B, f.P}).contiguous();
  }
  return f;
}

struct Plan {
  int vec = 1, S = 1;
  int64_t chunk = 0, blocks = 0;
};

template <typename scalar_t>
Plan plan(const Flat& f, int sms, std::initializer_list<const void*> ptrs) {
  Plan pl;
  constexpr int wide = 16 / sizeof(scalar_t);
  bool ok = f.P % wide == 0;
  for (const void* p : ptrs) ok = ok && aligned(p, 16);
  if (f.mask.defined()) ok = ok && aligned(f.mask.const_data_ptr(), wide);
  pl.vec = ok ? wide : 1;
  const int64_t target = int64_t(sms) * 8;
  const int64_t max_s = std::max<int64_t>(1, f.P / (int64_t(kThreads) * pl.vec * 4));
  const int64_t s = std::clamp<int64_t>((target + f.B - 1) / std::max<int64_t>(f.B, 1), 1, std::min<int64_t>(max_s, 4096));
  pl.chunk = (f.P + s - 1) / s;
  pl.chunk = (pl.chunk + pl.vec - 1) / pl.vec * pl.vec;
  pl.S = pl.chunk > 0 ? static_cast<int>((f.P + pl.chunk - 1) / pl.chunk) : 1;
  pl.blocks = f.B * pl.S;
  TORCH_CHECK(pl.blocks <= std::numeric_limits<int32_t>::max(), "si_depth_loss: input too large");
  return pl;
}

template <typename scalar_t>
void launch_moments(const Flat& f, const Plan& pl, double* part, cudaStream_t stream) {
  if (pl.blocks == 0) return;
  const bool* m = f.mask.defined() ? f.mask.const_data_ptr<bool>() : nullptr;
  with_vec<16 / sizeof(scalar_t)>(pl.vec > 1, [&](auto vc) {
    constexpr int VEC = decltype(vc)::value;
    auto go = [&](auto mask_c) {
      constexpr bool MASK = decltype(mask_c)::value;
      moments_kernel<scalar_t, VEC, MASK><<<static_cast<unsigned>(pl.blocks), kThreads, 0, stream>>>(
          f.pred.const_data_ptr<scalar_t>(), f.target.const_data_ptr<scalar_t>(), m, f.P, pl.S, pl.chunk, part);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (m) {
      go(std::true_type{});
    } else {
      go(std::false_type{});
    }
  });
}

at::Tensor si_depth_loss_cuda(const at::Tensor& pred_in, const at::Tensor& target_in,
                              const std::optional<at::Tensor>& mask_in) {
  check_si_depth_loss(pred_in, target_in, mask_in);
  c10::cuda::CUDAGuard guard(pred_in.device());
  const auto f = flatten(pred_in, target_in, mask_in);
  auto out = at::empty({}, f.pred.options());
  const int sms = sm_count(pred_in.get_device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.pred.scalar_type(), "si_depth_loss_cuda", [&] {
    const auto pl = plan<scalar_t>(f, sms, {f.pred.const_data_ptr(), f.target.const_data_ptr()});
    auto part = at::empty({std::max<int64_t>(1, pl.blocks * 3)}, f.pred.options().dtype(at::kDouble));
    launch_moments<scalar_t>(f, pl, part.data_ptr<double>(), stream);
    loss_kernel<scalar_t><<<1, kThreads, 0, stream>>>(part.const_data_ptr<double>(), f.B, pl.S,
                                                      out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> si_depth_loss_backward_cuda(const at::Tensor& grad_in, const at::Tensor& pred_in,
                                                               const at::Tensor& target_in,
                                                               const std::optional<at::Tensor>& mask_in) {
  check_si_depth_loss_backward(grad_in, pred_in, target_in, mask_in);
  c10::cuda::CUDAGuard guard(pred_in.device());
  const auto f = flatten(pred_in, target_in, mask_in);
  auto grad_pred = at::empty({f.B, f.P}, f.pred.options());
  auto grad_target = at::empty({f.B, f.P}, f.pred.options());
  auto shaped = [&] { return std::make_tuple(grad_pred.view(pred_in.sizes()), grad_target.view(target_in.sizes())); };
  if (grad_pred.numel() == 0) return shaped();
  // The gradient stays on the device: read by coef_kernel, never with .item().
  const auto grad = grad_in.to(f.pred.scalar_type()).reshape({1});
  const int sms = sm_count(pred_in.get_device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.pred.scalar_type(), "si_depth_loss_backward_cuda", [&] {
    scalar_t* gp = grad_pred.mutable_data_ptr<scalar_t>();
    scalar_t* gt = grad_target.mutable_data_ptr<scalar_t>();
    const auto pl = plan<scalar_t>(f, sms, {f.pred.const_data_ptr(), f.target.const_data_ptr(), gp, gt});
    // Workspace: partials (3 per block) | per-image coefficients (3 per image).
    auto ws = at::empty({pl.blocks * 3 + f.B * 3}, f.pred.options().dtype(at::kDouble));
    double* part = ws.data_ptr<double>();
    double* coef = part + pl.blocks * 3;
    launch_moments<scalar_t>(f, pl, part, stream);
    coef_kernel<scalar_t><<<1, kThreads, 0, stream>>>(part, f.B, pl.S, grad.const_data_ptr<scalar_t>(), coef);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const bool* m = f.mask.defined() ? f.mask.const_data_ptr<bool>() : nullptr;
    with_vec<16 / sizeof(scalar_t)>(pl.vec > 1, [&](auto vc) {
      constexpr int VEC = decltype(vc)::value;
      auto go = [&](auto mask_c) {
        constexpr bool MASK = decltype(mask_c)::value;
        grad_kernel<scalar_t, VEC, MASK><<<static_cast<unsigned>(pl.blocks), kThreads, 0, stream>>>(
            f.pred.const_data_ptr<scalar_t>(), f.target.const_data_ptr<scalar_t>(), m, coef, f.P, pl.S, pl.chunk, gp,
            gt);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (m) {
        go(std::true_type{});
      } else {
        go(std::false_type{});
      }
    });
  });
  return shaped();
}

}  // namespace

TORCH_LIBRARY_IMPL(pyamalgam, CUDA, m) {
  m.impl("si_depth_loss", &si_depth_loss_cuda);
  m.impl("si_depth_loss_backward", &si_depth_loss_backward_cuda);
}

}  // namespace pyamalgam
