"""Data files with bad values, names or headers: a DataFileError naming the file, never a silent
NaN, a MemoryError, an EOFError or a "disappeared" file (docs/robustness.md, "Data files").

Every file is written here, tiny; nothing is downloaded.
"""
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pyamalgam.data import Cityscapes, NYUv2
from pyamalgam.data._common import DataFileError

H, W = 4, 6


# ------------------------------------------------------------------------------ NYUv2

def nyu_sample(base, i, **arrays):
    """Write sample ``i`` (valid random arrays, unless given) under ``base``/{image,label,depth,normal}."""
    rng = np.random.default_rng(i)
    normal = rng.normal(size=(H, W, 3)).astype(np.float32)
    default = {"image": rng.random((H, W, 3)).astype(np.float32), "label": rng.integers(-1, 13, (H, W)),
               "depth": rng.uniform(0.5, 9, (H, W, 1)).astype(np.float32),
               "normal": normal / np.linalg.norm(normal, axis=-1, keepdims=True)}
    for folder, value in {**default, **arrays}.items():
        (base / folder).mkdir(parents=True, exist_ok=True)
        path = base / folder / f"{i}.npy"
        if isinstance(value, bytes):
            path.write_bytes(value)
        else:
            np.save(path, value)
    return base


def npy_bytes(header: dict, data: bytes = b"", version=(1, 0)) -> bytes:
    """A .npy file with a hand-made header (what numpy.save would never write)."""
    text = repr(header).encode("latin1")
    pad = 64 - (len(text) + 11) % 64
    text += b" " * pad + b"\n"
    size = struct.pack("<H", len(text)) if version == (1, 0) else struct.pack("<I", len(text))
    return b"\x93NUMPY" + bytes(version) + size + text + data


@pytest.fixture
def nyu(tmp_path):
    """A root whose train split has one sample; tests overwrite its files."""
    nyu_sample(tmp_path / "train", 0)
    return tmp_path


def load_fails(root, pattern):
    with pytest.raises(DataFileError, match=pattern) as info:
        NYUv2(root)[0]
    return info.value


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_image_pixel_is_refused(nyu, value):
    image = np.full((H, W, 3), 0.5, np.float32)
    image[1, 2, 0] = value  # min() and max() of an array holding NaN are NaN: the range check passed it
    nyu_sample(nyu / "train", 0, image=image)
    load_fails(nyu, r"image .*image/0\.npy.* NaN or infinite .*pixel \(1, 2\)")


def test_nan_label_is_refused_as_nan(nyu):
    label = np.zeros((H, W))
    label[0, 0] = np.nan
    nyu_sample(nyu / "train", 0, label=label)
    load_fails(nyu, r"label .*label/0\.npy.* NaN")


def test_non_canonical_name_is_refused_at_construction(nyu):
    nyu_sample(nyu / "train", 1)
    for folder in ("image", "label", "depth", "normal"):  # 01.npy for every folder: a "consistent" copy
        (nyu / "train" / folder / "1.npy").rename(nyu / "train" / folder / "01.npy")
    with pytest.raises(DataFileError, match=r"01\.npy.* not named by its index.*rename it 1\.npy"):
        NYUv2(nyu)


def test_other_scripts_digits_are_not_sample_names(nyu):
    # int() reads "١" (Arabic-Indic one) as 1: the old check took it for sample 1 and failed
    # later looking for 1.npy; now it is not a sample file, so the set is just sample 0.
    for folder in ("image", "label", "depth", "normal"):
        (nyu / "train" / folder / "\u0661.npy").write_bytes(b"")
    assert len(NYUv2(nyu)) == 1


@pytest.mark.parametrize("content, pattern", [
    (b"", r"not a readable \.npy file"),                                   # zero bytes
    (b"PK\x03\x04 zip, not npy", r"not a readable \.npy file"),
    (npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6, 3)}, b"\0" * 96), "truncated"),
    (npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (H, W, 3)}, b"\0" * 20), "truncated"),
    (npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (H, W, 3), "x": "y" * 20000}), "not a readable"),
    (npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (H, W, 3)}, version=(3, 0)), "version 3.0"),
    (npy_bytes({"descr": "|O", "fortran_order": False, "shape": (H, W, 3)}), "dtype object"),
    (npy_bytes({"descr": [("a", "<f4")], "fortran_order": False, "shape": (H, W, 3)}), "must hold"),
    (npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (0, W, 3)}), "empty"),
    (npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (H, W)}), "3 dimensions"),
], ids=["empty", "not-npy", "huge-shape", "truncated", "huge-header", "v3", "object", "structured", "zero-axis",
        "ndim"])
def test_bad_npy_header_names_the_file(nyu, content, pattern):
    (nyu / "train" / "image" / "0.npy").write_bytes(content)
    error = load_fails(nyu, pattern)
    assert "image/0.npy" in str(error) and error.path.endswith("0.npy")
    assert isinstance(error, ValueError) and isinstance(error, OSError)  # what callers caught before


def test_huge_header_costs_no_memory(nyu):
    """A header promising 12 TB of pixels is refused from the file size, before any allocation."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6, 3)}
    (nyu / "train" / "image" / "0.npy").write_bytes(npy_bytes(header, b"\0" * 1000))
    load_fails(nyu, r"truncated: its header promises shape \(1000000, 1000000, 3\)")


def test_fortran_order_is_read_right(nyu):
    image = np.asfortranarray(np.random.default_rng(0).random((H, W, 3)).astype(np.float32))
    nyu_sample(nyu / "train", 0, image=image)
    np.testing.assert_array_equal(NYUv2(nyu)[0]["image"].numpy(), np.moveaxis(image, -1, 0))


def test_integer_depth_is_refused(nyu):
    # a uint16 depth is most likely millimetres (the raw Kinect format): as metres it would be 1000x off
    nyu_sample(nyu / "train", 0, depth=np.full((H, W), 1500, np.uint16))
    load_fails(nyu, r"depth .*depth/0\.npy.* must hold float values, got dtype uint16")


def test_wide_integer_label_ids_do_not_wrap(nyu):
    label = np.zeros((H, W), np.uint64)
    label[0, 0] = 2**64 - 1  # as int64 this would be -1, i.e. "unknown"
    nyu_sample(nyu / "train", 0, label=label)
    load_fails(nyu, r"label .* outside -1\.\.12, e\.g\. 18446744073709551615")


# --------------------------------------------------------------------------- Cityscapes

STEM = "ulm_000000_000019"


def city_sample(root, **override):
    """One valid sample under root (train/ulm); ``override`` maps a kind to the bytes to write instead."""
    rng = np.random.default_rng(0)
    paths = {kind: root / kind / "train" / "ulm" / f"{STEM}{suffix}" for kind, suffix in (
        ("leftImg8bit", "_leftImg8bit.png"), ("gtFine", "_gtFine_labelIds.png"),
        ("disparity", "_disparity.png"), ("camera", "_camera.json"))}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (H, W, 3)).astype(np.uint8)).save(paths["leftImg8bit"])
    Image.fromarray(rng.integers(0, 34, (H, W)).astype(np.uint8)).save(paths["gtFine"])
    Image.fromarray(rng.integers(2, 30000, (H, W)).astype(np.uint16)).save(paths["disparity"])
    paths["camera"].write_text(json.dumps({"extrinsic": {"baseline": 0.2}, "intrinsic": {"fx": 2000.0}}))
    for kind, content in override.items():
        paths[kind].write_bytes(content)
    return paths


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` pixels, with no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def truncated_png(tmp_path) -> bytes:
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(tmp_path / "t.png")
    return (tmp_path / "t.png").read_bytes()[:200]


@pytest.mark.parametrize("kind, content, pattern", [
    ("leftImg8bit", b"", r"image .*_leftImg8bit\.png.* could not be read as a PNG"),
    ("leftImg8bit", b"garbage", r"image .*_leftImg8bit\.png.* could not be read as a PNG"),
    ("leftImg8bit", png_header_only(100_000, 100_000), r"_leftImg8bit\.png.* could not be read.*Decompression"),
    # 10 M pixels, under Pillow's bomb limit: refused from the header, before decoding
    ("gtFine", png_header_only(1000, 10_000), r"label .*_labelIds\.png.* size \(4, 6\), got size \(10000, 1000\)"),
    ("disparity", png_header_only(W, H + 1), r"disparity .*_disparity\.png.* size \(4, 6\), got size \(5, 6\)"),
], ids=["empty", "garbage", "bomb", "label-size", "disparity-size"])
def test_unreadable_png_names_the_file(tmp_path, kind, content, pattern):
    city_sample(tmp_path, **{kind: content})
    with pytest.raises(DataFileError, match=pattern):
        Cityscapes(tmp_path)[0]


def test_truncated_png_names_the_file(tmp_path):
    city_sample(tmp_path, leftImg8bit=truncated_png(tmp_path))
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "gtFine/train/ulm" / f"{STEM}_gtFine_labelIds.png")
    with pytest.raises(DataFileError, match=r"_leftImg8bit\.png.* could not be read as a PNG"):
        Cityscapes(tmp_path)[0]


@pytest.mark.parametrize("camera", [
    '{"extrinsic": {"baseline": Infinity}, "intrinsic": {"fx": 2000}}',  # json reads it; every depth would be inf
    '{"extrinsic": {"baseline": NaN}, "intrinsic": {"fx": 2000}}',
    '{"extrinsic": {"baseline": "0.2"}, "intrinsic": {"fx": 2000}}',     # a string, not a number
    '{"extrinsic": {"baseline": true}, "intrinsic": {"fx": 2000}}',
    '[1, 2]',
    '',
])
def test_bad_camera_values_name_the_file(tmp_path, camera):
    city_sample(tmp_path, camera=camera.encode())
    with pytest.raises(DataFileError, match=r"camera file .*_camera\.json"):
        Cityscapes(tmp_path)[0]


def test_valid_files_still_load(tmp_path, nyu):
    city_sample(tmp_path / "city")
    assert Cityscapes(tmp_path / "city")[0]["image"].shape == (3, H, W)
    assert NYUv2(nyu)[0]["image"].shape == (3, H, W)
