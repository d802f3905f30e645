"""CityscapesSequences / CamVidSequences on tiny PNG files written in tmp_path (documented layouts)."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pyamalgam.data import CamVidSequences, CityscapesSequences
from pyamalgam.data.cityscapes import LABEL_ID_TO_TRAIN_ID
from pyamalgam.data.video import CAMVID_CLASS_NAMES

H, W = 4, 6


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def cityscapes(root, split="val", snippets=(("lindau", 0), ("lindau", 1), ("ulm", 3)), n=30, skip=()):
    """Snippets of ``n`` frames (numbers 0..n-1 after the snippet's offset), label on the 20th."""
    rng = np.random.default_rng(0)
    frames, labels = {}, {}
    for city, seq in snippets:
        first = 100 * seq
        for f in range(first, first + n):
            if f in skip:
                continue
            stem = f"{city}_{seq:06d}_{f:06d}"
            frames[(city, seq, f)] = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
            _png(root / "leftImg8bit_sequence" / split / city / f"{stem}_leftImg8bit.png", frames[(city, seq, f)])
            if f == first + 19:
                labels[(city, seq, f)] = rng.integers(0, 34, (H, W)).astype(np.uint8)
                _png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", labels[(city, seq, f)])
    return frames, labels


def test_cityscapes_windows_and_the_annotated_frame(tmp_path):
    frames, labels = cityscapes(tmp_path)
    ds = CityscapesSequences(tmp_path, "val", frames=4)
    assert len(ds) == 3 * (30 // 4)  # non-overlapping windows of every snippet
    # the window holding frame 19 of snippet lindau_000000 is the 5th (frames 16..19)
    seq, numbers = ds.clip_name(4)
    assert seq == "lindau_000000" and numbers == [16, 17, 18, 19]
    clip = ds[4]
    assert clip["image"].shape == (4, 3, H, W) and clip["image"].dtype == torch.float32
    assert clip["labelled"].tolist() == [False, False, False, True]
    assert clip["frame"].tolist() == numbers
    assert (clip["seg"][:3] == 255).all()
    np.testing.assert_array_equal(clip["seg"][3].numpy(), LABEL_ID_TO_TRAIN_ID[labels[("lindau", 0, 19)]])
    for t, f in enumerate(numbers):
        np.testing.assert_allclose(clip["image"][t].numpy(), np.moveaxis(frames[("lindau", 0, f)], -1, 0) / 255.0,
                                   atol=1e-7)
    assert "flow" not in clip and ds.num_classes == 19


def test_cityscapes_anchor_gives_one_clip_per_annotated_frame(tmp_path):
    cityscapes(tmp_path)
    ds = CityscapesSequences(tmp_path, "val", frames=3, frame_step=2, anchor=1)
    assert len(ds) == 3
    assert [ds.clip_name(i) for i in range(3)][0] == ("lindau_000000", [17, 19, 21])
    clip = ds[2]
    assert clip["labelled"].tolist() == [False, True, False] and clip["frame"].tolist() == [317, 319, 321]
    last = CityscapesSequences(tmp_path, "val", frames=2, anchor=-1, target="categories")
    assert last.clip_name(0)[1] == [18, 19] and last[0]["labelled"].tolist() == [False, True]
    seg = last[0]["seg"][1]
    assert last.num_classes == 7 and ((seg < 7) | (seg == 255)).all()


def test_windows_needing_a_missing_frame_are_left_out(tmp_path):
    cityscapes(tmp_path, snippets=(("lindau", 0),), skip={18})
    with pytest.raises(FileNotFoundError, match="no clip of 2 frame"):
        CityscapesSequences(tmp_path, frames=2, anchor=-1)  # it would need frame 18
    ds = CityscapesSequences(tmp_path, frames=2, anchor=0)  # 19 and 20 exist
    assert len(ds) == 1 and ds.clip_name(0)[1] == [19, 20]
    windows = CityscapesSequences(tmp_path, frames=5)
    starts = [windows.clip_name(i)[1][0] for i in range(len(windows))]
    assert starts == [0, 5, 10, 19, 24]  # 15..19 would cross the gap: the next window starts at 19


def test_flow_callable_resolution_and_dataloader(tmp_path):
    cityscapes(tmp_path)
    calls = []

    def flow_fn(a, b):
        calls.append((a.shape, b.shape))
        f = torch.zeros(a.shape[0], 2, a.shape[2], a.shape[3])
        f[:, 0] = 1.0  # everything moves one pixel right: the last column lands outside
        return f

    ds = CityscapesSequences(tmp_path, frames=3, resolution=(8, 12), flow=flow_fn)
    clip = ds[0]
    assert calls == [((2, 3, 8, 12), (2, 3, 8, 12))]
    assert clip["image"].shape == (3, 3, 8, 12) and clip["seg"].shape == (3, 8, 12)
    assert clip["flow"].shape == (2, 2, 8, 12) and clip["flow_valid"].dtype == torch.bool
    assert clip["flow_valid"][:, :, :11].all() and not clip["flow_valid"][:, :, 11].any()
    with_mask = CityscapesSequences(tmp_path, frames=2, flow=lambda a, b: (flow_fn(a, b), torch.zeros(
        a.shape[0], a.shape[2], a.shape[3], dtype=torch.bool)))
    assert not with_mask[0]["flow_valid"].any()
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 3, 8, 12) and batch["labelled"].shape == (2, 3)
    bad = CityscapesSequences(tmp_path, frames=2, flow=lambda a, b: torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match=r"flow callable must return a float tensor \(T-1, 2, H, W\)"):
        bad[0]


def test_cityscapes_without_labels_and_bad_arguments(tmp_path):
    cityscapes(tmp_path, split="test", snippets=(("berlin", 0),), n=4)
    for p in (tmp_path / "gtFine").rglob("*.png"):
        p.unlink()
    ds = CityscapesSequences(tmp_path, "test", frames=2)
    assert len(ds) == 2 and not ds[1]["labelled"].any()
    with pytest.raises(FileNotFoundError, match="around an annotated frame"):
        CityscapesSequences(tmp_path, "test", frames=2, anchor=0)
    with pytest.raises(FileNotFoundError, match="leftImg8bit_sequence/val"):
        CityscapesSequences(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CityscapesSequences(tmp_path / "nope")
    for kw, err, msg in [({"frames": 0}, ValueError, "frames must be >= 1"),
                         ({"frame_step": 0}, ValueError, "frame_step must be >= 1"),
                         ({"anchor": 2}, ValueError, "anchor must be a frame position"),
                         ({"split": "dev"}, ValueError, "split must be one of"),
                         ({"target": "x"}, ValueError, "target must be one of"),
                         ({"flow": 3}, TypeError, "flow must be callable"),
                         ({"resolution": (0, 2)}, ValueError, "resolution")]:
        with pytest.raises(err, match=msg):
            CityscapesSequences(tmp_path, **{"split": "test", "frames": 2, **kw})


def test_a_corrupt_frame_is_named(tmp_path):
    cityscapes(tmp_path, snippets=(("ulm", 0),), n=2)
    broken = next((tmp_path / "leftImg8bit_sequence").rglob("*000001_leftImg8bit.png"))
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="ulm_000000_000001_leftImg8bit.png"):
        CityscapesSequences(tmp_path, frames=2)[0]


def camvid(root):
    rng = np.random.default_rng(1)
    labels = {}
    for seq, fmt, first, split in (("0001TP", "{:06d}", 6690, "train"), ("Seq05VD", "f{:05d}", 0, "test")):
        for f in range(first, first + 35):
            _png(root / "sequences" / seq / f"{seq}_{fmt.format(f)}.png", rng.integers(0, 256, (H, W, 3)).astype(np.uint8))
        for f in (first, first + 30):
            labels[(seq, f)] = rng.integers(0, 12, (H, W)).astype(np.uint8)
            _png(root / f"{split}annot" / f"{seq}_{fmt.format(f)}.png", labels[(seq, f)])
    return labels


def test_camvid_layout(tmp_path):
    labels = camvid(tmp_path)
    ds = CamVidSequences(tmp_path, "test", frames=3, anchor=0)
    assert len(ds) == 2 and ds.clip_name(1) == ("Seq05VD", [30, 31, 32])
    clip = ds[1]
    want = labels[("Seq05VD", 30)].astype(np.int64)
    want[want == 11] = 255
    np.testing.assert_array_equal(clip["seg"][0].numpy(), want)
    assert clip["labelled"].tolist() == [True, False, False] and (clip["seg"][1:] == 255).all()
    train = CamVidSequences(tmp_path, "train", frames=5)
    assert len(train) == 7 and train.clip_name(0) == ("0001TP", [6690, 6691, 6692, 6693, 6694])
    assert train.num_classes == len(CAMVID_CLASS_NAMES) == 11
    with pytest.raises(FileNotFoundError, match="valannot"):
        CamVidSequences(tmp_path, "val")
