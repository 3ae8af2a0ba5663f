"""Reward fine-tuning of a small pixel-space diffusion model on CPU with every estimator,
at equal counted compute.

A ``UNet2DModel`` pretrained here on 16x16 coloured shapes (:mod:`experiments.shapes.pretrain`)
is fine-tuned through a LoRA adapter to maximise a reward with headroom: closeness to one
target image (:mod:`experiments.shapes.target`), which the base model reaches at 0.05 and
which only a model that maps every noise onto the target reaches at 1. Every method starts
from the same weights and LoRA initialisation and spends the same budget of denoiser
evaluations, counted by the library's compute meter (:mod:`halforder.estimators.compute`:
one per sample per forward or backward pass, checkpoint and HO recomputation included; the
training loop writes it to every record). Each run checks the count against
:func:`~halforder.estimators.expected_evaluations` of the plans it drew.

One code path: every method is a plan sampler of the library, a pairing, a baseline and a
checkpointing flag; the model side is the library's ``DiffusionTask`` and the training is
the library's loop (``halforder.training.train``). This script adds the budget (a ``stop``
hook), evaluations (``on_step``) and the activation-memory meter (``around_estimate``).

Learning rates: every method is swept over ``lrs`` (factors of 3) on ``sweep_seed``, and
the grid is extended by factors of 3 past whichever edge holds the best rate, up to
``lr_extend`` times, so the chosen rate is interior where that is possible; the table says
where it is not. The chosen rate then runs on every seed.

The chain is the same for every method: DDIM with T steps and eta at every step, so the
likelihood-ratio (HO) terms have noise to work with; ZO steps add parameter noise
``zo_sigma``, and evaluation samples the same chain without it.

Run (from the repository root):

    python experiments/finetune_cpu.py --jobs 2     # full run, writes docs/results/finetune_*
    python experiments/finetune_cpu.py --quick      # smoke test, writes runs/finetune-quick

Outputs in ``--out``: finetune_reward_vs_compute.png, finetune_samples.png,
finetune_table.md, finetune_results.json.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import torch

if __package__ in (None, ""):  # run as a script: make `experiments` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import require_extras  # noqa: E402

if __name__ == "__main__":   # at once, before the imports below need them
    require_extras("plots", "diffusion")

from experiments import finetune_report as report  # noqa: E402
from experiments import learning_runs as runs  # noqa: E402
from experiments.shapes.classifier import ClassifierConfig  # noqa: E402
from experiments.shapes.pretrain import PretrainConfig  # noqa: E402
from experiments.shapes.target import TargetConfig  # noqa: E402
from experiments.shapes.world import UNCONDITIONAL, Setup, build_setup, evaluate  # noqa: E402
from halforder.estimators import (Pairing, SavedTensorMeter, estimate, expected_evaluations, group_means,  # noqa: E402
                                  grouped, make_sampler)
from halforder.training import Hooks, LoopConfig, make_accelerator, train  # noqa: E402
from halforder.training.files import write_json  # noqa: E402

ROLES = ("FO", "HO", "ZO")
METHODS = ("full", "draft1", "alignprop", "reinforce", "reinforce_grpo", "zeroth_order", "zeroth_order_paired",
           "rlr_h0", "rlr_h1", "rlr_h2", "rlr_h3", "rlr_h0_paired", "rlr_h1_paired", "rlr_h2_paired",
           "rlr_h3_paired", "rlr_h2_noZO")


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole experiment.

    Attributes:
      pretrain: the base model.
      target: the reward's target image and scale.
      classifier: a shape classifier whose P(circle) is reported beside the reward (the
        target is a circle; never optimised).
      T: DDIM steps of the chain.
      eta: DDIM eta at every step (sigma_t > 0 everywhere).
      zo_sigma: parameter-noise scale tau on ZO steps.
      batch: samples per gradient estimate (the leave-one-out baseline needs >= 2).
      budget: denoiser evaluations (per sample, forward + backward, by the library's meter)
        that each run may spend; a run stops at the first update that reaches it.
      lrs: the Adam learning rates every method is swept over on ``sweep_seed``.
      lr_extend: at most this many more rates (a factor 3 apart) past the edge that holds
        the best rate; then the best rate (by the area under reward against compute) runs
        on every seed.
      sweep_seed: the seed of the learning-rate sweep (not among ``seeds``).
      lora_rank: LoRA rank on ``lora_targets``.
      lora_targets: UNet modules that get LoRA.
      seeds: one run per seed and method (the seed drives plans and noise).
      n_eval: samples in each evaluation (fixed start noise and step noise).
      n_points: evaluations along the budget (besides the start).
      n_var: samples for the per-sample gradient variance at the start.
      methods: names from :func:`methods`.
    """

    pretrain: PretrainConfig = PretrainConfig(steps=1200)
    target: TargetConfig = TargetConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    T: int = 10
    eta: float = 1.0
    zo_sigma: float = 0.05
    batch: int = 8
    budget: int = 8000
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2)
    lr_extend: int = 3
    sweep_seed: int = 100
    lora_rank: int = 2
    lora_targets: tuple[str, ...] = ("conv1", "conv2")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    n_eval: int = 32
    n_points: int = 6
    n_var: int = 32
    methods: tuple[str, ...] = METHODS


QUICK = ExperimentConfig(pretrain=PretrainConfig(channels=(16, 32), steps=20, batch=16),
                         classifier=ClassifierConfig(steps=20, batch=32),
                         T=4, batch=8, budget=320, lrs=(1e-3, 3e-3), lr_extend=1, seeds=(0,), n_eval=8, n_points=2,
                         n_var=8, methods=("full", "draft1", "reinforce", "reinforce_grpo", "zeroth_order",
                                           "zeroth_order_paired", "rlr_h2_paired", "rlr_h2_noZO"))


@dataclass(frozen=True)
class Method:
    """A method: a plan sampler of the library, gradient checkpointing, a pairing and a
    baseline (``grpo``: GRPO's normalised advantage, biased)."""

    sampler: object
    checkpointing: bool = False
    pairing: str = "none"
    baseline: str = "loo"


def methods(T: int) -> dict[str, Method]:
    """Every method by name. AlignProp and the ZO-dropping RLR are the library's biased
    samplers (``truncated_random``, ``rlr_no_zo``); ``reinforce_grpo`` is REINFORCE with
    GRPO's normalised advantages (biased); ``_paired``: antithetic pairs with the parameter
    noise mirrored."""
    out = {"full": Method(make_sampler("full", T), True),
           "draft1": Method(make_sampler("truncated", T, k=1)),
           "alignprop": Method(make_sampler("truncated_random", T, k=T)),
           "reinforce": Method(make_sampler("reinforce", T)),
           "reinforce_grpo": Method(make_sampler("reinforce", T), baseline="grpo"),
           "zeroth_order": Method(make_sampler("zeroth_order", T)),
           "zeroth_order_paired": Method(make_sampler("zeroth_order", T), pairing="param")}
    for h in range(0, min(3, T - 1) + 1):
        out[f"rlr_h{h}"] = Method(make_sampler("rlr", T, h=h))
        out[f"rlr_h{h}_paired"] = Method(make_sampler("rlr", T, h=h), pairing="param")
    out["rlr_h2_noZO"] = Method(make_sampler("rlr_no_zo", T, h=min(2, T - 1)))
    return out


def gradient_variance(setup: Setup, method: Method) -> dict:
    """Variance per sample of the estimate at the start, per role: G x the trace of
    the covariance of a group mean (G = 1 unpaired), from ``n_var`` samples (per_sample)."""
    g = torch.Generator().manual_seed(777)
    plan = method.sampler.sample(method.sampler.init(), g)
    task = setup.task(method.checkpointing)
    G = Pairing.parse(method.pairing).size
    n = setup.cfg.n_var
    chain = task.chain(plan, UNCONDITIONAL * n, g)
    est = estimate(chain, plan, task.params, grouped(chain.sample_start(n // G, g), G), generator=g,
                   per_sample=True, baseline=method.baseline, pairing=method.pairing)
    var = (lambda d: G * sum(float(group_means(v, G).var(0).sum()) for v in d.values()))  # noqa: E731
    out = {role: var(est.parts[role]) for role in ROLES}
    out["total"] = var(est.grad)
    out["mean_sq_norm"] = sum(float(v.mean(0).pow(2).sum()) for v in est.grad.values())
    return out


# ----------------------------------------------------------------------------- one run
def run(setup: Setup, name: str, seed: int, lr: float) -> dict:
    """Fine-tune from the start with method ``name`` at learning rate ``lr`` until the budget
    is spent, through the library's training loop; the compute comes from the loop's records
    (the library's meter), checked against the plans' exact cost."""
    cfg = setup.cfg
    method = methods(cfg.T)[name]
    task = setup.task(method.checkpointing)
    meter = SavedTensorMeter(exclude=[*setup.unet.parameters(), *task.params.values()])
    first, x0 = setup.start
    curve, train_curve, plans = [{"compute": 0, "seconds": 0.0, **first}], [], []
    marks = [cfg.budget * (i + 1) / cfg.n_points for i in range(cfg.n_points)]
    eval_seconds = 0.0

    def on_step(rec, est):
        nonlocal x0, eval_seconds
        plans.append(rec)
        spent = rec["evaluations"]
        train_curve.append({"compute": spent, "reward": rec["reward_mean"]})
        while marks and spent >= marks[0]:
            marks.pop(0)
            t0 = time.perf_counter()
            point, x0 = evaluate(setup, task)
            # training time only: the evaluations before this point are taken out
            curve.append({"compute": spent, "seconds": rec["elapsed_s"] - eval_seconds, **point})
            eval_seconds += time.perf_counter() - t0

    loop = LoopConfig(steps=10 ** 9, lr=lr, batch_size=cfg.batch, grad_accum=1, clip_norm=0.0,
                      baseline=method.baseline, pairing=method.pairing, seed=seed, output_dir=None, eval_every=0,
                      progress=False)
    hooks = Hooks(on_step=on_step, stop=lambda rec: rec["evaluations"] >= cfg.budget, around_estimate=lambda: meter)
    result = train(task, method.sampler, UNCONDITIONAL, loop, accelerator=make_accelerator(cpu=True), hooks=hooks)
    check_count(method, plans, cfg.batch, seed)
    times = [r["time_s"] for r in result.metrics]
    return {"method": name, "seed": seed, "lr": lr, "pairing": method.pairing, "curve": curve, "train": train_curve,
            "steps": result.step, "forward": sum(r["evaluations_forward"] for r in result.metrics),
            "backward": sum(r["evaluations_backward"] for r in result.metrics),
            "time_per_step": sum(times) / len(times), "activation_bytes": meter.peak,
            "plans": [r["plan"] for r in plans[:5]], "final_samples": x0[:16].tolist() if seed == cfg.seeds[0] else None,
            "seconds": result.metrics[-1]["elapsed_s"] - eval_seconds,
            "diverged": any(r["skipped"] for r in result.metrics)}


def check_count(method: Method, records: list, batch: int, seed: int) -> None:
    """Each update's metered evaluations equal the exact cost of the plan it drew
    (:func:`experiments.learning_runs.check_count`)."""
    runs.check_count(method.sampler, records, seed,
                     lambda plan: expected_evaluations(plan, batch, checkpointed=method.checkpointing))


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    p = runs.parser(__doc__.split("\n")[0], "finetune-quick")
    p.add_argument("--zo-sigma", type=float, help="override the ZO parameter-noise scale tau")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    out, cache = runs.places(args, "finetune-quick")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else ExperimentConfig()
    cfg = dataclasses.replace(cfg, **runs.overrides(args, zo_sigma=args.zo_sigma))
    unknown = set(cfg.methods) - set(methods(cfg.T))
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; known: {sorted(methods(cfg.T))}")
    if cfg.budget < 1 or any(not lr > 0 for lr in cfg.lrs):
        p.error("the budget and the learning rates must be positive")
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    setup = build_setup(cfg, cache)
    base, base_samples = setup.start
    gvar = {name: gradient_variance(setup, methods(cfg.T)[name]) for name in cfg.methods}
    with runs.runner(setup, run, args.jobs, build_setup, (cfg, cache)) as run_all:
        swept, chosen, where = runs.sweep(run_all, cfg)
        results = run_all([(name, seed, chosen[name]) for name in cfg.methods for seed in cfg.seeds], "runs")
    table = report.summarise(results, setup, gvar, methods(cfg.T), where)
    lines = [*report.claims(results, cfg.methods, setup.reference, table), "",
             *report.headroom(results, cfg), "", *(report.sweep_table(swept, chosen, where) if swept else [])]
    report.write_table(table, setup, os.path.join(out, "finetune_table.md"), lines, args.jobs)
    report.plot(results, setup, out, base_samples, args.jobs)
    summary = {"config": dataclasses.asdict(cfg), "reference": setup.reference, "base": base, "chosen_lr": chosen,
               "lr_position": where, "table": table, "wall_seconds": time.perf_counter() - t0, "jobs": args.jobs,
               "sweep": [{k: v for k, v in r.items() if k != "final_samples"} for r in swept],
               "runs": [{k: v for k, v in r.items() if k != "final_samples"} for r in results]}
    write_json(os.path.join(out, "finetune_results.json"), runs.finite(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
