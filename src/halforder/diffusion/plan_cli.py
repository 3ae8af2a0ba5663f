"""``halforder plan``: the ranked estimators for a fine-tuning run's config under a memory
and a time budget (:mod:`halforder.diffusion.planning`, docs/plan-search.md).

    halforder plan --preset tiny --memory 2GiB [--time 1s]
    halforder plan --config run.yaml --memory 20GiB

Nothing is written; bad input ends with a one-line message and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import load_config
from .planning import report
from .run import prepare


def main(argv: list[str] | None = None) -> int:
    """``halforder plan``: print the ranked candidates for a run's config; 2 on bad input."""
    p = argparse.ArgumentParser(prog="halforder plan", description="Rank the estimators for a fine-tuning run "
                                "under a memory and a time budget, from costs and variances measured on its chain.")
    p.add_argument("--memory", required=True, help="activation memory budget, e.g. 2GiB, 512MiB")
    p.add_argument("--time", help="time budget per estimate (one batch), e.g. 1s, 250ms")
    p.add_argument("--preset", help="a preset of halforder train (e.g. tiny)")
    p.add_argument("--config", help="a config file of halforder train")
    p.add_argument("--top", type=int, default=20, help="rows of the table (default 20)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, {"preset": args.preset, "estimator": "auto", "memory_budget": args.memory,
                                        "time_budget": args.time})
        prepared = prepare(dataclasses.replace(cfg, output_dir=None, resume=None))   # a plan writes nothing
    except (ValueError, OSError) as e:
        print(f"halforder plan: error: {e}", file=sys.stderr)
        return 2
    print(report(prepared.search, args.top))
    return 0
