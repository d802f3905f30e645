"""Cityscapes loader on tiny PNG/JSON files written in tmp_path (official layout)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pyamalgam.data import SAMPLE_KEYS, Cityscapes
from pyamalgam.data.cityscapes import LABEL_ID_TO_CATEGORY, LABEL_ID_TO_TRAIN_ID

H, W = 4, 6
BASELINE, FX = 0.2, 2000.0


def write(root, split, city, stem, rng, disparity=None, labels=None, skip=()):
    paths = {
        "leftImg8bit": root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
        "gtFine": root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
        "disparity": root / "disparity" / split / city / f"{stem}_disparity.png",
        "camera": root / "camera" / split / city / f"{stem}_camera.json",
    }
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    if labels is None:
        labels = rng.integers(0, 34, (H, W)).astype(np.uint8)
    if disparity is None:
        disparity = rng.integers(2, 30000, (H, W)).astype(np.uint16)
        disparity[0, 0] = 0  # invalid
        disparity[0, 1] = 1  # zero disparity: invalid
    image = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
    if "leftImg8bit" not in skip:
        Image.fromarray(image).save(paths["leftImg8bit"])
    if "gtFine" not in skip:
        Image.fromarray(labels).save(paths["gtFine"])
    if "disparity" not in skip:
        Image.fromarray(disparity).save(paths["disparity"])
    if "camera" not in skip:
        paths["camera"].write_text(json.dumps({"extrinsic": {"baseline": BASELINE, "pitch": 0.04},
                                               "intrinsic": {"fx": FX, "fy": FX, "u0": 3.0, "v0": 2.0}}))
    return image, labels, disparity


@pytest.fixture
def root(tmp_path):
    rng = np.random.default_rng(0)
    write(tmp_path, "train", "aachen", "aachen_000000_000019", rng)
    write(tmp_path, "train", "bremen", "bremen_000001_000019", rng)
    write(tmp_path, "val", "lindau", "lindau_000000_000019", rng)
    return tmp_path


def test_label_tables():
    # spot checks against cityscapesScripts' labels.py
    assert LABEL_ID_TO_TRAIN_ID[7] == 0 and LABEL_ID_TO_TRAIN_ID[26] == 13 and LABEL_ID_TO_TRAIN_ID[33] == 18
    assert LABEL_ID_TO_TRAIN_ID[0] == 255 and LABEL_ID_TO_TRAIN_ID[29] == 255 and LABEL_ID_TO_TRAIN_ID[255] == 255
    assert sorted(set(LABEL_ID_TO_TRAIN_ID.tolist()) - {255}) == list(range(19))
    assert LABEL_ID_TO_CATEGORY[7] == 0 and LABEL_ID_TO_CATEGORY[23] == 4 and LABEL_ID_TO_CATEGORY[33] == 6
    assert LABEL_ID_TO_CATEGORY[6] == 255 and LABEL_ID_TO_CATEGORY[9] == 0
    assert sorted(set(LABEL_ID_TO_CATEGORY.tolist()) - {255}) == list(range(7))


def test_reads_and_converts(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.array([[0, 7, 8, 9, 23, 26]] * H, np.uint8)
    image, _, disparity = write(tmp_path, "val", "lindau", "lindau_000000_000019", rng, labels=labels)
    ds = Cityscapes(tmp_path, "val")
    assert len(ds) == 1 and ds.num_classes == 19 and ds.ignore_index == 255
    assert ds.sample_name(0) == "lindau_000000_000019"
    s = ds[0]
    assert tuple(s) == SAMPLE_KEYS
    assert s["image"].dtype == torch.float32 and s["image"].shape == (3, H, W)
    np.testing.assert_allclose(s["image"].numpy(), np.moveaxis(image, -1, 0) / 255.0, rtol=1e-6)
    assert s["seg"].dtype == torch.int64
    assert s["seg"][0].tolist() == [255, 0, 1, 255, 10, 13]
    d = (disparity.astype(np.float64) - 1) / 256
    valid = disparity > 1
    expected = np.where(valid, BASELINE * FX / np.where(valid, d, 1), 0)
    valid &= expected <= 100.0
    np.testing.assert_array_equal(s["mask"].numpy(), valid)
    np.testing.assert_allclose(s["depth"].numpy(), np.where(valid, expected, 0), rtol=1e-6)
    assert not s["mask"][0, 0] and not s["mask"][0, 1]
    assert s["normal"].shape == (3, H, W) and (s["normal"] == 0).all()
    assert ds.tasks == ("seg", "depth")
    cat = Cityscapes(tmp_path, "val", target="categories")
    assert cat.num_classes == 7 and cat.class_names[0] == "flat"
    assert cat[0]["seg"][0].tolist() == [255, 0, 0, 0, 4, 6]


def test_depth_formula_exact_value(tmp_path):
    rng = np.random.default_rng(2)
    disparity = np.full((H, W), 513, np.uint16)  # d = (513 - 1) / 256 = 2 px -> depth 200 m
    write(tmp_path, "train", "c", "c_000000_000000", rng, disparity=disparity)
    s = Cityscapes(tmp_path, max_depth=250.0)[0]
    assert s["mask"].all()
    torch.testing.assert_close(s["depth"], torch.full((H, W), BASELINE * FX / 2.0))
    default = Cityscapes(tmp_path)[0]  # 200 m > default max_depth 100 m -> invalid
    assert Cityscapes.max_depth == 100.0
    assert not default["mask"].any() and (default["depth"] == 0).all()


def test_dataloader_and_resize(root):
    ds = Cityscapes(root, "train", resolution=(2, 3))
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 2, 3) and batch["seg"].shape == (2, 2, 3)
    assert batch["mask"].dtype == torch.bool
    assert [ds.sample_name(i) for i in range(2)] == ["aachen_000000_000019", "bremen_000001_000019"]


def test_wrong_root_and_split(tmp_path, root):
    with pytest.raises(FileNotFoundError, match="Cityscapes root .* does not exist"):
        Cityscapes(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"folder .*leftImg8bit/test.* not found"):
        Cityscapes(root, "test")
    with pytest.raises(ValueError, match="split must be one of 'train', 'val', 'test'"):
        Cityscapes(root, "training")
    with pytest.raises(ValueError, match="target must be one of 'train_ids', 'categories'"):
        Cityscapes(root, target="labelIds")
    with pytest.raises(ValueError, match="max_depth must be a number > 0"):
        Cityscapes(root, max_depth=0)


@pytest.mark.parametrize("kind", ["gtFine", "disparity", "camera"])
def test_image_without_counterpart(tmp_path, kind):
    rng = np.random.default_rng(3)
    write(tmp_path, "train", "ulm", "ulm_000000_000019", rng)
    write(tmp_path, "train", "ulm", "ulm_000001_000019", rng, skip=(kind,))
    with pytest.raises(FileNotFoundError, match=rf"1 image\(s\) have no {kind} file, e.g. .*ulm_000001_000019"):
        Cityscapes(tmp_path)


def test_label_without_image(tmp_path):
    rng = np.random.default_rng(4)
    write(tmp_path, "train", "ulm", "ulm_000000_000019", rng)
    write(tmp_path, "train", "ulm", "ulm_000001_000019", rng, skip=("leftImg8bit",))
    with pytest.raises(FileNotFoundError, match=r"gtFine file\(s\) have no image, e.g. .*ulm_000001_000019_leftImg8bit\.png"):
        Cityscapes(tmp_path)


def test_bad_files_name_the_file(tmp_path):
    rng = np.random.default_rng(5)
    write(tmp_path, "train", "ulm", "ulm_000000_000019", rng)
    cam = tmp_path / "camera/train/ulm/ulm_000000_000019_camera.json"
    cam.write_text(json.dumps({"intrinsic": {"fx": 1.0}}))
    ds = Cityscapes(tmp_path)
    with pytest.raises(ValueError, match=r"camera file .*ulm_000000_000019_camera\.json.* extrinsic\.baseline"):
        ds[0]
    cam.write_text(json.dumps({"extrinsic": {"baseline": BASELINE}, "intrinsic": {"fx": FX}}))
    disp = tmp_path / "disparity/train/ulm/ulm_000000_000019_disparity.png"
    disp.write_bytes(b"garbage")
    with pytest.raises(OSError, match=r"ulm_000000_000019_disparity\.png.* could not be read"):
        ds[0]
    Image.fromarray(np.zeros((H + 1, W), np.uint16)).save(disp)
    with pytest.raises(ValueError, match=r"disparity .*must be a 16-bit single-channel PNG of size \(4, 6\)"):
        ds[0]
