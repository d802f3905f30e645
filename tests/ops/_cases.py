"""Input makers and the reference comparison shared by the op tests (CPU and CUDA)."""
import torch

# (B, C, H, W): awkward on purpose: B=1, C=1, odd sizes, sizes no patch divides.
SHAPES = [(1, 1, 1, 1), (1, 1, 5, 3), (2, 3, 7, 9), (3, 16, 4, 5), (1, 5, 13, 1), (4, 8, 6, 11)]


def channel_coding_args(b, c, h, w, dtype=torch.float64, device="cpu", reduction=2, gen=None):
    r = max(1, c // reduction)
    kw = {"dtype": dtype, "device": device, "generator": gen}
    x = torch.randn(b, c, h, w, **kw)
    return x, torch.randn(r, c, **kw), torch.randn(r, **kw), torch.randn(c, r, **kw), torch.randn(c, **kw)


def depth_args(b, h, w, dtype=torch.float64, device="cpu", p_valid=0.7, gen=None):
    kw = {"dtype": dtype, "device": device, "generator": gen}
    pred = torch.rand(b, h, w, **kw) * 5
    target = torch.rand(b, h, w, **kw) * 5
    mask = torch.rand(b, h, w, device=device, generator=gen) < p_valid
    return pred, target, mask


def as_layout(t, layout):
    """The same values in another memory layout: 'contiguous', 'channels_last' or 'strided'."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.to(memory_format=torch.channels_last)
    # Non-dense: every other column of a twice-as-wide tensor.
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    out = wide[..., ::2]
    assert not out.is_contiguous()
    return out


def _is_float(a):
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def _grads(fn, args, grad_out):
    args = [a.detach().clone().requires_grad_() if _is_float(a) else a for a in args]
    out = fn(*args)
    out.backward(grad_out)
    return out.detach(), [a.grad for a in args if _is_float(a)]


def assert_matches_reference(fused, reference, args, rtol=1e-10, atol=1e-12):
    """Values and gradients of every floating input agree; the reference runs in float64 on the
    same device, and the fused op's output stays on the inputs' device."""
    out = fused(*args)
    assert out.device == next(a for a in args if isinstance(a, torch.Tensor)).device
    grad_out = torch.randn(out.shape, dtype=torch.float64, device=out.device)
    o1, g1 = _grads(fused, args, grad_out.to(out.dtype))
    o2, g2 = _grads(reference, [a.double() if _is_float(a) else a for a in args], grad_out)
    torch.testing.assert_close(o1.double(), o2, rtol=rtol, atol=atol)
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol)
    return out


def assert_pairwise_matches_reference(shape, patch, device="cpu"):
    """The pair-wise loss against its float64 reference, teacher with 2 more channels than the student."""
    from pyamalgam import ops
    from pyamalgam.ops import reference as ref

    b, c, h, w = shape
    fs = torch.randn(b, c, h, w, dtype=torch.float64, device=device)
    ft = torch.randn(b, c + 2, h, w, dtype=torch.float64, device=device)
    assert_matches_reference(
        lambda s, t: ops.pairwise_affinity_loss(s, t, patch),
        lambda s, t: ref.pairwise_affinity_loss(s, t, patch),
        [fs, ft],
        rtol=1e-9,
        atol=1e-12,
    )


def conformance_tests(cases):
    """(test_gradcheck, test_opcheck) over ``cases``, each ``(id, op overload, Python API, float64
    args)``: gradcheck of the API and ``torch.library.opcheck`` of the registered op on every case.
    A test module binds them to its own names so that pytest collects them there."""
    import pytest

    ids = [c[0] for c in cases]

    @pytest.mark.parametrize("case", cases, ids=ids)
    def test_gradcheck(case):
        _, _, api, args = case
        assert torch.autograd.gradcheck(lambda *a: api(*a), args, eps=1e-6, atol=1e-7, rtol=1e-5)

    @pytest.mark.parametrize("case", cases, ids=ids)
    def test_opcheck(case):
        _, op, _, args = case
        torch.library.opcheck(op, args)

    return test_gradcheck, test_opcheck
