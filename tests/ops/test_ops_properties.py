"""Property-based checks over shapes (hypothesis): every op equals its float64 reference."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyamalgam import ops
from pyamalgam.ops import reference as ref

SETTINGS = settings(max_examples=30, deadline=None)
dims = st.integers(1, 9)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@SETTINGS
@given(b=st.integers(1, 3), c=st.integers(1, 12), h=dims, w=dims, reduction=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_channel_coding_matches_reference(b, c, h, w, reduction, seed):
    g = _gen(seed)
    r = max(1, c // reduction)
    x = torch.randn(b, c, h, w, dtype=torch.float64, generator=g)
    p = [torch.randn(*s, dtype=torch.float64, generator=g) for s in ((r, c), (r,), (c, r), (c,))]
    torch.testing.assert_close(ops.channel_coding(x, *p), ref.channel_coding(x, *p), rtol=1e-12, atol=1e-12)


@SETTINGS
@given(b=st.integers(1, 3), n=st.integers(1, 40), h=dims, w=dims, scale=st.floats(0.01, 30), l=st.floats(1e-3, 10), seed=st.integers(0, 2**16))
def test_soft_argmax_depth_matches_reference(b, n, h, w, scale, l, seed):
    logits = torch.randn(b, n, h, w, dtype=torch.float64, generator=_gen(seed)) * scale
    out = ops.soft_argmax_depth(logits, l)
    torch.testing.assert_close(out, ref.soft_argmax_depth(logits, l), rtol=1e-12, atol=1e-12)
    # A convex combination of the bin centres 1..n, times l.
    assert bool((out >= l * (1 - 1e-9)).all() and (out <= n * l * (1 + 1e-9)).all())


@SETTINGS
@given(b=st.integers(1, 4), h=dims, w=dims, p_valid=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_si_depth_loss_matches_reference(b, h, w, p_valid, seed):
    g = _gen(seed)
    pred = torch.randn(b, h, w, dtype=torch.float64, generator=g)
    target = torch.randn(b, h, w, dtype=torch.float64, generator=g)
    mask = torch.rand(b, h, w, generator=g) < p_valid
    loss = ops.si_depth_loss(pred, target, mask)
    torch.testing.assert_close(loss, ref.si_depth_loss(pred, target, mask), rtol=1e-12, atol=1e-12)
    assert loss.item() >= 0  # a variance plus half a squared mean


@SETTINGS
@given(b=st.integers(1, 3), cs=st.integers(1, 10), ct=st.integers(1, 10), h=dims, w=dims, patch=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_pairwise_matches_reference(b, cs, ct, h, w, patch, seed):
    g = _gen(seed)
    fs = torch.randn(b, cs, h, w, dtype=torch.float64, generator=g)
    ft = torch.randn(b, ct, h, w, dtype=torch.float64, generator=g)
    torch.testing.assert_close(
        ops.pairwise_affinity_loss(fs, ft, patch), ref.pairwise_affinity_loss(fs, ft, patch), rtol=1e-9, atol=1e-13
    )
