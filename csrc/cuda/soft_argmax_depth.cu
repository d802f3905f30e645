// Depth-bin soft-argmax (paper 001 Eq. 2) on CUDA: D = l * sum_k k * softmax(r)_k, bins 1..K.
//
// Semantics are those of csrc/cpu/soft_argmax_depth.cpp; the CUDA kernels read the logits once
// with an online softmax (running max m, s = sum e^{r-m}, w = sum k e^{r-m}; one exp per logit):
//   * NCHW: a thread owns VEC neighbouring pixels (a 16-byte vector) and walks the bins, whose
//     rows lie P elements apart, so every load of a warp is one contiguous span;
//   * channels_last (bins contiguous per pixel): a group of G lanes owns a pixel, each lane walks
//     every G-th vector of bins, and the G partial states are merged by a fixed shuffle butterfly.
// Backward needs m, s, w before it can write dL/dr_k = l g p_k (k - E[k]), so it reads the logits
// twice; the NCHW kernel keeps the first read in shared memory when K bins fit (so global memory
// is read once and written once), the channels_last kernel re-reads its own pixel's bins right
// after the first pass (L1-resident).
// A pixel whose largest logit is not finite (an inf, or all bins -inf) gives NaN, like the CPU
// kernel and the reference; a NaN logit gives NaN.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "checks.h"
#include "common.h"
#include "cuda/common.cuh"

namespace pyamalgam {
namespace {

using namespace cuda;  // NOLINT: the shared device helpers

constexpr int kThreads = 256;       // threads per block (forward, uncached backward, channels_last)
constexpr int kCacheThreads = 128;  // threads per block of the shared-memory-cached NCHW backward

__device__ __forceinline__ float exp_(float x) { return ::expf(x); }
__device__ __forceinline__ double exp_(double x) { return ::exp(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t nan_() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}

// Online softmax state of one pixel.
template <typename acc_t>
struct State {
  acc_t m, s, w;
  __device__ __forceinline__ void init() {
    m = -std::numeric_limits<acc_t>::infinity();
    s = 0;
    w = 0;
  }
  // Adds logit v of bin number `bin`: one exp. A value equal to the running max adds e^0 = 1
  // exactly (which also keeps an all -inf prefix from turning into NaN); a NaN logit poisons s, w.
  __device__ __forceinline__ void add(acc_t v, acc_t bin) {
    const bool gt = v > m;
    const acc_t e = v == m ? acc_t(1) : exp_(gt ? m - v : v - m);
    s = gt ? s * e + acc_t(1) : s + e;
    w = gt ? w * e + bin : w + bin * e;
    m = gt ? v : m;
  }
  // Merge with another state; `this` must be the lower-numbered lane's so that both lanes of a
  // butterfly pair compute bit-identical results.
  __device__ __forceinline__ void merge(const State& o) {
    const acc_t M = m > o.m ? m : o.m;
    const acc_t fa = m == M ? acc_t(1) : exp_(m - M);
    const acc_t fb = o.m == M ? acc_t(1) : exp_(o.m - M);
    s = s * fa + o.s * fb;
    w = w * fa + o.w * fb;
    m = M;
  }
  // s, or NaN when the largest logit is not finite (the CPU kernel's exp(inf - inf)).
  __device__ __forceinline__ acc_t denominator() const { return isfinite(m) ? s : nan_<acc_t>(); }
};

template <typename acc_t>
__device__ __forceinline__ void group_merge(State<acc_t>& st, int lane, int G) {
  for (int off = 1; off < G; off <<= 1) {
    State<acc_t> o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, off, G);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, off, G);
    o.w = __shfl_xor_sync(0xffffffffu, st.w, off, G);
    if (lane & off) {  // I am the upper lane: merge(lower = other, upper = me)
      State<acc_t> lo = o;
      lo.merge(st);
      st = lo;
    } else {
      st.merge(o);
    }
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t depth_value(const State<acc_t>& st, double bin_size) {
  return static_cast<scalar_t>(bin_size * static_cast<double>(st.w / st.denominator()));
}

struct DeviceInfo {
  int sms = 0, smem_optin = 0, smem_per_sm = 0;
};

DeviceInfo device_info(int device) {
  static std::atomic<int> cache[64][3];
  if (device < 0 || device >= 64) device = 0;
  DeviceInfo d;
  d.sms = cache[device][0].load(std::memory_order_relaxed);
  if (d.sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device));
    cache[device][1].store(d.smem_optin, std::memory_order_relaxed);
    cache[device][2].store(d.smem_per_sm, std::memory_order_relaxed);
    cache[device][0].store(d.sms, std::memory_order_release);
  } else {
    std::atomic_thread_fence(std::memory_order_acquire);
    d.smem_optin = cache[device][1].load(std::memory_order_relaxed);
    d.smem_per_sm = cache[device][2].load(std::memory_order_relaxed);
  }
  return d;
}

// f(std::integral_constant<int, vec>) for vec in {1, 2, 4, 8}, instantiating only widths <= MAX.
template <int MAX, typename F>
void with_vec_upto(int vec, const F& f) {
  if constexpr (MAX >= 8) {
    if (vec == 8) return f(std::integral_constant<int, 8>{});
  }
  if constexpr (MAX >= 4) {
    if (vec == 4) return f(std::integral_constant<int, 4>{});
  }
  if constexpr (MAX >= 2) {
    if (vec == 2) return f(std::integral_constant<int, 2>{});
  }
  TORCH_CHECK(vec == 1, "soft_argmax_depth: internal error (vector width ", vec, ")");
  f(std::integral_constant<int, 1>{});
}

// ---------------------------------------------------------------------------------------------
// NCHW kernels: thread t owns pixels [VEC t, VEC t + VEC) of the B * P pixels (P % VEC == 0).

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_nchw(const scalar_t* __restrict__ r, scalar_t* __restrict__ depth, int64_t nvec, int64_t P, int64_t K,
                 double bin_size) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (v >= nvec) return;
  const int64_t pix = v * VEC, b = pix / P, p = pix - b * P;
  const scalar_t* base = r + b * K * P + p;
  State<acc_t> st[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) st[j].init();
#pragma unroll 4
  for (int64_t k = 0; k < K; ++k) {
    const auto x = load_vec<VEC>(base + k * P);
    const acc_t bin = static_cast<acc_t>(k + 1);
#pragma unroll
    for (int j = 0; j < VEC; ++j) st[j].add(static_cast<acc_t>(x.v[j]), bin);
  }
  Vec<scalar_t, VEC> out;
#pragma unroll
  for (int j = 0; j < VEC; ++j) out.v[j] = depth_value<scalar_t>(st[j], bin_size);
  store_vec<VEC>(depth + pix, out);
}

// CACHE: the first pass stores each thread's logits in shared memory (K * blockDim vectors; a
// thread only ever reads back its own, so no synchronisation is needed) and the second pass reads
// them from there instead of global memory.
template <typename scalar_t, int VEC, bool CACHE>
__global__ void __launch_bounds__(kThreads)
    backward_nchw(const scalar_t* __restrict__ r, const scalar_t* __restrict__ grad, scalar_t* __restrict__ out,
                  int64_t nvec, int64_t P, int64_t K, double bin_size) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  extern __shared__ __align__(16) unsigned char smem[];
  V* cache = reinterpret_cast<V*>(smem) + threadIdx.x;
  const int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v >= nvec) return;
  const int64_t pix = v * VEC, b = pix / P, p = pix - b * P;
  const int64_t off = b * K * P + p;
  State<acc_t> st[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) st[j].init();
#pragma unroll 4
  for (int64_t k = 0; k < K; ++k) {
    const V x = load_vec<VEC>(r + off + k * P);
    if (CACHE) cache[k * blockDim.x] = x;
    const acc_t bin = static_cast<acc_t>(k + 1);
#pragma unroll
    for (int j = 0; j < VEC; ++j) st[j].add(static_cast<acc_t>(x.v[j]), bin);
  }
  const V g = load_vec<VEC>(grad + pix);
  acc_t coef[VEC], mean[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const acc_t s = st[j].denominator();
    coef[j] = static_cast<acc_t>(bin_size) * static_cast<acc_t>(g.v[j]) / s;
    mean[j] = st[j].w / s;
  }
#pragma unroll 4
  for (int64_t k = 0; k < K; ++k) {
    const V x = CACHE ? cache[k * blockDim.x] : load_vec<VEC>(r + off + k * P);
    const acc_t bin = static_cast<acc_t>(k + 1);
    V o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t e = exp_(static_cast<acc_t>(x.v[j]) - st[j].m);
      o.v[j] = static_cast<scalar_t>(coef[j] * e * (bin - mean[j]));
    }
    store_vec<VEC>(out + off + k * P, o);
  }
}

// ---------------------------------------------------------------------------------------------
// channels_last kernels: logits viewed as (B * P, K); G lanes (a power of two <= 32) per pixel,
// lane l reads bin vectors l, l + G, ... (K % VEC == 0). All lanes reach the shuffles.

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_cl(const scalar_t* __restrict__ r, scalar_t* __restrict__ depth, int64_t npix, int64_t K, int G,
               double bin_size) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t q = t / G;
  const int lane = threadIdx.x & (G - 1);
  State<acc_t> st;
  st.init();
  if (q < npix) {
    const scalar_t* base = r + q * K;
    for (int64_t k = int64_t(lane) * VEC; k < K; k += int64_t(G) * VEC) {
      const auto x = load_vec<VEC>(base + k);
#pragma unroll
      for (int j = 0; j < VEC; ++j) st.add(static_cast<acc_t>(x.v[j]), static_cast<acc_t>(k + j + 1));
    }
  }
  group_merge(st, lane, G);
  if (q < npix && lane == 0) depth[q] = depth_value<scalar_t>(st, bin_size);
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    backward_cl(const scalar_t* __restrict__ r, const scalar_t* __restrict__ grad, scalar_t* __restrict__ out,
                int64_t npix, int64_t K, int G, double bin_size) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t q = t / G;
  const int lane = threadIdx.x & (G - 1);
  const int64_t stride = int64_t(G) * VEC;
  State<acc_t> st;
  st.init();
  if (q < npix) {
    const scalar_t* base = r + q * K;
    for (int64_t k = int64_t(lane) * VEC; k < K; k += stride) {
      const auto x = load_vec<VEC>(base + k);
#pragma unroll
      for (int j = 0; j < VEC; ++j) st.add(static_cast<acc_t>(x.v[j]), static_cast<acc_t>(k + j + 1));
    }
  }
  group_merge(st, lane, G);
  if (q >= npix) return;
  const acc_t s = st.denominator();
  const acc_t coef = static_cast<acc_t>(bin_size) * static_cast<acc_t>(grad[q]) / s;
  const acc_t mean = st.w / s;
  const scalar_t* base = r + q * K;
  scalar_t* obase = out + q * K;
  for (int64_t k = int64_t(lane) * VEC; k < K; k += stride) {
    const auto x = load_vec<VEC>(base + k);
    Vec<scalar_t, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t e = exp_(static_cast<acc_t>(x.v[j]) - st.m);
      o.v[j] = static_cast<scalar_t>(coef * e * (static_cast<acc_t>(k + j + 1) - mean));
    }
    store_vec<VEC>(obase + k, o);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

int lanes_per_pixel(int64_t K, int vec) {
  const int64_t vectors = (K + vec - 1) / vec;
  int g = 1;
  while (g < 32 && g < vectors) g *= 2;
  return g;
}

unsigned grid_for(int64_t threads, int block) {
  const int64_t blocks = (threads + block - 1) / block;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "soft_argmax_depth: input too large");
  return static_cast<unsigned>(blocks);
}

// The widest vector (<= 16 bytes) that divides `row` and suits every pointer.
template <typename scalar_t>
int pick_vec(int64_t row, std::initializer_list<const void*> ptrs, int max_bytes = 16) {
  int vec = max_bytes / static_cast<int>(sizeof(scalar_t));
  for (; vec > 1; vec /= 2) {
    bool ok = row % vec == 0;
    for (const void* p : ptrs) ok = ok && aligned(p, vec * sizeof(scalar_t));
    if (ok) break;
  }
  return std::max(vec, 1);
}

at::Tensor soft_argmax_depth_cuda(const at::Tensor& logits_in, double bin_size) {
  check_soft_argmax_depth(logits_in, bin_size);
  c10::cuda::CUDAGuard guard(logits_in.device());
  const auto format = dense_format(logits_in);
  const auto logits = logits_in.contiguous(format);
  const int64_t B = logits.size(0), K = logits.size(1), H = logits.size(2), W = logits.size(3), P = H * W;
  auto depth = at::empty({B, H, W}, logits.options().memory_format(c10::MemoryFormat::Contiguous));
  if (depth.numel() == 0) return depth;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "soft_argmax_depth_cuda", [&] {
    const scalar_t* r = logits.const_data_ptr<scalar_t>();
    scalar_t* d = depth.mutable_data_ptr<scalar_t>();
    if (format == c10::MemoryFormat::ChannelsLast) {
      const int vec = pick_vec<scalar_t>(K, {r});
      const int G = lanes_per_pixel(K, vec);
      with_vec_upto<16 / sizeof(scalar_t)>(vec, [&](auto vc) {
        constexpr int VEC = decltype(vc)::value;
        forward_cl<scalar_t, VEC><<<grid_for(B * P * G, kThreads), kThreads, 0, stream>>>(r, d, B * P, K, G, bin_size);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      const int vec = pick_vec<scalar_t>(P, {r, d});
      with_vec_upto<16 / sizeof(scalar_t)>(vec, [&](auto vc) {
        constexpr int VEC = decltype(vc)::value;
        const int64_t nvec = B * P / VEC;
        forward_nchw<scalar_t, VEC><<<grid_for(nvec, kThreads), kThreads, 0, stream>>>(r, d, nvec, P, K, bin_size);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  });
  return depth;
}

at::Tensor soft_argmax_depth_backward_cuda(const at::Tensor& grad_in, const at::Tensor& logits_in, double bin_size) {
  check_soft_argmax_depth_backward(grad_in, logits_in, bin_size);
  c10::cuda::CUDAGuard guard(logits_in.device());
  const auto format = dense_format(logits_in);
  const auto logits = logits_in.contiguous(format);
  const auto grad = grad_in.to(logits.scalar_type()).contiguous();
  const int64_t B = logits.size(0), K = logits.size(1), P = logits.size(2) * logits.size(3);
  auto grad_logits = at::empty(logits.sizes(), logits.options().memory_format(format));
  if (grad_logits.numel() == 0) return grad_logits;
  const auto dev = device_info(logits_in.get_device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "soft_argmax_depth_backward_cuda", [&] {
    const scalar_t* r = logits.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* o = grad_logits.mutable_data_ptr<scalar_t>();
    if (format == c10::MemoryFormat::ChannelsLast) {
      const int vec = pick_vec<scalar_t>(K, {r, o});
      const int G = lanes_per_pixel(K, vec);
      with_vec_upto<16 / sizeof(scalar_t)>(vec, [&](auto vc) {
        constexpr int VEC = decltype(vc)::value;
        backward_cl<scalar_t, VEC><<<grid_for(B * P * G, kThreads), kThreads, 0, stream>>>(r, g, o, B * P, K, G,
                                                                                              bin_size);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      return;
    }
    // Cached: 4-byte-or-wider units per thread and bin (fp32/fp64: 1 pixel, fp16/bf16: 2), 128
    // threads, K units each in shared memory; used when at least 3 such blocks fit on an SM.
    const int cvec = pick_vec<scalar_t>(P, {r, o, g}, std::max<int>(4, sizeof(scalar_t)));
    const int64_t smem = K * kCacheThreads * cvec * static_cast<int64_t>(sizeof(scalar_t));
    const bool cached = smem <= dev.smem_optin && 3 * smem <= dev.smem_per_sm;
    if (cached) {
      with_vec_upto<std::max<int>(4, sizeof(scalar_t)) / sizeof(scalar_t)>(cvec, [&](auto vc) {
        constexpr int VEC = decltype(vc)::value;
        if constexpr (VEC * sizeof(scalar_t) <= 8) {
          auto kernel = backward_nchw<scalar_t, VEC, true>;
          if (smem > 48 * 1024) {
            // Raise the kernel's dynamic shared memory limit to the device maximum once it is
            // needed (idempotent, so concurrent callers cannot undo each other).
            C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dev.smem_optin));
          }
          const int64_t nvec = B * P / VEC;
          kernel<<<grid_for(nvec, kCacheThreads), kCacheThreads, static_cast<size_t>(smem), stream>>>(r, g, o, nvec, P,
                                                                                                     K, bin_size);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          TORCH_CHECK(false, "soft_argmax_depth_backward: internal error (cached vector width)");
        }
      });
      return;
    }
    const int vec = pick_vec<scalar_t>(P, {r, o, g});
    with_vec_upto<16 / sizeof(scalar_t)>(vec, [&](auto vc) {
      constexpr int VEC = decltype(vc)::value;
      const int64_t nvec = B * P / VEC;
      backward_nchw<scalar_t, VEC, false><<<grid_for(nvec, kThreads), kThreads, 0, stream>>>(r, g, o, nvec, P, K,
                                                                                             bin_size);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyamalgam, CUDA, m) {
  m.impl("soft_argmax_depth", &soft_argmax_depth_cuda);
  m.impl("soft_argmax_depth_backward", &soft_argmax_depth_backward_cuda);
}

}  // namespace pyamalgam
