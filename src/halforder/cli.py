"""Command line: ``halforder demo`` (toy estimator comparison) and ``halforder train``
(reward fine-tuning of diffusion models; needs the ``diffusion`` extra)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        try:
            from .diffusion.cli import main as train_main
        except ImportError as err:
            raise SystemExit(f"`halforder train` needs the diffusion extra: pip install 'halforder[diffusion]' ({err})")
        return train_main(argv[1:])
    parser = argparse.ArgumentParser(prog="halforder", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compare every estimator family on an exact linear-Gaussian chain")
    demo.add_argument("--T", type=int, default=8)
    demo.add_argument("--d", type=int, default=3)
    demo.add_argument("--samples", type=int, default=50_000)
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("train", help="fine-tune a diffusion model (see `halforder train --help`)")
    args = parser.parse_args(argv)
    from .toy.demo import check_demo, comparison_table
    try:
        check_demo(args.T, args.d, args.samples)
    except ValueError as e:
        demo.error(str(e))
    print(comparison_table(args.T, args.d, args.samples, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
