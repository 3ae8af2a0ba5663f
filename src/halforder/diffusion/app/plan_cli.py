"""``halforder plan``: the ranked estimators for a fine-tuning run's config under a memory
and a time budget (:mod:`halforder.diffusion.app.plan_choice`, docs/plan-search.md).

    halforder plan --preset tiny --memory 2GiB [--time 1s]
    halforder plan --config run.yaml --memory 20GiB

The config's estimator settings (an RLR config's h, j law, ...) are replaced by the search.
Nothing is written; bad input ends with a one-line message and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from ...training.config import field_default
from .config import SAMPLER_FIELDS, load_config
from .plan_choice import report
from .run import prepare


def main(argv: list[str] | None = None) -> int:
    """``halforder plan``: print the ranked candidates for a run's config; 2 on bad input."""
    p = argparse.ArgumentParser(prog="halforder plan", description="Rank the estimators for a fine-tuning run "
                                "under a memory and a time budget, from costs and variances measured on its chain.")
    p.add_argument("--memory", required=True, help="activation memory budget, e.g. 2GiB, 512MiB")
    p.add_argument("--time", help="time budget per estimate (one batch), e.g. 1s, 250ms")
    p.add_argument("--preset", help="a preset of halforder train (e.g. tiny)")
    p.add_argument("--config", help="a config file of halforder train")
    p.add_argument("--plan-pilots", type=int, help="pilot estimates per part of a plan (default: the config's, 64)")
    p.add_argument("--top", type=int, default=20, help="rows of the table (default 20)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, {"preset": args.preset})
        fields = cfg.__dataclass_fields__
        pilots = cfg.plan_pilots if args.plan_pilots is None else args.plan_pilots
        cfg = dataclasses.replace(cfg, estimator="auto", memory_budget=args.memory, plan_pilots=pilots,
                                  time_budget=args.time or cfg.time_budget,
                                  output_dir=None, resume=None,   # a plan writes nothing
                                  **{f: field_default(fields[f]) for f in SAMPLER_FIELDS})
        prepared = prepare(cfg)
    except (ValueError, OSError) as e:
        print(f"halforder plan: error: {e}", file=sys.stderr)
        return 2
    print(report(prepared.search, args.top))
    return 0
