"""The ``pyamalgam`` command line: argument parsing only; each command is a function elsewhere."""
from __future__ import annotations

import argparse
import json
import sys


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyamalgam", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions and what the compiled operators were built with")
    p.set_defaults(fn=_cmd_info)
    p = sub.add_parser("selfcheck", help="check every fused operator against its float64 reference")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.set_defaults(fn=_cmd_selfcheck)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
