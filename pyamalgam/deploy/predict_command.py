"""``pyamalgam predict MODEL IMAGES... --out DIR``: the command around :func:`pyamalgam.deploy.predict`.

Arguments are checked first (exit 2 with the usage line: a missing image or folder, a folder
without images, a MODEL that does not load, ``--resolution`` that is no multiple of the model's
size divisor, an unwritable ``--out``). Then every readable image is predicted and written; an
unreadable one is reported on stderr and skipped. The summary (JSON) goes to stdout. Exit 0 when
every image was written, 2 when some could not be read (docs/demo.md "Exit codes": data that
cannot be read), after the others were written.
"""
from __future__ import annotations

import argparse
import json
import sys

from ..cli import _device, _out_dir, _positive_int, _resolution
from ._args import check_divisor, load_or_exit, model_path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict", help="run a saved TargetNet or teacher on image files and write its predictions as PNGs",
        description="Predict segmentation (colour-coded palette PNG), depth (16-bit PNG in millimetres and a "
                    "colour-mapped preview) and normals (RGB PNG) for every image, at the image's size "
                    "(docs/deploy.md).")
    p.add_argument("model", metavar="MODEL", type=model_path, help="a model file (TargetNet.save) or teacher checkpoint")
    p.add_argument("images", metavar="IMAGES", nargs="+", help="PNG/JPEG files or folders of them (not recursive)")
    p.add_argument("--out", required=True, type=_out_dir, help="folder for the predictions (created)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--resolution", type=_resolution, default=None,
                   help="HxW every image is resized to, multiples of 2^depth (default: each image's own size "
                        "rounded to the nearest multiple); outputs are written at the input's size")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="images per forward pass (default 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (stderr)")
    p.set_defaults(fn=run, subparser=p)
    return p


def run(args) -> int:
    from ..teachers import check_output_folder
    from .predict import collect_images, predict

    try:
        images = collect_images(args.images)
    except (FileNotFoundError, ValueError) as e:
        args.subparser.error(f"IMAGES: {e}")
    loaded = load_or_exit(args)
    check_divisor(args, args.resolution, int(loaded.net.size_divisor), "--resolution")
    try:
        check_output_folder(args.out, "--out")
    except OSError as e:
        args.subparser.error(str(e))
    result = predict(loaded.net, images, args.out, device=args.device, resolution=args.resolution,
                     batch_size=args.batch_size, progress=not args.no_progress)
    print(json.dumps({"out": str(args.out), "images": len(images), "written": len(result.written),
                      "skipped": result.skipped, "files": sum(len(f) for f in result.written.values())}, indent=2))
    if result.skipped:
        print(f"pyamalgam predict: error: {len(result.skipped)} of {len(images)} image(s) could not be read and were "
              f"skipped (the other {len(result.written)} were written)", file=sys.stderr)
        return 2
    return 0
