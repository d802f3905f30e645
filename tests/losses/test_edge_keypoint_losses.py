"""edge_loss / keypoint_loss and their tasks and heads, against float64 NumPy references."""
import numpy as np
import pytest
import torch

from pyamalgam import models
from pyamalgam.models.heads import EdgeHead, KeypointHead
from pyamalgam.losses import (EDGE_MIN_FRACTION, EdgeTask, KeypointTask, edge_loss, get_task, keypoint_loss)

SHAPES = [(1, 1, 1), (1, 5, 3), (3, 7, 9), (2, 16, 11)]


def _np_edge(p, y, m=None):
    """Materialised reference: per image rho (clamped), w = (1-rho) y + rho (1-y), weighted mean BCE."""
    p, y = p.astype(np.float64), y.astype(np.float64)
    m = np.ones_like(y) if m is None else m.astype(np.float64)
    num = den = 0.0
    for b in range(p.shape[0]):
        rho = float(np.clip((y[b] * m[b]).sum() / max(m[b].sum(), 1.0), EDGE_MIN_FRACTION, 1 - EDGE_MIN_FRACTION))
        for i in range(p.shape[1]):
            for j in range(p.shape[2]):
                if not m[b, i, j]:
                    continue
                w = (1 - rho) * y[b, i, j] + rho * (1 - y[b, i, j])
                pi = p[b, i, j]
                num += w * -(y[b, i, j] * np.log(pi) + (1 - y[b, i, j]) * np.log(1 - pi))
                den += w
    return num / den


def _rand(shape, seed, lo=0.02, hi=0.98, binary=False):
    g = torch.Generator().manual_seed(seed)
    p = lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)
    y = (torch.rand(shape, generator=g) < 0.2).double() if binary else torch.rand(shape, generator=g, dtype=torch.float64)
    m = torch.rand(shape, generator=g) < 0.7
    return p, y, m


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("binary", [True, False])
def test_edge_loss_matches_reference(shape, binary):
    p, y, m = _rand(shape, sum(shape), binary=binary)
    ref = _np_edge(p.numpy(), y.numpy())
    assert edge_loss(p, y).item() == pytest.approx(ref, rel=1e-12)
    if m.any():
        assert edge_loss(p, y, m).item() == pytest.approx(_np_edge(p.numpy(), y.numpy(), m.numpy()), rel=1e-12)
    # (B, 1, H, W) and float32
    assert edge_loss(p[:, None], y[:, None]).item() == pytest.approx(ref, rel=1e-12)
    assert edge_loss(p.float(), y.float()).dtype == torch.float32


def test_binary_targets_give_heds_class_balance():
    """With 0/1 labels, positives weigh beta = |Y-|/|Y| and negatives 1 - beta (HED Eq. 2)."""
    y = torch.zeros(1, 4, 5, dtype=torch.float64)
    y[0, 1, :] = 1.0  # 5 of 20 pixels: beta = 0.75
    p = torch.full_like(y, 0.3)
    pos, neg = -np.log(0.3), -np.log(0.7)
    expected = (0.75 * 5 * pos + 0.25 * 15 * neg) / (0.75 * 5 + 0.25 * 15)
    assert edge_loss(p, y).item() == pytest.approx(expected, rel=1e-13)


def test_unbalanced_is_the_plain_mean_bce():
    p, y, m = _rand((2, 5, 6), 4)
    bce = -(y * p.log() + (1 - y) * (1 - p).log())
    assert edge_loss(p, y, balanced=False).item() == pytest.approx(bce.mean().item(), rel=1e-13)
    assert edge_loss(p, y, m, balanced=False).item() == pytest.approx(bce[m].mean().item(), rel=1e-13)
    assert EdgeTask(balanced=False)(p, y).item() == pytest.approx(bce.mean().item(), rel=1e-13)


def test_soft_targets_are_copied_not_pushed():
    """A teacher's soft map: the loss's gradient vanishes at p = y (the student copies it)."""
    _, y, _ = _rand((2, 6, 7), 3)
    y = y.clamp(0.05, 0.95)
    p = y.clone().requires_grad_(True)
    edge_loss(p, y).backward()
    assert p.grad.abs().max() < 1e-12
    q = (y + 0.1).clamp(0, 0.99).requires_grad_(True)
    edge_loss(q, y).backward()
    assert (q.grad[(y + 0.1) < 0.99] > 0).all()  # too high everywhere: pushed down everywhere


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 5)])
def test_gradcheck(shape):
    p, y, m = _rand(shape, 7)
    p.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: edge_loss(a, y), (p,))
    assert torch.autograd.gradcheck(lambda a: edge_loss(a, y, m | torch.eye(1, dtype=bool).expand_as(m)), (p,))
    assert torch.autograd.gradcheck(lambda a: keypoint_loss(a, y), (p,))
    assert torch.autograd.gradcheck(lambda a: keypoint_loss(a, y, m), (p,))


def test_edge_loss_legal_edge_cases_are_finite():
    y = torch.zeros(2, 3, 4)
    p = torch.zeros(2, 3, 4, requires_grad=True)
    loss = edge_loss(p, y)  # no edge at all, a perfect prediction
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(p.grad).all()
    p1 = torch.ones(2, 3, 4, requires_grad=True)  # all wrong, saturated
    loss = edge_loss(p1, y)
    loss.backward()
    assert torch.isfinite(loss) and loss > 50 and torch.isfinite(p1.grad).all()
    assert edge_loss(p, y, torch.zeros(2, 3, 4, dtype=torch.bool)).item() == 0.0  # nothing valid
    assert edge_loss(torch.zeros(0, 3, 4), torch.zeros(0, 3, 4)).item() == 0.0


def test_nan_propagates_but_not_from_masked_pixels():
    p, y, _ = _rand((1, 3, 4), 2)
    p[0, 0, 0] = float("nan")
    assert torch.isnan(edge_loss(p, y)) and torch.isnan(keypoint_loss(p, y))
    m = torch.ones(1, 3, 4, dtype=torch.bool)
    m[0, 0, 0] = False
    y2 = y.clone()
    y2[0, 0, 0] = float("nan")
    assert torch.isfinite(edge_loss(p, y2, m)) and torch.isfinite(keypoint_loss(p, y2, m))


@pytest.mark.parametrize("shape", SHAPES)
def test_keypoint_loss_matches_reference(shape):
    p, y, m = _rand(shape, 11, lo=-0.5, hi=1.5)
    d2 = (p.numpy() - y.numpy()) ** 2
    assert keypoint_loss(p, y).item() == pytest.approx(d2.mean(), rel=1e-12)
    if m.any():
        assert keypoint_loss(p, y, m).item() == pytest.approx(d2[m.numpy()].mean(), rel=1e-12)
    assert keypoint_loss(p, y, torch.zeros(shape, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize("fn", [edge_loss, keypoint_loss])
def test_bad_inputs_name_the_argument(fn):
    p = torch.rand(2, 3, 4)
    with pytest.raises(ValueError, match="pred and target must both be"):
        fn(p, torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="pred and target must both be"):
        fn(torch.rand(2, 2, 3, 4), torch.rand(2, 2, 3, 4))
    with pytest.raises(TypeError, match="floating point"):
        fn(p, torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="mask must be a bool"):
        fn(p, p, torch.ones(2, 3, 4))
    with pytest.raises(TypeError, match="tensors"):
        fn(p, 1.0)


def test_edge_loss_refuses_values_outside_unit_interval():
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        edge_loss(torch.full((1, 2, 2), 1.5), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"target in \[-1"):
        edge_loss(torch.full((1, 2, 2), 0.5), torch.full((1, 2, 2), -1.0))


def test_task_registry_and_targets():
    for spec, cls, name in (("edges", EdgeTask, "edges"), ("edge", EdgeTask, "edges"),
                            ("keypoints", KeypointTask, "keypoints"), ("key_points", KeypointTask, "keypoints")):
        task = get_task(spec)
        assert type(task) is cls and task.name == name
    assert get_task("Edges", name="contours").name == "contours"
    p = torch.rand(2, 4, 5, requires_grad=True)
    for task in (EdgeTask(), KeypointTask()):
        t = task.target(p)
        assert not t.requires_grad and torch.equal(t, p.detach())
        assert task(p, t).item() == pytest.approx(task.loss(p, t).item())
    with pytest.raises(ValueError, match="unknown task"):
        get_task("corners")


@pytest.mark.parametrize("factory", ["segnet_vgg", "unet_vgg"])
def test_teachers_of_the_new_tasks(factory):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 24)
    for task, head in (("edges", EdgeHead), ("keypoints", KeypointHead)):
        net = getattr(models, factory)(task, width=1 / 16, depth=2).eval()
        assert isinstance(net.head, head) and net.tasks == {task: net.task}
        out = net(x)
        assert out.shape == (2, 16, 24) and out.dtype == torch.float32
        if task == "edges":
            assert 0 <= out.min() and out.max() <= 1
        net.task.loss(out, net.task.target(out)).item()  # its own prediction as target: a finite loss
