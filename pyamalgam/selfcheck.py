"""``pyamalgam selfcheck``: each fused operator against its float64 reference, values and gradients."""
from __future__ import annotations

import torch

from . import ops
from .ops import reference


def _cases(device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)

    yield "channel_coding", ops.channel_coding, reference.channel_coding, [rnd(2, 8, 9, 7), rnd(2, 8), rnd(2), rnd(8, 2), rnd(8)]
    yield "soft_argmax_depth", (lambda l: ops.soft_argmax_depth(l, 0.1)), (lambda l: reference.soft_argmax_depth(l, 0.1)), [rnd(2, 16, 9, 7)]
    mask = (rnd(2, 9, 7) > -0.5)
    yield "si_depth_loss", (lambda p, t: ops.si_depth_loss(p, t, mask)), (lambda p, t: reference.si_depth_loss(p, t, mask)), [rnd(2, 9, 7), rnd(2, 9, 7)]
    yield "pairwise_affinity_loss", (lambda s, t: ops.pairwise_affinity_loss(s, t, 2)), (lambda s, t: reference.pairwise_affinity_loss(s, t, 2)), [rnd(2, 6, 9, 7), rnd(2, 4, 9, 7)]
    # Thesis 003: channel-wise (Eqs. 4.3-4.4, T = 3) and local pair-wise (Eq. 3.2, radius 1, 2x2 cells).
    yield "channel_wise_loss", (lambda s, t: ops.channel_wise_loss(s, t, 3.0)), (lambda s, t: reference.channel_wise_loss(s, t, 3.0)), [rnd(2, 5, 9, 7), rnd(2, 5, 9, 7)]
    yield "pairwise_local_loss", (lambda s, t: ops.pairwise_local_loss(s, t, 1, 2)), (lambda s, t: reference.pairwise_local_loss(s, t, 1, 2)), [rnd(2, 6, 9, 7), rnd(2, 4, 9, 7)]
    # Thesis 003 ch. 5: pair-wise frames (Eq. 5.2), student frames t and t+k, then the teacher's, 2x2 cells.
    yield "pairwise_frames_loss", (lambda *a: ops.pairwise_frames_loss(*a, 2)), (lambda *a: reference.pairwise_frames_loss(*a, 2)), [rnd(2, 6, 9, 7), rnd(2, 6, 9, 7), rnd(2, 4, 9, 7), rnd(2, 4, 9, 7)]


def _run(fn, args):
    args = [a.clone().requires_grad_() for a in args]
    out = fn(*args)
    out.sum().backward()
    return [out.detach()] + [a.grad for a in args]


def run(device: str = "cpu") -> bool:
    ok = True
    for name, fused, ref, args in _cases(device):
        got, want = _run(fused, args), _run(ref, args)
        err = max((a - b).abs().max().item() for a, b in zip(got, want))
        passed = err < 1e-9
        ok &= passed
        print(f"{name:24s} max |fused - reference| (values and grads) = {err:.2e}  {'ok' if passed else 'FAIL'}")
    return ok
