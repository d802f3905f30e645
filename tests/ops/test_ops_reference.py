"""Each fused op against its float64 reference: values, gradients, layouts and dtypes (CPU)."""
import pytest
import torch
from _cases import (
    SHAPES,
    as_layout,
    assert_matches_reference,
    assert_pairwise_matches_reference,
    channel_coding_args,
    depth_args,
)

from pyamalgam import ops
from pyamalgam.ops import reference as ref


@pytest.mark.parametrize("shape", SHAPES)
def test_channel_coding(shape):
    assert_matches_reference(ops.channel_coding, ref.channel_coding, channel_coding_args(*shape))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (1, 5, 13, 1), (4, 8, 6, 11)])
def test_channel_coding_with_a_gradient_constant_per_plane(shape, layout):
    """out.sum() or a per-(b, c) weight hands the backward an expanded gradient (stride 0 over H, W),
    which the CPU kernel reads as B x C numbers instead of materialising it."""
    args = [a.requires_grad_() for a in channel_coding_args(*shape)]
    x = as_layout(args[0].detach(), layout).requires_grad_()
    per_plane = torch.randn(shape[0], shape[1], 1, 1, dtype=torch.float64)
    for grad_out in (torch.ones(()).double().expand(shape), per_plane.expand(shape)):
        grads = torch.autograd.grad(ops.channel_coding(x, *args[1:]), [x, *args[1:]], grad_out)
        expected = torch.autograd.grad(ref.channel_coding(*args), args, grad_out.contiguous())
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bins", [1, 2, 17])
def test_soft_argmax_depth(shape, bins):
    b, _, h, w = shape
    logits = torch.randn(b, bins, h, w, dtype=torch.float64) * 3
    out = assert_matches_reference(lambda l: ops.soft_argmax_depth(l, 0.25), lambda l: ref.soft_argmax_depth(l, 0.25), [logits])
    assert out.shape == (b, h, w)


def test_soft_argmax_depth_is_stable_for_huge_logits():
    logits = torch.tensor([1000.0, 0.0, -1000.0], dtype=torch.float32).view(1, 3, 1, 1)
    assert ops.soft_argmax_depth(logits, 2.0).item() == pytest.approx(2.0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_si_depth_loss(shape, masked):
    b, _, h, w = shape
    pred, target, mask = depth_args(b, h, w)
    args = [pred, target, mask] if masked else [pred, target]
    assert_matches_reference(ops.si_depth_loss, ref.si_depth_loss, args)


def test_si_depth_loss_accepts_a_channel_dimension():
    pred, target, mask = depth_args(2, 5, 6)
    flat = ops.si_depth_loss(pred, target, mask)
    torch.testing.assert_close(ops.si_depth_loss(pred[:, None], target[:, None], mask[:, None]), flat)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("patch", [1, 2, 3])
def test_pairwise_affinity_loss(shape, patch):
    assert_pairwise_matches_reference(shape, patch)


LAYOUTS = ["contiguous", "channels_last", "strided"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_give_the_same_result(layout):
    x, *w = channel_coding_args(2, 5, 7, 3)
    y = ops.channel_coding(as_layout(x, layout), *w)
    torch.testing.assert_close(y, ref.channel_coding(x, *w))
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    logits = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    assert_matches_reference(lambda l: ops.soft_argmax_depth(l, 0.5), lambda l: ref.soft_argmax_depth(l, 0.5), [as_layout(logits, layout)])
    fs, ft = torch.randn(2, 4, 5, 7, dtype=torch.float64), torch.randn(2, 3, 5, 7, dtype=torch.float64)
    assert_matches_reference(
        lambda s, t: ops.pairwise_affinity_loss(s, t, 2),
        lambda s, t: ref.pairwise_affinity_loss(s, t, 2),
        [as_layout(fs, layout), as_layout(ft, layout)],
        rtol=1e-9,
    )
    pred, target, mask = depth_args(2, 6, 10)
    torch.testing.assert_close(
        ops.si_depth_loss(as_layout(pred[:, None], layout), target[:, None], mask[:, None]),
        ref.si_depth_loss(pred, target, mask),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32_or_better(dtype):
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    x, *w = channel_coding_args(2, 8, 9, 7, dtype=dtype)
    y = ops.channel_coding(x, *w)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref.channel_coding(x.double(), *[t.double() for t in w]), rtol=tol, atol=tol)
    logits = (torch.randn(2, 32, 9, 7) * 4).to(dtype)
    d = ops.soft_argmax_depth(logits, 0.1)
    assert d.dtype == dtype
    torch.testing.assert_close(d.double(), ref.soft_argmax_depth(logits.double(), 0.1), rtol=tol, atol=tol * 3)
    # A large image in float32 would drift with float32 sums: the kernels accumulate in double.
    pred, target, mask = depth_args(1, 300, 400, dtype=dtype)
    loss = ops.si_depth_loss(pred, target, mask)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), ref.si_depth_loss(pred.double(), target.double(), mask), rtol=tol, atol=0)
    fs, ft = torch.randn(2, 8, 9, 7).to(dtype), torch.randn(2, 8, 9, 7).to(dtype)
    pw = ops.pairwise_affinity_loss(fs, ft, 2)
    # Computed in float64 from the same values: off only by the rounding of the output itself.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(pw.double(), ref.pairwise_affinity_loss(fs.double(), ft.double(), 2), rtol=eps, atol=0)
