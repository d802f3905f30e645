"""DepthMetric: hand-computed case, NumPy reference, streaming invariance, masks, errors."""
import math

import numpy as np
import pytest
import torch

from pyamalgam.metrics import DepthMetric


def numpy_reference(pred, target, mask=None, min_depth=1e-3, max_depth=None):
    pred, target = np.asarray(pred, np.float64).ravel(), np.asarray(target, np.float64).ravel()
    valid = np.isfinite(target) & (target > 0)
    if max_depth is not None:
        valid &= target <= max_depth
    if mask is not None:
        valid &= np.asarray(mask).ravel()
    t = target[valid]
    p = np.clip(pred[valid], min_depth, max_depth if max_depth is not None else np.inf)
    ratio = np.maximum(p / t, t / p)
    return {
        "abs_rel": np.mean(np.abs(p - t) / t),
        "sq_rel": np.mean((p - t) ** 2 / t),
        "rmse": np.sqrt(np.mean((p - t) ** 2)),
        "rmse_log": np.sqrt(np.mean((np.log(p) - np.log(t)) ** 2)),
        "log10": np.mean(np.abs(np.log10(p) - np.log10(t))),
        "mae": np.mean(np.abs(p - t)),
        "delta1": np.mean(ratio < 1.25),
        "delta2": np.mean(ratio < 1.25 ** 2),
        "delta3": np.mean(ratio < 1.25 ** 3),
    }


def test_hand_computed():
    pred = torch.tensor([[[1.0, 2.0, 4.0, 7.0, 3.0]]])
    target = torch.tensor([[[1.0, 1.0, 2.0, 0.0, 5.0]]])  # target 0: invalid
    mask = torch.tensor([[[True, True, True, True, False]]])  # last pixel masked out
    m = DepthMetric()
    m.update(pred, target, mask)
    r = m.compute()
    assert m.num_pixels == 3
    assert r["abs_rel"] == pytest.approx((0 + 1 + 1) / 3)
    assert r["sq_rel"] == pytest.approx((0 + 1 + 2) / 3)
    assert r["rmse"] == pytest.approx(math.sqrt(5 / 3))
    assert r["rmse_log"] == pytest.approx(math.sqrt(2 * math.log(2) ** 2 / 3))
    assert r["log10"] == pytest.approx(2 * math.log10(2) / 3)
    assert r["mae"] == pytest.approx(1.0)
    # ratios 1, 2, 2: only the first is within 1.25^3 = 1.953
    assert (r["delta1"], r["delta2"], r["delta3"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))


@pytest.mark.parametrize("max_depth", [None, 6.0])
def test_streaming_matches_numpy(max_depth):
    rng = np.random.default_rng(0)
    target = rng.uniform(0.5, 10.0, (6, 1, 8, 10)).astype(np.float32)
    target[rng.random(target.shape) < 0.15] = 0.0
    pred = (target * rng.uniform(0.6, 1.5, target.shape)).astype(np.float32)
    pred[0, 0, 0, :3] = 0.0  # clamped to min_depth (target may be valid there)
    mask = rng.random((6, 8, 10)) < 0.8
    m = DepthMetric(max_depth=max_depth)
    for lo, hi in ((0, 1), (1, 4), (4, 6)):
        m.update(torch.from_numpy(pred[lo:hi]), torch.from_numpy(target[lo:hi]), torch.from_numpy(mask[lo:hi]))
    ref = numpy_reference(pred, target, mask[:, None], max_depth=max_depth)
    got = m.compute()
    assert set(got) == set(ref)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], rel=1e-10), key
    whole = DepthMetric(max_depth=max_depth)
    whole.update(torch.from_numpy(pred[:, 0]), torch.from_numpy(target[:, 0]), torch.from_numpy(mask))
    for key in ref:
        assert got[key] == pytest.approx(whole.compute()[key], rel=1e-12, abs=1e-15)


def test_pixel_pooled_not_per_image():
    m = DepthMetric()
    m.update(torch.full((1, 1, 1), 2.0), torch.ones(1, 1, 1))  # 1 pixel, abs rel 1
    m.update(torch.ones(1, 3, 1), torch.ones(1, 3, 1))  # 3 pixels, abs rel 0
    assert m.compute()["abs_rel"] == pytest.approx(1 / 4)  # per-image mean would be 1/2


def test_non_finite_and_empty():
    m = DepthMetric()
    m.update(torch.ones(1, 2, 2), torch.tensor([[[float("nan"), float("inf")], [0.0, -1.0]]]))
    assert m.num_pixels == 0 and all(math.isnan(v) for v in m.compute().values())
    with pytest.raises(ValueError, match="pred holds 1 non-finite value"):
        m.update(torch.tensor([[[float("nan"), 1.0]]]), torch.ones(1, 1, 2))
    m.reset()
    with pytest.raises(RuntimeError, match="before any update"):
        m.compute()


def test_errors():
    m = DepthMetric()
    with pytest.raises(ValueError, match=r"same shape .* got \(2, 3, 4\) and \(2, 3, 5\)"):
        m.update(torch.ones(2, 3, 4), torch.ones(2, 3, 5))
    with pytest.raises(TypeError, match="target must be a floating-point tensor"):
        m.update(torch.ones(2, 3, 4), torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"mask must have the shape of target \(2, 3, 4\)"):
        m.update(torch.ones(2, 3, 4), torch.ones(2, 3, 4), torch.ones(2, 4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="min_depth must be a finite number > 0"):
        DepthMetric(min_depth=0)
    with pytest.raises(ValueError, match=r"max_depth \(0.5\) must be > min_depth \(1.0\)"):
        DepthMetric(min_depth=1.0, max_depth=0.5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(5)
    target = torch.rand(2, 1, 8, 8, generator=g) * 5
    pred = target * (0.5 + torch.rand(2, 1, 8, 8, generator=g))
    mask = torch.rand(2, 8, 8, generator=g) > 0.2
    cpu, gpu = DepthMetric(), DepthMetric()
    cpu.update(pred, target, mask)
    gpu.update(pred.cuda(), target.cuda(), mask.cuda())
    assert gpu.compute() == pytest.approx(cpu.compute(), rel=1e-9)
