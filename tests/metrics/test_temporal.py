"""TemporalConsistency: independent NumPy reference, streaming, masks, the synthetic clips, errors."""
import math

import numpy as np
import pytest
import torch

from pyamalgam.metrics import TemporalConsistency


def numpy_tc(pairs, k):
    """Independent reference over a list of (labels_t, labels_tk, flow, mask) in NumPy: each pixel
    looks up the label at t+k at round(position + flow) (pixel-index coordinates), if that lands
    in the image; then per-class IoU over all counted pixels, mean over classes that occur."""
    rows, cols = [], []
    for lt, ltk, flow, mask in pairs:
        b, h, w = lt.shape
        for n in range(b):
            for v in range(h):
                for u in range(w):
                    sx, sy = u + flow[n, 0, v, u], v + flow[n, 1, v, u]
                    if not (-0.5 <= sx <= w - 0.5 and -0.5 <= sy <= h - 0.5):
                        continue
                    if mask is not None and not mask[n, v, u]:
                        continue
                    su, sv = min(max(int(np.rint(sx)), 0), w - 1), min(max(int(np.rint(sy)), 0), h - 1)
                    rows.append(lt[n, v, u])
                    cols.append(ltk[n, sv, su])
    rows, cols = np.array(rows), np.array(cols)
    ious = [np.sum((rows == c) & (cols == c)) / np.sum((rows == c) | (cols == c))
            for c in range(k) if np.any((rows == c) | (cols == c))]
    return {"tc": np.mean(ious) if ious else math.nan,
            "agreement": np.mean(rows == cols) if rows.size else math.nan, "pixels": rows.size}


def _random_pairs(seed, k, shapes, masked):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for b, h, w in shapes:
        lt = torch.randint(0, k, (b, h, w), generator=g)
        ltk = torch.randint(0, k, (b, h, w), generator=g)
        ltk[:, : h // 2] = lt[:, : h // 2]  # some agreement, so TC is not ~1/k everywhere
        flow = (torch.rand(b, 2, h, w, generator=g, dtype=torch.float64) - 0.5) * 4 + 0.0137  # no .5 ties
        mask = torch.rand(b, h, w, generator=g) > 0.3 if masked else None
        pairs.append((lt, ltk, flow, mask))
    return pairs


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_matches_numpy_reference_and_streams(k, masked):
    shapes = [(1, 1, 1), (2, 5, 7), (1, 9, 4), (3, 3, 11)]
    pairs = _random_pairs(k + 10 * masked, k, shapes, masked)
    m = TemporalConsistency(k)
    for lt, ltk, flow, mask in pairs:
        m.update(lt, ltk, flow, mask)
    got = m.compute()
    ref = numpy_tc([(a.numpy(), b.numpy(), f.numpy(), None if ma is None else ma.numpy()) for a, b, f, ma in pairs], k)
    assert got["pixels"] == ref["pixels"] > 0
    assert got["tc"] == pytest.approx(ref["tc"], abs=1e-12)
    assert got["agreement"] == pytest.approx(ref["agreement"], abs=1e-12)
    # one big batch of the same pixels gives the same numbers (streaming invariance)
    one = TemporalConsistency(k)
    for lt, ltk, flow, mask in pairs[1:2]:
        one.update(lt, ltk, flow, mask)
    part = TemporalConsistency(k)
    lt, ltk, flow, mask = pairs[1]
    for i in range(lt.shape[0]):
        part.update(lt[i:i + 1], ltk[i:i + 1], flow[i:i + 1], None if mask is None else mask[i:i + 1])
    assert part.compute() == one.compute()


def test_logits_are_argmaxed_before_warping():
    g = torch.Generator().manual_seed(0)
    logits_t, logits_tk = torch.randn(2, 4, 6, 5, generator=g), torch.randn(2, 4, 6, 5, generator=g)
    flow = torch.full((2, 2, 6, 5), 0.7)
    a, b = TemporalConsistency(4), TemporalConsistency(4)
    a.update(logits_t, logits_tk, flow)
    b.update(logits_t.argmax(1), logits_tk.argmax(1), flow)
    assert a.compute() == b.compute()


def test_identical_static_predictions_score_one_and_a_shift_is_followed():
    seg = torch.zeros(1, 6, 8, dtype=torch.int64)
    seg[:, :, 4:] = 1
    m = TemporalConsistency(2)
    m.update(seg, seg, torch.zeros(1, 2, 6, 8))
    assert m.compute() == {"tc": 1.0, "agreement": 1.0, "pixels": 48.0}
    # frame t+1 moved 2 px right: with the true flow TC stays 1, with zero flow it drops
    moved = torch.zeros_like(seg)
    moved[:, :, 6:] = 1
    flow = torch.zeros(1, 2, 6, 8)
    flow[:, 0] = 2.0
    m.reset()
    m.update(seg, moved, flow)
    r = m.compute()
    assert r["tc"] == 1.0 and r["pixels"] == 6 * 6  # the last two columns land outside
    m.reset()
    m.update(seg, moved, torch.zeros(1, 2, 6, 8))
    assert m.compute()["tc"] < 0.8


def test_nothing_counted_gives_nan_and_compute_before_update_raises():
    m = TemporalConsistency(3)
    with pytest.raises(RuntimeError, match="before any update"):
        m.compute()
    m.update(torch.zeros(1, 2, 2, dtype=torch.int64), torch.zeros(1, 2, 2, dtype=torch.int64),
             torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool))
    r = m.compute()
    assert math.isnan(r["tc"]) and math.isnan(r["agreement"]) and r["pixels"] == 0


def test_ground_truth_of_a_synthetic_clip_is_temporally_consistent():
    from pyamalgam.data import SyntheticClips
    clip = SyntheticClips("test", size=1, frames=3, resolution=(24, 32))[0]
    seg, flow, valid = clip["seg"], clip["flow"], clip["flow_valid"]
    exact = TemporalConsistency(SyntheticClips.num_classes)
    exact.update(seg[:-1], seg[1:], flow, valid)
    still = TemporalConsistency(SyntheticClips.num_classes)
    still.update(seg[:-1], seg[1:], torch.zeros_like(flow), valid)
    # the labels are a function of the scene point: only label edges (nearest sampling) disagree
    assert exact.compute()["agreement"] > 0.95
    assert exact.compute()["agreement"] >= still.compute()["agreement"]


@pytest.mark.parametrize("args, err, msg", [
    ((torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.int64), torch.zeros(1, 2, 2, 2)), ValueError,
     "pred_t is floating point"),
    ((torch.zeros(1, 2, 2, dtype=torch.int64), torch.zeros(1, 3, 2, dtype=torch.int64), torch.zeros(1, 2, 2, 2)),
     ValueError, "same shape"),
    ((torch.zeros(1, 2, 2, dtype=torch.int64), torch.zeros(1, 2, 2, dtype=torch.int64), torch.zeros(1, 2, 2, 3)),
     ValueError, "flow must be"),
    ((torch.zeros(1, 2, 2, dtype=torch.int64), torch.zeros(1, 2, 2, dtype=torch.int64),
      torch.zeros(1, 2, 2, 2, dtype=torch.int64)), TypeError, "flow must be a floating-point"),
    ((torch.full((1, 2, 2), 3), torch.zeros(1, 2, 2, dtype=torch.int64), torch.zeros(1, 2, 2, 2)), ValueError,
     "pred_t holds label 3"),
    ((torch.zeros(1, 2, 2, dtype=torch.int64), torch.zeros(1, 2, 2, dtype=torch.bool), torch.zeros(1, 2, 2, 2)),
     TypeError, "pred_tk must be"),
    ((torch.zeros(1, 2, 2, dtype=torch.int64), torch.zeros(1, 2, 2, dtype=torch.int64), torch.zeros(1, 2, 2, 2),
      torch.zeros(1, 2, 2)), TypeError, "mask must be a bool"),
])
def test_bad_arguments_are_named(args, err, msg):
    with pytest.raises(err, match=msg):
        TemporalConsistency(3).update(*args)
