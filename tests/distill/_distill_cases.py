"""Shared pieces of the Distiller tests (also imported by their child processes): tiny networks,
a labelled toy data set, a fake holistic term with HolisticDistillation's interface, and the
video trainer's clips and VideoDistiller."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from pyamalgam._testing import TensorItems, tiny_net

H, W = 32, 32
T = 3  # frames per clip


def nets(task="segmentation", teacher_width=1 / 8, student_width=1 / 16):
    """(teacher, student): tiny SegNets (depth 3, 5 classes) of two widths, fixed seeds."""
    return tiny_net(task, 1, width=teacher_width), tiny_net(task, 2, width=student_width).train()


class Scenes(TensorItems):
    """``n`` random images with random labels (some ignored); ``labels=False``: images only;
    ``delay`` seconds per item slow a run down to be killed."""

    def __init__(self, n=8, seed=0, labels=True, delay=0.0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, H, W, generator=g)
        self.seg = torch.randint(0, 5, (n, H, W), generator=g)
        self.seg[:, :4] = 255  # ignored pixels
        self.labels = labels
        super().__init__({"image": self.images, **({"seg": self.seg} if labels else {})}, delay)


def loader(n=8, batch=4, seed=0, labels=True, delay=0.0, shuffle=True, distributed=False):
    data = Scenes(n, seed, labels, delay)
    if distributed:
        sampler = torch.utils.data.DistributedSampler(data, shuffle=shuffle, seed=seed)
        return DataLoader(data, batch_size=batch, sampler=sampler)
    return DataLoader(data, batch_size=batch, shuffle=shuffle, generator=torch.Generator().manual_seed(seed + 1))


class FakeHolistic(nn.Module):
    """HolisticDistillation's interface on a one-layer critic (a WGAN-GP step of its own).

    ``forward(student_map, image)``: the critic's mean score, differentiable w.r.t. the map and
    never into the critic. ``critic_step``: one SGD step on D(student) - D(teacher) + a gradient
    penalty at a random interpolate (draws from the global RNG, as a real one does).
    ``calls`` records the order of the calls and whether the map carried a gradient.
    """

    def __init__(self, num_classes, lr=0.05, momentum=0.9):
        super().__init__()
        self.num_classes, self.lr, self.momentum = num_classes, lr, momentum
        self.conv = nn.Conv2d(num_classes + 3, 1, 3, padding=1)
        self.register_buffer("mom_w", torch.zeros_like(self.conv.weight))
        self.register_buffer("mom_b", torch.zeros_like(self.conv.bias))
        self.calls = []

    def _score(self, q, image, detach_params):
        w, b = (self.conv.weight.detach(), self.conv.bias.detach()) if detach_params else (self.conv.weight,
                                                                                           self.conv.bias)
        return F.conv2d(torch.cat([q, image], 1), w, b, padding=1).mean(dim=(1, 2, 3))

    def forward(self, student_map, image):
        self.calls.append(("forward", student_map.requires_grad))
        return self._score(student_map, image, True).mean()

    def critic_step(self, student_map, teacher_map, image):
        self.calls.append(("critic", student_map.requires_grad))
        s, t = student_map.detach(), teacher_map.detach()
        eps = torch.rand(s.shape[0], 1, 1, 1)
        mix = (eps * t + (1 - eps) * s).requires_grad_(True)
        (grad,) = torch.autograd.grad(self._score(mix, image, False).sum(), mix, create_graph=True)
        gp = (grad.flatten(1).norm(dim=1) - 1).square().mean()
        wd = self._score(s, image, False).mean() - self._score(t, image, False).mean()
        gw, gb = torch.autograd.grad(wd + 10 * gp, [self.conv.weight, self.conv.bias])
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # as the real one: mean over ranks
            for g in (gw, gb):
                torch.distributed.all_reduce(g)
                g /= torch.distributed.get_world_size()
        with torch.no_grad():
            for p, m, g in ((self.conv.weight, self.mom_w, gw), (self.conv.bias, self.mom_b, gb)):
                m.mul_(self.momentum).add_(g)
                p.sub_(self.lr * m)
        return {"wasserstein": float(-wd.detach()), "gp": float(gp.detach())}

    def state_tensors(self):
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def load_state_tensors(self, tensors):
        self.load_state_dict(tensors)


def distiller(checkpoint_dir=None, *, terms=None, teacher_width=1 / 8, **kwargs):
    """A Distiller of the tiny pair (seeded, so a fresh process builds the same one)."""
    from pyamalgam.distill import Distiller

    torch.manual_seed(0)
    teacher, student = nets(teacher_width=teacher_width)
    if terms is None:
        terms = {"pi": 10.0, "pa": 10.0, "cwd": 3.0, "ho": FakeHolistic(5)}
    kwargs.setdefault("progress", False)
    return Distiller(teacher, student, terms=terms, checkpoint_dir=checkpoint_dir, **kwargs)


def digest_all(d) -> dict:
    from pyamalgam._testing import state_digest

    out = {"student": state_digest(d.student), "terms": state_digest(d.step_module.losses)}
    if isinstance(d.holistic, nn.Module):
        out["ho"] = state_digest(d.holistic)
    return out


# ------------------------------------------------------------------ video (thesis ch. 5)

VIDEO_ALL = ("pi", "pa", "pf", "mf", "tl")


class Clips(TensorItems):
    """``n`` random 3-frame clips (5 classes, the middle frame labelled), a random flow of a few
    pixels and a random visibility mask; ``delay`` seconds per item slow a run down to be killed."""

    def __init__(self, n=8, seed=0, delay=0.0):
        g = torch.Generator().manual_seed(seed)
        self.image = torch.rand(n, T, 3, H, W, generator=g)
        self.seg = torch.full((n, T, H, W), 255, dtype=torch.int64)
        self.seg[:, 1] = torch.randint(0, 5, (n, H, W), generator=g)
        self.flow = 3 * torch.randn(n, T - 1, 2, H, W, generator=g)
        self.valid = torch.rand(n, T - 1, H, W, generator=g) > 0.2
        super().__init__({"image": self.image, "seg": self.seg, "flow": self.flow, "flow_valid": self.valid}, delay)


def clip_loader(n=8, delay=0.0, data=None, distributed=False):
    """Batches of 2 clips, shuffled by a generator of their own (a DistributedSampler when ``distributed``)."""
    data = data if data is not None else Clips(n, delay=delay)
    if distributed:
        return DataLoader(data, batch_size=2, sampler=torch.utils.data.DistributedSampler(data, seed=1))
    return DataLoader(data, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(1))


def video_distiller(checkpoint_dir=None, terms=VIDEO_ALL, **kwargs):
    """A VideoDistiller of the tiny pair (Adam, lr 1e-3), every term of Eq. 5.3 by default."""
    from pyamalgam.distill.video import VideoDistiller

    teacher, student = nets()
    return VideoDistiller(teacher, student, terms=terms, optimizer="adam", lr=1e-3, progress=False,
                          checkpoint_dir=checkpoint_dir, **kwargs)
