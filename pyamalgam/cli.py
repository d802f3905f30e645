"""The ``pyamalgam`` command line: argument parsing only; each command is a function elsewhere.

Exit codes: 0 success, 1 a run that failed (e.g. a diverging loss), 2 bad arguments or data
that cannot be opened (argparse's convention), 130 interrupted (Ctrl-C; cached stages are kept).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

_TASKS = ("seg", "depth", "normal")


def _cmd_info(args) -> int:
    import torch

    import pyamalgam

    info = {"pyamalgam": pyamalgam.__version__, "torch": torch.__version__, "build": pyamalgam.build_info(),
            "cuda_available": torch.cuda.is_available()}
    print(json.dumps(info, indent=2))
    return 0


def _cmd_selfcheck(args) -> int:
    from .selfcheck import run

    return 0 if run(device=args.device) else 1


def _cmd_demo(args) -> int:
    from .demo import demo_config, run_demo

    config = demo_config(args.quick, args.device, **dict(args.set)) if args.set else None
    run_demo(args.out, device=args.device, quick=args.quick, seed=args.seed, progress=not args.no_progress,
             config=config, threads=args.threads, data=args.data)
    return 0


def _cmd_train_teacher(args) -> int:
    from .teachers import run_train_teacher

    out = args.out or f"teachers/{args.task}.safetensors"
    summary = run_train_teacher(
        args.task, out, data=args.data, resolution=args.resolution, size=args.size, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer, width=args.width, depth=args.depth,
        num_bins=args.num_bins, device=args.device, seed=args.seed, num_workers=args.workers,
        progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


# ---------------------------------------------------------------------- argument types
# Each raises argparse.ArgumentTypeError, so a bad value exits with code 2 and a usage line
# before any data is rendered or any network is built.

def _number(kind, ok, what):
    """An argparse type: ``kind(text)`` that satisfies ``ok``, else an error naming ``what``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine (torch.cuda.is_available() is False); "
                                         "use --device cpu")
    return text


def _data_spec(text: str) -> str:
    kind, sep, root = text.partition(":")
    if kind == "synthetic" and not sep:
        return text
    if kind in ("nyuv2", "cityscapes"):
        if not root:
            raise argparse.ArgumentTypeError(f"{kind} needs its folder: {kind}:/path/to/{kind} (see docs/data.md)")
        if not Path(root).is_dir():
            raise argparse.ArgumentTypeError(f"no folder {root!r} for {kind} (see docs/data.md for the layout)")
        return text
    raise argparse.ArgumentTypeError(f"expected synthetic, nyuv2:ROOT or cityscapes:ROOT, got {text!r}")


def _resolution(text: str) -> tuple:
    from .teachers import parse_resolution

    try:
        return parse_resolution(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _out_dir(text: str) -> str:
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    return text


def _override(text: str) -> tuple:
    """``KEY=VALUE`` for a :class:`~pyamalgam.demo.DemoConfig` field, VALUE parsed as the field's type."""
    from .demo import DemoConfig

    key, sep, value = text.partition("=")
    fields = {f.name: f for f in dataclasses.fields(DemoConfig)}
    if not sep or key not in fields:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY one of {sorted(fields)}, got {text!r}")
    default = getattr(DemoConfig, key)
    try:
        if isinstance(default, tuple):
            return key, _resolution(value)
        if isinstance(default, bool):  # bool("false") is True: spell the two values out
            words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
            if value.lower() not in words:
                raise ValueError(value)
            return key, words[value.lower()]
        return key, type(default)(value)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"{key} needs a {type(default).__name__}, got {value!r}") from None


# ---------------------------------------------------------------------------- parser

def _add_common(p, device_default) -> None:
    p.add_argument("--device", type=_device, default=device_default,
                   help=f"cpu, cuda or cuda:N (default: {device_default or 'cuda if available, else cpu'})")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seeds data, initialisation and order (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or stage lines (stderr)")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the paper's experiment end to end: data, teachers, TargetNet-2/3, tables, figures",
                       description="Render synthetic scenes, train SegNet/DepthNet/NormNet, amalgamate them into "
                                   "TargetNet-2 (Decoder_b1..b5 and Eq. 7) and TargetNet-3 (Eq. 8, Eq. 9), evaluate, "
                                   "and write Table 1, Table 2 and Figs. 5-6 to --out. Finished stages are reused.")
    p.add_argument("--quick", action="store_true", help="CI-sized run (about 1 min on 2 idle CPU cores): every stage, tiny sizes")
    p.add_argument("--out", type=_out_dir, default="runs/demo", help="run folder: caches, tables, figures (default runs/demo)")
    p.add_argument("--data", type=_data_spec, default=None,
                   help="synthetic (default), nyuv2:ROOT or cityscapes:ROOT (see docs/data.md)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--set", type=_override, action="append", metavar="KEY=VALUE",
                   help="override one preset field, e.g. --set teacher_steps=500 (repeatable; see docs/demo.md)")
    _add_common(p, None)
    p.set_defaults(fn=_cmd_demo)


def _add_train_teacher(sub) -> None:
    p = sub.add_parser("train-teacher", help="train one single-task teacher with labels (Eq. 1, 3 or 4) and save it",
                       description="Train SegNet (seg), DepthNet (depth) or NormNet (normal) on labelled data and save "
                                   "PATH.safetensors + PATH.json, which pyamalgam.teachers.load_teacher, the "
                                   "Amalgamator and the demo read.")
    p.add_argument("--task", required=True, choices=_TASKS, help="which teacher")
    p.add_argument("--data", type=_data_spec, default="synthetic",
                   help="synthetic (default), nyuv2:ROOT or cityscapes:ROOT (see docs/data.md)")
    p.add_argument("--out", default=None, help="checkpoint path (default teachers/TASK.safetensors)")
    p.add_argument("--steps", type=_positive_int, default=1000, help="optimiser steps (default 1000)")
    p.add_argument("--resolution", type=_resolution, default=None,
                   help="HxW, multiples of 2^depth (default: 96x128 synthetic, stored size for real data)")
    p.add_argument("--size", type=_positive_int, default=None, help="synthetic training images (default: the split's)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="default 8")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="initial learning rate, poly decay (default 1e-3)")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="default adam")
    p.add_argument("--width", type=_positive_float, default=1.0, help="channel multiplier of VGG16 (default 1)")
    p.add_argument("--depth", type=_positive_int, default=5, help="pooling stages; N = 2*depth blocks (default 5)")
    p.add_argument("--num-bins", type=_positive_int, default=64, help="depth bins N_d of Eq. 2 (default 64)")
    p.add_argument("--workers", type=_non_negative_int, default=0, help="DataLoader workers (default 0)")
    _add_common(p, None)
    p.set_defaults(fn=_cmd_train_teacher)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyamalgam", description="Knowledge amalgamation of dense-prediction teachers "
                                     "into one multi-task student (Ye et al., CVPR 2019). Start with: pyamalgam demo --quick")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions and what the compiled operators were built with")
    p.set_defaults(fn=_cmd_info)
    p = sub.add_parser("selfcheck", help="check every fused operator against its float64 reference")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.set_defaults(fn=_cmd_selfcheck)
    _add_demo(sub)
    _add_train_teacher(sub)
    return parser


def _check(parser, args) -> None:
    """Checks that need several arguments together (argparse types see one at a time)."""
    if args.command == "train-teacher" and args.resolution is not None:
        divisor = 2 ** args.depth
        if any(s % divisor for s in args.resolution):
            parser.error(f"--resolution {args.resolution[0]}x{args.resolution[1]}: both sides must be multiples "
                         f"of 2^depth = {divisor}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print(f"pyamalgam {args.command}: interrupted; finished stages are kept", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:  # bad data or settings found late
        print(f"pyamalgam {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"pyamalgam {args.command}: failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
