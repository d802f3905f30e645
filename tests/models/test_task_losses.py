"""Task losses Eq. 1, 3, 4, the task objects and Eq. 5's feature loss."""
import pytest
import torch
import torch.nn.functional as F

from pyamalgam.losses import (
    DepthTask,
    LossTask,
    NormalTask,
    SegmentationTask,
    depth_loss,
    feature_loss,
    get_task,
    normal_loss,
)
from pyamalgam.ops import reference

gen = torch.Generator().manual_seed(0)


def test_segmentation_target_is_the_argmax_and_the_loss_cross_entropy_on_one_hot():
    teacher = torch.randn(2, 5, 4, 6, generator=gen)
    student = torch.randn(2, 5, 4, 6, generator=gen)
    task = SegmentationTask()
    target = task.target(teacher)
    assert torch.equal(target, teacher.argmax(1))
    one_hot = F.one_hot(target, 5).permute(0, 3, 1, 2).float()
    expected = -(one_hot * student.log_softmax(1)).sum(1).mean()  # Eq. 1, (1/N) sum_i l(S*_i, S_i)
    torch.testing.assert_close(task.loss(student, target), expected)


def test_depth_loss_is_eq3_and_zero_on_the_teachers_own_prediction():
    pred = torch.rand(3, 4, 6, generator=gen) * 5
    target = torch.rand(3, 4, 6, generator=gen) * 5
    task = DepthTask()
    torch.testing.assert_close(task.loss(pred, task.target(target)), reference.si_depth_loss(pred, target))
    assert task.loss(target, target).item() == 0.0
    d = (target - pred).reshape(3, -1)
    n = d.shape[1]
    manual = ((d**2).sum(1) / n - d.sum(1) ** 2 / (2 * n * n)).mean()
    torch.testing.assert_close(depth_loss(pred, target), manual)


def test_normal_loss_is_the_negative_mean_dot_product():
    m = F.normalize(torch.randn(2, 3, 4, 5, generator=gen), dim=1)
    g = F.normalize(torch.randn(2, 3, 4, 5, generator=gen), dim=1)
    torch.testing.assert_close(NormalTask().loss(m, m), torch.tensor(-1.0))
    torch.testing.assert_close(normal_loss(m, g), -(m * g).sum(1).mean())
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[0, 1, 2] = True
    g_nan = g.clone()
    g_nan[1] = float("nan")  # masked pixels must not leak NaN
    torch.testing.assert_close(normal_loss(m, g_nan, mask), -(m[0, :, 1, 2] * g[0, :, 1, 2]).sum())


def test_normal_loss_checks_shapes():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        normal_loss(torch.rand(1, 2, 3, 3), torch.rand(1, 2, 3, 3))


def test_get_task_names_tasks_and_callables():
    assert isinstance(get_task("segmentation"), SegmentationTask)
    assert get_task("normals", name="n").name == "n"
    custom = get_task(lambda p, t: (p - t).abs().mean(), name="albedo")
    assert isinstance(custom, LossTask) and custom.name == "albedo"
    assert custom(torch.ones(2), torch.zeros(2)).item() == 1.0
    with pytest.raises(ValueError, match="unknown task 'x'"):
        get_task("x")
    with pytest.raises(TypeError, match="task must be a name"):
        get_task(3)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        LossTask(3)


def test_feature_loss_is_an_element_mean_and_averages_streams():
    a, b = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert feature_loss(a, b).item() == 1.0
    assert feature_loss(a, {"x": b, "y": 3 * b}).item() == 5.0
    with pytest.raises(ValueError, match="differ in shape"):
        feature_loss(a, torch.ones(2, 3, 4, 5))
