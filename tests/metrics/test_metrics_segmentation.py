"""SegmentationMetric: hand-computed cases, NumPy reference, streaming invariance, errors."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyamalgam.metrics import SegmentationMetric


def numpy_reference(pred, target, k, ignore_index=255, mask=None):
    """Independent computation over the whole data set (loops over classes, no confusion matrix)."""
    pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
    valid = np.ones_like(target, dtype=bool) if ignore_index is None else target != ignore_index
    if mask is not None:
        valid &= np.asarray(mask).ravel()
    p, t = pred[valid], target[valid]
    ious, accs = [], []
    for c in range(k):
        if c == ignore_index:
            continue
        inter = np.sum((p == c) & (t == c))
        union = np.sum((p == c) | (t == c))
        if union:
            ious.append(inter / union)
        if np.sum(t == c):
            accs.append(inter / np.sum(t == c))
    return {"pixel_acc": np.mean(p == t) if len(t) else math.nan,
            "miou": np.mean(ious) if ious else math.nan,
            "mean_acc": np.mean(accs) if accs else math.nan}


def test_hand_computed():
    target = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
    pred = torch.tensor([[[0, 1, 1], [1, 0, 2]]])
    m = SegmentationMetric(3)
    m.update(pred, target)
    r = m.compute()
    assert r["pixel_acc"] == pytest.approx(3 / 5)
    # IoU: class 0 = 1/3, class 1 = 2/3, class 2 = 0 / 1
    assert r["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert r["mean_acc"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert m.confusion_matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    np.testing.assert_allclose(m.iou_per_class().numpy(), [1 / 3, 2 / 3, 0])


def test_absent_classes_are_left_out_predicted_only_counts_zero():
    target = torch.tensor([[0, 0, 1, 1]])
    m = SegmentationMetric(5)
    m.update(torch.tensor([[0, 0, 1, 1]]), target)
    assert m.compute()["miou"] == 1.0  # classes 2..4 absent from both: not averaged
    assert math.isnan(m.iou_per_class()[3])
    m.update(torch.tensor([[0, 0, 1, 4]]), target)  # class 4 predicted, never present: IoU 0, counts
    iou = m.iou_per_class()
    assert iou[4] == 0 and iou[0] == 1 and iou[1] == pytest.approx(3 / 4)
    assert m.compute()["miou"] == pytest.approx((1 + 3 / 4 + 0) / 3)


def test_logits_equal_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=g)
    target = torch.randint(0, 4, (2, 5, 6), generator=g)
    a, b = SegmentationMetric(4), SegmentationMetric(4)
    a.update(logits, target)
    b.update(logits.argmax(1), target)
    assert a.compute() == b.compute()
    assert torch.equal(a.confusion_matrix, b.confusion_matrix)


@pytest.mark.parametrize("ignore_index", [255, 0, None, -1])
def test_streaming_matches_numpy(ignore_index):
    rng = np.random.default_rng(1)
    k = 5
    target = rng.integers(0, k, (7, 9, 11))
    if ignore_index is not None:
        target[rng.random(target.shape) < 0.2] = ignore_index
    pred = rng.integers(0, k, target.shape)
    mask = rng.random(target.shape) < 0.9
    m = SegmentationMetric(k, ignore_index=ignore_index)
    for lo, hi in ((0, 2), (2, 3), (3, 7)):
        m.update(torch.from_numpy(pred[lo:hi]), torch.from_numpy(target[lo:hi]), torch.from_numpy(mask[lo:hi]))
    whole = SegmentationMetric(k, ignore_index=ignore_index)
    whole.update(torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(mask))
    assert m.compute() == whole.compute()
    ref = numpy_reference(pred, target, k, ignore_index, mask)
    for key, value in m.compute().items():
        assert value == pytest.approx(ref[key], rel=1e-12), key


def test_ignore_index_zero_excludes_class_zero():
    target = torch.tensor([[0, 1, 1, 2]])
    pred = torch.tensor([[2, 1, 0, 2]])  # class 0 predicted once at a non-ignored pixel
    m = SegmentationMetric(3, ignore_index=0)
    m.update(pred, target)
    r = m.compute()
    assert r["pixel_acc"] == pytest.approx(2 / 3)
    assert math.isnan(m.iou_per_class()[0])
    assert r["miou"] == pytest.approx((1 / 2 + 1) / 2)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.integers(0, 2**31 - 1))
def test_any_batch_split_gives_identical_results(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    logits = torch.randn(n, 3, 4, 4, generator=g)
    target = torch.randint(0, 4, (n, 4, 4), generator=g)
    target[target == 3] = 255
    whole = SegmentationMetric(3)
    whole.update(logits, target)
    parts = SegmentationMetric(3)
    for chunk_l, chunk_t in zip(logits.split(sizes), target.split(sizes)):
        parts.update(chunk_l, chunk_t)
    assert torch.equal(parts.confusion_matrix, whole.confusion_matrix)
    assert parts.compute() == whole.compute()


def test_reset_and_compute_before_update():
    m = SegmentationMetric(2)
    with pytest.raises(RuntimeError, match="before any update"):
        m.compute()
    m.update(torch.tensor([[1, 1]]), torch.tensor([[0, 1]]))
    m.reset()
    assert m.confusion_matrix.sum() == 0
    m.update(torch.tensor([[1]]), torch.tensor([[255]]))  # nothing evaluated: nan, not an error
    assert all(math.isnan(v) for v in m.compute().values())


def test_confusion_matrix_is_a_copy():
    m = SegmentationMetric(2)
    m.update(torch.tensor([[1]]), torch.tensor([[1]]))
    m.confusion_matrix.zero_()
    assert m.confusion_matrix[1, 1] == 1


def test_errors():
    m = SegmentationMetric(3)
    t = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"logits/scores of shape \(2, 3, 4, 4\).*got \(2, 4, 4, 4\)"):
        m.update(torch.randn(2, 4, 4, 4), t)
    with pytest.raises(ValueError, match=r"logits/scores of shape .*integer pred is read as labels"):
        m.update(torch.randn(2, 4, 4), t)
    with pytest.raises(ValueError, match=r"pred labels must have the shape of target \(2, 4, 4\), got \(2, 4, 5\)"):
        m.update(torch.zeros(2, 4, 5, dtype=torch.long), t)
    with pytest.raises(TypeError, match="target must be an integer label tensor"):
        m.update(torch.zeros(2, 4, 4, dtype=torch.long), t.float())
    with pytest.raises(ValueError, match=r"target holds label 7 outside 0\.\.2"):
        m.update(torch.zeros_like(t), torch.full_like(t, 7))
    with pytest.raises(ValueError, match=r"pred holds label -1 outside 0\.\.2"):
        m.update(torch.full_like(t, -1), t)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        m.update(t, t, mask=torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match=r"mask must have the shape of target \(2, 4, 4\)"):
        m.update(t, t, mask=torch.ones(2, 4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="pred must be a torch.Tensor"):
        m.update(np.zeros((2, 4, 4)), t)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        SegmentationMetric(0)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        SegmentationMetric(3, ignore_index=2.5)
    assert m.confusion_matrix.sum() == 0  # failed updates leave no trace


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, 8, 8, generator=g)
    target = torch.randint(0, 5, (3, 8, 8), generator=g)
    target[target == 4] = 255
    cpu, gpu = SegmentationMetric(4), SegmentationMetric(4)
    cpu.update(logits, target)
    gpu.update(logits.cuda(), target.cuda())
    assert gpu.confusion_matrix.device.type == "cuda"
    assert torch.equal(gpu.confusion_matrix.cpu(), cpu.confusion_matrix)
    assert gpu.compute() == pytest.approx(cpu.compute())
