"""The ``pyamalgam distill`` command: the distillation ablation (thesis Tables 3.1 and 4.2) on
synthetic scenes, or with ``--video`` the temporal-consistency table (thesis Table 5.1) on
synthetic clips. :func:`add_parser` registers it on the CLI's sub-parsers (``fn=run``,
``check=check``, as ``train-teacher``); :func:`check` runs before any work (exit 2 on a bad
argument); :func:`run` runs it and prints the table."""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

__all__ = ["add_parser", "check", "run"]


def _seeds(text: str) -> tuple:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        seeds = ()
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative integers such as 0,1, got {text!r}")
    return seeds


def _threads(text: str) -> int:
    cap = 4 * (os.cpu_count() or 1)  # more only oversubscribes the cores
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= cap:
        raise argparse.ArgumentTypeError(f"expected a positive integer up to {cap} (4 x the CPU count), got {text!r}")
    return value


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine; use --device cpu")
    return text


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``distill`` on ``subparsers`` (the CLI's); returns its parser."""
    p = subparsers.add_parser(
        "distill", help="the structured-distillation ablation (thesis Tables 3.1, 4.2) on synthetic scenes",
        description="Train a wide SegNet teacher with labels, then students of two widths without distillation, "
                    "+PI (printed and soft-target order), +PI+PA (full and local graph), +PI+PA+HO and +CWD, over "
                    "several seeds; write the table (markdown, JSON) and a figure to --out. With --video, thesis "
                    "Table 5.1 on synthetic clips instead.")
    p.add_argument("--quick", action="store_true",
                   help="small images and few steps (2.5 min on 2 idle AVX2 cores; with --video 1.5 min; the full "
                        "preset 13 min, 11 with --video)")
    p.add_argument("--video", action="store_true",
                   help="thesis Table 5.1 instead: a per-frame student on synthetic clips, +SF, +PF, +MF, +TL and all "
                        "(Eq. 5.3), mIoU and temporal consistency (11 min on 2 idle AVX2 cores)")
    p.add_argument("--out", default=None, help="folder of the tables and the figure (default runs/distill, "
                                               "with --video runs/distill-video)")
    p.add_argument("--seeds", type=_seeds, default=(0, 1), help="comma-separated training seeds (default 0,1)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", type=_threads, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (stderr)")
    p.set_defaults(fn=run, check=check, subparser=p)
    return p


def check(args) -> None:
    """--out must be a folder that can be written (created if needed); before any work."""
    if args.out is None:
        args.out = "runs/distill-video" if getattr(args, "video", False) else "runs/distill"
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise OSError(f"--out: cannot write to the folder {str(out)!r} ({e.strerror or type(e).__name__})") from None


def run(args) -> int:
    """Run the ablation of ``args`` and print its table; 0 on success."""
    if args.out is None:
        check(args)
    if getattr(args, "video", False):
        from .video_ablation import run_video_ablation
        from .video_report import markdown as video_markdown

        results = run_video_ablation(args.out, quick=args.quick, seeds=args.seeds, device=args.device,
                                     threads=args.threads, progress=not args.no_progress)
        print(video_markdown(results), end="")
        print(f"(written to {results['files']['md']}, {results['files']['json']}, {results['files']['png']})")
        return 0
    from .ablation import run_ablation
    from .ablation_report import markdown

    results = run_ablation(args.out, quick=args.quick, seeds=args.seeds, device=args.device, threads=args.threads,
                           progress=not args.no_progress)
    print(markdown(results), end="")
    print(f"(written to {results['files']['md']}, {results['files']['json']}, {results['files']['png']})")
    return 0
