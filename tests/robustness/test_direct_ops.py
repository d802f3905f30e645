"""Direct ``torch.ops.pyamalgam.*`` calls with bad arguments get a clean error naming the argument.

These calls skip the Python API and its checks (pyamalgam/ops/_validate.py) and reach the C++
checks (csrc/checks.cpp) in front of the CPU kernels. Without those checks some of them killed the
process (a target smaller than pred: segfault; patch 0: SIGFPE), so every case runs in a child
process, and a crash fails that case only: the child reports each case as it starts, and the
cases after a crash run in a fresh child. The same cases then run against the fake kernels
(FakeTensorMode and torch.compile), which must refuse them with the same messages.

A tensor on another device than its partners cannot be made without a second device: not tested.
"""
import json
import re
import signal
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from pyamalgam import ops  # noqa: F401  (loads the kernels and registers the fake kernels)
from pyamalgam._testing import subprocess_env

# The names an expression below may use; the child process defines the same.
PRELUDE = """
import torch
import pyamalgam.ops
P = torch.ops.pyamalgam
f64 = torch.float64
def r(*shape, dtype=f64):
    return torch.randn(*shape, dtype=dtype)
def ints(*shape, dtype=torch.int64):
    return torch.ones(*shape, dtype=dtype)
def g0():  # the gradient of a loss
    return torch.tensor(1.0, dtype=f64)
def cc(c=4, r_=2):  # valid channel_coding arguments: x (2, C, 3, 3), w1, b1, w2, b2
    return r(2, c, 3, 3), r(r_, c), r(r_), r(c, r_), r(c)
def depth(*shape):  # valid si_depth_loss arguments: pred, target, mask
    return r(*shape), r(*shape), torch.rand(*shape) < 0.7
def pw(h=5, dtype=f64):  # valid pairwise arguments: fs (2, 4, h, 6), ft (2, 3, h, 6)
    return r(2, 4, h, 6, dtype=dtype), r(2, 3, h, 6, dtype=dtype)
def saved(patch=2, h=5, dtype=f64, i=None, t=None):  # what the forward saved; entry i replaced by t(entry)
    s = list(P.pairwise_affinity_loss_for_backward(*pw(h, dtype), patch)[1:])
    if i is not None:
        s[i] = t(s[i])
    return s
def pf(h=5, dtype=f64):  # valid pairwise_frames arguments: fs_t, fs_k (2, 4, h, 6), ft_t, ft_k (2, 3, h, 6)
    (fs_t, ft_t), (fs_k, ft_k) = pw(h, dtype), pw(h, dtype)
    return fs_t, fs_k, ft_t, ft_k
def pf_saved(patch=2, h=5, dtype=f64, i=None, t=None):  # what the pairwise_frames forward saved
    s = list(P.pairwise_frames_loss_for_backward(*pf(h, dtype), patch)[1:])
    if i is not None:
        s[i] = t(s[i])
    return s
"""

FLOAT = r"must be a floating-point tensor \(float16, bfloat16, float32 or float64\), got torch\."
CC = "channel_coding: "
CCB = "channel_coding_backward: "
SA = "soft_argmax_depth: "
SAB = "soft_argmax_depth_backward: "
SI = "si_depth_loss: "
SIB = "si_depth_loss_backward: "
PW = "pairwise_affinity_loss: "
PWB = "pairwise_affinity_loss_backward: "
PWF = "pairwise_affinity_loss_for_backward: "
PWS = "pairwise_affinity_loss_saved_backward: "
SIZES = r"fs and ft must have the same batch and spatial sizes \(channels may differ\)"
PF, PFB = "pairwise_frames_loss: ", "pairwise_frames_loss_backward: "
PFF, PFS = "pairwise_frames_loss_for_backward: ", "pairwise_frames_loss_saved_backward: "
PF_SIZES = r"fs_t and ft_t must have the same batch and spatial sizes \(channels may differ\)"

# (id, expression, regex the message must match; None: a valid call that must succeed).
CASES = [
    # channel_coding
    ("cc_valid", "P.channel_coding(*cc())", None),
    ("cc_valid_channels_last", "P.channel_coding(cc()[0].to(memory_format=torch.channels_last), *cc()[1:])", None),
    ("cc_valid_no_hidden_unit", "P.channel_coding(*cc(r_=0))", None),
    ("cc_x_3d", "P.channel_coding(r(4, 3, 3), *cc()[1:])", CC + r"x must have 4 dimensions, got shape \(4, 3, 3\)"),
    ("cc_x_int", "P.channel_coding(cc()[0].long(), *[t.long() for t in cc()[1:]])", CC + "x " + FLOAT + "int64"),
    ("cc_w1_1d", "P.channel_coding(cc()[0], r(4), *cc()[2:])", CC + r"w1 must have 2 dimensions, got shape \(4,\)"),
    ("cc_w1_too_small", "P.channel_coding(cc()[0], r(2, 3), *cc()[2:])",
     CC + r"w1 must have shape \(2, 4\) \(\(R, C\) with C = x.shape\[1\]\), got \(2, 3\)"),
    ("cc_w1_too_small_big_x", "P.channel_coding(r(1, 4096, 1, 1), r(64, 1), r(64), r(4096, 64), r(4096))",
     CC + r"w1 must have shape \(64, 4096\)"),
    ("cc_b1_size", "(lambda x, w1, b1, w2, b2: P.channel_coding(x, w1, r(3), w2, b2))(*cc())",
     CC + r"b1 must have shape \(2,\) \(\(R,\) with R = w1.shape\[0\]\), got \(3,\)"),
    ("cc_w2_transposed", "(lambda x, w1, b1, w2, b2: P.channel_coding(x, w1, b1, w2.t(), b2))(*cc())",
     CC + r"w2 must have shape \(4, 2\) \(\(C, R\)\), got \(2, 4\)"),
    ("cc_b2_size", "(lambda x, w1, b1, w2, b2: P.channel_coding(x, w1, b1, w2, b2[:3]))(*cc())",
     CC + r"b2 must have shape \(4,\) \(\(C,\)\), got \(3,\)"),
    ("cc_b1_dtype", "(lambda x, w1, b1, w2, b2: P.channel_coding(x, w1, b1.float(), w2, b2))(*cc())",
     CC + r"b1 must have the same dtype as x \(torch.float64\), got torch.float32"),
    ("cc_w2_dtype", "(lambda x, w1, b1, w2, b2: P.channel_coding(x, w1, b1, w2.half(), b2))(*cc())",
     CC + r"w2 must have the same dtype as x \(torch.float64\), got torch.float16"),
    # channel_coding_backward
    ("ccb_valid", "P.channel_coding_backward(torch.ones(2, 4, 3, 3), *cc())", None),
    ("ccb_grad_shape", "P.channel_coding_backward(r(2, 4, 3), *cc())",
     CCB + r"grad must have the shape of x \(2, 4, 3, 3\), got \(2, 4, 3\)"),
    ("ccb_grad_small", "P.channel_coding_backward(r(1, 4, 3, 3), *cc())",
     CCB + r"grad must have the shape of x \(2, 4, 3, 3\), got \(1, 4, 3, 3\)"),
    ("ccb_grad_int", "P.channel_coding_backward(ints(2, 4, 3, 3, dtype=torch.int32), *cc())",
     CCB + "grad " + FLOAT + "int32"),
    ("ccb_x_3d", "P.channel_coding_backward(r(4, 3, 3), r(4, 3, 3), *cc()[1:])", CCB + r"x must have 4 dimensions"),
    ("ccb_w1_too_small", "P.channel_coding_backward(r(2, 4, 3, 3), cc()[0], r(2, 3), *cc()[2:])",
     CCB + r"w1 must have shape \(2, 4\)"),
    ("ccb_b2_dtype", "(lambda x, w1, b1, w2, b2: P.channel_coding_backward(x, x, w1, b1, w2, b2.float()))(*cc())",
     CCB + r"b2 must have the same dtype as x \(torch.float64\), got torch.float32"),
    # soft_argmax_depth
    ("sa_valid", "P.soft_argmax_depth(r(2, 5, 3, 4), 0.5)", None),
    ("sa_logits_3d", "P.soft_argmax_depth(r(5, 3, 3), 0.5)",
     SA + r"logits must have 4 dimensions, got shape \(5, 3, 3\)"),
    ("sa_logits_int", "P.soft_argmax_depth(ints(2, 5, 3, 3), 0.5)", SA + "logits " + FLOAT + "int64"),
    ("sa_bin_size_zero", "P.soft_argmax_depth(r(2, 5, 3, 3), 0.0)",
     SA + r"bin_size must be a finite number > 0, got 0$"),
    ("sa_bin_size_negative", "P.soft_argmax_depth(r(2, 5, 3, 3), -1.5)",
     SA + r"bin_size must be a finite number > 0, got -1.5"),
    ("sa_bin_size_nan", "P.soft_argmax_depth(r(2, 5, 3, 3), float('nan'))",
     SA + r"bin_size must be a finite number > 0, got nan"),
    ("sa_bin_size_inf", "P.soft_argmax_depth(r(2, 5, 3, 3), float('inf'))",
     SA + r"bin_size must be a finite number > 0, got inf"),
    # soft_argmax_depth_backward
    ("sab_valid", "P.soft_argmax_depth_backward(r(2, 3, 4), r(2, 5, 3, 4), 0.5)", None),
    ("sab_grad_shape", "P.soft_argmax_depth_backward(r(2, 3, 4), r(2, 5, 3, 3), 0.5)",
     SAB + r"grad must have shape \(2, 3, 3\) \(\(B, H, W\) of logits\), got \(2, 3, 4\)"),
    ("sab_grad_large_image", "P.soft_argmax_depth_backward(r(1, 1, 1), r(1, 2, 2000, 2000), 0.5)",
     SAB + r"grad must have shape \(1, 2000, 2000\)"),
    ("sab_grad_4d", "P.soft_argmax_depth_backward(r(2, 1, 3, 3), r(2, 5, 3, 3), 0.5)",
     SAB + r"grad must have shape \(2, 3, 3\)"),
    ("sab_grad_int", "P.soft_argmax_depth_backward(ints(2, 3, 3), r(2, 5, 3, 3), 0.5)",
     SAB + "grad " + FLOAT + "int64"),
    ("sab_logits_3d", "P.soft_argmax_depth_backward(r(2, 3, 3), r(5, 3, 3), 0.5)",
     SAB + r"logits must have 4 dimensions"),
    ("sab_bin_size_zero", "P.soft_argmax_depth_backward(r(2, 3, 3), r(2, 5, 3, 3), 0.0)",
     SAB + r"bin_size must be a finite number > 0"),
    # si_depth_loss
    ("si_valid", "P.si_depth_loss(*depth(2, 4, 5))", None),
    ("si_valid_no_mask", "P.si_depth_loss(*depth(2, 4, 5)[:2], None)", None),
    ("si_valid_channel_dim", "P.si_depth_loss(*depth(2, 1, 4, 5))", None),
    ("si_target_issue_10", "P.si_depth_loss(torch.rand(2, 3000, 3000), torch.rand(1, 4), None)",
     SI + r"target must have the shape of pred \(2, 3000, 3000\), got \(1, 4\)"),
    ("si_pred_2d", "P.si_depth_loss(r(2, 4), r(2, 4), None)",
     SI + r"pred must have 3 or 4 dimensions, got shape \(2, 4\)"),
    ("si_pred_channels", "P.si_depth_loss(r(2, 3, 4, 5), r(2, 3, 4, 5), None)",
     SI + r"pred must be \(B, H, W\) or \(B, 1, H, W\), got shape \(2, 3, 4, 5\)"),
    ("si_pred_int", "P.si_depth_loss(ints(2, 4, 5), ints(2, 4, 5), None)",
     SI + "pred " + FLOAT + "int64"),
    ("si_target_dtype", "P.si_depth_loss(r(2, 4, 5), r(2, 4, 5).float(), None)",
     SI + r"target must have the same dtype as pred \(torch.float64\), got torch.float32"),
    ("si_mask_shape", "P.si_depth_loss(r(2, 4, 5), r(2, 4, 5), torch.ones(2, 4, 3, dtype=torch.bool))",
     SI + r"mask must have the shape of pred \(2, 4, 5\), got \(2, 4, 3\)"),
    ("si_mask_small", "P.si_depth_loss(r(2, 500, 500), r(2, 500, 500), torch.ones(1, 1, 1, dtype=torch.bool))",
     SI + r"mask must have the shape of pred \(2, 500, 500\), got \(1, 1, 1\)"),
    ("si_mask_float", "P.si_depth_loss(*depth(2, 4, 5)[:2], torch.ones(2, 4, 5))",
     SI + r"mask must be a bool tensor, got torch.float32"),
    # si_depth_loss_backward
    ("sib_valid", "P.si_depth_loss_backward(g0(), *depth(2, 4, 5))", None),
    ("sib_valid_no_mask", "P.si_depth_loss_backward(g0(), *depth(2, 4, 5)[:2], None)", None),
    ("sib_grad_shape", "P.si_depth_loss_backward(torch.ones(2), *depth(2, 4, 5))",
     SIB + r"grad must have one element \(the loss is a scalar\), got shape \(2,\)"),
    ("sib_grad_empty", "P.si_depth_loss_backward(torch.ones(0), *depth(2, 4, 5))", SIB + r"grad must have one element"),
    ("sib_grad_int", "P.si_depth_loss_backward(torch.tensor(1), *depth(2, 4, 5))", SIB + "grad " + FLOAT + "int64"),
    ("sib_target_small", "P.si_depth_loss_backward(g0(), torch.rand(2, 3000, 3000), torch.rand(1, 4), None)",
     SIB + r"target must have the shape of pred \(2, 3000, 3000\), got \(1, 4\)"),
    ("sib_mask_shape", "P.si_depth_loss_backward(g0(), r(2, 4, 5), r(2, 4, 5), torch.ones(2, 5, dtype=torch.bool))",
     SIB + r"mask must have the shape of pred \(2, 4, 5\), got \(2, 5\)"),
    ("sib_mask_uint8", "P.si_depth_loss_backward(g0(), *depth(2, 4, 5)[:2], ints(2, 4, 5, dtype=torch.uint8))",
     SIB + r"mask must be a bool tensor, got torch.uint8"),
    # pairwise_affinity_loss
    ("pw_valid", "P.pairwise_affinity_loss(r(2, 4, 5, 6), r(2, 3, 5, 6), 2)", None),
    ("pw_valid_patch_beyond_image", "P.pairwise_affinity_loss(r(2, 4, 5, 6), r(2, 3, 5, 6), 9)", None),
    ("pw_patch_zero_issue_10", "P.pairwise_affinity_loss(torch.randn(2, 4, 5, 6), torch.randn(2, 3, 5, 6), 0)",
     PW + r"patch must be >= 1, got 0"),
    ("pw_patch_negative", "P.pairwise_affinity_loss(r(2, 4, 5, 6), r(2, 3, 5, 6), -2)",
     PW + r"patch must be >= 1, got -2"),
    ("pw_fs_3d", "P.pairwise_affinity_loss(r(4, 5, 6), r(2, 3, 5, 6), 1)",
     PW + r"fs must have 4 dimensions, got shape \(4, 5, 6\)"),
    ("pw_ft_3d", "P.pairwise_affinity_loss(r(2, 4, 5, 6), r(3, 5, 6), 1)",
     PW + r"ft must have 4 dimensions, got shape \(3, 5, 6\)"),
    ("pw_ft_spatial", "P.pairwise_affinity_loss(r(2, 4, 5, 6), r(2, 3, 5, 4), 1)",
     PW + SIZES + r": fs is \(2, 4, 5, 6\), ft is \(2, 3, 5, 4\)"),
    ("pw_ft_batch", "P.pairwise_affinity_loss(r(2, 4, 5, 6), r(1, 3, 5, 6), 1)", PW + SIZES),
    ("pw_ft_dtype", "P.pairwise_affinity_loss(r(2, 4, 5, 6), r(2, 3, 5, 6).float(), 1)",
     PW + r"ft must have the same dtype as fs \(torch.float64\), got torch.float32"),
    ("pw_fs_int", "P.pairwise_affinity_loss(ints(2, 4, 5, 6), ints(2, 3, 5, 6), 1)",
     PW + "fs " + FLOAT + "int64"),
    # pairwise_affinity_loss_backward
    ("pwb_valid", "P.pairwise_affinity_loss_backward(g0(), r(2, 4, 5, 6), r(2, 3, 5, 6), 2)", None),
    ("pwb_patch_zero", "P.pairwise_affinity_loss_backward(g0(), r(2, 4, 5, 6), r(2, 3, 5, 6), 0)",
     PWB + r"patch must be >= 1, got 0"),
    ("pwb_grad_shape", "P.pairwise_affinity_loss_backward(torch.ones(2, dtype=f64), r(2, 4, 5, 6), r(2, 3, 5, 6), 1)",
     PWB + r"grad must have one element \(the loss is a scalar\), got shape \(2,\)"),
    ("pwb_grad_int", "P.pairwise_affinity_loss_backward(torch.tensor(1), r(2, 4, 5, 6), r(2, 3, 5, 6), 1)",
     PWB + "grad " + FLOAT + "int64"),
    ("pwb_ft_spatial", "P.pairwise_affinity_loss_backward(g0(), r(2, 4, 5, 6), r(2, 3, 4, 6), 1)",
     PWB + SIZES),
    ("pwb_ft_dtype", "P.pairwise_affinity_loss_backward(g0(), r(2, 4, 5, 6), r(2, 3, 5, 6).half(), 1)",
     PWB + r"ft must have the same dtype as fs \(torch.float64\), got torch.float16"),
    # pairwise_affinity_loss_for_backward: the forward's checks under its own name
    ("pwf_valid", "P.pairwise_affinity_loss_for_backward(*pw(), 2)", None),
    ("pwf_valid_empty_map", "P.pairwise_affinity_loss_for_backward(*pw(h=0), 2)", None),
    ("pwf_patch_zero", "P.pairwise_affinity_loss_for_backward(*pw(), 0)", PWF + r"patch must be >= 1, got 0"),
    ("pwf_ft_spatial", "P.pairwise_affinity_loss_for_backward(r(2, 4, 5, 6), r(2, 3, 5, 4), 1)", PWF + SIZES),
    ("pwf_fs_int", "P.pairwise_affinity_loss_for_backward(ints(2, 4, 5, 6), ints(2, 3, 5, 6), 1)",
     PWF + "fs " + FLOAT + "int64"),
    # pairwise_affinity_loss_saved_backward: the saved tensors are indexed blindly by the kernels
    ("pws_valid", "P.pairwise_affinity_loss_saved_backward(g0(), *pw(), *saved(), 2)", None),
    ("pws_valid_float32", "P.pairwise_affinity_loss_saved_backward(g0(), *pw(dtype=torch.float32),"
     " *saved(dtype=torch.float32), 2)", None),
    ("pws_valid_empty_map", "P.pairwise_affinity_loss_saved_backward(g0(), *pw(h=0), *saved(h=0), 2)", None),
    ("pws_valid_patch_beyond_image", "P.pairwise_affinity_loss_saved_backward(g0(), *pw(), *saved(9), 2**62)", None),
    ("pws_valid_strided_saved", "P.pairwise_affinity_loss_saved_backward(g0(), *pw(),"
     " *saved(i=0, t=lambda s: s.transpose(1, 2).contiguous().transpose(1, 2)), 2)", None),
    ("pws_patch_zero", "P.pairwise_affinity_loss_saved_backward(g0(), *pw(), *saved(), 0)",
     PWS + r"patch must be >= 1, got 0"),
    ("pws_grad_shape", "P.pairwise_affinity_loss_saved_backward(torch.ones(3, dtype=f64), *pw(), *saved(), 2)",
     PWS + r"grad must have one element \(the loss is a scalar\), got shape \(3,\)"),
    ("pws_s_hat_float32", "P.pairwise_affinity_loss_saved_backward(g0(), *pw(), *saved(i=0, t=lambda s: s.float()), 2)",
     PWS + r"s_hat must be a float64 tensor \(the forward's\), got torch.float32"),
    ("pws_s_hat_other_patch", "P.pairwise_affinity_loss_saved_backward(g0(), *pw(), *saved(1), 2)",
     PWS + r"s_hat must have shape \(2, 9, 4\) \(\(B, N, Cs\): N nodes of fs\), got \(2, 30, 4\)"),
    ("pws_s_inv_2d", "P.pairwise_affinity_loss_saved_backward(g0(), *pw(), *saved(i=1, t=lambda s: s[..., 0]), 2)",
     PWS + r"s_inv must have shape \(2, 9, 1\) \(\(B, N, 1\)\), got \(2, 9\)"),
    ("pws_t_hat_channels", "P.pairwise_affinity_loss_saved_backward(g0(), *pw(), *saved(i=2, t=lambda s: s[..., :2]), 2)",
     PWS + r"t_hat must have shape \(2, 9, 3\) \(\(B, N, Ct\)\), got \(2, 9, 2\)"),
    ("pws_t_inv_half", "P.pairwise_affinity_loss_saved_backward(g0(), *pw(), *saved(i=3, t=lambda s: s.half()), 2)",
     PWS + r"t_inv must be a float64 tensor \(the forward's\), got torch.float16"),
    ("pws_pd_float32_for_float64", "P.pairwise_affinity_loss_saved_backward(g0(), *pw(), *saved(i=4, t=lambda s: s.float()), 2)",
     PWS + r"pd must be a float64 tensor \(the forward's\), got torch.float32"),
    ("pws_pd_float64_for_float32", "P.pairwise_affinity_loss_saved_backward(g0(), *pw(dtype=torch.float32),"
     " *saved(dtype=torch.float32, i=4, t=lambda s: s.double()), 2)",
     PWS + r"pd must be a float32 tensor \(the forward's\), got torch.float64"),
    ("pws_pd_small", "P.pairwise_affinity_loss_saved_backward(g0(), *pw(), *saved(i=4, t=lambda s: s[:, :1]), 2)",
     PWS + r"pd must have shape \(2, 9, 8\) \(\(B, N, 2 max\(Cs, Ct\)\)\), got \(2, 1, 8\)"),
    ("pws_coef_columns", "P.pairwise_affinity_loss_saved_backward(g0(), *pw(), *saved(i=5, t=lambda s: s[..., :-1]), 2)",
     PWS + r"coef must have shape \(2, 8, 7\) \(\(B, 2 max\(Cs, Ct\), Cs \+ Ct\)\), got \(2, 8, 6\)"),
    ("pws_coef_batch", "P.pairwise_affinity_loss_saved_backward(g0(), *pw(), *saved(i=5, t=lambda s: s[:1]), 2)",
     PWS + r"coef must have shape \(2, 8, 7\)"),
    ("pws_ft_dtype", "P.pairwise_affinity_loss_saved_backward(g0(), r(2, 4, 5, 6), r(2, 3, 5, 6).float(), *saved(), 2)",
     PWS + r"ft must have the same dtype as fs \(torch.float64\), got torch.float32"),
    # pairwise_frames_loss (thesis Eq. 5.2) and its three companions
    ("pf_valid", "P.pairwise_frames_loss(*pf(), 2)", None),
    ("pf_valid_patch_beyond_image", "P.pairwise_frames_loss(*pf(), 2**62)", None),
    ("pf_valid_empty_map", "P.pairwise_frames_loss(*pf(h=0), 1)", None),
    ("pf_patch_zero", "P.pairwise_frames_loss(*pf(), 0)", PF + r"patch must be >= 1, got 0"),
    ("pf_fs_t_3d", "P.pairwise_frames_loss(r(4, 5, 6), *pf()[1:], 1)", PF + r"fs_t must have 4 dimensions, got shape \(4, 5, 6\)"),
    ("pf_fs_t_int", "P.pairwise_frames_loss(ints(2, 4, 5, 6), *pf()[1:], 1)", PF + "fs_t " + FLOAT + "int64"),
    ("pf_fs_k_small", "P.pairwise_frames_loss(r(2, 4, 50, 60), r(2, 4, 5, 6), r(2, 3, 50, 60), r(2, 3, 50, 60), 1)",
     PF + r"fs_k must have the shape of fs_t \(2, 4, 50, 60\), got \(2, 4, 5, 6\)"),
    ("pf_ft_t_3d", "P.pairwise_frames_loss(*pf()[:2], r(3, 5, 6), pf()[3], 1)", PF + r"ft_t must have 4 dimensions"),
    ("pf_ft_t_spatial", "P.pairwise_frames_loss(*pf()[:2], r(2, 3, 5, 4), r(2, 3, 5, 4), 1)", PF + PF_SIZES),
    ("pf_ft_t_batch", "P.pairwise_frames_loss(*pf()[:2], r(1, 3, 5, 6), r(1, 3, 5, 6), 1)", PF + PF_SIZES),
    ("pf_ft_k_small", "P.pairwise_frames_loss(*pf()[:3], r(2, 3, 1, 1), 1)",
     PF + r"ft_k must have the shape of ft_t \(2, 3, 5, 6\), got \(2, 3, 1, 1\)"),
    ("pf_ft_k_channels", "P.pairwise_frames_loss(*pf()[:3], r(2, 4, 5, 6), 1)", PF + r"ft_k must have the shape of ft_t"),
    ("pf_fs_k_dtype", "P.pairwise_frames_loss(pf()[0], pf()[1].float(), *pf()[2:], 1)",
     PF + r"fs_k must have the same dtype as fs_t \(torch.float64\), got torch.float32"),
    ("pf_ft_k_dtype", "P.pairwise_frames_loss(*pf()[:3], pf()[3].half(), 1)",
     PF + r"ft_k must have the same dtype as fs_t \(torch.float64\), got torch.float16"),
    ("pfb_valid", "P.pairwise_frames_loss_backward(g0(), *pf(), 2)", None),
    ("pfb_grad_shape", "P.pairwise_frames_loss_backward(torch.ones(2, dtype=f64), *pf(), 1)",
     PFB + r"grad must have one element \(the loss is a scalar\), got shape \(2,\)"),
    ("pfb_grad_int", "P.pairwise_frames_loss_backward(torch.tensor(1), *pf(), 1)", PFB + "grad " + FLOAT + "int64"),
    ("pfb_fs_k_small", "P.pairwise_frames_loss_backward(g0(), r(2, 4, 50, 60), r(2, 4, 5, 6), r(2, 3, 50, 60),"
     " r(2, 3, 50, 60), 1)", PFB + r"fs_k must have the shape of fs_t"),
    ("pff_valid", "P.pairwise_frames_loss_for_backward(*pf(), 2)", None),
    ("pff_patch_zero", "P.pairwise_frames_loss_for_backward(*pf(), 0)", PFF + r"patch must be >= 1, got 0"),
    ("pff_ft_t_spatial", "P.pairwise_frames_loss_for_backward(*pf()[:2], r(2, 3, 5, 4), r(2, 3, 5, 4), 1)", PFF + PF_SIZES),
    ("pfs_valid", "P.pairwise_frames_loss_saved_backward(g0(), *pf(), *pf_saved(), 2)", None),
    ("pfs_valid_float32", "P.pairwise_frames_loss_saved_backward(g0(), *pf(dtype=torch.float32),"
     " *pf_saved(dtype=torch.float32), 2)", None),
    ("pfs_valid_empty_map", "P.pairwise_frames_loss_saved_backward(g0(), *pf(h=0), *pf_saved(h=0), 2)", None),
    ("pfs_valid_strided_saved", "P.pairwise_frames_loss_saved_backward(g0(), *pf(),"
     " *pf_saved(i=2, t=lambda s: s.transpose(1, 2).contiguous().transpose(1, 2)), 2)", None),
    ("pfs_grad_shape", "P.pairwise_frames_loss_saved_backward(torch.ones(3, dtype=f64), *pf(), *pf_saved(), 2)",
     PFS + r"grad must have one element \(the loss is a scalar\), got shape \(3,\)"),
    ("pfs_s_hat_one_frame", "P.pairwise_frames_loss_saved_backward(g0(), *pf(), *pf_saved(i=0, t=lambda s: s[:2]), 2)",
     PFS + r"s_hat must have shape \(4, 9, 4\) \(\(2B, N, Cs\): N nodes of fs_t and fs_k\), got \(2, 9, 4\)"),
    ("pfs_s_hat_other_patch", "P.pairwise_frames_loss_saved_backward(g0(), *pf(), *pf_saved(1), 2)",
     PFS + r"s_hat must have shape \(4, 9, 4\)"),
    ("pfs_s_inv_float32", "P.pairwise_frames_loss_saved_backward(g0(), *pf(), *pf_saved(i=1, t=lambda s: s.float()), 2)",
     PFS + r"s_inv must be a float64 tensor \(the forward's\), got torch.float32"),
    ("pfs_t_hat_channels", "P.pairwise_frames_loss_saved_backward(g0(), *pf(), *pf_saved(i=2, t=lambda s: s[..., :2]), 2)",
     PFS + r"t_hat must have shape \(4, 9, 3\) \(\(2B, N, Ct\)\), got \(4, 9, 2\)"),
    ("pfs_t_inv_2d", "P.pairwise_frames_loss_saved_backward(g0(), *pf(), *pf_saved(i=3, t=lambda s: s[..., 0]), 2)",
     PFS + r"t_inv must have shape \(4, 9, 1\) \(\(2B, N, 1\)\), got \(4, 9\)"),
    ("pfs_pd_float64_for_float32", "P.pairwise_frames_loss_saved_backward(g0(), *pf(dtype=torch.float32),"
     " *pf_saved(dtype=torch.float32, i=4, t=lambda s: s.double()), 2)",
     PFS + r"pd must be a float32 tensor \(the forward's\), got torch.float64"),
    ("pfs_pd_small", "P.pairwise_frames_loss_saved_backward(g0(), *pf(), *pf_saved(i=4, t=lambda s: s[:, :1]), 2)",
     PFS + r"pd must have shape \(4, 9, 8\) \(\(2B, N, 2 max\(Cs, Ct\)\)\), got \(4, 1, 8\)"),
    ("pfs_coef_columns", "P.pairwise_frames_loss_saved_backward(g0(), *pf(), *pf_saved(i=5, t=lambda s: s[..., :-1]), 2)",
     PFS + r"coef must have shape \(4, 8, 7\) \(\(2B, 2 max\(Cs, Ct\), Cs \+ Ct\)\), got \(4, 8, 6\)"),
    ("pfs_ft_k_dtype", "P.pairwise_frames_loss_saved_backward(g0(), *pf()[:3], pf()[3].float(), *pf_saved(), 2)",
     PFS + r"ft_k must have the same dtype as fs_t \(torch.float64\), got torch.float32"),
]
IDS = [c[0] for c in CASES]
BAD = [c for c in CASES if c[2] is not None]

# Runs the cases it reads from stdin, announcing each before it runs, so that the parent knows
# which one a crash interrupted.
CHILD = PRELUDE + """
import json, sys
for cid, expr in json.load(sys.stdin):
    print(json.dumps({"id": cid, "start": True}), flush=True)
    try:
        eval(expr)
        rec = {"id": cid, "type": None}
    except Exception as e:
        rec = {"id": cid, "type": type(e).__name__, "message": str(e)}
    print(json.dumps(rec), flush=True)
"""


def _crash(returncode: int, stderr: str) -> dict:
    how = f"signal {signal.Signals(-returncode).name}" if returncode < 0 else f"exit status {returncode}"
    return {"crash": how, "stderr": stderr[-3000:]}


def _run_in_children(cases) -> dict:
    """id -> what the call did, from as few child processes as crashes allow."""
    results, pending = {}, [(cid, expr) for cid, expr, _ in cases]
    while pending:
        out = subprocess.run([sys.executable, "-P", "-c", CHILD], check=False, input=json.dumps(pending),
                             capture_output=True, text=True, timeout=600, env=subprocess_env())
        running = None
        for line in out.stdout.splitlines():
            rec = json.loads(line)
            if rec.pop("start", False):
                running = rec["id"]
            else:
                results[rec["id"]], running = rec, None
        left = [c for c in pending if c[0] not in results]
        if left and running is None:  # died outside any case (e.g. at import): every case left fails
            results.update({cid: _crash(out.returncode, out.stderr) for cid, _ in left})
        elif running is not None:
            results[running] = _crash(out.returncode, out.stderr)
        pending = [c for c in left if c[0] not in results]
    return results


@pytest.fixture(scope="module")
def direct_results():
    return _run_in_children(CASES)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_direct_call(direct_results, case):
    cid, expr, pattern = case
    got = direct_results[cid]
    assert "crash" not in got, f"{expr} killed the process ({got['crash']}):\n{got['stderr']}"
    if pattern is None:
        assert got["type"] is None, f"{expr} (valid) raised {got['type']}: {got.get('message')}"
        return
    assert got["type"] == "RuntimeError", f"{expr} raised {got['type']} instead of RuntimeError: {got.get('message')}"
    assert re.search(pattern, got["message"]), f"{expr}: message {got['message']!r} !~ {pattern!r}"


def _namespace() -> dict:
    ns = {}
    exec(PRELUDE, ns)  # noqa: S102  (the prelude the child process runs too)
    return ns


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fake_kernel(direct_results, case):
    """The fake kernels (what FakeTensor tracing and torch.compile run) refuse the same calls with
    the same messages as the C++ checks, and accept the valid ones."""
    cid, expr, pattern = case
    ns = _namespace()
    with FakeTensorMode():
        if pattern is None:
            eval(expr, ns)
            return
        with pytest.raises(RuntimeError, match=pattern) as err:
            eval(expr, ns)
    if direct_results[cid].get("type") == "RuntimeError":
        assert str(err.value) == direct_results[cid]["message"]


# (id, function of tensors, its arguments, regex). torch.compile traces with fake tensors: the
# fake kernels' checks must stop it, with the C++ message.
COMPILED = [
    ("si_target", lambda p, t: torch.ops.pyamalgam.si_depth_loss.default(p, t, None),
     lambda: (torch.rand(2, 30, 30), torch.rand(1, 4)),
     SI + r"target must have the shape of pred \(2, 30, 30\), got \(1, 4\)"),
    ("cc_grad", lambda g, *args: torch.ops.pyamalgam.channel_coding_backward.default(g, *args),
     lambda: (torch.ones(2, 4, 3), *_namespace()["cc"]()),
     CCB + r"grad must have the shape of x \(2, 4, 3, 3\), got \(2, 4, 3\)"),
]


@pytest.mark.parametrize("case", COMPILED, ids=[c[0] for c in COMPILED])
def test_compile_fullgraph_refuses(case):
    _, fn, make_args, pattern = case
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=pattern):
        torch.compile(fn, fullgraph=True, backend="eager")(*make_args())
