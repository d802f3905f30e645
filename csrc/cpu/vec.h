// Loop building blocks for the CPU kernels that the compiler turns into SIMD code.
//
// Without -ffast-math a compiler may not reorder a floating-point sum, so `s += x[i]` runs one
// add per cycle-latency and never vectorises. Summing into kLanes independent accumulators
// (combined in a fixed order at the end) keeps the result deterministic and lets the lanes map
// onto vector registers. Likewise std::exp is a scalar libm call; fast_exp_nonpositive is a
// branch-free polynomial the compiler vectorises.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

// Everything here lives in the namespace of the instruction set the including file is compiled for
// (csrc/cpu/kernels.h): an inline function compiled for AVX2 must never stand in for a baseline one.
namespace pyamalgam::cpu::PYAMALGAM_CPU_ISA {

constexpr int kLanes = 8;

// Adds the kLanes accumulators in a fixed order.
inline double lane_total(const double (&acc)[kLanes]) {
  double s = 0;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// sum_{p < n} f(p), f returning acc_t (float for float data). Four vector registers' worth of
// independent lanes hide the latency of the adds (one lane per register would wait on every add);
// each lane sums kFlush values in acc_t at full SIMD width, then goes into a double, so the error
// does not grow with n.
template <typename acc_t, typename F>
__attribute__((always_inline)) inline double lane_sum(int64_t n, const F& f) {
  constexpr int kSumLanes = 4 * 32 / static_cast<int>(sizeof(acc_t));  // 4 AVX registers
  constexpr int64_t kFlush = 16;
  if (n < kSumLanes) {  // too short for lanes to pay off
    double sum = 0;
    for (int64_t p = 0; p < n; ++p) sum += static_cast<double>(f(p));
    return sum;
  }
  double total[kSumLanes] = {};
  int64_t p = 0;
  while (const int64_t block = std::min(kFlush, (n - p) / kSumLanes) * kSumLanes) {
    acc_t acc[kSumLanes] = {};
    for (int64_t q = p; q < p + block; q += kSumLanes) {
      for (int j = 0; j < kSumLanes; ++j) acc[j] += f(q + j);
    }
    for (int j = 0; j < kSumLanes; ++j) total[j] += static_cast<double>(acc[j]);
    p += block;
  }
  for (; p < n; ++p) total[p % kSumLanes] += static_cast<double>(f(p));
  // Lanes combined as a tree, in a fixed order: log2(lanes) vector adds, not a chain of 32 scalar
  // ones (which dominates short sums, e.g. the 16x16 planes of a deep layer).
  for (int width = kSumLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) total[j] += total[j + width];
  }
  return total[0];
}

// e^x for x <= 0 (or NaN) in float, within 2 ulp: x = n ln2 + r, |r| <= ln2 / 2, e^r by a
// degree-6 polynomial (Cephes expf), 2^n from the exponent bits. e^x underflows to 0 below
// -87.3; NaN stays NaN. The kernels only need x = logit - max <= 0.
__attribute__((always_inline)) inline float fast_exp_nonpositive(float x) {
  // Branch- and select-free so that loops calling it vectorise: clamp, then zero what underflows
  // by a multiply (a NaN input stays NaN through r and p).
  const float keep = static_cast<float>(x >= -87.33f);
  const float xc = std::max(x, -87.33f);
  const float t = xc * 1.44269504088896341f;
  const int32_t n = static_cast<int32_t>(t - 0.5f);  // round to nearest for t <= 0
  const float fn = static_cast<float>(n);
  float r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale * keep;
}

template <typename acc_t>
__attribute__((always_inline)) inline acc_t exp_nonpositive(acc_t x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return fast_exp_nonpositive(x);
  } else {
    return std::exp(x);  // float64 keeps libm's accuracy
  }
}

}  // namespace pyamalgam::cpu::PYAMALGAM_CPU_ISA
