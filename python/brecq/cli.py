"""Command line: ``brecq <command>``. Each command is a small function; see ``brecq --help``."""
from __future__ import annotations

import argparse
import logging
import sys


def _demo(args) -> int:
    from brecq_ext import Clipping

    from .demo import format_demo, run_demo

    result = run_demo(layers=args.layers, seed=args.seed,
                      clipping=Clipping.MINMAX if args.minmax else Clipping.MSE,
                      speed_repeats=args.repeats)
    print(format_demo(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brecq", description="BRECQ post-training quantization toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="offline demo: quantize a Qwen3-shaped model, print sizes and speed")
    demo.add_argument("--layers", type=int, default=2, help="decoder layers of the Qwen3-0.6B-shaped model")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--repeats", type=int, default=50, help="timed calls per matmul")
    demo.add_argument("--minmax", action="store_true", help="min-max ranges instead of the MSE clipping search")
    demo.set_defaults(run=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
