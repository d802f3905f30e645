// Node kernels of the pair-wise affinity loss, one implementation per backend.
//
// The algorithm (csrc/pairwise_affinity.cpp) is device-generic; what it needs per backend is the
// memory-bound work around the products: pooling pixels into L2-normalised nodes, the adjoint of
// that, and the sum and difference of the two sides. The CPU versions fuse each into one pass (csrc/cpu/pairwise_nodes.cpp, reached
// through csrc/cpu/dispatch.cpp, which picks the instruction set); other devices use ATen.
#pragma once
#include <ATen/core/Tensor.h>

namespace pyamalgam {

// (B, C, H, W) -> node features (B, N, C) float64, L2-normalised, and reciprocal norms (B, N, 1)
// (0 for a zero node, whose normalised vector stays 0).
std::pair<at::Tensor, at::Tensor> normalized_nodes_cpu(const at::Tensor& f, int64_t patch);

// Adjoint: gradient w.r.t. the normalised nodes (B, N, C), any floating dtype and strides ->
// gradient w.r.t. f, in f's dtype and dense layout (csrc/common.h).
at::Tensor normalized_nodes_backward_cpu(const at::Tensor& grad_hat, const at::Tensor& hat,
                                         const at::Tensor& inv, const at::Tensor& f, int64_t patch);

// [b + a_rot | b - a_rot] (B, N, 2 C) in `dtype` (float32 or float64) from float64 (B, N, C): the
// sum and difference in float64, rounded once.
at::Tensor sum_and_difference_cpu(const at::Tensor& b, const at::Tensor& a_rot, at::ScalarType dtype);

}  // namespace pyamalgam
