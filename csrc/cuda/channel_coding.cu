// Channel coding (paper 001 §5.1.1, Fig. 3) on CUDA: the same algorithm as csrc/cpu/channel_coding.cpp.
//
// Forward, 4 launches:
//   1. plane_sums: per-(b, c) partial sums of x over fixed pixel chunks (one block per chunk, no atomics);
//   2. fc1: pooled = sum / P (partials added in a fixed order), hidden = relu(w1 pooled + b1), in double;
//   3. fc2: scale = sigmoid(w2 hidden + b2), in double, stored in the op-math type;
//   4. rescale: out = x * scale, vectorised, one pass.
// Backward, 6 launches: plane_sums of x and grad * x together, fc1, fc2 (+ dz2 = dL/ds * s (1 - s)),
// fc_backward_a (dz1 and the w2/b2 gradients), fc_backward_b (the shift dz1 w1 / P and the w1/b1
// gradients), rescale: grad_x = grad * scale + shift.
// Reductions are deterministic: every sum has a fixed shape and order for a given shape and GPU.
// Per-thread sums run in the op-math type for at most kFlush vectors, then go into a double, so
// float32 planes of any size keep ~double accuracy at float speed.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
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

constexpr int kThreads = 256;  // every kernel here runs 256-thread blocks
constexpr int kWarps = kThreads / 32;
constexpr int kFlush = 16;     // vectors summed in the op-math type before going into a double
constexpr int kTile = 1024;    // pooled values staged in shared memory per step of fc1

__device__ __forceinline__ double relu_nan(double z) { return z > 0 || z != z ? z : 0.0; }  // NaN stays NaN

// ---------------------------------------------------------------------------------------------
// 1. Per-plane partial sums. part_x[(b * C + c) * S + s] = sum of x[b, c, p] over chunk s of the
//    pixels (and part_gx likewise for grad * x).

// NCHW: one block per (plane, chunk); threads stride over the chunk in vectors of VEC pixels.
template <typename scalar_t, int VEC, bool GRAD>
__global__ void __launch_bounds__(kThreads)
    plane_sums_nchw(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, int64_t P, int S,
                    int64_t chunk, double* __restrict__ part_x, double* __restrict__ part_gx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t blk = blockIdx.x;
  const int64_t plane = blk / S;
  const int64_t begin = (blk - plane * S) * chunk, end = std::min<int64_t>(P, begin + chunk);
  const scalar_t* xp = x + plane * P;
  const scalar_t* gp = GRAD ? g + plane * P : nullptr;
  constexpr int64_t step = int64_t(kThreads) * VEC;
  double s[2] = {0.0, 0.0};
  for (int64_t i = begin + int64_t(threadIdx.x) * VEC; i < end;) {
    acc_t ax = 0, agx = 0;
#pragma unroll 4
    for (int k = 0; k < kFlush; ++k, i += step) {
      if (i >= end) break;
      const auto xv = load_vec<VEC>(xp + i);
      if constexpr (GRAD) {
        const auto gv = load_vec<VEC>(gp + i);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const acc_t xj = static_cast<acc_t>(xv.v[j]);
          ax += xj;
          agx += static_cast<acc_t>(gv.v[j]) * xj;
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) ax += static_cast<acc_t>(xv.v[j]);
      }
    }
    s[0] += static_cast<double>(ax);
    s[1] += static_cast<double>(agx);
  }
  block_sum(s);
  if (threadIdx.x == 0) {
    part_x[blk] = s[0];
    if (GRAD) part_gx[blk] = s[1];
  }
}

// channels_last, x viewed as (B, P, C): a block is (TX channel-vectors) x (TY pixel rows) over one
// tile of TX * VEC channels and one chunk of pixels; each thread keeps VEC running sums, then the
// TY rows are added in order through shared memory.
template <typename scalar_t, int VEC, bool GRAD>
__global__ void __launch_bounds__(kThreads)
    plane_sums_cl(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, int64_t P, int64_t C, int S,
                  int64_t chunk, int ntiles, double* __restrict__ part_x, double* __restrict__ part_gx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int TX = blockDim.x, TY = blockDim.y;
  int64_t blk = blockIdx.x;
  const int split = static_cast<int>(blk % S);
  blk /= S;
  const int64_t tile = blk % ntiles, b = blk / ntiles;
  const int64_t c0 = (tile * TX + threadIdx.x) * VEC;
  const bool active = c0 < C;
  const int64_t begin = split * chunk, end = std::min<int64_t>(P, begin + chunk);
  double sx[VEC], sgx[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) sx[j] = sgx[j] = 0.0;
  if (active) {
    for (int64_t p = begin + threadIdx.y; p < end;) {
      acc_t ax[VEC], agx[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) ax[j] = agx[j] = 0;
#pragma unroll 4
      for (int k = 0; k < kFlush; ++k, p += TY) {
        if (p >= end) break;
        const int64_t off = (b * P + p) * C + c0;
        const auto xv = load_vec<VEC>(x + off);
        if constexpr (GRAD) {
          const auto gv = load_vec<VEC>(g + off);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t xj = static_cast<acc_t>(xv.v[j]);
            ax[j] += xj;
            agx[j] += static_cast<acc_t>(gv.v[j]) * xj;
          }
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) ax[j] += static_cast<acc_t>(xv.v[j]);
        }
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        sx[j] += static_cast<double>(ax[j]);
        sgx[j] += static_cast<double>(agx[j]);
      }
    }
  }
  __shared__ double sh[(GRAD ? 2 : 1) * kThreads * VEC];
  const int tid = threadIdx.y * TX + threadIdx.x;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    sh[tid * VEC + j] = sx[j];
    if (GRAD) sh[(kThreads + tid) * VEC + j] = sgx[j];
  }
  __syncthreads();
  if (threadIdx.y == 0 && active) {
    for (int j = 0; j < VEC; ++j) {
      if (c0 + j >= C) break;
      double tx = 0, tgx = 0;
      for (int y = 0; y < TY; ++y) {
        tx += sh[(y * TX + threadIdx.x) * VEC + j];
        if (GRAD) tgx += sh[(kThreads + y * TX + threadIdx.x) * VEC + j];
      }
      const int64_t o = (b * C + c0 + j) * S + split;
      part_x[o] = tx;
      if (GRAD) part_gx[o] = tgx;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 2. hidden[b, r] = relu(b1[r] + sum_c w1[r, c] * pooled[b, c]), pooled = (sum of partials) / P.
//    Block (rb, b): one warp per row r; pooled[b, :] is staged through shared memory in tiles.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fc1_kernel(const double* __restrict__ part_x, int S, int64_t C, int64_t R, double P, int64_t rblocks,
               const scalar_t* __restrict__ w1, const scalar_t* __restrict__ b1, double* __restrict__ pooled,
               double* __restrict__ hidden) {
  __shared__ double tile[kTile];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t b = blockIdx.x / rblocks, rb = blockIdx.x % rblocks;
  const int64_t r = rb * kWarps + warp;
  double acc = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTile, C - c0));
    for (int t = threadIdx.x; t < n; t += kThreads) {
      const double* pp = part_x + (b * C + c0 + t) * S;
      double s = 0;
      for (int q = 0; q < S; ++q) s += pp[q];
      const double v = s / P;
      tile[t] = v;
      if (rb == 0) pooled[b * C + c0 + t] = v;
    }
    __syncthreads();
    if (r < R) {
      const scalar_t* wr = w1 + r * C + c0;
      for (int t = lane; t < n; t += 32) acc += static_cast<double>(wr[t]) * tile[t];
    }
    __syncthreads();
  }
  acc = warp_sum(acc);
  if (lane == 0 && r < R) hidden[b * R + r] = relu_nan(acc + static_cast<double>(b1[r]));
}

// 3. scale[b, c] = sigmoid(b2[c] + sum_r w2[c, r] * hidden[b, r]); one warp per (b, c).
//    BACKWARD: also dz2[b, c] = (sum of grad*x partials) * s * (1 - s).
template <typename scalar_t, bool BACKWARD>
__global__ void __launch_bounds__(kThreads)
    fc2_kernel(const double* __restrict__ hidden, int64_t C, int64_t R, int64_t cblocks,
               const scalar_t* __restrict__ w2, const scalar_t* __restrict__ b2,
               at::opmath_type<scalar_t>* __restrict__ scale, const double* __restrict__ part_gx, int S,
               double* __restrict__ dz2) {
  using acc_t = at::opmath_type<scalar_t>;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t b = blockIdx.x / cblocks;
  const int64_t c = (blockIdx.x % cblocks) * kWarps + warp;
  if (c >= C) return;  // whole warp
  const scalar_t* wr = w2 + c * R;
  const double* h = hidden + b * R;
  double acc = 0;
  for (int64_t t = lane; t < R; t += 32) acc += static_cast<double>(wr[t]) * h[t];
  acc = warp_sum(acc);
  if (lane == 0) {
    const double z = acc + static_cast<double>(b2[c]);
    const double s = 1.0 / (1.0 + ::exp(-z));
    scale[b * C + c] = static_cast<acc_t>(s);
    if (BACKWARD) {
      const double* pp = part_gx + (b * C + c) * S;
      double gs = 0;
      for (int q = 0; q < S; ++q) gs += pp[q];
      dz2[b * C + c] = gs * s * (1 - s);
    }
  }
}

// out[b, j] = sum_i v[b, i] * M[i, j] (M is (I, J) row-major), for one block of 32 consecutive j:
// lanes over j (coalesced rows of M), the 8 warps over slices of i, added in order.
template <typename scalar_t>
__device__ __forceinline__ bool column_dot(const double* __restrict__ v, const scalar_t* __restrict__ M, int64_t I,
                                           int64_t J, int64_t b, int64_t j, double& out) {
  __shared__ double sh[kThreads];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  double acc = 0;
  if (j < J) {
    for (int64_t i = ty; i < I; i += kWarps) acc += v[b * I + i] * static_cast<double>(M[i * J + j]);
  }
  sh[threadIdx.x] = acc;
  __syncthreads();
  if (ty != 0 || j >= J) return false;
  double t = 0;
#pragma unroll
  for (int y = 0; y < kWarps; ++y) t += sh[y * 32 + tx];
  out = t;
  return true;
}

// Weight and bias gradients of a linear layer y = W v + b from dL/dy = dz, summed over the batch
// in a fixed order: thread i < A*V writes gw[x, y] = sum_b dz[b, x] v[b, y] (x = i / V, y = i % V),
// thread A*V + x writes gb[x] = sum_b dz[b, x]. dz: (B, A), v: (B, V).
template <typename scalar_t>
__device__ __forceinline__ void weight_grads(int64_t i, const double* __restrict__ dz, const double* __restrict__ v,
                                             int64_t B, int64_t A, int64_t V, scalar_t* __restrict__ gw,
                                             scalar_t* __restrict__ gb) {
  if (i < A * V) {
    const int64_t x = i / V, y = i % V;
    double t = 0;
    for (int64_t b = 0; b < B; ++b) t += dz[b * A + x] * v[b * V + y];
    gw[i] = static_cast<scalar_t>(t);
  } else if (i < A * V + A) {
    const int64_t x = i - A * V;
    double t = 0;
    for (int64_t b = 0; b < B; ++b) t += dz[b * A + x];
    gb[x] = static_cast<scalar_t>(t);
  }
}

// 4a. Blocks [0, na): dz1[b, r] = (sum_c dz2[b, c] w2[c, r]) * (hidden[b, r] > 0).
//     Blocks [na, ...): gw2[c, r] = sum_b dz2[b, c] hidden[b, r] and gb2[c] = sum_b dz2[b, c].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fc_backward_a(const double* __restrict__ dz2, const double* __restrict__ hidden, const scalar_t* __restrict__ w2,
                  int64_t B, int64_t C, int64_t R, int64_t na, double* __restrict__ dz1, scalar_t* __restrict__ gw2,
                  scalar_t* __restrict__ gb2) {
  if (blockIdx.x < na) {
    const int64_t rblocks = (R + 31) / 32;
    const int64_t b = blockIdx.x / rblocks, r = (blockIdx.x % rblocks) * 32 + (threadIdx.x & 31);
    double dh;
    if (column_dot(dz2, w2, C, R, b, r, dh)) {
      dz1[b * R + r] = dh * (hidden[b * R + r] > 0 ? 1.0 : 0.0);
    }
    return;
  }
  weight_grads((static_cast<int64_t>(blockIdx.x) - na) * kThreads + threadIdx.x, dz2, hidden, B, C, R, gw2, gb2);
}

// 4b. Blocks [0, na): shift[b, c] = (sum_r dz1[b, r] w1[r, c]) / P.
//     Blocks [na, ...): gw1[r, c] = sum_b dz1[b, r] pooled[b, c] and gb1[r] = sum_b dz1[b, r].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fc_backward_b(const double* __restrict__ dz1, const double* __restrict__ pooled, const scalar_t* __restrict__ w1,
                  int64_t B, int64_t C, int64_t R, double P, int64_t na, at::opmath_type<scalar_t>* __restrict__ shift,
                  scalar_t* __restrict__ gw1, scalar_t* __restrict__ gb1) {
  using acc_t = at::opmath_type<scalar_t>;
  if (blockIdx.x < na) {
    const int64_t cblocks = (C + 31) / 32;
    const int64_t b = blockIdx.x / cblocks, c = (blockIdx.x % cblocks) * 32 + (threadIdx.x & 31);
    double t;
    if (column_dot(dz1, w1, R, C, b, c, t)) shift[b * C + c] = static_cast<acc_t>(t / P);
    return;
  }
  weight_grads((static_cast<int64_t>(blockIdx.x) - na) * kThreads + threadIdx.x, dz1, pooled, B, R, C, gw1, gb1);
}

// ---------------------------------------------------------------------------------------------
// 5. out = a * scale[b, c] (+ shift[b, c]), vectorised over the dense layout.
//    NCHW: vector v lies in plane v / (P / VEC). channels_last: image v / (P * C / VEC), channel
//    group v % (C / VEC).
template <typename scalar_t, int VEC, bool CL, bool SHIFT, typename index_t>
__global__ void __launch_bounds__(kThreads)
    rescale_kernel(const scalar_t* __restrict__ a, const at::opmath_type<scalar_t>* __restrict__ scale,
                   const at::opmath_type<scalar_t>* __restrict__ shift, scalar_t* __restrict__ out, index_t nvec,
                   at::cuda::detail::IntDivider<index_t> outer, at::cuda::detail::IntDivider<index_t> groups,
                   index_t C) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t stride = static_cast<index_t>(gridDim.x) * kThreads;
  for (index_t v = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; v < nvec; v += stride) {
    const auto av = load_vec<VEC>(a + static_cast<int64_t>(v) * VEC);
    Vec<scalar_t, VEC> o;
    if constexpr (!CL) {
      const index_t row = outer.div(v);
      const acc_t s = scale[row];
      const acc_t t = SHIFT ? shift[row] : acc_t(0);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t y = static_cast<acc_t>(av.v[j]) * s;
        o.v[j] = static_cast<scalar_t>(SHIFT ? y + t : y);
      }
    } else {
      const index_t b = outer.div(v);
      const index_t cg = groups.divmod(v).mod;
      const index_t base = b * C + cg * VEC;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t y = static_cast<acc_t>(av.v[j]) * scale[base + j];
        o.v[j] = static_cast<scalar_t>(SHIFT ? y + shift[base + j] : y);
      }
    }
    store_vec<VEC>(out + static_cast<int64_t>(v) * VEC, o);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

struct Shape {
  int64_t B, C, P, R;
  bool cl;
};

// How plane_sums splits the work; the workspace holds S partials per plane.
struct SumsPlan {
  int vec = 1;
  int S = 1;
  int64_t chunk = 0;
  int tx = 1, ty = kThreads, ntiles = 1;  // channels_last block shape
  int64_t blocks = 0;
};

SumsPlan plan_sums(const Shape& sh, int wide_vec, bool can_vec, int sms) {
  SumsPlan pl;
  const int64_t target = int64_t(sms) * 8;  // ~8 resident blocks of 256 threads per SM
  if (!sh.cl) {
    pl.vec = can_vec ? wide_vec : 1;
    const int64_t per_block_min = int64_t(kThreads) * pl.vec * 4;
    const int64_t max_s = std::max<int64_t>(1, sh.P / per_block_min);
    const int64_t s = std::clamp<int64_t>((target + sh.B * sh.C - 1) / (sh.B * sh.C), 1, std::min<int64_t>(max_s, 1024));
    pl.chunk = (sh.P + s - 1) / s;
    pl.chunk = (pl.chunk + pl.vec - 1) / pl.vec * pl.vec;
    pl.S = pl.chunk > 0 ? static_cast<int>((sh.P + pl.chunk - 1) / pl.chunk) : 1;
    pl.blocks = sh.B * sh.C * pl.S;
    return pl;
  }
  pl.vec = can_vec ? wide_vec : 1;
  const int64_t groups = (sh.C + pl.vec - 1) / pl.vec;
  int tx = 1;
  while (tx < 32 && tx < groups) tx *= 2;
  pl.tx = tx;
  pl.ty = kThreads / tx;
  pl.ntiles = static_cast<int>((groups + tx - 1) / tx);
  const int64_t base = sh.B * pl.ntiles;
  const int64_t max_s = std::max<int64_t>(1, sh.P / (int64_t(pl.ty) * 8));
  const int64_t s = std::clamp<int64_t>((target + base - 1) / base, 1, std::min<int64_t>(max_s, 1024));
  pl.chunk = (sh.P + s - 1) / s;
  pl.S = pl.chunk > 0 ? static_cast<int>((sh.P + pl.chunk - 1) / pl.chunk) : 1;
  pl.blocks = base * pl.S;
  return pl;
}

template <typename scalar_t, bool GRAD>
void launch_plane_sums(const scalar_t* x, const scalar_t* g, const Shape& sh, const SumsPlan& pl, double* part_x,
                       double* part_gx, cudaStream_t stream) {
  if (pl.blocks == 0) return;
  TORCH_CHECK(pl.blocks <= std::numeric_limits<int32_t>::max(), "channel_coding: input too large");
  with_vec<16 / sizeof(scalar_t)>(pl.vec > 1, [&](auto vec_c) {
    constexpr int VEC = decltype(vec_c)::value;
    if (!sh.cl) {
      plane_sums_nchw<scalar_t, VEC, GRAD><<<static_cast<unsigned>(pl.blocks), kThreads, 0, stream>>>(
          x, g, sh.P, pl.S, pl.chunk, part_x, part_gx);
    } else {
      plane_sums_cl<scalar_t, VEC, GRAD><<<static_cast<unsigned>(pl.blocks), dim3(pl.tx, pl.ty), 0, stream>>>(
          x, g, sh.P, sh.C, pl.S, pl.chunk, pl.ntiles, part_x, part_gx);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t, bool SHIFT>
void launch_rescale(const scalar_t* a, const at::opmath_type<scalar_t>* scale, const at::opmath_type<scalar_t>* shift,
                    scalar_t* out, const Shape& sh, int wide_vec, bool can_vec, int sms, cudaStream_t stream) {
  const int64_t numel = sh.B * sh.C * sh.P;
  if (numel == 0) return;
  with_vec<16 / sizeof(scalar_t)>(can_vec, [&](auto vec_c) {
    constexpr int VEC = decltype(vec_c)::value;
    const int64_t nvec = numel / VEC;
    const int64_t blocks = std::min<int64_t>((nvec + kThreads - 1) / kThreads, int64_t(sms) * 8);
    auto go = [&](auto index_c) {
      using index_t = decltype(index_c);
      using Div = at::cuda::detail::IntDivider<index_t>;
      const index_t outer = static_cast<index_t>(sh.cl ? sh.P * sh.C / VEC : sh.P / VEC);
      const index_t groups = static_cast<index_t>(std::max<int64_t>(1, sh.C / VEC));
      if (sh.cl) {
        rescale_kernel<scalar_t, VEC, true, SHIFT, index_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            a, scale, shift, out, static_cast<index_t>(nvec), Div(outer), Div(groups), static_cast<index_t>(sh.C));
      } else {
        rescale_kernel<scalar_t, VEC, false, SHIFT, index_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            a, scale, shift, out, static_cast<index_t>(nvec), Div(outer), Div(groups), static_cast<index_t>(sh.C));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    // 32-bit index arithmetic (fast division) unless the grid-stride loop could overflow it.
    if (nvec + int64_t(blocks) * kThreads < (int64_t(1) << 31)) {
      go(static_cast<unsigned int>(0));
    } else {
      go(static_cast<uint64_t>(0));
    }
  });
}

struct Prepared {
  at::Tensor x, w1, b1, w2, b2;
  c10::MemoryFormat format;
  Shape sh;
};

// The arguments passed check_channel_coding (csrc/checks.h): shapes agree, and the weights have
// x's dtype and device.
Prepared prepare(const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                 const at::Tensor& b2) {
  const int64_t R = w1.size(0), C = x_in.size(1);
  Prepared p;
  p.format = dense_format(x_in);
  p.x = x_in.contiguous(p.format);
  p.w1 = w1.contiguous();
  p.b1 = b1.contiguous();
  p.w2 = w2.contiguous();
  p.b2 = b2.contiguous();
  p.sh = {p.x.size(0), C, p.x.size(2) * p.x.size(3), R, p.format == c10::MemoryFormat::ChannelsLast};
  return p;
}

// Whether `ptrs` allow VEC-wide accesses: every pointer 16-byte aligned and rows a multiple of VEC.
bool can_vectorise(const Shape& sh, int vec, std::initializer_list<const void*> ptrs) {
  const int64_t row = sh.cl ? sh.C : sh.P;
  if (row % vec != 0) return false;
  for (const void* p : ptrs) {
    if (!aligned(p, 16)) return false;
  }
  return true;
}

at::Tensor channel_coding_cuda(const at::Tensor& x_in, const at::Tensor& w1_in, const at::Tensor& b1_in,
                               const at::Tensor& w2_in, const at::Tensor& b2_in) {
  check_channel_coding(x_in, w1_in, b1_in, w2_in, b2_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto p = prepare(x_in, w1_in, b1_in, w2_in, b2_in);
  const auto& sh = p.sh;
  auto out = at::empty(p.x.sizes(), p.x.options().memory_format(p.format));
  if (out.numel() == 0) return out;
  const int sms = sm_count(x_in.get_device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "channel_coding_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int wide = 16 / sizeof(scalar_t);
    const scalar_t* x = p.x.const_data_ptr<scalar_t>();
    const bool vec_in = can_vectorise(sh, wide, {x});
    const auto pl = plan_sums(sh, wide, vec_in, sms);
    // Workspace (doubles): partials | pooled | hidden | scale (acc_t, padded to doubles).
    const int64_t n_part = sh.B * sh.C * pl.S, n_bc = sh.B * sh.C, n_br = sh.B * sh.R;
    auto ws = at::empty({n_part + 2 * n_bc + n_br}, p.x.options().dtype(at::kDouble));
    double* part = ws.data_ptr<double>();
    double* pooled = part + n_part;
    double* hidden = pooled + n_bc;
    acc_t* scale = reinterpret_cast<acc_t*>(hidden + n_br);

    launch_plane_sums<scalar_t, false>(x, nullptr, sh, pl, part, nullptr, stream);
    const int64_t rblocks = (sh.R + kWarps - 1) / kWarps;
    if (sh.R > 0) {
      fc1_kernel<scalar_t><<<static_cast<unsigned>(sh.B * rblocks), kThreads, 0, stream>>>(
          part, pl.S, sh.C, sh.R, static_cast<double>(sh.P), rblocks, p.w1.const_data_ptr<scalar_t>(),
          p.b1.const_data_ptr<scalar_t>(), pooled, hidden);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t cblocks = (sh.C + kWarps - 1) / kWarps;
    fc2_kernel<scalar_t, false><<<static_cast<unsigned>(sh.B * cblocks), kThreads, 0, stream>>>(
        hidden, sh.C, sh.R, cblocks, p.w2.const_data_ptr<scalar_t>(), p.b2.const_data_ptr<scalar_t>(), scale,
        nullptr, pl.S, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    launch_rescale<scalar_t, false>(x, scale, nullptr, o, sh, wide, vec_in && aligned(o, 16), sms, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_coding_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& w1_in, const at::Tensor& b1_in,
    const at::Tensor& w2_in, const at::Tensor& b2_in) {
  check_channel_coding_backward(grad_in, x_in, w1_in, b1_in, w2_in, b2_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto p = prepare(x_in, w1_in, b1_in, w2_in, b2_in);
  const auto& sh = p.sh;
  const auto grad = grad_in.to(p.x.scalar_type()).contiguous(p.format);
  auto grad_x = at::empty(p.x.sizes(), p.x.options().memory_format(p.format));
  auto gw1 = at::empty(p.w1.sizes(), p.w1.options());
  auto gb1 = at::empty(p.b1.sizes(), p.b1.options());
  auto gw2 = at::empty(p.w2.sizes(), p.w2.options());
  auto gb2 = at::empty(p.b2.sizes(), p.b2.options());
  auto finish = [&] { return std::make_tuple(grad_x, gw1, gb1, gw2, gb2); };
  if (sh.B * sh.C * sh.P == 0) {
    // An empty result (no plane, or planes of no pixel) depends on no weight: zero gradients, as
    // on CPU. (With P = 0 the pooled mean would be 0 / 0 = NaN and reach them.)
    gw1.zero_();
    gb1.zero_();
    gw2.zero_();
    gb2.zero_();
    return finish();
  }
  const int sms = sm_count(x_in.get_device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "channel_coding_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int wide = 16 / sizeof(scalar_t);
    const scalar_t* x = p.x.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* gx = grad_x.mutable_data_ptr<scalar_t>();
    const bool vec_in = can_vectorise(sh, wide, {x, g});
    const auto pl = plan_sums(sh, wide, vec_in, sms);
    // Workspace (doubles): part_x | part_gx | pooled | dz2 | hidden | dz1 | scale | shift (acc_t).
    const int64_t n_part = sh.B * sh.C * pl.S, n_bc = sh.B * sh.C, n_br = sh.B * sh.R;
    auto ws = at::empty({2 * n_part + 4 * n_bc + 2 * n_br}, p.x.options().dtype(at::kDouble));
    double* part_x = ws.data_ptr<double>();
    double* part_gx = part_x + n_part;
    double* pooled = part_gx + n_part;
    double* dz2 = pooled + n_bc;
    double* hidden = dz2 + n_bc;
    double* dz1 = hidden + n_br;
    acc_t* scale = reinterpret_cast<acc_t*>(dz1 + n_br);
    acc_t* shift = reinterpret_cast<acc_t*>(dz1 + n_br + n_bc);

    launch_plane_sums<scalar_t, true>(x, g, sh, pl, part_x, part_gx, stream);
    const scalar_t* w1 = p.w1.const_data_ptr<scalar_t>();
    const scalar_t* w2 = p.w2.const_data_ptr<scalar_t>();
    const int64_t rblocks = (sh.R + kWarps - 1) / kWarps;
    if (sh.R > 0) {
      fc1_kernel<scalar_t><<<static_cast<unsigned>(sh.B * rblocks), kThreads, 0, stream>>>(
          part_x, pl.S, sh.C, sh.R, static_cast<double>(sh.P), rblocks, w1, p.b1.const_data_ptr<scalar_t>(), pooled,
          hidden);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }  // R == 0: no hidden unit, and gw1 / gb1 are empty, so pooled is not needed
    const int64_t cblocks = (sh.C + kWarps - 1) / kWarps;
    fc2_kernel<scalar_t, true><<<static_cast<unsigned>(sh.B * cblocks), kThreads, 0, stream>>>(
        hidden, sh.C, sh.R, cblocks, w2, p.b2.const_data_ptr<scalar_t>(), scale, part_gx, pl.S, dz2);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const int64_t na = sh.B * ((sh.R + 31) / 32);
    const int64_t nwa = (sh.C * sh.R + sh.C + kThreads - 1) / kThreads;
    fc_backward_a<scalar_t><<<static_cast<unsigned>(na + nwa), kThreads, 0, stream>>>(
        dz2, hidden, w2, sh.B, sh.C, sh.R, na, dz1, gw2.mutable_data_ptr<scalar_t>(),
        gb2.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t nb = sh.B * ((sh.C + 31) / 32);
    const int64_t nwb = (sh.R * sh.C + sh.R + kThreads - 1) / kThreads;
    fc_backward_b<scalar_t><<<static_cast<unsigned>(nb + nwb), kThreads, 0, stream>>>(
        dz1, pooled, w1, sh.B, sh.C, sh.R, static_cast<double>(sh.P), nb, shift, gw1.mutable_data_ptr<scalar_t>(),
        gb1.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    launch_rescale<scalar_t, true>(g, scale, shift, gx, sh, wide, vec_in && aligned(gx, 16), sms, stream);
  });
  return finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(pyamalgam, CUDA, m) {
  m.impl("channel_coding", &channel_coding_cuda);
  m.impl("channel_coding_backward", &channel_coding_backward_cuda);
}

}  // namespace pyamalgam
