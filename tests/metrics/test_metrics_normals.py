"""NormalMetric: hand-computed angles, exact and histogram streaming medians, NumPy reference."""
import math

import numpy as np
import pytest
import torch

from pyamalgam.metrics import NormalMetric, angular_error


def normals_at(angles_deg):
    """(1, 3, 1, N) predictions at the given angles from the target (0, 0, 1)."""
    a = torch.deg2rad(torch.tensor(angles_deg, dtype=torch.float64))
    pred = torch.stack([torch.sin(a), torch.zeros_like(a), torch.cos(a)])[None, :, None]
    target = torch.zeros_like(pred)
    target[:, 2] = 1.0
    return pred.float(), target.float()


def numpy_reference(pred, target, mask):
    p = np.moveaxis(np.asarray(pred, np.float64), 1, -1)
    t = np.moveaxis(np.asarray(target, np.float64), 1, -1)
    valid = np.asarray(mask) & (np.abs(t).sum(-1) > 0)
    p, t = p[valid], t[valid]
    cos = (p * t).sum(-1) / np.linalg.norm(p, axis=-1) / np.linalg.norm(t, axis=-1)
    ang = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    return ang, {"mean": ang.mean(), "median": np.median(ang), "rmse": np.sqrt(np.mean(ang ** 2)),
                 "within_11_25": np.mean(ang < 11.25), "within_22_5": np.mean(ang < 22.5),
                 "within_30": np.mean(ang < 30)}


def test_hand_computed():
    pred, target = normals_at([0.0, 10.0, 20.0, 45.0, 90.0])
    m = NormalMetric()
    m.update(pred, target)
    r = m.compute()
    assert r["mean"] == pytest.approx(33.0, abs=1e-4)
    assert r["median"] == pytest.approx(20.0, abs=1e-4)
    assert r["rmse"] == pytest.approx(math.sqrt((100 + 400 + 2025 + 8100) / 5), abs=1e-4)
    assert (r["within_11_25"], r["within_22_5"], r["within_30"]) == (2 / 5, 3 / 5, 3 / 5)


def test_even_count_median_is_mean_of_middle_pair_and_scale_invariant():
    pred, target = normals_at([5.0, 10.0, 30.0, 80.0])
    m = NormalMetric()
    m.update(pred * 7.0, target * 0.5)  # lengths do not matter
    assert m.compute()["median"] == pytest.approx(20.0, abs=1e-4)


def test_angular_error_accurate_for_small_angles():
    pred, target = normals_at([1e-4, 0.0, 180.0])
    ang = angular_error(pred.double(), target.double())
    torch.testing.assert_close(ang.flatten(), torch.tensor([1e-4, 0.0, 180.0], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    assert angular_error(torch.zeros(1, 3), torch.tensor([[0.0, 0.0, 1.0]])).item() == 90.0


def random_batches(seed=0, n=5, h=7, w=9):
    rng = np.random.default_rng(seed)
    target = rng.normal(size=(n, 3, h, w)).astype(np.float32)
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    target[:, :, 0, :2] = 0.0  # invalid normals
    pred = (target + 0.4 * rng.normal(size=target.shape)).astype(np.float32)
    mask = rng.random((n, h, w)) < 0.85
    return pred, target, mask


def test_exact_streaming_median_equals_whole_and_numpy():
    pred, target, mask = random_batches()
    stream = NormalMetric()
    for lo, hi in ((0, 2), (2, 3), (3, 5)):
        stream.update(torch.from_numpy(pred[lo:hi]), torch.from_numpy(target[lo:hi]), torch.from_numpy(mask[lo:hi]))
    whole = NormalMetric()
    whole.update(torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(mask))
    got = stream.compute()
    assert got["median"] == whole.compute()["median"]  # bit-identical
    ang, ref = numpy_reference(pred, target, mask)
    assert stream.num_pixels == len(ang) > 100
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-5), key
    assert stream.median_error_bound == 0.0


@pytest.mark.parametrize("bins", [180, 18_000, 180_000])
def test_histogram_median_within_stated_bound(bins):
    pred, target, mask = random_batches(seed=1, n=6)
    exact, hist = NormalMetric(), NormalMetric(median_bins=bins)
    for i in range(6):
        args = (torch.from_numpy(pred[i:i + 1]), torch.from_numpy(target[i:i + 1]), torch.from_numpy(mask[i:i + 1]))
        exact.update(*args)
        hist.update(*args)
    e, h = exact.compute(), hist.compute()
    bound = hist.median_error_bound
    assert bound == pytest.approx(90.0 / bins)
    assert abs(h["median"] - e["median"]) <= bound + 1e-9
    for key in ("mean", "rmse", "within_11_25", "within_22_5", "within_30"):
        assert h[key] == e[key]


def test_histogram_bound_is_attained_order_of_magnitude():
    """With coarse bins the histogram median is visibly off but still inside the bound."""
    pred, target = normals_at([1.0, 2.0, 3.0])
    m = NormalMetric(median_bins=18)  # 10-degree bins: median reported as 5
    m.update(pred, target)
    assert m.compute()["median"] == pytest.approx(5.0)
    assert abs(m.compute()["median"] - 2.0) <= m.median_error_bound


def test_compute_twice_and_reset():
    pred, target, mask = random_batches(seed=2, n=2)
    m = NormalMetric()
    m.update(torch.from_numpy(pred[:1]), torch.from_numpy(target[:1]))
    m.update(torch.from_numpy(pred[1:]), torch.from_numpy(target[1:]))
    assert m.compute() == m.compute()
    m.reset()
    with pytest.raises(RuntimeError, match="before any update"):
        m.compute()
    m.update(torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))  # all targets invalid
    assert m.num_pixels == 0 and all(math.isnan(v) for v in m.compute().values())


def test_errors():
    m = NormalMetric()
    with pytest.raises(ValueError, match=r"target must have shape \(B, 3, H, W\).*got \(2, 4, 5, 5\)"):
        m.update(torch.ones(2, 4, 5, 5), torch.ones(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"pred must have the shape of target \(2, 3, 5, 5\), got \(2, 3, 5, 4\)"):
        m.update(torch.ones(2, 3, 5, 4), torch.ones(2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"mask must have the shape of target without its channel dim \(2, 5, 5\)"):
        m.update(torch.ones(2, 3, 5, 5), torch.ones(2, 3, 5, 5), torch.ones(2, 3, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="pred holds non-finite values at 1 evaluated pixel"):
        bad = torch.ones(1, 3, 1, 2)
        bad[0, 1, 0, 0] = float("inf")
        m.update(bad, torch.ones(1, 3, 1, 2))
    with pytest.raises(TypeError, match="pred must be a floating-point tensor"):
        m.update(torch.ones(1, 3, 1, 1, dtype=torch.long), torch.ones(1, 3, 1, 1))
    with pytest.raises(ValueError, match="median_bins must be >= 1"):
        NormalMetric(median_bins=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bins", [None, 18_000])
def test_cuda_matches_cpu(bins):
    pred, target, mask = (torch.from_numpy(a) for a in random_batches(seed=6, n=3))
    cpu, gpu = NormalMetric(bins), NormalMetric(bins)
    cpu.update(pred, target, mask)
    gpu.update(pred.cuda(), target.cuda(), mask.cuda())
    c, g = cpu.compute(), gpu.compute()
    assert g == pytest.approx(c, abs=1e-6 if bins is None else gpu.median_error_bound * 2)
