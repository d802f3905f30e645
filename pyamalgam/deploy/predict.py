"""Batch prediction on image files: ``pyamalgam predict`` without the argument parsing (issue 13).

Per image and per output of the network (a TargetNet or a teacher), one PNG at the input's size:

* segmentation ``STEM_NAME.png``: a palette PNG whose pixel values are the class ids (argmax of the
  logits) and whose palette colours them (the PASCAL VOC colour map; class 0 is black); with more
  than 256 classes a 16-bit grey PNG of the ids;
* depth ``STEM_NAME.png``: 16-bit grey, millimetres (value / 1000 = metres, Eq. 2's decoded depth,
  clipped to 0..65.535 m), and ``STEM_NAME_preview.png``: colour-mapped (magma, near = bright),
  stretched to that image's own min..max;
* normals ``STEM_NAME.png``: RGB = (n + 1) / 2 * 255 of the unit normal, in the network's camera
  axes;
* edges ``STEM_NAME.png``: 8-bit grey, round(255 p) of the edge probability p in [0, 1];
* key-points ``STEM_NAME.png``: 8-bit grey, round(255 h) of the heat-map h clipped to [0, 1] (the
  range of its targets: Gaussians of peak 1), and ``STEM_NAME_preview.png``: those values
  colour-mapped (magma, peaks bright).

Each image is resized (bilinear, antialiased) to a size the network takes (``resolution``, or its
own size rounded to the nearest multiple of the size divisor), predicted in batches of images that
share that size, and its outputs are resized back (bilinear; class ids are the argmax of the
resized logits, normals renormalised). An image that cannot be read is reported and skipped: the
others are still written, each file atomically.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._io import atomic_write
from ..data._common import DataFileError
from ..losses import DepthTask, EdgeTask, KeypointTask, NormalTask, SegmentationTask

__all__ = ["IMAGE_SUFFIXES", "PredictResult", "collect_images", "network_size", "palette", "predict", "read_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_PIXELS = 1 << 28  # PIL's decompression-bomb guard, made an error instead of a warning


class PredictResult(NamedTuple):
    """``written``: image path -> the files written for it; ``skipped``: image path -> why."""

    written: dict
    skipped: dict


def collect_images(inputs) -> list:
    """Image files from files and folders (a folder's ``*.png``/``*.jpg``/``*.jpeg``, sorted, not
    recursive); a FileNotFoundError for a missing path, a ValueError for a folder without images."""
    paths = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"the folder {str(p)!r} holds no {'/'.join(IMAGE_SUFFIXES)} image")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"no image or folder {str(p)!r}")
    return list(dict.fromkeys(paths))  # an image named twice is predicted once


def read_image(path) -> torch.Tensor:
    """(3, H, W) float32 RGB in [0, 1], what :mod:`pyamalgam.data` feeds the networks; a
    DataFileError naming the file if PIL cannot decode it (torn, empty, not an image, too big)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise DataFileError(f"image {str(path)!r}: {img.width}x{img.height} pixels, more than {MAX_PIXELS}", path)
            img.load()  # decode now: a truncated file fails here, not later
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except DataFileError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's errors on bad files
        raise DataFileError(f"image {str(path)!r} could not be read ({type(e).__name__}: {e})", path) from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(255.0)


def network_size(size, divisor: int, resolution=None) -> tuple:
    """The (H, W) an image of ``size`` is predicted at: ``resolution`` if given, else each side
    rounded to the nearest multiple of ``divisor`` (at least one divisor)."""
    if resolution is not None:
        return tuple(resolution)
    return tuple(max(1, round(s / divisor)) * divisor for s in size)


def predict(net: nn.Module, images, out, *, device="cpu", resolution=None, batch_size: int = 4,
            progress: bool = True) -> PredictResult:
    """Predict every image of ``images`` (files or folders, see :func:`collect_images`) with
    ``net`` and write the PNGs of the module docstring into the folder ``out``."""
    divisor = int(getattr(net, "size_divisor", 1))
    if resolution is not None and any(s < 1 or s % divisor for s in resolution):
        raise ValueError(f"resolution {resolution[0]}x{resolution[1]}: both sides must be multiples of the "
                         f"network's size divisor {divisor} (2^depth)")
    writers = _writers(net)
    paths = collect_images(images)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    net = net.to(device).eval()
    dtype = next(net.parameters()).dtype
    stems = _unique_stems(paths)
    result = PredictResult({}, {})
    from tqdm import tqdm

    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, file=sys.stderr)
    batch = []
    for path in paths:
        try:
            image = read_image(path)
        except DataFileError as e:
            result.skipped[str(path)] = str(e)
            bar.write(f"pyamalgam predict: skipped {e}", file=sys.stderr)
            bar.update(1)
            continue
        size = network_size(image.shape[-2:], divisor, resolution)
        if batch and (len(batch) == batch_size or batch[0][2] != size):
            _run_batch(net, batch, writers, out, stems, result, device, dtype, bar)
            batch = []
        batch.append((path, image, size))
    if batch:
        _run_batch(net, batch, writers, out, stems, result, device, dtype, bar)
    bar.close()
    return result


def _run_batch(net, batch, writers, out, stems, result, device, dtype, bar) -> None:
    size = batch[0][2]
    x = torch.stack([_resize(img[None], size, antialias=True)[0] for _, img, _ in batch]).to(device, dtype)
    with torch.inference_mode():
        prediction = net(x)
    if not isinstance(prediction, dict):
        prediction = {next(iter(writers)): prediction}
    for i, (path, image, _) in enumerate(batch):
        files = []
        for name, write in writers.items():
            value = prediction[name][i : i + 1].float().cpu()
            files += write(value, tuple(image.shape[-2:]), out / f"{stems[path]}_{name}")
        result.written[str(path)] = [str(f) for f in files]
        bar.update(1)


def _writers(net) -> dict:
    """Output name -> writer(prediction (1, ...), input size, path stem) -> files written."""
    tasks = dict(getattr(net, "tasks", {}))
    writers = {}
    for name, task in tasks.items():
        for cls, write in _WRITERS.items():
            if isinstance(task, cls):
                writers[name] = write
                break
    if not writers:
        raise ValueError(f"the network predicts none of segmentation, depth, normals, edges or keypoints (its outputs: "
                         f"{sorted(tasks)})")
    return writers


def _resize(x: torch.Tensor, size, antialias: bool = False) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False,
                         antialias=antialias and any(a > b for a, b in zip(x.shape[-2:], size)))


def _write_seg(logits, size, stem) -> list:
    from PIL import Image

    labels = _resize(logits, size).argmax(dim=1)[0].numpy()
    if logits.shape[1] <= 256:
        img = Image.fromarray(labels.astype(np.uint8))
        img.putpalette(palette().reshape(-1).tolist())  # an "L" image with a palette becomes "P"
    else:
        img = Image.fromarray(labels.astype(np.uint16))
    return [_save(img, stem.with_name(stem.name + ".png"))]


def _write_depth(depth, size, stem) -> list:
    from PIL import Image

    d = _resize(depth[:, None], size)[0, 0].numpy().astype(np.float64)
    d = np.nan_to_num(d, nan=0.0, posinf=65.535, neginf=0.0)
    mm = np.clip(np.rint(d * 1000.0), 0, 65535).astype(np.uint16)
    lo, hi = float(d.min()), float(d.max())
    t = np.zeros_like(d) if hi <= lo else (d - lo) / (hi - lo)
    preview = _magma()[np.clip((1.0 - t) * 255.0, 0, 255).astype(np.uint8)]  # near = bright
    return [_save(Image.fromarray(mm), stem.with_name(stem.name + ".png")),
            _save(Image.fromarray(preview), stem.with_name(stem.name + "_preview.png"))]


def _write_normal(normals, size, stem) -> list:
    from PIL import Image

    n = F.normalize(_resize(normals, size), dim=1, eps=1e-6)[0].permute(1, 2, 0).numpy()
    rgb = np.clip(np.rint((n + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return [_save(Image.fromarray(rgb), stem.with_name(stem.name + ".png"))]


def _unit_map(value, size) -> np.ndarray:
    """A (1, H, W) map at the input's size, clipped to [0, 1], as 8-bit round(255 v)."""
    v = _resize(value[:, None], size)[0, 0].numpy().astype(np.float64)
    v = np.nan_to_num(v, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(np.rint(np.clip(v, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)


def _write_edges(prob, size, stem) -> list:
    from PIL import Image

    return [_save(Image.fromarray(_unit_map(prob, size)), stem.with_name(stem.name + ".png"))]


def _write_keypoints(heat, size, stem) -> list:
    from PIL import Image

    u8 = _unit_map(heat, size)
    return [_save(Image.fromarray(u8), stem.with_name(stem.name + ".png")),
            _save(Image.fromarray(_magma()[u8]), stem.with_name(stem.name + "_preview.png"))]


_WRITERS = {SegmentationTask: _write_seg, DepthTask: _write_depth, NormalTask: _write_normal, EdgeTask: _write_edges,
            KeypointTask: _write_keypoints}


def _save(img, path: Path) -> Path:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write(path, buf.getvalue())


def palette() -> np.ndarray:
    """(256, 3) uint8: the PASCAL VOC colour map (bits of the class id spread over R, G, B)."""
    ids = np.arange(256)
    pal = np.zeros((256, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            pal[:, channel] |= ((ids >> (3 * shift + channel)) & 1) << (7 - shift)
    return pal.astype(np.uint8)


def _magma() -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps["magma"](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).round().astype(np.uint8)


def _unique_stems(paths) -> dict:
    """path -> output stem: the file's stem, then ``-2``, ``-3``... where it is taken (two folders
    with an ``0001.png`` each)."""
    stems, used = {}, set()
    for p in paths:
        stem, count = p.stem, 1
        while stem in used:
            count += 1
            stem = f"{p.stem}-{count}"
        used.add(stem)
        stems[p] = stem
    return stems
