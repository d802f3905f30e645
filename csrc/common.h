// Helpers shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/TensorUtils.h>
#include <c10/core/MemoryFormat.h>

#include <algorithm>
#include <cstdint>

namespace pyamalgam {

// The one dense layout a kernel works in. Inputs that are neither NCHW- nor channels_last-
// contiguous are copied to NCHW; outputs are always allocated in the chosen layout, and the
// fake kernels in pyamalgam/ops/_layout.py make the same choice, so strides always agree.
inline c10::MemoryFormat dense_format(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(c10::MemoryFormat::ChannelsLast)) {
    return c10::MemoryFormat::ChannelsLast;
  }
  return c10::MemoryFormat::Contiguous;
}

// Element (b, c, p) of a 4-d tensor in `format`, with p = h * W + w: one addressing scheme
// for both layouts, so each kernel is written once.
struct PlaneIndex {
  int64_t sb, sc, sp;  // strides of batch, channel, pixel
  PlaneIndex(const at::Tensor& x, c10::MemoryFormat format) {
    const int64_t C = x.size(1), P = x.size(2) * x.size(3);
    if (format == c10::MemoryFormat::ChannelsLast) {
      sb = C * P; sc = 1; sp = C;
    } else {
      sb = C * P; sc = P; sp = 1;
    }
  }
  int64_t operator()(int64_t b, int64_t c, int64_t p) const { return b * sb + c * sc + p * sp; }
};

// The cell side the node kernels of the pair-wise losses use for a (B, C, H, W) map: a patch
// beyond the map covers it with one cell, as max(H, W) does, and H + patch - 1 or (i + 1) * patch
// can no longer overflow (patch = 2^63 - 1 gave NaN).
inline int64_t node_patch(const at::Tensor& f, int64_t patch) {
  return std::min(patch, std::max<int64_t>({f.size(2), f.size(3), 1}));
}

// The number of nodes, ceil(H / patch) * ceil(W / patch) at that cell side (ragged border cells kept).
inline int64_t node_count(const at::Tensor& f, int64_t patch) {
  const int64_t p = node_patch(f, patch);
  return ((f.size(2) + p - 1) / p) * ((f.size(3) + p - 1) / p);
}

}  // namespace pyamalgam
