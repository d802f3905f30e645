"""Bad input gets a clear error naming the argument; legal edge cases give numbers, not NaN."""
import math

import pytest
import torch
from _cases import channel_coding_args, depth_args

from pyamalgam import ops
from pyamalgam.ops import reference as ref


def test_channel_coding_bad_inputs():
    x, w1, b1, w2, b2 = channel_coding_args(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"x must have 4 dimensions"):
        ops.channel_coding(x[0], w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r"w1 must have shape \(2, 4\)"):
        ops.channel_coding(x, w1[:, :3], b1, w2, b2)
    with pytest.raises(ValueError, match=r"w2 must have shape \(4, 2\)"):
        ops.channel_coding(x, w1, b1, w2.t(), b2)
    with pytest.raises(ValueError, match=r"b2 must have shape \(4,\)"):
        ops.channel_coding(x, w1, b1, w2, b2[:3])
    with pytest.raises(ValueError, match=r"b1 must have the same dtype as x"):
        ops.channel_coding(x, w1, b1.float(), w2, b2)
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor"):
        ops.channel_coding(x.long(), w1, b1, w2, b2)
    with pytest.raises(TypeError, match=r"w1 must be a torch.Tensor"):
        ops.channel_coding(x, w1.tolist(), b1, w2, b2)
    with pytest.raises(ValueError, match=r"b1 must have the same device as x"):
        ops.channel_coding(x, w1, b1.to("meta"), w2, b2)


def test_soft_argmax_depth_bad_inputs():
    logits = torch.randn(2, 5, 3, 3)
    with pytest.raises(ValueError, match=r"bin_size must be a finite number > 0, got 0"):
        ops.soft_argmax_depth(logits, 0.0)
    with pytest.raises(ValueError, match=r"bin_size must be a finite number > 0"):
        ops.soft_argmax_depth(logits, -1.0)
    with pytest.raises(ValueError, match=r"bin_size"):
        ops.soft_argmax_depth(logits, math.nan)
    with pytest.raises(TypeError, match=r"bin_size must be a Python float"):
        ops.soft_argmax_depth(logits, torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"logits must have 4 dimensions"):
        ops.soft_argmax_depth(logits[0], 0.5)
    with pytest.raises(TypeError, match=r"logits must be a floating-point tensor.*torch.int32"):
        ops.soft_argmax_depth(logits.int(), 0.5)


def test_si_depth_loss_bad_inputs():
    pred, target, mask = depth_args(2, 4, 5)
    with pytest.raises(ValueError, match=r"target must have shape \(2, 4, 5\)"):
        ops.si_depth_loss(pred, target[:1])
    with pytest.raises(ValueError, match=r"target must have shape"):
        ops.si_depth_loss(pred, target[:, :, :1])  # would broadcast: must not
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 4, 5\)"):
        ops.si_depth_loss(pred, target, mask[:, :3])
    with pytest.raises(TypeError, match=r"mask must be a bool tensor, got torch.float64"):
        ops.si_depth_loss(pred, target, mask.double())
    with pytest.raises(TypeError, match=r"mask must be a bool tensor, got torch.uint8"):
        ops.si_depth_loss(pred, target, mask.to(torch.uint8))
    with pytest.raises(ValueError, match=r"target must have the same dtype as pred"):
        ops.si_depth_loss(pred, target.float())
    with pytest.raises(ValueError, match=r"pred must be \(B, H, W\) or \(B, 1, H, W\)"):
        ops.si_depth_loss(pred[:, None].expand(2, 3, 4, 5), target[:, None].expand(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"pred must have 3 or 4 dimensions"):
        ops.si_depth_loss(pred[0], target[0])


def test_pairwise_bad_inputs():
    fs, ft = torch.randn(2, 3, 6, 7), torch.randn(2, 5, 6, 7)
    with pytest.raises(ValueError, match=r"patch must be >= 1, got 0"):
        ops.pairwise_affinity_loss(fs, ft, 0)
    with pytest.raises(TypeError, match=r"patch must be an int"):
        ops.pairwise_affinity_loss(fs, ft, 2.0)
    with pytest.raises(ValueError, match=r"fs and ft must have the same batch and spatial sizes"):
        ops.pairwise_affinity_loss(fs, ft[:, :, :5])
    with pytest.raises(ValueError, match=r"fs and ft must have the same batch and spatial sizes"):
        ops.pairwise_affinity_loss(fs, ft[:1])
    with pytest.raises(ValueError, match=r"ft must have the same dtype as fs"):
        ops.pairwise_affinity_loss(fs, ft.double())
    with pytest.raises(ValueError, match=r"ft must have 4 dimensions"):
        ops.pairwise_affinity_loss(fs, ft[0])
    with pytest.raises(TypeError, match=r"fs must be a floating-point tensor"):
        ops.pairwise_affinity_loss(fs.to(torch.int64), ft)


def test_channel_coding_module():
    from pyamalgam.nn import ChannelCoding

    m = ChannelCoding(12, reduction=4).double()
    assert sum(p.numel() for p in m.parameters()) == 2 * 12 * 3 + 12 + 3
    x = torch.randn(2, 12, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref.channel_coding(x, m.w1, m.b1, m.w2, m.b2))
    assert ChannelCoding(3, reduction=8).hidden == 1
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 12, H, W\)"):
        m(torch.randn(2, 11, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"reduction must be >= 1"):
        ChannelCoding(4, reduction=0)


# NaN in the input must reach the output: a kernel that hides it would hide a diverged run.
def test_nan_propagates():
    x, *w = channel_coding_args(1, 3, 4, 4)
    x[0, 1, 2, 2] = math.nan
    assert torch.isnan(ops.channel_coding(x, *w)[0, 1]).all()
    logits = torch.randn(1, 4, 3, 3)
    logits[0, 2, 1, 1] = math.nan
    d = ops.soft_argmax_depth(logits, 1.0)
    assert torch.isnan(d[0, 1, 1]) and torch.isfinite(d[0, 0, 0])
    pred, target, mask = depth_args(2, 3, 3)
    mask[:] = True
    pred[1, 0, 0] = math.nan
    assert torch.isnan(ops.si_depth_loss(pred, target, mask))
    fs, ft = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    fs[1, 0, 0, 0] = math.nan
    assert torch.isnan(ops.pairwise_affinity_loss(fs, ft))


def test_masked_out_nan_is_ignored():
    pred, target, mask = depth_args(2, 3, 3)
    mask[:] = True
    mask[0, 1, 1] = False
    pred[0, 1, 1] = math.nan
    loss = ops.si_depth_loss(pred, target, mask)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref.si_depth_loss(pred, target, mask))


def test_images_without_valid_pixels_are_left_out_of_the_mean():
    pred, target, mask = depth_args(3, 4, 4)
    mask[1] = False
    full = ops.si_depth_loss(pred, target, mask)
    two = ops.si_depth_loss(pred[[0, 2]], target[[0, 2]], mask[[0, 2]])
    torch.testing.assert_close(full, two)


def test_zero_feature_vectors_stay_finite():
    fs = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        fs[:, :, :2] = 0  # a band of all-zero nodes
        ft[1] = 0  # a whole teacher image of zeros
    loss = ops.pairwise_affinity_loss(fs, ft, 2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(fs.grad).all()
    torch.testing.assert_close(loss, ref.pairwise_affinity_loss(fs, ft, 2))


def test_soft_argmax_of_one_bin_is_the_bin_size():
    logits = torch.randn(2, 1, 3, 4)
    torch.testing.assert_close(ops.soft_argmax_depth(logits, 0.7), torch.full((2, 3, 4), 0.7))
