// Device helpers shared by the CUDA kernels of csrc/cuda/: vectorised loads and stores, and
// fixed-order (deterministic) warp and block sums.
#pragma once
#include <c10/cuda/CUDAException.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

namespace pyamalgam {
namespace cuda {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// Sum over the warp by a fixed shuffle tree; the result is in lane 0.
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sums each v[j] over the block (fixed order); the results are in thread 0. Every thread of the
// block must call it; the block size must be a multiple of 32.
template <int N>
__device__ __forceinline__ void block_sum(double (&v)[N]) {
  __shared__ double sh[N][32];
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, nwarps = (blockDim.x * blockDim.y) >> 5;
#pragma unroll
  for (int j = 0; j < N; ++j) v[j] = warp_sum(v[j]);
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < N; ++j) sh[j][warp] = v[j];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = warp_sum(lane < nwarps ? sh[j][lane] : 0.0);
  }
  __syncthreads();  // a later call in the same kernel may reuse sh
}

inline int sm_count(int device) {
  static std::atomic<int> cache[256];
  if (device < 0 || device >= 256) device = 0;
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

// f(std::integral_constant<int, VEC>) with VEC = WIDE (when `wide`) or 1: only these two widths
// are instantiated.
template <int WIDE, typename F>
void with_vec(bool wide, const F& f) {
  if (wide) return f(std::integral_constant<int, WIDE>{});
  f(std::integral_constant<int, 1>{});
}

}  // namespace cuda
}  // namespace pyamalgam
