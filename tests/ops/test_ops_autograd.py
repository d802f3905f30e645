"""gradcheck, torch.library.opcheck and torch.compile(fullgraph=True) for every op (CPU)."""
import pytest
import torch
from _cases import channel_coding_args, conformance_tests, depth_args

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


test_gradcheck, test_opcheck = conformance_tests(CASES)


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


# --- the full pair-wise op keeps what its backward needs --------------------------------------------
P = torch.ops.pyamalgam


def _pairwise_inputs(cs=3, ct=2, h=5, w=7, dtype=torch.float64):
    return _req(torch.randn(2, cs, h, w, dtype=dtype), torch.randn(2, ct, h, w, dtype=dtype))


@pytest.mark.parametrize("cs,ct,patch", [(3, 2, 1), (2, 5, 2), (1, 1, 9)])
def test_opcheck_pairwise_saving_ops(cs, ct, patch):
    """The forward that returns what the backward needs, and the backward that takes it: fake
    kernels (shapes, dtypes, strides of all seven outputs), autograd registration, AOT dispatch."""
    fs, ft = _pairwise_inputs(cs, ct)
    torch.library.opcheck(P.pairwise_affinity_loss_for_backward.default, (fs, ft, patch))
    saved = P.pairwise_affinity_loss_for_backward.default(fs.detach(), ft.detach(), patch)[1:]
    torch.library.opcheck(P.pairwise_affinity_loss_saved_backward.default,
                          (torch.tensor(0.7, dtype=torch.float64), fs.detach(), ft.detach(), *saved, patch))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_saved_backward_equals_the_recomputing_backward(dtype):
    """The API's backward (from the saved tensors) and the direct op's (which runs the forward
    again) are the same gradients, and both match the float64 reference."""
    fs, ft = _pairwise_inputs(4, 3, 6, 5, dtype)
    via_api = torch.autograd.grad(ops.pairwise_affinity_loss(fs, ft, 2) * 1.5, (fs, ft))
    direct = torch.autograd.grad(P.pairwise_affinity_loss.default(fs, ft, 2) * 1.5, (fs, ft))
    fs64, ft64 = _req(fs.double(), ft.double())
    want = torch.autograd.grad(ref.pairwise_affinity_loss(fs64, ft64, 2) * 1.5, (fs64, ft64))
    tol = dict(rtol=1e-10, atol=1e-13) if dtype == torch.float64 else dict(rtol=2e-4, atol=1e-7)
    for a, b, w in zip(via_api, direct, want):
        torch.testing.assert_close(a, b, **tol)
        torch.testing.assert_close(a.double(), w, **tol)


def test_the_backward_recomputes_nothing():
    """No node pooling, SVD or Gram product runs twice: the backward is one product and the adjoint
    of the pooling (what the forward saved), so the whole step has a single SVD."""
    fs, ft = _pairwise_inputs(6, 4, 8, 9)

    def count(step):
        with torch.profiler.profile() as prof:
            step()
        return {e.key: e.count for e in prof.key_averages()}

    forward = count(lambda: ops.pairwise_affinity_loss(fs, ft, 2))
    both = count(lambda: ops.pairwise_affinity_loss(fs, ft, 2).backward())
    assert both["aten::_linalg_svd"] == forward["aten::_linalg_svd"] == 1, both
    assert both["pyamalgam::pairwise_affinity_loss_saved_backward"] == 1
    assert "pyamalgam::pairwise_affinity_loss_backward" not in both
    assert both["aten::bmm"] == forward["aten::bmm"] + 1, both  # the forward's products, then one


def test_saved_outputs_get_no_gradient_and_need_none():
    """The six saved outputs are not differentiable; a loss that is not used gets no gradient."""
    fs, ft = _pairwise_inputs()
    out = P.pairwise_affinity_loss_for_backward.default(fs, ft, 1)
    assert out[0].requires_grad and not any(t.requires_grad for t in out[1:])
    (out[0] * 0 + fs.sum()).backward()
    torch.testing.assert_close(fs.grad, torch.ones_like(fs))
    assert torch.equal(ft.grad, torch.zeros_like(ft))
