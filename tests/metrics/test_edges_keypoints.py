"""EdgeMetric, KeypointMetric and NormalCosineMetric against float64 NumPy, streamed in batches."""
import math

import numpy as np
import pytest
import torch

from pyamalgam.data.synthetic.annotations import keypoint_heatmap
from pyamalgam.metrics import EdgeMetric, KeypointMetric, NormalCosineMetric, heatmap_peaks


def _maps(shape, seed):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(shape, generator=g)
    target = (torch.rand(shape, generator=g) < 0.15).float()
    mask = torch.rand(shape, generator=g) < 0.8
    return pred, target, mask


def _np_edges(p, t, m, th=0.5):
    p, t = p[m].astype(np.float64), t[m].astype(np.float64)
    pe, te = p >= th, t >= th
    tp = (pe & te).sum()
    prec = tp / pe.sum() if pe.sum() else 0.0
    rec = tp / te.sum() if te.sum() else 0.0
    return {"abs": np.abs(p - t).mean(), "mse": ((p - t) ** 2).mean(), "precision": prec, "recall": rec,
            "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0}


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 5), (4, 9, 13)])
def test_edge_metric_matches_numpy_and_is_batch_invariant(shape):
    p, t, m = _maps(shape, 1)
    ref = _np_edges(p.numpy(), t.numpy(), m.numpy())
    whole = EdgeMetric()
    whole.update(p, t, m)
    split = EdgeMetric()
    for i in range(shape[0]):
        split.update(p[i:i + 1, None], t[i:i + 1, None], m[i:i + 1])  # (B, 1, H, W) too
    for metric in (whole, split):
        got = metric.compute()
        assert set(got) == set(ref)
        for k in ref:
            assert got[k] == pytest.approx(ref[k], rel=1e-12, abs=1e-15), k
    assert whole.num_pixels == int(m.sum())


def test_edge_metric_threshold_and_empty():
    metric = EdgeMetric(threshold=0.3)
    metric.update(torch.tensor([[[0.35, 0.2]]]), torch.tensor([[[1.0, 1.0]]]))
    got = metric.compute()
    assert got["precision"] == 1.0 and got["recall"] == 0.5 and got["f1"] == pytest.approx(2 / 3)
    assert got["abs"] == pytest.approx((0.65 + 0.8) / 2)
    empty = EdgeMetric()
    empty.update(torch.rand(1, 2, 2), torch.rand(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool))
    assert all(math.isnan(v) for v in empty.compute().values())
    none = EdgeMetric()
    none.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))  # no edge predicted, none true
    assert none.compute() == {"abs": 0.0, "mse": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    metric.reset()
    with pytest.raises(RuntimeError, match="before any update"):
        metric.compute()


@pytest.mark.parametrize("cls", [EdgeMetric, KeypointMetric])
def test_map_metric_errors(cls):
    m = cls()
    with pytest.raises(ValueError, match="maps of one shape"):
        m.update(torch.rand(1, 3, 4), torch.rand(1, 3, 5))
    with pytest.raises(ValueError, match="maps of one shape"):
        m.update(torch.rand(3, 4), torch.rand(3, 4))
    with pytest.raises(TypeError, match="floating-point"):
        m.update(torch.rand(1, 3, 4), torch.ones(1, 3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="mask must be a bool"):
        m.update(torch.rand(1, 3, 4), torch.rand(1, 3, 4), torch.ones(1, 3, 4))
    bad = torch.rand(1, 3, 4)
    bad[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        m.update(bad, torch.rand(1, 3, 4))
    mask = torch.ones(1, 3, 4, dtype=torch.bool)
    mask[0, 1, 1] = False
    m.update(bad, torch.rand(1, 3, 4), mask)  # a masked NaN is never read
    assert m.num_pixels == 11


def test_metric_argument_errors():
    for bad in (0, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="threshold"):
            EdgeMetric(threshold=bad)
    with pytest.raises(ValueError, match="peak_threshold"):
        KeypointMetric(peak_threshold=0)
    with pytest.raises(ValueError, match="radius"):
        KeypointMetric(radius=-1)


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 7, 5), (3, 12, 17)])
def test_keypoint_errors_match_numpy(shape):
    g = torch.Generator().manual_seed(5)
    p, t = torch.randn(shape, generator=g), torch.rand(shape, generator=g)
    m = torch.rand(shape, generator=g) < 0.6
    metric = KeypointMetric()
    for i in range(shape[0]):
        metric.update(p[i:i + 1], t[i:i + 1], m[i:i + 1])
    d = (p.double() - t.double()).numpy()[m.numpy()]
    got = metric.compute()
    if d.size:
        assert got["abs"] == pytest.approx(np.abs(d).mean(), rel=1e-12)
        assert got["mse"] == pytest.approx((d * d).mean(), rel=1e-12)


def _np_peaks(h, th):
    b, hh, ww = h.shape
    out = np.zeros(h.shape, dtype=bool)
    for n in range(b):
        for i in range(hh):
            for j in range(ww):
                win = h[n, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
                out[n, i, j] = h[n, i, j] >= th and h[n, i, j] >= win.max()
    return out


def test_heatmap_peaks_match_brute_force():
    g = torch.Generator().manual_seed(2)
    h = torch.rand(2, 9, 11, generator=g)
    h[0, 3, 3:5] = 2.0  # a tie: both are peaks
    assert np.array_equal(heatmap_peaks(h, 0.5).numpy(), _np_peaks(h.numpy(), 0.5))
    assert heatmap_peaks(h, 0.5)[0, 3, 3:5].all()


def test_keypoint_detection_counts():
    res = (20, 30)
    pts = np.array([[5.2, 4.7], [20.5, 10.5], [25.1, 16.3]])
    target = torch.from_numpy(keypoint_heatmap(pts, res))[None]
    shifted = torch.from_numpy(keypoint_heatmap(pts[:2] + [1.0, 1.0], res))[None]  # two found, one pixel off
    for radius, expected in ((1, (1.0, 2 / 3)), (0, (0.0, 0.0))):
        m = KeypointMetric(radius=radius)
        m.update(shifted, target)
        got = m.compute()
        assert (got["precision"], got["recall"]) == pytest.approx(expected), radius
    perfect = KeypointMetric()
    perfect.update(target, target)
    assert perfect.compute() == {"abs": 0.0, "mse": 0.0, "precision": 1.0, "recall": 1.0}


def _np_cosine(p, t, m):
    p = np.moveaxis(p.astype(np.float64), 1, -1)
    t = np.moveaxis(t.astype(np.float64), 1, -1)
    valid = m & np.isfinite(t).all(-1) & (t != 0).any(-1)
    pp, tt = p[valid], t[valid]
    num = (pp * tt).sum(-1)
    den = np.linalg.norm(pp, axis=-1) * np.linalg.norm(tt, axis=-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0).mean()


@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 3, 5, 7), (3, 3, 8, 3)])
def test_normal_cosine_matches_numpy(shape):
    g = torch.Generator().manual_seed(9)
    p, t = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t[0, :, 0, 0] = 0.0  # an invalid target: skipped
    if shape[2] > 1:
        p[0, :, 1, 0] = 0.0  # a zero prediction: scores 0
    m = torch.rand(shape[:1] + shape[2:], generator=g) < 0.9
    m[0, 0, 0] = True
    metric = NormalCosineMetric()
    for i in range(shape[0]):
        metric.update(p[i:i + 1], t[i:i + 1], m[i:i + 1])
    got = metric.compute()["cosine"]
    if metric.num_pixels:
        assert got == pytest.approx(_np_cosine(p.numpy(), t.numpy(), m.numpy()), rel=1e-12)
    unit = torch.nn.functional.normalize(t + (t == 0).float(), dim=1)
    same = NormalCosineMetric()
    same.update(3.0 * unit, unit)
    assert same.compute()["cosine"] == pytest.approx(1.0, abs=1e-12)
    opposite = NormalCosineMetric()
    opposite.update(-unit, unit)
    assert opposite.compute()["cosine"] == pytest.approx(-1.0, abs=1e-12)


def test_normal_cosine_errors_and_empty():
    m = NormalCosineMetric()
    with pytest.raises(RuntimeError, match="before any update"):
        m.compute()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m.update(torch.rand(1, 2, 3, 3), torch.rand(1, 2, 3, 3))
    with pytest.raises(ValueError, match="shape of target"):
        m.update(torch.rand(1, 3, 3, 4), torch.rand(1, 3, 3, 3))
    bad = torch.rand(1, 3, 2, 2)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        m.update(bad, torch.rand(1, 3, 2, 2))
    m.update(torch.rand(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))
    assert math.isnan(m.compute()["cosine"]) and m.num_pixels == 0
