"""``pyamalgam export MODEL --format onnx|pt2``: the command around :func:`pyamalgam.deploy.export_model`.

Every argument is checked before the export starts (exit 2 with the usage line: a MODEL that does
not load, ``--resolution`` that is no multiple of the model's size divisor, ``--keep-ops`` with
ONNX, ONNX without its packages, an unwritable ``--out``). After writing, the file is run on a fresh
input (ONNX Runtime for ONNX, ``torch.export.load`` for ``.pt2``) and compared with PyTorch; a
difference over ``TOLERANCE`` (relative to the output's largest value, at least 1) that is also over
10x PyTorch's own float32 error on that output exits 1 (:func:`~pyamalgam.deploy.export.export_ok`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import _resolution
from ._args import check_divisor, load_or_exit, model_path

TOLERANCE = 1e-4


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="export a saved TargetNet or teacher to ONNX or a torch.export .pt2 program",
        description="Trace MODEL with torch.export, replace the fused pyamalgam operators by their reference "
                    "formulas, write ONNX or .pt2, then check the file against PyTorch (docs/deploy.md).")
    p.add_argument("model", metavar="MODEL", type=model_path, help="a model file (TargetNet.save) or teacher checkpoint")
    p.add_argument("--format", required=True, choices=("onnx", "pt2"), help="onnx or pt2 (torch.export.save)")
    p.add_argument("--out", default=None, help="output file (default: MODEL with the format's suffix)")
    p.add_argument("--resolution", type=_resolution, default=None,
                   help="HxW of the traced input, multiples of 2^depth (default: the size the model was saved "
                        "with, else 256x256 rounded up)")
    p.add_argument("--dynamic", action="store_true",
                   help="free batch size and image size (multiples of 2^depth); default: exactly 1xCxHxW")
    p.add_argument("--keep-ops", action="store_true",
                   help="pt2 only: keep the fused pyamalgam operators (the file then loads only with pyamalgam)")
    p.add_argument("--no-check", action="store_true", help="do not run the written file against PyTorch")
    p.set_defaults(fn=run, subparser=p)
    return p


def run(args) -> int:
    from ..teachers import check_output_folder
    from .export import check_export, default_resolution, export_model, export_ok

    if args.keep_ops and args.format == "onnx":
        args.subparser.error("--keep-ops: ONNX has no pyamalgam operators; an ONNX export always decomposes them")
    if args.format == "onnx":
        _need_onnx(args)
    loaded = load_or_exit(args)
    divisor = int(loaded.net.size_divisor)
    saved = loaded.record.get("resolution")
    resolution = args.resolution or (tuple(saved) if saved else default_resolution(divisor))
    check_divisor(args, resolution, divisor, "--resolution" if args.resolution else "the saved resolution")
    out = Path(args.out) if args.out else Path(args.model).with_suffix("." + args.format)
    if out.is_dir():
        args.subparser.error(f"--out {str(out)!r} is a folder; give a file, e.g. {str(out / ('model.' + args.format))!r}")
    try:
        check_output_folder(out.parent, "--out")
    except OSError as e:
        args.subparser.error(str(e))
    exported = export_model(loaded.net, out, args.format, resolution=resolution, dynamic=args.dynamic,
                            keep_ops=args.keep_ops)
    diffs = None if args.no_check else check_export(exported, loaded.net, args.format, dynamic=args.dynamic)
    print(json.dumps({"out": str(exported.path), "format": args.format, "outputs": exported.names,
                      "traced_shape": list(exported.shape), "dynamic": args.dynamic,
                      "fused_ops_left": len(exported.fused_ops), "check": diffs}, indent=2))
    if diffs is None and not args.no_check:
        print("pyamalgam export: not checked: onnxruntime is not installed", file=sys.stderr)
    bad = export_ok(diffs or {}, TOLERANCE)
    if bad:
        print(f"pyamalgam export: failed: the exported outputs differ from PyTorch beyond {TOLERANCE:g}: {bad}",
              file=sys.stderr)
        return 1
    return 0


def _need_onnx(args) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        args.subparser.error('--format onnx needs onnx and onnxscript: pip install "pyamalgam[export]"')
