"""SyntheticClips and data.synthetic.motion: the clip contract, determinism, exact flow and visibility."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from pyamalgam.data import SyntheticClips, SyntheticScenes
from pyamalgam.data.synthetic import motion
from pyamalgam.data.synthetic.motion import Trajectory, draw_trajectory, exact_flow
from pyamalgam.data.synthetic.primitives import SPHERE, Primitive, _rot_z
from pyamalgam.data.synthetic.rendering import intrinsics_for, render

RES = (20, 28)


@pytest.fixture(scope="module")
def clip():
    return SyntheticClips("train", size=4, frames=3, resolution=RES)[1]


def test_clip_keys_shapes_and_dtypes(clip):
    t, (h, w) = 3, RES
    want = {"image": ((t, 3, h, w), torch.float32), "seg": ((t, h, w), torch.int64),
            "depth": ((t, h, w), torch.float32), "normal": ((t, 3, h, w), torch.float32),
            "mask": ((t, h, w), torch.bool), "flow": ((t - 1, 2, h, w), torch.float32),
            "flow_valid": ((t - 1, h, w), torch.bool)}
    assert set(clip) == set(want)
    for key, (shape, dtype) in want.items():
        assert tuple(clip[key].shape) == shape and clip[key].dtype == dtype, key
    assert torch.isfinite(clip["flow"]).all()
    assert clip["seg"].max() < SyntheticClips.num_classes and clip["image"].min() >= 0 and clip["image"].max() <= 1


def test_frames_are_the_renderer_output_of_the_posed_scene(clip):
    ds = SyntheticClips("train", size=4, frames=3, resolution=RES)
    for t, scene in enumerate(ds.scenes(1)):
        still = render(scene, RES, ds._streams(1)[2][t])
        for key in ("image", "seg", "depth", "normal", "mask"):
            assert torch.equal(clip[key][t], still[key]), (t, key)


def test_deterministic_and_a_longer_clip_extends_a_shorter_one(clip):
    again = SyntheticClips("train", size=4, frames=3, resolution=RES)[1]
    assert all(torch.equal(clip[k], again[k]) for k in clip)
    short = SyntheticClips("train", size=4, frames=2, resolution=RES)[1]
    for k in short:
        n = short[k].shape[0]
        assert torch.equal(short[k], clip[k][:n]), k
    other = SyntheticClips("train", size=4, frames=3, resolution=RES, seed=1)[1]
    assert not torch.equal(other["image"], clip["image"])


def test_the_camera_moves_and_the_still_data_set_is_untouched():
    ds = SyntheticClips("test", size=3, frames=4, resolution=RES)
    poses = ds.scenes(0)
    assert all(np.array_equal(p.room, poses[0].room) and p.primitives is poses[0].primitives for p in poses)
    assert not np.allclose(poses[0].camera_rotation, poses[3].camera_rotation)
    # the clips have their own seed streams: clip 0 is not still sample 0
    assert not np.array_equal(SyntheticScenes("test", size=1).scene(0).room, poses[0].room)


def test_flow_between_any_two_frames(clip):
    ds = SyntheticClips("train", size=4, frames=3, resolution=RES)
    flow, valid = ds.flow(1, 0, 1)
    assert torch.equal(flow, clip["flow"][0]) and torch.equal(valid, clip["flow_valid"][0])
    flow, valid = ds.flow(1, 2, 2)  # a frame to itself: zero flow, every point visible
    assert flow.abs().max() < 1e-4 and valid.all()
    f02, _ = ds.flow(1, 0, 2)
    assert f02.abs().mean() > clip["flow"][0].abs().mean()


def test_trajectories_stay_clear_of_walls_and_furniture():
    ds = SyntheticClips("unlabelled", size=12, frames=16, resolution=RES)
    for i in range(12):
        scene, traj = ds.trajectory(i)
        assert np.linalg.norm(traj.velocity) <= motion.SPEED[1] * math.hypot(1, 1) + abs(motion.CLIMB[1])
        for t in range(16):
            c = traj.pose(scene, t).camera_position
            assert (c >= motion.ROOM_MARGIN).all() and (c <= scene.room - motion.ROOM_MARGIN).all()
            for p in scene.primitives:
                assert np.linalg.norm(c - p.center) >= p.bound_radius + motion.OBJECT_MARGIN


def test_a_trajectory_that_would_hit_a_wall_is_shortened():
    scene = SyntheticScenes("train", size=1).scene(0)
    rng = np.random.default_rng(0)
    traj = draw_trajectory(rng, scene, 100000)  # no speed keeps 10^5 frames in the room
    assert np.array_equal(traj.velocity, np.zeros(3))


# -------------------------------------------------------------- exact flow against closed forms
def _geometry(scene, res):
    g = {}
    render(scene, res, np.random.default_rng(0), geometry=g)
    return g


def test_sideways_translation_gives_disparity_flow():
    """Camera moved by b along its own x axis: flow = (-f b / z, 0), z the depth at t."""
    res = (18, 26)
    scene = SyntheticScenes("train", size=1).scene(0)
    k = intrinsics_for(res)
    b = 0.05
    moved = dataclasses.replace(scene, camera_position=scene.camera_position + b * scene.camera_rotation[:, 0])
    g = _geometry(scene, res)
    flow, valid = exact_flow(g, moved, k, res)
    z = g["t"].reshape(res)
    np.testing.assert_allclose(flow[0], -k[0, 0] * b / z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flow[1], 0.0, atol=1e-5)
    assert valid.mean() > 0.8


def test_pure_rotation_gives_the_homography_flow():
    """A camera turning about its centre: flow = K R' ^T R K^-1 applied to the pixel centres, no depth."""
    res = (15, 22)
    scene = SyntheticScenes("train", size=2).scene(1)
    k = intrinsics_for(res)
    traj = Trajectory(velocity=np.zeros(3), yaw_rate=math.radians(2.0), pitch_rate=math.radians(-1.0))
    turned = traj.pose(scene, 1)
    flow, valid = exact_flow(_geometry(scene, res), turned, k, res)
    h, w = res
    us, vs = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    hom = k @ turned.camera_rotation.T @ scene.camera_rotation @ np.linalg.inv(k)
    p = np.einsum("ij,jhw->ihw", hom, np.stack([us, vs, np.ones_like(us)]))
    np.testing.assert_allclose(flow[0], p[0] / p[2] - us, atol=1e-4)
    np.testing.assert_allclose(flow[1], p[1] / p[2] - vs, atol=1e-4)
    # the yaw turns the view: the columns on one side leave it
    assert not valid.all() and valid.mean() > 0.7


def test_occlusion_by_a_ball_the_camera_moves_past():
    """A ball in front of a wall; the camera slides sideways: wall points behind the ball in the
    new view are invalid, visible ones valid, and the ball itself stays valid."""
    res = (24, 32)
    scene = SyntheticScenes("train", size=1).scene(0)
    fwd, right = scene.camera_rotation[:, 2], scene.camera_rotation[:, 0]
    ball = Primitive("sphere", SPHERE, scene.camera_position + 1.5 * fwd, _rot_z(0.0), np.full(3, 0.3),
                     np.ones(3), np.ones(3), 0.0)
    scene = dataclasses.replace(scene, primitives=(ball,))
    moved = dataclasses.replace(scene, camera_position=scene.camera_position + 0.4 * right)
    g, g1 = _geometry(scene, res), _geometry(moved, res)
    k = intrinsics_for(res)
    flow, valid = exact_flow(g, moved, k, res)
    seg = g["label"].reshape(res)
    # the ball hides nothing of itself: its points are valid exactly where they face the new camera
    facing = np.einsum("in,in->n", g["normal"], moved.camera_position[:, None] - g["point"]).reshape(res) > 0
    on_ball = seg == SPHERE
    assert np.array_equal(valid[on_ball], facing[on_ball]) and facing[on_ball].mean() > 0.7
    # independent z-buffer check: the depth frame t+1 sees at the target vs the depth of X there
    x = g["point"]
    z1 = (moved.camera_rotation.T @ (x - moved.camera_position[:, None]))[2].reshape(res)
    h, w = res
    tu = np.rint(np.arange(w)[None, :] + flow[0]).astype(int)
    tv = np.rint(np.arange(h)[:, None] + flow[1]).astype(int)
    inview = (tu >= 0) & (tu < w) & (tv >= 0) & (tv < h)
    seen = np.full(res, np.nan)
    seen[inview] = g1["t"].reshape(res)[tv[inview], tu[inview]]
    hidden = inview & ~valid & ~on_ball
    assert hidden.sum() > 10  # the ball hides part of the room
    assert np.mean(seen[hidden] < 0.9 * z1[hidden]) > 0.9  # something much closer is in front
    shown = inview & valid & (seg != SPHERE)
    assert np.mean(np.abs(seen[shown] - z1[shown]) < 0.05 * z1[shown]) > 0.9


def test_back_facing_points_are_invalid():
    res = (12, 16)
    scene = SyntheticScenes("train", size=1).scene(0)
    g = _geometry(scene, res)
    # put the target camera behind the floor (below z = 0): every floor point faces away from it
    below = dataclasses.replace(scene, camera_position=scene.camera_position * np.array([1, 1, -1]))
    _, valid = exact_flow(g, below, intrinsics_for(res), res)
    assert not valid[g["label"].reshape(res) == 0].any()


@pytest.mark.parametrize("kw, err, msg", [
    ({"frames": 1}, ValueError, "frames must be >= 2"),
    ({"frames": 2.5}, TypeError, "frames must be an int"),
    ({"split": "val"}, ValueError, "split must be one of"),
    ({"size": -1}, ValueError, "size must be >= 0"),
    ({"resolution": (0, 4)}, ValueError, "resolution"),
    ({"seed": -1}, ValueError, "seed must be >= 0"),
    ({"transform": 3}, TypeError, "transform must be callable"),
])
def test_bad_arguments_are_named(kw, err, msg):
    with pytest.raises(err, match=msg):
        SyntheticClips(**kw)


def test_indexing_and_transform():
    ds = SyntheticClips("test", size=2, frames=2, resolution=(8, 10), transform=lambda c: {"n": c["flow"].shape[0]})
    assert len(ds) == 2 and ds[-1] == {"n": 1} and "frames=2" in repr(ds)
    with pytest.raises(IndexError, match="out of range"):
        ds[2]
    with pytest.raises(IndexError, match="out of range"):
        ds.flow(0, 0, 5)
    assert ds.intrinsics.shape == (3, 3) and SyntheticClips.__len__(SyntheticClips("unlabeled", size=0)) == 0
