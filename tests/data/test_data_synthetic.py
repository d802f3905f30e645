"""SyntheticScenes: sample contract, determinism, split disjointness, exact ground truth, caching."""
import pickle

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch.utils.data import DataLoader

from pyamalgam.data import SAMPLE_KEYS, SyntheticScenes
from pyamalgam.data import synthetic as S
from pyamalgam.data.synthetic import rendering

RES = (48, 64)


@pytest.fixture(scope="module")
def ds():
    return SyntheticScenes("train", size=12, resolution=RES, seed=3)


@pytest.fixture(scope="module")
def samples(ds):
    return [ds[i] for i in range(len(ds))]


def backproject(ds, sample):
    """Camera-frame rays (z = 1) and points, (3, H, W) float64 NumPy:
    X = depth * K^-1 [u + 0.5, v + 0.5, 1]. (NumPy: tiny ops are much cheaper than torch's on a
    loaded machine.)"""
    h, w = ds.resolution
    k = ds.intrinsics.numpy()
    v, u = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    rays = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)])
    return rays, rays * sample["depth"].numpy().astype(np.float64)


# ------------------------------------------------------------------------------- contract
def test_sample_contract(ds, samples):
    h, w = RES
    assert ds.num_classes == len(ds.class_names) >= 6
    assert ds.ignore_index == 255 and ds.max_depth > 0
    for s in samples:
        assert tuple(s) == SAMPLE_KEYS
        assert s["image"].dtype == torch.float32 and s["image"].shape == (3, h, w)
        assert s["seg"].dtype == torch.int64 and s["seg"].shape == (h, w)
        assert s["depth"].dtype == torch.float32 and s["depth"].shape == (h, w)
        assert s["normal"].dtype == torch.float32 and s["normal"].shape == (3, h, w)
        assert s["mask"].dtype == torch.bool and s["mask"].shape == (h, w)
        assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
        assert s["image"].std() > 0.02  # not a flat image
        assert 0 <= s["seg"].min() and s["seg"].max() < ds.num_classes
        m = s["mask"]
        assert torch.equal(m, s["depth"] > 0)
        assert (s["depth"][m] <= ds.max_depth).all()
        assert (s["normal"][:, ~m] == 0).all()
        norms = s["normal"][:, m].norm(dim=0)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-6, rtol=0)


def test_masks_have_realistic_holes(samples):
    frac = torch.stack([s["mask"].float().mean() for s in samples])
    assert (frac < 1).any(), "no invalid pixels at all"
    assert frac.mean() > 0.6, "most pixels should be valid"


def test_classes_all_appear(ds):
    small = SyntheticScenes("train", size=24, resolution=(24, 32), seed=3)
    seen = torch.cat([small[i]["seg"].flatten() for i in range(len(small))]).unique()
    assert len(seen) >= 6, f"only classes {seen.tolist()} rendered"


def test_image_carries_class_information(samples):
    """Mean colours of floor and wall differ: RGB is informative about the class."""
    floor = torch.cat([s["image"][:, s["seg"] == S.FLOOR] for s in samples], 1).mean(1)
    wall = torch.cat([s["image"][:, s["seg"] == S.WALL] for s in samples], 1).mean(1)
    assert (floor - wall).abs().max() > 0.05


# --------------------------------------------------------------------------- determinism
def test_deterministic_bit_identical(ds, samples):
    again = SyntheticScenes("train", size=12, resolution=RES, seed=3)
    for i in (0, 5, 11):
        for k in SAMPLE_KEYS:
            assert torch.equal(again[i][k], samples[i][k])
            assert torch.equal(ds[i][k], samples[i][k])
    assert torch.equal(ds[-1]["image"], samples[11]["image"])
    assert torch.equal(ds[np.int64(2)]["image"], samples[2]["image"])


def test_seed_and_split_give_different_scenes(samples):
    other_seed = SyntheticScenes("train", size=12, resolution=RES, seed=4)[0]
    assert not torch.equal(other_seed["image"], samples[0]["image"])
    rooms = {}
    for split in ("train", "unlabelled", "test"):
        d = SyntheticScenes(split, size=20, resolution=(8, 8), seed=3)
        rooms[split] = {tuple(d.scene(i).room.round(9)) for i in range(20)}
        assert len(rooms[split]) == 20
    assert not rooms["train"] & rooms["unlabelled"]
    assert not rooms["train"] & rooms["test"]
    assert not rooms["unlabelled"] & rooms["test"]
    assert SyntheticScenes("unlabeled", size=1).split == "unlabelled"


def test_scene_independent_of_resolution():
    a = SyntheticScenes("test", size=3, resolution=(10, 10)).scene(2)
    b = SyntheticScenes("test", size=3, resolution=(99, 7)).scene(2)
    np.testing.assert_array_equal(a.camera_rotation, b.camera_rotation)
    assert len(a.primitives) == len(b.primitives)


def test_culling_is_exact(monkeypatch):
    ds = SyntheticScenes("train", size=4, resolution=(30, 40), seed=7)
    fast = [ds[i] for i in range(4)]
    monkeypatch.setattr(rendering, "_CULLING", False)
    for i in range(4):
        slow = ds[i]
        for k in SAMPLE_KEYS:
            assert torch.equal(slow[k], fast[i][k]), (i, k)


# ----------------------------------------------------------------------- exact geometry
def test_floor_depth_and_normal_are_analytic(ds, samples):
    k_inv = np.linalg.inv(ds.intrinsics.numpy())
    checked = 0
    for i, s in enumerate(samples):
        scene = ds.scene(i)
        rot = scene.camera_rotation
        cam_z = scene.camera_position[2]
        sel = ((s["seg"] == S.FLOOR) & s["mask"]).numpy()
        v, u = np.nonzero(sel)
        pix = np.stack([u + 0.5, v + 0.5, np.ones(len(u))])
        d_world = rot @ (k_inv @ pix)  # camera ray with z = 1, in world coordinates
        expected = -cam_z / d_world[2]  # the ray meets z = 0 at t = z-depth
        np.testing.assert_allclose(s["depth"].numpy()[sel], expected, rtol=1e-6, atol=1e-6)
        up_cam = rot.T @ np.array([0.0, 0.0, 1.0])
        np.testing.assert_allclose(s["normal"].numpy()[:, sel], np.repeat(up_cam[:, None], len(u), 1),
                                   atol=1e-6, rtol=0)
        checked += len(u)
    assert checked > 1000


def test_normals_face_the_camera(ds, samples):
    for s in samples:
        m = s["mask"].numpy()
        _, pts = backproject(ds, s)
        facing = (s["normal"].numpy() * pts).sum(0)[m]
        assert (facing < 0).all()


def test_walls_backproject_to_planes_with_their_normal(ds, samples):
    planes = 0
    for s in samples:
        _, pts = backproject(ds, s)
        sel = ((s["seg"] == S.WALL) & s["mask"]).numpy()
        normals = s["normal"].numpy()[:, sel].astype(np.float64)
        x = pts[:, sel]
        for n in np.unique(normals.round(3), axis=1).T:  # one normal per wall
            g = np.abs(normals - n[:, None]).max(0) < 2e-3
            if g.sum() < 30:
                continue
            xg = x[:, g]
            # the points lie on a plane (smallest singular value ~ 0) whose normal is n
            sv = np.linalg.svd(xg - xg.mean(1, keepdims=True), compute_uv=False)
            assert sv[-1] / sv[0] < 1e-5
            offsets = (normals[:, g] * xg).sum(0)  # n . X is constant on the plane
            assert offsets.std() < 1e-4
            planes += 1
    assert planes >= len(samples)


def test_spheres_are_exact(ds, samples):
    checked = 0
    for i, s in enumerate(samples):
        scene = ds.scene(i)
        spheres = [p for p in scene.primitives if p.kind == "sphere"]
        sel = ((s["seg"] == S.SPHERE) & s["mask"]).numpy()
        if not spheres or not sel.any():
            continue
        _, pts = backproject(ds, s)
        rot = scene.camera_rotation
        world = rot @ pts[:, sel] + scene.camera_position[:, None]
        centres = np.stack([p.center for p in spheres], 1)
        radii = np.array([p.size[0] for p in spheres])
        dist = np.linalg.norm(world[:, :, None] - centres[:, None, :], axis=0) - radii  # (N, n_spheres)
        best = np.abs(dist).argmin(1)
        assert np.abs(dist).min(1).max() < 1e-4  # every sphere pixel is on a sphere surface
        expected_n = rot.T @ ((world - centres[:, best]) / radii[best])
        np.testing.assert_allclose(s["normal"].numpy()[:, sel], expected_n, atol=1e-4, rtol=0)
        checked += int(sel.sum())
    assert checked > 20


def test_boxes_and_tables_are_exact(ds, samples):
    """Box/table pixels lie on a face of some box primitive and carry that face's outward normal."""
    checked = 0
    for i, s in enumerate(samples):
        scene = ds.scene(i)
        boxes = [p for p in scene.primitives if p.kind == "box"]
        sel = ((s["seg"] == S.BOX) | (s["seg"] == S.TABLE)) & s["mask"]
        if not boxes or not sel.any():
            continue
        _, pts = backproject(ds, s)
        rot = scene.camera_rotation
        sel = sel.numpy()
        world = rot @ pts[:, sel] + scene.camera_position[:, None]
        cols = np.arange(world.shape[1])
        best_res = np.full(world.shape[1], np.inf)
        best_n = np.zeros_like(world)
        for b in boxes:
            local = b.rotation.T @ (world - b.center[:, None])
            excess = np.abs(local) - b.size[:, None]  # 0 on a face, < 0 inside its extent
            axis = excess.argmax(0)
            res = excess[axis, cols]
            n_local = np.zeros_like(local)
            n_local[axis, cols] = np.sign(local[axis, cols])
            closer = np.abs(res) < np.abs(best_res)
            best_res = np.where(closer, res, best_res)
            best_n[:, closer] = (b.rotation @ n_local)[:, closer]
        assert np.abs(best_res).max() < 1e-4
        np.testing.assert_allclose(s["normal"].numpy()[:, sel], rot.T @ best_n, atol=1e-5, rtol=0)
        checked += int(sel.sum())
    assert checked > 100


def test_cylinders_are_exact():
    """Cylinder pixels lie on the side (normal radial) or a cap (normal along the axis)."""
    ds = SyntheticScenes("test", size=16, resolution=(36, 48), seed=11)
    checked = {"side": 0, "cap": 0}
    for i in range(len(ds)):
        s, scene = ds[i], ds.scene(i)
        cyls = [p for p in scene.primitives if p.kind == "cylinder"]
        sel = ((s["seg"] == S.CYLINDER) & s["mask"]).numpy()
        if not cyls or not sel.any():
            continue
        _, pts = backproject(ds, s)
        rot = scene.camera_rotation
        world = rot @ pts[:, sel] + scene.camera_position[:, None]
        best_res = np.full(world.shape[1], np.inf)
        best_n = np.zeros_like(world)
        best_cap = np.zeros(world.shape[1], dtype=bool)
        for c in cyls:
            r, hh = c.size[0], c.size[2]
            local = c.rotation.T @ (world - c.center[:, None])
            rho = np.hypot(local[0], local[1])
            side_res = np.where(np.abs(local[2]) <= hh + 1e-6, np.abs(rho - r), np.inf)
            cap_res = np.where(rho <= r + 1e-6, np.abs(np.abs(local[2]) - hh), np.inf)
            cap = cap_res < side_res
            res = np.minimum(side_res, cap_res)
            n_local = np.where(cap, np.stack([0 * rho, 0 * rho, np.sign(local[2])]),
                               np.stack([local[0] / rho, local[1] / rho, 0 * rho]))
            closer = res < best_res
            best_res = np.where(closer, res, best_res)
            best_cap = np.where(closer, cap, best_cap)
            best_n[:, closer] = (c.rotation @ n_local)[:, closer]
        assert best_res.max() < 1e-4
        np.testing.assert_allclose(s["normal"].numpy()[:, sel], rot.T @ best_n, atol=1e-4, rtol=0)
        checked["cap"] += int(best_cap.sum())
        checked["side"] += int((~best_cap).sum())
    assert checked["side"] > 50 and checked["cap"] > 5, checked


# ----------------------------------------------------------------------------- indexing/args
def test_len_and_index_errors(ds):
    assert len(ds) == 12
    with pytest.raises(IndexError, match=r"index 12 is out of range for a data set of size 12"):
        ds[12]
    with pytest.raises(IndexError, match="out of range"):
        ds[-13]
    with pytest.raises(TypeError, match="indices must be integers"):
        ds[1.5]
    with pytest.raises(IndexError, match="empty"):
        SyntheticScenes(size=0)[0]


@pytest.mark.parametrize("kwargs, exc, msg", [
    ({"split": "validation"}, ValueError, r"split must be one of 'train', 'unlabelled', 'test'"),
    ({"size": -1}, ValueError, r"size must be >= 0, got -1"),
    ({"size": 2.5}, TypeError, r"size must be an int"),
    ({"resolution": (0, 5)}, ValueError, r"resolution must be a pair \(H, W\) of positive ints"),
    ({"resolution": (4, 5, 6)}, TypeError, r"resolution must be a pair"),
    ({"seed": -1}, ValueError, r"seed must be >= 0"),
    ({"transform": 3}, TypeError, r"transform must be callable"),
])
def test_argument_errors(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        SyntheticScenes(**kwargs)


def test_defaults_and_square_resolution():
    d = SyntheticScenes("unlabelled", resolution=16)
    assert len(d) == S.DEFAULT_SIZES["unlabelled"] and d.resolution == (16, 16)
    assert SyntheticScenes(resolution=np.int64(16)).resolution == (16, 16)
    assert SyntheticScenes(resolution=torch.Size([8, 12])).resolution == (8, 12)
    with pytest.raises(TypeError, match="resolution must be a pair"):
        SyntheticScenes(resolution=True)
    assert d[0]["image"].shape == (3, 16, 16)
    assert "unlabelled" in repr(d)


def test_transform_is_applied():
    d = SyntheticScenes(size=2, resolution=(8, 8), transform=lambda s: {**s, "image": s["image"] * 0})
    assert d[0]["image"].abs().sum() == 0


# --------------------------------------------------------------------------- loader / cache
def test_dataloader_batches_and_worker_determinism():
    d = SyntheticScenes("test", size=6, resolution=(16, 20), seed=1)
    batches = list(DataLoader(d, batch_size=4, num_workers=0))
    assert [b["image"].shape for b in batches] == [(4, 3, 16, 20), (2, 3, 16, 20)]
    assert batches[0]["seg"].dtype == torch.int64 and batches[0]["mask"].dtype == torch.bool
    workers = list(DataLoader(d, batch_size=4, num_workers=2))
    for a, b in zip(batches, workers):
        for k in SAMPLE_KEYS:
            assert torch.equal(a[k], b[k])


def _cache_files(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


def _assert_same_sample(a, b):
    assert tuple(a) == tuple(b) == SAMPLE_KEYS
    for k in SAMPLE_KEYS:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_cache_dir_roundtrip_atomic_and_recovers(tmp_path):
    d = SyntheticScenes("train", size=3, resolution=(12, 16), cache_dir=tmp_path / "cache")
    fresh = SyntheticScenes("train", size=3, resolution=(12, 16))[1]
    first = d[1]
    files = _cache_files(tmp_path / "cache")
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    assert "12x16" in str(files[0]) and "train" in str(files[0])
    cached = d[1]
    _assert_same_sample(first, fresh)
    _assert_same_sample(cached, fresh)
    # a cached file is read, not re-rendered
    files[0].write_bytes(safetensors_bytes({**fresh, "image": torch.zeros_like(fresh["image"])},
                                           metadata={"format": "pyamalgam-synthetic-sample"}))
    assert d[1]["image"].abs().sum() == 0
    # a corrupt file is re-rendered and replaced
    files[0].write_bytes(b"not a safetensors file")
    assert torch.equal(d[1]["image"], fresh["image"])
    with safe_open(str(files[0]), framework="pt") as f:
        assert torch.equal(f.get_tensor("image"), fresh["image"])
    assert not [p for p in (tmp_path / "cache").rglob("*.tmp")]


def test_cache_files_are_safetensors_and_nothing_is_pickled(tmp_path, monkeypatch):
    def no_pickle(*args, **kwargs):
        raise AssertionError("the sample cache must not pickle or unpickle")

    for name in ("save", "load"):
        monkeypatch.setattr(torch, name, no_pickle)
    for name in ("dump", "dumps", "load", "loads"):
        monkeypatch.setattr(pickle, name, no_pickle)
    d = SyntheticScenes("test", size=2, resolution=(10, 14), seed=5, cache_dir=tmp_path)
    written = d[0]
    (path,) = _cache_files(tmp_path)
    data = path.read_bytes()
    assert not data.startswith(b"\x80") and not data.startswith(b"PK")  # neither a pickle nor torch's zip
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(SAMPLE_KEYS)
        assert f.metadata()["format"] == "pyamalgam-synthetic-sample"
    _assert_same_sample(d[0], written)  # read back through safetensors only


def test_cached_and_uncached_samples_are_identical(tmp_path):
    kwargs = {"split": "unlabelled", "size": 6, "resolution": (20, 28), "seed": 9}
    plain = SyntheticScenes(**kwargs)
    cached = SyntheticScenes(**kwargs, cache_dir=tmp_path)
    for i in range(6):
        _assert_same_sample(cached[i], plain[i])  # rendered, then written
    assert len(_cache_files(tmp_path)) == 6
    again = SyntheticScenes(**kwargs, cache_dir=tmp_path)  # a new data set on the same cache
    for i in range(6):
        _assert_same_sample(again[i], plain[i])  # read from the files
    # another resolution or seed gets its own files
    SyntheticScenes(**{**kwargs, "resolution": (10, 14)}, cache_dir=tmp_path)[0]
    SyntheticScenes(**{**kwargs, "seed": 10}, cache_dir=tmp_path)[0]
    assert len(_cache_files(tmp_path)) == 8


@pytest.mark.parametrize("damage", ["torn", "empty", "header_only", "garbage", "foreign", "wrong_shape", "pickle"])
def test_a_torn_or_foreign_cache_file_is_rendered_again(tmp_path, damage):
    d = SyntheticScenes("train", size=2, resolution=(12, 16), seed=2, cache_dir=tmp_path)
    fresh = SyntheticScenes("train", size=2, resolution=(12, 16), seed=2)[1]
    d[1]
    (path,) = _cache_files(tmp_path)
    good = path.read_bytes()
    bad = {
        "torn": good[: len(good) // 2],
        "empty": b"",
        "header_only": good[:8 + int.from_bytes(good[:8], "little")],
        "garbage": b"\x00" * 64,
        "foreign": safetensors_bytes({k: v for k, v in fresh.items()}, metadata={"format": "something-else"}),
        "wrong_shape": safetensors_bytes({**fresh, "seg": fresh["seg"][:-1]},
                                         metadata={"format": "pyamalgam-synthetic-sample"}),
        "pickle": pickle.dumps({k: v.numpy() for k, v in fresh.items()}),
    }[damage]
    path.write_bytes(bad)
    _assert_same_sample(d[1], fresh)
    with safe_open(str(path), framework="pt") as f:  # and the file was replaced by a good one
        _assert_same_sample({k: f.get_tensor(k) for k in SAMPLE_KEYS}, fresh)
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_cache_dir_must_be_a_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        SyntheticScenes(cache_dir=f)
    with pytest.raises(TypeError, match="cache_dir must be a path"):
        SyntheticScenes(cache_dir=3)
