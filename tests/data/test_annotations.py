"""The synthetic scenes' edges and key-points (annotations.py), checked against independent NumPy:
the sample's own seg and depth, a hand-built scene projected by hand, a sub-sampled ray cast
along the segment between two pixel centres, and a brute-force Gaussian heat-map."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pyamalgam.data import SAMPLE_KEYS, SyntheticScenes
from pyamalgam.data.synthetic import annotations as A
from pyamalgam.data.synthetic.primitives import BOX, Primitive
from pyamalgam.data.synthetic.scenes import _camera_rotation

RES = (48, 64)
TARGETS = ("edges", "keypoints")


@pytest.fixture(scope="module")
def ds():
    return SyntheticScenes("train", size=6, resolution=RES, seed=5, targets=TARGETS)


@pytest.fixture(scope="module")
def samples(ds):
    return [ds[i] for i in range(len(ds))]


def pairs(a):
    """Neighbour pairs of an (H, W) map: (across columns, down rows) as bool maps of differences."""
    return a[:, 1:] != a[:, :-1], a[1:] != a[:-1]


def project(scene, k, x):
    """(u, v, z) of world points x (3, N), by hand: camera coordinates R^T (x - o), then K."""
    xc = scene.camera_rotation.T @ (x - scene.camera_position[:, None])
    return k[0, 0] * xc[0] / xc[2] + k[0, 2], k[1, 1] * xc[1] / xc[2] + k[1, 2], xc[2]


# ------------------------------------------------------------------------------- contract
def test_targets_are_extra_keys_and_leave_the_sample_bit_identical(ds, samples):
    plain = SyntheticScenes("train", size=6, resolution=RES, seed=5)
    assert plain.tasks == ("seg", "depth", "normal") and ds.tasks == plain.tasks + TARGETS
    for i, s in enumerate(samples):
        assert tuple(s) == SAMPLE_KEYS + TARGETS
        p = plain[i]
        assert tuple(p) == SAMPLE_KEYS
        for key in SAMPLE_KEYS:
            assert torch.equal(s[key], p[key]), key
        for key in TARGETS:
            assert s[key].dtype == torch.float32 and s[key].shape == RES
        assert set(s["edges"].unique().tolist()) <= {0.0, 1.0}
        assert 0.0 <= s["keypoints"].min() and s["keypoints"].max() <= 1.0
    assert 0.02 < torch.stack([s["edges"].mean() for s in samples]).mean() < 0.4
    assert all(s["keypoints"].max() > 0.9 for s in samples), "every room shows a corner"


def test_one_target_alone_and_canonical_order():
    one = SyntheticScenes("test", size=1, resolution=(16, 24), targets=["keypoints"])
    both = SyntheticScenes("test", size=1, resolution=(16, 24), targets=("keypoints", "edges"))
    assert one.targets == ("keypoints",) and tuple(one[0]) == SAMPLE_KEYS + ("keypoints",)
    assert both.targets == TARGETS and torch.equal(one[0]["keypoints"], both[0]["keypoints"])
    assert "targets=('edges', 'keypoints')" in repr(both) and "targets" not in repr(SyntheticScenes(size=1))


@pytest.mark.parametrize("targets, exc, msg", [
    ("edges", TypeError, "tuple of names"), (("edge",), ValueError, "distinct names"),
    (("edges", "edges"), ValueError, "distinct names"), (None, TypeError, "targets")])
def test_targets_argument_errors(targets, exc, msg):
    with pytest.raises(exc, match=msg):
        SyntheticScenes(size=1, targets=targets)


def test_dataloader_batches_the_targets(ds):
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["edges"].shape == (3, *RES) and batch["keypoints"].shape == (3, *RES)


def test_cache_keeps_targets_apart_and_round_trips(tmp_path):
    kw = dict(size=2, resolution=(16, 24), seed=1, cache_dir=tmp_path)
    plain, extra = SyntheticScenes(**kw), SyntheticScenes(**kw, targets=TARGETS)
    p0, e0 = plain[0], extra[0]  # the plain cache file exists before the annotated one is asked for
    folders = sorted(f.name for f in tmp_path.iterdir())
    assert folders == ["v1-train-seed1-16x24", "v1-train-seed1-16x24-a1-edges+keypoints"]
    again = SyntheticScenes(**kw, targets=TARGETS)[0]
    assert tuple(again) == SAMPLE_KEYS + TARGETS and all(torch.equal(again[k], e0[k]) for k in again)
    assert tuple(SyntheticScenes(**kw)[0]) == SAMPLE_KEYS and torch.equal(plain[0]["image"], p0["image"])
    path = extra._cache_path(0)
    path.write_bytes(path.read_bytes()[:50])  # torn: rendered again
    assert torch.equal(SyntheticScenes(**kw, targets=TARGETS)[0]["edges"], e0["edges"])


# ------------------------------------------------------------------------------------ edges
def test_surface_classes_are_the_sample_seg(ds, samples):
    for i, s in enumerate(samples):
        label, solid = A.surface_ids(ds.scene(i), RES)
        assert np.array_equal(label, s["seg"].numpy())
        assert solid.min() >= -1 and solid.max() < len(ds.scene(i).primitives)


def test_every_class_change_is_an_edge(samples):
    """Semantic edges, from the sample's own seg: both pixels of every differing pair are marked."""
    for s in samples:
        seg, e = s["seg"].numpy(), s["edges"].numpy() > 0
        across, down = pairs(seg)
        assert e[:, 1:][across].all() and e[:, :-1][across].all()
        assert e[1:][down].all() and e[:-1][down].all()


def test_every_edge_pixel_has_a_boundary_neighbour(ds, samples):
    """No isolated marks: an edge pixel has a neighbour of another class or another solid."""
    for i, s in enumerate(samples):
        label, solid = A.surface_ids(ds.scene(i), RES)
        key = label * 1000 + solid
        across, down = pairs(key)
        has = np.zeros(RES, dtype=bool)
        has[:, 1:] |= across
        has[:, :-1] |= across
        has[1:] |= down
        has[:-1] |= down
        assert np.array_equal(has, s["edges"].numpy() > 0)


def test_large_depth_jumps_are_edges(samples):
    """Occlusions seen in the rendered depth: two valid neighbours more than 35 % apart in depth
    are never one continuous surface at < 85 degrees incidence at this resolution (a step of at
    most tan(85°) / f ~ 0.2 per pixel), so they must be marked."""
    for s in samples:
        z, m, e = s["depth"].numpy().astype(np.float64), s["mask"].numpy(), s["edges"].numpy() > 0
        for sl_a, sl_b in (((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
                           ((slice(1, None), slice(None)), (slice(None, -1), slice(None)))):
            za, zb = z[sl_a], z[sl_b]
            jump = m[sl_a] & m[sl_b] & (np.abs(za - zb) > 0.35 * np.minimum(za, zb))
            assert e[sl_a][jump].all() and e[sl_b][jump].all()


def _segment_depths(scene, k, a, b, n=400):
    """z-depth along the segment between pixel centres a and b (each (row, col)), n + 1 rays cast
    by hand against the room box and every primitive."""
    s = np.linspace(0.0, 1.0, n + 1)
    v = a[0] + 0.5 + s * (b[0] - a[0])
    u = a[1] + 0.5 + s * (b[1] - a[1])
    dc = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)])
    d = scene.camera_rotation @ dc  # t along d is the z-depth
    o = scene.camera_position[:, None]
    with np.errstate(divide="ignore"):
        t = np.where(d > 0, (scene.room[:, None] - o) / d, np.where(d < 0, -o / d, np.inf)).min(0)
    for prim in scene.primitives:
        t = np.minimum(t, prim.intersect(o, d))
    return t


def test_same_class_edges_are_depth_discontinuities(ds):
    """Occlusion edges between two solids of one class: casting 400 rays along the segment
    between the two pixel centres, the depth jumps (>= 5 mm, and 50x the median step; a thin
    solid between the two, a table leg, makes two jumps)."""
    k = ds.intrinsics.numpy()
    checked = 0
    for i in range(len(ds)):
        scene = ds.scene(i)
        label, solid = A.surface_ids(scene, RES)
        for (di, dj) in ((0, 1), (1, 0)):
            la, lb = label[: RES[0] - di, : RES[1] - dj], label[di:, dj:]
            sa, sb = solid[: RES[0] - di, : RES[1] - dj], solid[di:, dj:]
            for r, c in np.argwhere((la == lb) & (sa != sb))[:40]:
                steps = np.sort(np.abs(np.diff(_segment_depths(scene, k, (r, c), (r + di, c + dj)))))
                assert steps[-1] > 0.005 and steps[-1] > 50 * np.median(steps), (i, r, c, steps[-3:])
                checked += 1
    assert checked > 10, "the scenes should show a few same-class occlusions (box on box, table legs)"


def _box_scene(ds):
    """One crate in the lower middle of a camera looking straight into the room (no tilt, no roll)."""
    base = ds.scene(0)
    room = np.array([5.0, 7.0, 3.0])
    box = Primitive("box", BOX, np.array([2.3, 3.5, 0.4]), np.eye(3), np.array([0.3, 0.25, 0.4]),
                    np.full(3, 0.5), np.full(3, 0.4), 0.1)
    return dataclasses.replace(base, room=room, camera_position=np.array([2.9, 0.5, 1.4]),
                               camera_rotation=_camera_rotation(math.radians(6.0), math.radians(12.0), 0.0),
                               primitives=(box,), dropouts=np.zeros((0, 4)))


def _box_faces(box):
    """The 6 faces of an axis-aligned box, each 4 world corners in cyclic order, and outward normals."""
    faces = []
    for axis in range(3):
        a, b = [x for x in range(3) if x != axis]
        for sign in (-1.0, 1.0):
            quad = []
            for sa, sb in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
                off = np.zeros(3)
                off[axis], off[a], off[b] = sign, sa, sb
                quad.append(box.center + box.size * off)
            n = np.zeros(3)
            n[axis] = sign
            faces.append((np.array(quad).T, n))
    return faces


def _inside_convex(u, v, qu, qv):
    """Pixel centres (u, v) inside the convex polygon (qu, qv) (either winding)."""
    cross = [(qu[(j + 1) % 4] - qu[j]) * (v - qv[j]) - (qv[(j + 1) % 4] - qv[j]) * (u - qu[j]) for j in range(4)]
    cross = np.stack(cross)
    return (cross > 0).all(0) | (cross < 0).all(0)


def test_a_box_projected_by_hand(ds):
    """Hand-built scene: the box's pixels are the union of its projected faces (pixel centres in
    convex quads), every box / background pair is an edge, and the visible corners are those of
    its camera-facing faces, plus every room corner in view."""
    res = (60, 80)
    scene = _box_scene(ds)
    k = A.intrinsics_for(res)
    vv, uu = np.meshgrid(np.arange(res[0]) + 0.5, np.arange(res[1]) + 0.5, indexing="ij")
    box = scene.primitives[0]
    inside = np.zeros(res, dtype=bool)
    visible_corners = []
    for quad, n in _box_faces(box):
        qu, qv, _ = project(scene, k, quad)
        inside |= _inside_convex(uu, vv, qu, qv)
        if n @ (quad[:, 0] - scene.camera_position) < 0:  # front-facing: its corners are seen
            visible_corners += [tuple(c) for c in quad.T]
    label, solid = A.surface_ids(scene, res)
    assert 50 < inside.sum() < 0.5 * inside.size
    assert np.array_equal(solid == 0, inside)
    e = A.edge_map(scene, res) > 0
    across, down = pairs(inside)
    assert e[:, 1:][across].all() and e[:, :-1][across].all() and e[1:][down].all() and e[:-1][down].all()

    room = np.array([[x, y, z] for x in (0, 5.0) for y in (0, 7.0) for z in (0, 3.0)]).T
    ru, rv, rz = project(scene, k, room)
    in_view = (rz > 0) & (ru >= 0) & (ru < res[1]) & (rv >= 0) & (rv < res[0])
    assert in_view.sum() >= 2
    for u, v in zip(ru[in_view], rv[in_view]):  # the box covers no room corner
        assert not inside[int(v), int(u)]
    corners = np.unique(np.array(visible_corners), axis=0).T
    cu, cv, _ = project(scene, k, corners)
    expected = np.concatenate([np.stack([ru[in_view], rv[in_view]], 1), np.stack([cu, cv], 1)])
    got = A.keypoints_2d(scene, res)
    assert corners.shape[1] == 7  # seen from above, the front and one side: all but the far bottom corner
    assert len(got) == len(expected)
    np.testing.assert_allclose(np.sort(got, axis=0), np.sort(expected, axis=0), rtol=0, atol=1e-9)


# -------------------------------------------------------------------------------- key-points
def test_keypoint_visibility_agrees_with_the_rendered_depth():
    """Random scenes: a visible in-image corner is not behind the surfaces its 3x3 pixels show (the
    largest rendered depth there is at least 93 % of the corner's: a wall seen at 80 degrees changes depth
    by ~5 % per pixel, and a room corner is the farthest point around it), a hidden one mostly shows something in front of it."""
    ds = SyntheticScenes("train", size=12, resolution=(96, 128), seed=8)
    k = ds.intrinsics.numpy()
    seen = hidden_behind = hidden = 0
    for i in range(len(ds)):
        scene, s = ds.scene(i), ds[i]
        z, m = s["depth"].numpy(), s["mask"].numpy()
        vis = A.keypoints_2d(scene, ds.resolution)
        x = A.keypoints_3d(scene)
        u, v, zc = project(scene, k, x)
        inside = (zc > 0) & (u >= 0) & (u < 128) & (v >= 0) & (v < 96)
        is_vis = np.array([np.isclose(vis, [a, b], rtol=0, atol=1e-9).all(1).any() for a, b in zip(u, v)])
        assert is_vis.sum() == len(vis) and not (is_vis & ~inside).any()
        for a, b, c, flag in zip(u[inside], v[inside], zc[inside], is_vis[inside]):
            r, col = int(b), int(a)
            if not m[r, col] or c > ds.max_depth:  # the sensor's range: the depth map says nothing beyond
                continue
            if flag:  # the 3x3 pixels around: an occluder's silhouette may pass between corner and centre
                near = z[max(r - 1, 0): r + 2, max(col - 1, 0): col + 2][m[max(r - 1, 0): r + 2, max(col - 1, 0): col + 2]]
                assert near.max() > 0.93 * c, (i, a, b, c, near)
                seen += 1
            else:
                hidden += 1
                hidden_behind += z[r, col] < c - 0.01
    assert seen > 50 and hidden > 20 and hidden_behind > 0.8 * hidden


def test_heatmap_is_the_max_of_gaussians():
    rng = np.random.default_rng(0)
    for res in ((1, 1), (7, 5), (31, 17)):
        pts = np.stack([rng.uniform(-3, res[1] + 3, 9), rng.uniform(-3, res[0] + 3, 9)], 1)
        for sigma in (0.7, A.KEYPOINT_SIGMA):
            got = A.keypoint_heatmap(pts, res, sigma)
            v, u = np.meshgrid(np.arange(res[0]) + 0.5, np.arange(res[1]) + 0.5, indexing="ij")
            d2 = (u[None] - pts[:, 0, None, None]) ** 2 + (v[None] - pts[:, 1, None, None]) ** 2
            full = np.exp(-d2 / (2 * sigma**2)).max(0)
            assert got.dtype == np.float32 and got.shape == res
            np.testing.assert_allclose(got, full, rtol=0, atol=4e-5)
    np.testing.assert_array_equal(A.keypoint_heatmap(np.zeros((0, 2)), (3, 4)), np.zeros((3, 4), np.float32))
    assert A.keypoint_heatmap(np.array([[2.5, 1.5]]), (3, 5))[1, 2] == 1.0  # a pixel centre
    with pytest.raises(ValueError, match="sigma"):
        A.keypoint_heatmap(np.zeros((1, 2)), (3, 4), sigma=0.0)


def test_sample_heatmap_is_built_from_the_visible_corners(ds, samples):
    for i, s in enumerate(samples):
        pts = A.keypoints_2d(ds.scene(i), RES)
        np.testing.assert_array_equal(s["keypoints"].numpy(), A.keypoint_heatmap(pts, RES))
        assert len(pts) >= 1


def test_annotate_rejects_unknown_targets(ds):
    with pytest.raises(ValueError, match="unknown target"):
        A.annotate(ds.scene(0), RES, ("flow",))
