"""The ``pyamalgam`` command line: argument parsing only; each command is a function elsewhere.

Exit codes: 0 success; 1 a run that failed (e.g. a diverging loss); 2 bad arguments (argparse's
convention: a usage line and a message naming the argument, before any work starts) or data that
cannot be opened or read (the message names the file); 130 interrupted (Ctrl-C; cached stages
are kept). docs/robustness.md lists each promise with the test that holds it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ._interrupts import InterruptGuard

_TASKS = ("seg", "depth", "normal", "edges", "keypoints")


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
    from .demo import run_demo

    # args.config: the preset with --set and --data applied, checked by _check_demo
    run_demo(args.out, device=args.device, quick=args.quick, seed=args.seed, progress=not args.no_progress,
             config=args.config, threads=args.threads, data=args.data)
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
        if value is None or not ok(value):  # nan fails every comparison, so `ok` rejects it
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")
_num_bins = _number(int, lambda v: v >= 2, "an integer >= 2 (depth bins)")


def _seed(text: str) -> int:
    from .teachers import MAX_SEED

    return _number(int, lambda v: 0 <= v <= MAX_SEED, "a non-negative integer below 2^63")(text)


def _threads(text: str) -> int:
    cap = 4 * (os.cpu_count() or 1)  # more threads than that only oversubscribes the cores
    return _number(int, lambda v: 1 <= v <= cap, f"a positive integer up to {cap} (4 x the CPU count)")(text)


def _depth(text: str) -> int:
    from .teachers import MAX_DEPTH

    return _number(int, lambda v: 1 <= v <= MAX_DEPTH, f"an integer in 1..{MAX_DEPTH} (VGG16's pooling stages)")(text)


def _width(text: str) -> float:
    from .teachers import MAX_WIDTH

    return _number(float, lambda v: 0 < v <= MAX_WIDTH, f"a number in (0, {MAX_WIDTH:g}]")(text)


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        _check_cuda(text, device.index)
    return text


def _check_cuda(text: str, index) -> None:
    import torch

    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine (torch.cuda.is_available() is False); "
                                         "use --device cpu")
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    from ._extension import has_cuda_kernels

    if not has_cuda_kernels():  # the fused operators would refuse the first CUDA tensor, mid-run
        raise argparse.ArgumentTypeError("this pyamalgam build has no CUDA kernels (see `pyamalgam info`); rebuild "
                                         "it with nvcc available (README: Installing) or use --device cpu")


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


_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
# How --set reads a value, by the type of the field's default; what the message asks for.
_SET_PARSERS = {
    bool: (lambda v: _WORDS[v.lower()], "true or false"),  # bool("false") is True: spell the two values out
    int: (int, "an int"),
    float: (float, "a number"),
    str: (str, "a string"),
    tuple: (lambda v: _resolution(v), "HxW"),
}


def _override(text: str) -> tuple:
    """``KEY=VALUE`` for a :class:`~pyamalgam.demo.DemoConfig` field, VALUE parsed as the
    field's type and checked by the field's own rule (:func:`pyamalgam.demo.config.check_field`)."""
    import dataclasses

    from .demo import DemoConfig
    from .demo.config import check_field

    key, sep, value = text.partition("=")
    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    if not sep or key not in fields:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY one of {sorted(fields)}, got {text!r}")
    parse, what = _SET_PARSERS[type(getattr(DemoConfig, key))]
    try:
        parsed = parse(value)
    except (ValueError, KeyError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"{key} needs {what}, got {value!r}") from None
    try:
        return key, check_field(key, parsed)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{text}: {str(e).removeprefix('demo config: ')}") from None


# ---------------------------------------------------------------------------- parser

def _add_common(p, device_default) -> None:
    p.add_argument("--device", type=_device, default=device_default,
                   help=f"cpu, cuda or cuda:N (default: {device_default or 'cuda if available, else cpu'})")
    p.add_argument("--seed", type=_seed, default=0, help="seeds data, initialisation and order (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or stage lines (stderr)")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the paper's experiment end to end: data, teachers, TargetNet-2/3, tables, figures",
                       description="Render synthetic scenes, train SegNet/DepthNet/NormNet, amalgamate them into "
                                   "TargetNet-2 (Decoder_b1..b5 and Eq. 7) and TargetNet-3 (Eq. 8, Eq. 9), evaluate, "
                                   "and write Table 1, Table 2 and Figs. 5-6 to --out. Finished stages are reused.")
    p.add_argument("--quick", action="store_true", help="CI-sized run (2 min on 2 idle AVX-512 CPU cores, 5.5 on AVX2 ones): every stage, small sizes")
    p.add_argument("--out", type=_out_dir, default="runs/demo", help="run folder: caches, tables, figures (default runs/demo)")
    p.add_argument("--data", type=_data_spec, default=None,
                   help="synthetic (default), nyuv2:ROOT or cityscapes:ROOT (see docs/data.md)")
    p.add_argument("--threads", type=_threads, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--set", type=_override, action="append", metavar="KEY=VALUE",
                   help="override one preset field, e.g. --set teacher_steps=500 (repeatable; see docs/demo.md)")
    _add_common(p, None)
    p.set_defaults(fn=_cmd_demo, subparser=p)


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
    p.add_argument("--width", type=_width, default=1.0, help="channel multiplier of VGG16, up to 4 (default 1)")
    p.add_argument("--depth", type=_depth, default=5, help="pooling stages, 1..5; N = 2*depth blocks (default 5)")
    p.add_argument("--num-bins", type=_num_bins, default=64, help="depth bins N_d of Eq. 2, >= 2 (default 64)")
    p.add_argument("--workers", type=_non_negative_int, default=0, help="DataLoader workers (default 0)")
    _add_common(p, None)
    p.set_defaults(fn=_cmd_train_teacher, subparser=p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyamalgam", description="Knowledge amalgamation of dense-prediction teachers "
                                     "into one multi-task student (Ye et al., CVPR 2019). Start with: pyamalgam demo --quick")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions and what the compiled operators were built with")
    p.set_defaults(fn=_cmd_info, subparser=p)
    p = sub.add_parser("selfcheck", help="check every fused operator against its float64 reference")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.set_defaults(fn=_cmd_selfcheck, subparser=p)
    _add_demo(sub)
    _add_train_teacher(sub)
    from .deploy import export_command, predict_command  # their modules import torch only when run
    from .distill.command import add_parser as _add_distill
    _add_distill(sub)
    from .multitask.command import add_parser as _add_mtl
    _add_mtl(sub)
    export_command.add_parser(sub)
    predict_command.add_parser(sub)
    return parser


def _check(args) -> None:
    """Checks that need several arguments together (argparse types see one at a time), and the
    output folder; all before any work, each error naming the argument (exit 2)."""
    check = {"demo": _check_demo, "train-teacher": _check_train_teacher}.get(args.command, getattr(args, "check", None))
    if check is not None:
        try:
            check(args)
        except (argparse.ArgumentTypeError, TypeError, ValueError, OSError) as e:
            args.subparser.error(str(e))  # the command's usage line and "pyamalgam COMMAND: error:"


def _check_demo(args) -> None:
    """The whole DemoConfig (preset + --set + --data), then --out, so run_demo starts from a
    configuration it can run (its own validate() would only repeat this)."""
    import dataclasses

    from .demo import demo_config
    from .teachers import check_output_folder

    try:
        config = demo_config(args.quick, args.device, **dict(args.set or []))
        if args.data is not None:
            config = dataclasses.replace(config, data=args.data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--set: {str(e).removeprefix('demo config: ')}") from None
    if config.data != "synthetic":  # --set data=... skipped _data_spec's folder check
        _data_spec(config.data)
    args.config = config
    check_output_folder(args.out, "--out")  # last: it creates the folder


def _check_train_teacher(args) -> None:
    from .teachers import check_output_folder, teacher_paths

    resolution = args.resolution or ((96, 128) if args.data == "synthetic" else None)  # open_dataset's default
    divisor = 2**args.depth
    if resolution is not None and any(s % divisor for s in resolution):
        given = "--resolution" if args.resolution else "the synthetic default resolution"
        raise ValueError(f"{given} {resolution[0]}x{resolution[1]}: both sides must be multiples of 2^depth = "
                         f"{divisor} (--depth {args.depth})")
    weights, _ = teacher_paths(args.out or f"teachers/{args.task}.safetensors")
    if weights.is_dir():
        raise ValueError(f"--out {str(weights)!r} is a folder; give a checkpoint path, e.g. {str(weights / args.task)!r}")
    check_output_folder(weights.parent, "--out")


# ------------------------------------------------------------------------- running

def _failure_code(e: Exception) -> int | None:
    """The exit code of an exception that ends a command, None for one that is a bug (traceback)."""
    if isinstance(e, FloatingPointError):  # a diverging loss
        return 1
    if isinstance(e, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return 2  # bad data or settings found late; unreadable data files raise DataFileError, a ValueError
    if isinstance(e, OSError):  # e.g. a full disk while writing results
        return 1
    return None


def _message(e: Exception) -> str:
    text = str(e)
    if "\nOriginal Traceback" in text:  # re-raised from a DataLoader worker: keep the original's own line
        last = text.strip().splitlines()[-1]
        text = last.partition(": ")[2] or last
    return text


def _run(args, guard) -> int:
    try:
        return args.fn(args)
    except Exception as e:
        code = None if guard.interrupted else _failure_code(e)
        if code is None:
            raise  # after an interrupt main() returns 130; otherwise a bug: its traceback, exit 1
        print(f"pyamalgam {args.command}: {'failed' if code == 1 else 'error'}: {_message(e)}", file=sys.stderr)
        return code


_INTERRUPTED = {
    "demo": "finished stages are kept; run the same command again to resume",
    "train-teacher": "a checkpoint is complete only once its .json is written; run it again to train it",
}


def main(argv=None) -> int:
    args = None
    with InterruptGuard() as guard:
        try:
            parser = build_parser()
            args = parser.parse_args(argv)
            _check(args)
            code = _run(args, guard)
        except KeyboardInterrupt:
            code = None
        except Exception:
            if not guard.interrupted:
                raise
            code = None  # what the interrupt left behind, e.g. "DataLoader worker exited unexpectedly"
        if code is None or guard.interrupted:
            guard.stop()
            command = getattr(args, "command", None) or "pyamalgam"
            hint = _INTERRUPTED.get(command)
            print(f"pyamalgam {command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
            return 130
        return code


if __name__ == "__main__":
    sys.exit(main())
