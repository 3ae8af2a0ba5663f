"""Command line: halforder demo (toy estimator comparison), halforder train (reward
fine-tuning of diffusion models), halforder plan (the estimator for a run under memory and
time budgets), halforder diagnose (which steps carry the gradient and the batch a run needs)
and halforder export (a checkpoint as a LoRA file or a fused model folder); all but demo
need the diffusion extra."""
from __future__ import annotations

import argparse
import importlib.util
import sys

from . import __version__


def parser() -> argparse.ArgumentParser:
    """The parser of ``halforder`` and its ``demo`` command (``train`` has its own,
    :func:`halforder.diffusion.app.cli.parser`)."""
    p = argparse.ArgumentParser(prog="halforder", description=__doc__)
    p.add_argument("--version", action="version", version=f"halforder {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compare every estimator family on an exact linear-Gaussian chain",
                          description="Compare every estimator family on a linear-Gaussian chain whose gradient "
                                      "is known exactly: error of the mean, a test of unbiasedness, variance and "
                                      "cost of each plan.",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--T", type=int, default=8, help="steps of the chain (at least 6)")
    demo.add_argument("--d", type=int, default=3,
                      help="dimension of the state (the parameters: a d x d matrix and a d-vector)")
    demo.add_argument("--samples", type=int, default=50_000, help="independent estimates drawn per plan")
    demo.add_argument("--seed", type=int, default=0, help="seed of the chain and of every draw")
    sub.add_parser("train", help="fine-tune a diffusion model (see: halforder train --help)")
    sub.add_parser("plan", help="rank the estimators for a fine-tuning run under memory and time budgets "
                                "(see: halforder plan --help)")
    sub.add_parser("export", help="write a checkpoint's LoRA file, or fuse it into a model folder "
                                  "(see: halforder export --help)")
    sub.add_parser("diagnose", help="which steps carry the gradient, the batch and group a run needs, and the "
                                    "ratio's consistency (see: halforder diagnose --help)")
    return p


#: the packages of the ``diffusion`` extra that ``halforder train`` and ``halforder plan`` import
DIFFUSION_EXTRA = ("diffusers", "transformers", "peft", "accelerate", "safetensors", "yaml")


def missing_diffusion_extra() -> list[str]:
    """The packages of the ``diffusion`` extra that are not installed."""
    return [m for m in DIFFUSION_EXTRA if importlib.util.find_spec(m) is None]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train", "plan", "export", "diagnose"):
        missing = missing_diffusion_extra()
        if missing:
            print(f"halforder {argv[0]}: error: needs the diffusion extra (missing: {', '.join(missing)}); install "
                  f"it with: pip install -e \".[diffusion]\"", file=sys.stderr)
            return 2
        if argv[0] == "plan":
            from .diffusion.app.plan_cli import main as plan_main
            return plan_main(argv[1:])
        if argv[0] == "diagnose":
            from .diffusion.app.diagnose_cli import main as diagnose_main
            return diagnose_main(argv[1:])
        if argv[0] == "export":
            from .diffusion.app.export_cli import main as export_main
            return export_main(argv[1:])
        from .diffusion.app.cli import main as train_main
        return train_main(argv[1:])
    p = parser()
    args = p.parse_args(argv)
    from .toy.demo import check_demo, comparison_table
    try:
        check_demo(args.T, args.d, args.samples)
    except ValueError as e:
        p.exit(2, f"{p.prog} demo: error: {e}\n")
    print(comparison_table(args.T, args.d, args.samples, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
