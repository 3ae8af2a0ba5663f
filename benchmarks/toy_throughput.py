"""Per-sample RLR estimates per second on the linear chain (T=50, d=8), against the ceiling
set by drawing the same number of normals.

    python benchmarks/toy_throughput.py [--n 16384] [--repeats 5]

Each sample needs, per step, d*d + d parameter-noise draws (tau > 0 at every step) and d
inherent-noise draws (sigma > 0 at every step): T (d^2 + 2d) = 4000 normals at T=50, d=8.
The ceiling is (normals drawn per second) / 4000, measured with the same torch.randn calls
in the same shapes. Results are printed as a markdown table.
"""
from __future__ import annotations

import argparse
import time

import torch

from halforder.estimators import Plan, estimate
from halforder.toy import linear_chain


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384, help="samples per estimate() call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--T", type=int, default=50)
    ap.add_argument("--d", type=int, default=8)
    args = ap.parse_args()
    T, d, n = args.T, args.d, args.n
    per_sample = T * (d * d + 2 * d)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; T={T}, d={d}, n={n} per call, "
          f"{per_sample} normals per sample\n")
    print("| dtype | plan | estimates/s | ceiling (normals/s / per-sample draws) | fraction of ceiling |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.float64):
        chain, params = linear_chain(T=T, d=d, sigma=0.5, tau=0.05, seed=0, dtype=dtype)
        g = torch.Generator().manual_seed(0)
        x_T = chain.sample_start(n, g, dtype=dtype)

        def draws():
            for _ in range(T):
                torch.randn((n, d, d), generator=g, dtype=dtype)
                torch.randn((n, d), generator=g, dtype=dtype)
                torch.randn((n, d), generator=g, dtype=dtype)

        ceiling = n / best_of(draws, args.repeats)
        for plan in (Plan.rlr(T, 2, T // 3), Plan.rlr(T, 0)):
            rate = n / best_of(lambda: estimate(chain, plan, params, x_T, generator=g, per_sample=True),
                               args.repeats)
            print(f"| {str(dtype).removeprefix('torch.')} | {plan} | {rate:,.0f} | {ceiling:,.0f} | {rate / ceiling:.2f} |")


if __name__ == "__main__":
    main()
