// Schemas of pyamalgam's operators and the small non-tensor Python surface (build_info).
//
// Kernels are registered per dispatch key: CPU in cpu/dispatch.cpp (which picks the instruction
// set), CUDA in cuda/<op>.cu; fake (meta) kernels and autograd are registered from Python
// (pyamalgam/ops/*.py), as in pytorch/extension-cpp.
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include "cpu/dispatch.h"

TORCH_LIBRARY(pyamalgam, m) {
  m.def("channel_coding(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> Tensor");
  m.def("channel_coding_backward(Tensor grad, Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("soft_argmax_depth(Tensor logits, float bin_size) -> Tensor");
  m.def("soft_argmax_depth_backward(Tensor grad, Tensor logits, float bin_size) -> Tensor");
  m.def("si_depth_loss(Tensor pred, Tensor target, Tensor? mask) -> Tensor");
  m.def("si_depth_loss_backward(Tensor grad, Tensor pred, Tensor target, Tensor? mask) -> (Tensor, Tensor)");
  m.def("pairwise_affinity_loss(Tensor fs, Tensor ft, int patch) -> Tensor");
  m.def("pairwise_affinity_loss_backward(Tensor grad, Tensor fs, Tensor ft, int patch) -> (Tensor, Tensor)");
  // The same loss with what its backward needs, so that the backward computes nothing twice (the
  // Python API's path; csrc/pairwise_affinity.cpp): (loss, s_hat, s_inv, t_hat, t_inv, pd, coef).
  m.def("pairwise_affinity_loss_for_backward(Tensor fs, Tensor ft, int patch)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("pairwise_affinity_loss_saved_backward(Tensor grad, Tensor fs, Tensor ft, Tensor s_hat, Tensor s_inv,"
        " Tensor t_hat, Tensor t_inv, Tensor pd, Tensor coef, int patch) -> (Tensor, Tensor)");
  // Thesis 003. channel_wise_loss returns (loss, stats): stats (B, C, 3) float64 are the per-plane
  // log-sum-exps and mean the backward needs instead of the two softmaxes (csrc/cpu/channel_wise.cpp).
  m.def("channel_wise_loss(Tensor ys, Tensor yt, float temperature) -> (Tensor, Tensor)");
  m.def("channel_wise_loss_backward(Tensor grad, Tensor ys, Tensor yt, Tensor stats, float temperature)"
        " -> (Tensor, Tensor)");
  // Thesis 003, Eq. 3.2 with a Chebyshev window of the given radius (csrc/cpu/pairwise_local.cpp).
  m.def("pairwise_local_loss(Tensor fs, Tensor ft, int radius, int patch) -> Tensor");
  m.def("pairwise_local_loss_backward(Tensor grad, Tensor fs, Tensor ft, int radius, int patch) -> (Tensor, Tensor)");
  // Thesis 003, Eq. 5.2: cross-frame affinities of student (fs_t, fs_k) against teacher (ft_t, ft_k),
  // exact and linear in the nodes (csrc/cpu/pairwise_frames.cpp); the _for_backward overload also
  // returns what the backward needs, frames stacked on the batch: (loss, s_hat, s_inv, t_hat, t_inv, pd, coef).
  m.def("pairwise_frames_loss(Tensor fs_t, Tensor fs_k, Tensor ft_t, Tensor ft_k, int patch) -> Tensor");
  m.def("pairwise_frames_loss_backward(Tensor grad, Tensor fs_t, Tensor fs_k, Tensor ft_t, Tensor ft_k, int patch)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("pairwise_frames_loss_for_backward(Tensor fs_t, Tensor fs_k, Tensor ft_t, Tensor ft_k, int patch)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("pairwise_frames_loss_saved_backward(Tensor grad, Tensor fs_t, Tensor fs_k, Tensor ft_t, Tensor ft_k,"
        " Tensor s_hat, Tensor s_inv, Tensor t_hat, Tensor t_inv, Tensor pd, Tensor coef, int patch)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
}

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyamalgam's compiled operators (registered under torch.ops.pyamalgam)";
  m.def("build_info", [] {
    py::dict info;
    info["torch_version"] = PYAMALGAM_TORCH_VERSION;
    info["cpu_isa"] = pyamalgam::cpu::isa();
    info["cpu_isas"] = pyamalgam::cpu::compiled_isas();
#ifdef PYAMALGAM_WITH_CUDA
    info["with_cuda"] = true;
    info["cuda_version"] = PYAMALGAM_CUDA_VERSION;
    info["cuda_archs"] = PYAMALGAM_CUDA_ARCHS;
#else
    info["with_cuda"] = false;
    info["cuda_version"] = py::none();
    info["cuda_archs"] = "";
#endif
    return info;
  });
}
