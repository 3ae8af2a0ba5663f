"""Run every experiment and write its figures and tables to docs/results/.

    python -m experiments.run_all            # the committed results in docs/results/ (about 75 min on one core)
    python -m experiments.run_all --quick    # smoke test, tiny samples (about 40 s on one core), in runs/quick-results/

Every experiment seeds its own generators, and a full run rewrites the committed files of
e1-e7 byte for byte; e8 measures CPU times (its seconds, and the rankings that use them,
vary from run to run); e9's CSV comes back byte for byte, its Markdown states the run's wall
time. The times, on one thread, measured separately: e1-e7 313 s of CPU time, e8 about 60 min
and e9 about 9 min of wall time on a shared 2-core machine; --quick 32 s before e9, whose
--quick part takes about 8 s. Set HALFORDER_THREADS to use more than one torch thread.
"""
from __future__ import annotations

import json
import time

from tqdm.auto import tqdm

from . import (e1_unbiasedness, e2_variance, e3_truncation, e4_hstar, e5_convergence, e6_compute, e7_pairing,
               e8_plan_search, e9_field_estimators)
from .common import cli, setup


def main() -> None:
    args = cli("Run all halforder experiments (figures and tables into docs/results/).", ("plots", "diffusion"))
    setup()
    times = {}
    bar = tqdm(total=9, desc="experiments")
    t0 = time.perf_counter()

    def step(name, fn, *a, **kw):
        bar.set_postfix_str(name)
        t = time.perf_counter()
        r = fn(args.out, args.quick, *a, **kw)
        times[name] = round(time.perf_counter() - t, 1)
        bar.update()
        return r

    step("e1_unbiasedness", e1_unbiasedness.run)
    e2 = step("e2_variance", e2_variance.run)
    step("e3_truncation", e3_truncation.run)
    step("e4_hstar", e4_hstar.run)
    step("e5_convergence", e5_convergence.run)
    step("e6_compute", e6_compute.run, measured=e2["measured"])
    step("e7_pairing", e7_pairing.run)
    step("e8_plan_search", e8_plan_search.run)
    step("e9_field_estimators", e9_field_estimators.run)
    bar.close()
    times["total"] = round(time.perf_counter() - t0, 1)
    print("wall seconds:", json.dumps(times))


if __name__ == "__main__":
    main()
