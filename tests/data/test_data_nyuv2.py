"""NYUv2 loader on tiny .npy files written in tmp_path (MTAN layout)."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pyamalgam.data import SAMPLE_KEYS, NYUv2

H, W = 6, 8


def write_sample(base, i, rng, label=None, depth=None, image=None, normal=None):
    for folder in ("image", "label", "depth", "normal"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    if image is None:
        image = rng.random((H, W, 3))
    if label is None:
        label = rng.integers(-1, 13, (H, W)).astype(np.float64)
    if depth is None:
        depth = rng.uniform(0.5, 9.0, (H, W, 1)).astype(np.float32)
        depth[0, :3] = 0.0  # missing
    if normal is None:
        normal = rng.normal(size=(H, W, 3)).astype(np.float32)
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    np.save(base / "image" / f"{i}.npy", image)
    np.save(base / "label" / f"{i}.npy", label)
    np.save(base / "depth" / f"{i}.npy", depth)
    np.save(base / "normal" / f"{i}.npy", normal)
    return image, label, depth, normal


@pytest.fixture
def root(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            write_sample(tmp_path / split, i, rng)
    return tmp_path


def test_reads_and_maps_values(root):
    ds = NYUv2(root, "train")
    assert len(ds) == 3 and ds.num_classes == 13 and len(ds.class_names) == 13
    assert ds.ignore_index == 255 and ds.max_depth == 10.0
    image = np.load(root / "train/image/1.npy")
    label = np.load(root / "train/label/1.npy")
    depth = np.load(root / "train/depth/1.npy")[..., 0]
    normal = np.load(root / "train/normal/1.npy")
    s = ds[1]
    assert tuple(s) == SAMPLE_KEYS
    assert s["image"].dtype == torch.float32 and s["image"].shape == (3, H, W)
    np.testing.assert_allclose(s["image"].numpy(), np.moveaxis(image, -1, 0), rtol=1e-6)
    expected_seg = np.where(label == -1, 255, label).astype(np.int64)
    assert s["seg"].dtype == torch.int64
    np.testing.assert_array_equal(s["seg"].numpy(), expected_seg)
    assert (s["seg"] == 255).any()
    np.testing.assert_array_equal(s["mask"].numpy(), depth > 0)
    assert not s["mask"][0, :3].any() and s["mask"][1].all()
    np.testing.assert_array_equal(s["depth"].numpy(), depth)
    np.testing.assert_allclose(s["normal"].numpy(), np.where(depth > 0, np.moveaxis(normal, -1, 0), 0), atol=1e-6)
    assert len(NYUv2(root, "val")) == 2 and len(NYUv2(root, "test")) == 2


def test_normal_renormalised_and_signs(tmp_path):
    rng = np.random.default_rng(1)
    normal = np.zeros((H, W, 3), np.float32)
    normal[..., 2] = 2.0
    normal[2, 2] = 0.0  # zero normal -> invalid pixel even with depth
    write_sample(tmp_path / "train", 0, rng, normal=normal, depth=np.ones((H, W, 1), np.float32))
    s = NYUv2(tmp_path)[0]
    assert not s["mask"][2, 2] and s["mask"].sum() == H * W - 1
    assert s["depth"][2, 2] == 0
    assert torch.equal(s["normal"][2, s["mask"]], torch.ones(H * W - 1))
    flipped = NYUv2(tmp_path, normal_signs=(1, 1, -1))[0]
    assert torch.equal(flipped["normal"][2, s["mask"]], -torch.ones(H * W - 1))


def test_uint8_image_and_resolution(tmp_path):
    rng = np.random.default_rng(2)
    write_sample(tmp_path / "train", 0, rng, image=np.full((H, W, 3), 255, np.uint8))
    s = NYUv2(tmp_path, resolution=(3, 4))[0]
    assert s["image"].shape == (3, 3, 4) and torch.allclose(s["image"], torch.ones(3, 3, 4))
    assert s["seg"].shape == (3, 4) and s["seg"].dtype == torch.int64
    assert s["mask"].dtype == torch.bool and torch.equal(s["mask"], s["depth"] > 0)


def test_dataloader(root):
    batch = next(iter(DataLoader(NYUv2(root), batch_size=3)))
    assert batch["image"].shape == (3, 3, H, W) and batch["mask"].shape == (3, H, W)


def test_wrong_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="NYUv2 root .* does not exist"):
        NYUv2(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"split folder .*train"):
        NYUv2(tmp_path)
    with pytest.raises(ValueError, match="split must be one of 'train', 'val'"):
        NYUv2(tmp_path, split="training")
    with pytest.raises(TypeError, match="root must be a path"):
        NYUv2(None)


def test_missing_folder_and_files(root):
    (root / "val" / "normal" / "1.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) have no normal file, e.g. .*normal/1\.npy"):
        NYUv2(root, "val")
    (root / "train" / "image" / "2.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"label file\(s\) have no image, e.g. .*image/2\.npy"):
        NYUv2(root, "train")
    import shutil
    shutil.rmtree(root / "val" / "depth")
    with pytest.raises(FileNotFoundError, match=r"folder .*val/depth.* not found"):
        NYUv2(root, "val")


def test_gap_in_numbering(tmp_path):
    rng = np.random.default_rng(3)
    write_sample(tmp_path / "train", 0, rng)
    write_sample(tmp_path / "train", 2, rng)
    with pytest.raises(FileNotFoundError, match=r"numbered 0\.\.1 without gaps; .*image/1\.npy"):
        NYUv2(tmp_path)


def test_bad_contents_name_the_file(tmp_path):
    rng = np.random.default_rng(4)
    write_sample(tmp_path / "train", 0, rng, label=np.full((H, W), 13.0))
    write_sample(tmp_path / "train", 1, rng, image=rng.random((H, W, 3)) * 255)
    write_sample(tmp_path / "train", 2, rng, depth=np.ones((H + 1, W, 1), np.float32))
    write_sample(tmp_path / "train", 3, rng, label=np.full((H, W), 0.5))
    ds = NYUv2(tmp_path)
    with pytest.raises(ValueError, match=r"label .*label/0\.npy.* outside -1\.\.12, e.g. 13"):
        ds[0]
    with pytest.raises(ValueError, match=r"image .*image/1\.npy.* \[0, 1\].*divid"):
        ds[1]
    with pytest.raises(ValueError, match=r"depth .*depth/2\.npy.* must have shape"):
        ds[2]
    with pytest.raises(ValueError, match=r"label/3\.npy.* non-integer"):
        ds[3]
    with pytest.raises(IndexError, match="out of range"):
        ds[4]
