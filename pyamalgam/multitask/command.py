"""The ``pyamalgam mtl`` command: seed 002's Table 1 (multi-task baselines, SD-MTCNN, U-Net
ablation, and the amalgamated TargetNet) on synthetic scenes. Shaped as ``pyamalgam distill``:
:func:`add_parser` registers it (``fn=run``, ``check=check``), :func:`check` runs before any
work (exit 2 on a bad argument), :func:`run` runs it and prints the table. ``register`` /
``run`` are the pair the CLI calls."""
from __future__ import annotations

import argparse

from ..distill.command import _device, _seeds, _threads, check

__all__ = ["add_parser", "register", "check", "run"]


def _tasks(text: str) -> tuple:
    from ..models.multitask import resolve_tasks

    try:
        return tuple(resolve_tasks([t.strip() for t in text.split(",") if t.strip()]))
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``mtl`` on ``subparsers`` (the CLI's); returns its parser."""
    p = subparsers.add_parser(
        "mtl", help="seed 002's multi-task table (Vanilla, SD-Vanilla, Trad. KD, SD-MTCNN, U-Net, amalgamated) "
                    "on synthetic scenes",
        description="Train hard-sharing multi-task SegNets with labels (vanilla, self-distilled: SD-Vanilla and "
                    "SD-MTCNN T/S in the (★), (★★) and full variants; traditional KD from single-task teachers; "
                    "the U-Net ablation) and an amalgamated TargetNet from single-task teachers, over several "
                    "seeds; write the table (markdown, JSON) and a figure to --out.")
    p.add_argument("--quick", action="store_true", help="small images and few steps (about 1.5 min on 2 idle cores)")
    p.add_argument("--out", default="runs/mtl", help="folder of the tables and the figure (default runs/mtl)")
    p.add_argument("--seeds", type=_seeds, default=(0, 1), help="comma-separated training seeds (default 0,1)")
    p.add_argument("--tasks", type=_tasks, default=None,
                   help="comma-separated tasks (default seg,depth,normal; edges, keypoints where available)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", type=_threads, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (stderr)")
    p.set_defaults(fn=run, check=check, subparser=p)
    return p


register = add_parser


def run(args) -> int:
    """Run the table of ``args`` and print it; 0 on success."""
    from .report import markdown
    from .table import run_table, table_config

    overrides = {} if args.tasks is None else {"tasks": tuple(args.tasks)}
    cfg = table_config("quick" if args.quick else "full", **overrides)
    results = run_table(args.out, seeds=args.seeds, device=args.device, threads=args.threads,
                        progress=not args.no_progress, config=cfg)
    print(markdown(results), end="")
    print(f"(written to {results['files']['md']}, {results['files']['json']}, {results['files']['png']})")
    return 0
