"""Activation memory and time per training step of every estimator on the tiny SD UNet.

Activation memory is counted deterministically, not sampled from an allocator, by the
library's :class:`halforder.estimators.SavedTensorMeter` (the bytes autograd saves for
backward, each storage once, the model's own weights excluded; the peak over one estimate). Time is the
CPU time of the process for one estimate (rollout, backward passes, HO recomputation) with
one torch thread, best of ``--repeats``: unlike wall time it does not count the time other
jobs on a shared machine take.

    nice -n 10 python benchmarks/diffusion_memory.py            # writes docs/results/diffusion_memory.md

Plans: full backprop with and without per-step gradient checkpointing, truncated (K=1, 5),
REINFORCE, zeroth order and RLR (h=1, 2, 3; j = T/2) for T in {10, 20, 50}.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from halforder.diffusion import NoiseScales, add_lora, make_chain, make_reward, tiny_components
from halforder.estimators import Checkpointed, Plan, SavedTensorMeter, estimate
from halforder.training.files import write_text


def plans(T: int):
    yield "full", Plan.full(T), False
    yield "full + checkpointing", Plan.full(T), True
    yield "truncated K=1", Plan.truncated(T, 1), False
    yield "truncated K=5", Plan.truncated(T, 5), False
    yield "reinforce", Plan.reinforce(T), False
    yield "zeroth_order", Plan.zeroth_order(T), False
    for h in (1, 2, 3):
        yield f"rlr h={h}", Plan.rlr(T, h, T // 2), False


def measure(comp, params, reward, plan, ckpt, batch, repeats, seed=0):
    chain = make_chain(comp, plan.T, ["a photo of a cat"] * batch, reward, guidance_scale=1.0).for_plan(
        plan, NoiseScales(eta="plan", eta_plan=0.1, zo_sigma=1e-3))
    if ckpt:
        chain = Checkpointed(chain)
    exclude = [t for m in comp.modules() for t in (*m.parameters(), *m.buffers())]
    best, peak = float("inf"), None
    for r in range(repeats + 1):   # the first run warms up (kernel selection, lazy init) and is not timed
        g = torch.Generator().manual_seed(seed)
        x_T = chain.sample_start(batch, g)
        counter = SavedTensorMeter(exclude)
        t0 = time.process_time()
        with counter:
            est = estimate(chain, plan, params, x_T, generator=g, baseline="loo")
        if r > 0:
            best = min(best, time.process_time() - t0)
        assert all(torch.isfinite(v).all() for v in est.grad.values())
        peak = counter.peak if peak is None else peak
        if counter.peak != peak:
            raise RuntimeError("saved-bytes count is not deterministic")
    return peak, best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[10, 20, 50])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscribing a shared CPU)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "results",
                                                  "diffusion_memory.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    comp = tiny_components(0)
    params = add_lora(comp.unet, rank=4, init=False, seed=0)
    reward = make_reward("brightness")
    rows = []
    for T in args.T:
        for name, plan, ckpt in plans(T):
            peak, sec = measure(comp, params, reward, plan, ckpt, args.batch, args.repeats)
            rows.append((T, name, peak, sec, plan.cost()["graph_steps"]))
            print(f"T={T:3d} {name:22s} saved {peak / 2**20:8.3f} MiB  {sec:7.3f} CPU s/step", flush=True)
    write_table(rows, args)


def write_table(rows, args):
    by = {(T, n): (b, s, g) for T, n, b, s, g in rows}
    Ts = sorted({T for T, *_ in rows})
    names = list(dict.fromkeys(n for _, n, *_ in rows))
    lines = [
        "# Activation memory and time per step on the tiny SD UNet",
        "",
        "Written by `benchmarks/diffusion_memory.py` (tiny random SD components from",
        f"`tiny_components(0)`, LoRA rank 4 on the attention projections, batch {args.batch}, DDIM, no CFG,",
        "reward `brightness` on the VAE-decoded image, leave-one-out baseline; CPU, one torch thread on a",
        "2-core machine shared with other jobs, under",
        "`nice`). **Saved** is the peak of the bytes autograd keeps for backward at once during one estimate,",
        "counted with `torch.autograd.graph.saved_tensors_hooks` (each storage once, model weights excluded):",
        "it is deterministic. **Time** is the process CPU time of one estimate with one torch thread, best",
        f"of {args.repeats} after a warm-up run (wall time on this shared machine was up to several times",
        "larger and erratic). `graph` is `Plan.cost()['graph_steps']`.",
        "",
        "| plan | graph (T=" + ", ".join(map(str, Ts)) + ") | " + " | ".join(f"saved KiB T={T}" for T in Ts) + " | "
        + " | ".join(f"CPU s/step T={T}" for T in Ts) + " |",
        "|---|---|" + "---:|" * (2 * len(Ts)),
    ]
    for n in names:
        g = ", ".join(str(by[(T, n)][2]) for T in Ts)
        mem = " | ".join(f"{by[(T, n)][0] / 1024:,.0f}" for T in Ts)
        sec = " | ".join(f"{by[(T, n)][1]:.3f}" for T in Ts)
        lines.append(f"| {n} | {g} | {mem} | {sec} |")
    lines.append("")
    for n in ("full", "full + checkpointing") if len(Ts) > 1 else ():   # a line needs two T values
        a, b, res = _linear_fit(Ts, [by[(T, n)][0] for T in Ts])
        lines.append(f"- {n}: saved bytes = {a / 1024:,.0f} KiB + {b / 1024:,.1f} KiB x T "
                     f"(least squares over T = {', '.join(map(str, Ts))}; largest residual {res / 1024:,.1f} KiB).")
    for n in names:
        if n.startswith("rlr") and len(Ts) > 1:
            vals = [by[(T, n)][0] for T in Ts]
            lines.append(f"- {n}: saved bytes at T={Ts[-1]} / at T={Ts[0]} = {vals[-1] / vals[0]:.3f} (flat in T).")
    lines += ["- The `graph` column is the cost model `Plan.cost()`; it does not know about checkpointing,",
              "  which keeps one state per FO step instead of one step graph.", ""]
    write_text(args.out, "\n".join(lines))


def _linear_fit(xs, ys):
    """Least-squares a + b x, and the largest absolute residual."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    return a, b, max(abs(y - a - b * x) for x, y in zip(xs, ys))


if __name__ == "__main__":
    main()
