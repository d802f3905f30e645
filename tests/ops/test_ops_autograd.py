"""gradcheck, torch.library.opcheck and torch.compile(fullgraph=True) for every op (CPU)."""
import pytest
import torch
from _cases import channel_coding_args, depth_args

from pyamalgam import ops
from pyamalgam.ops import reference as ref


def _req(*ts):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in ts]


def cases():
    """(name, op overload, python api, args for the op) in float64, small and awkward."""
    cc = _req(*channel_coding_args(2, 3, 5, 3))
    cc_cl = _req(*channel_coding_args(1, 4, 3, 5))
    cc_cl[0] = cc_cl[0].detach().to(memory_format=torch.channels_last).requires_grad_()
    logits = _req(torch.randn(2, 5, 3, 7, dtype=torch.float64))[0]
    pred, target, mask = depth_args(2, 4, 5)
    pred, target = _req(pred, target)
    fs, ft = _req(torch.randn(2, 3, 5, 7, dtype=torch.float64), torch.randn(2, 2, 5, 7, dtype=torch.float64))
    P = torch.ops.pyamalgam
    return [
        ("channel_coding", P.channel_coding.default, ops.channel_coding, cc),
        ("channel_coding_cl", P.channel_coding.default, ops.channel_coding, cc_cl),
        ("soft_argmax_depth", P.soft_argmax_depth.default, ops.soft_argmax_depth, [logits, 0.3]),
        ("si_depth_loss", P.si_depth_loss.default, ops.si_depth_loss, [pred, target, mask]),
        ("si_depth_loss_nomask", P.si_depth_loss.default, ops.si_depth_loss, [pred, target, None]),
        ("pairwise_p1", P.pairwise_affinity_loss.default, ops.pairwise_affinity_loss, [fs, ft, 1]),
        ("pairwise_p3", P.pairwise_affinity_loss.default, ops.pairwise_affinity_loss, [fs, ft, 3]),
    ]


CASES = cases()
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradcheck(case):
    _, _, api, args = case
    assert torch.autograd.gradcheck(lambda *a: api(*a), args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_opcheck(case):
    _, op, _, args = case
    torch.library.opcheck(op, args)


def test_zero_gradient_for_masked_nothing():
    """All-invalid batch: loss 0 and zero gradients, not NaN."""
    pred, target, _ = depth_args(2, 3, 4)
    pred, target = _req(pred, target)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    loss = ops.si_depth_loss(pred, target, mask)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(pred.grad, torch.zeros_like(pred)) and torch.equal(target.grad, torch.zeros_like(target))


def _all_ops(x, w1, b1, w2, b2, logits, pred, target, mask, fs, ft):
    y = ops.channel_coding(x, w1, b1, w2, b2)
    d = ops.soft_argmax_depth(logits, 0.5)
    return y.square().mean() + d.mean() + ops.si_depth_loss(d, target, mask) + ops.pairwise_affinity_loss(fs, y, 2) + ops.si_depth_loss(pred, target)


def _all_ops_reference(x, w1, b1, w2, b2, logits, pred, target, mask, fs, ft):
    y = ref.channel_coding(x, w1, b1, w2, b2)
    d = ref.soft_argmax_depth(logits, 0.5)
    return y.square().mean() + d.mean() + ref.si_depth_loss(d, target, mask) + ref.pairwise_affinity_loss(fs, y, 2) + ref.si_depth_loss(pred, target)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    x, w1, b1, w2, b2 = channel_coding_args(2, 4, 6, 5, dtype=torch.float32)
    logits = torch.randn(2, 8, 6, 5)
    pred, target, mask = depth_args(2, 6, 5, dtype=torch.float32)
    fs = torch.randn(2, 3, 6, 5)
    args = _req(x, w1, b1, w2, b2, logits, pred, target) + [mask, fs.requires_grad_(), None]
    compiled = torch.compile(_all_ops, fullgraph=True, backend=backend)
    out = compiled(*args)
    out.backward()
    got = [a.grad.clone() for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    ref_args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    expected = _all_ops_reference(*ref_args)
    expected.backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for g, a in zip(got, [a for a in ref_args if isinstance(a, torch.Tensor) and a.requires_grad]):
        torch.testing.assert_close(g, a.grad, rtol=1e-4, atol=1e-5)
