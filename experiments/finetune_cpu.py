"""Reward fine-tuning of a small pixel-space diffusion model on CPU with every estimator.

A ``UNet2DModel`` pretrained here on 16x16 coloured shapes (:mod:`experiments.shapes.pretrain`)
is fine-tuned through a LoRA adapter to maximise a learned, hackable reward, the
probability that a classifier sees a circle (:mod:`experiments.shapes.classifier`).
Every method starts from the same weights and the same LoRA initialisation and gets the
same compute budget, counted in UNet evaluations: one per sample in every forward pass
(the rollout, checkpoint recomputation, HO recomputation) and every backward pass, by
hooks on the UNet. (The classifier reward is a small fraction of a UNet call.)

One code path: every method is a plan sampler of the library
(``halforder.estimators.make_sampler``) and a gradient-checkpointing flag, the model side
is the library's ``DiffusionTask`` and the training is the library's loop
(``halforder.training.train``); this script adds the budget (a ``stop`` hook), the
evaluations (an ``on_step`` hook) and the activation-memory meter (``around_estimate``).

The chain is the same for every method: DDIM with T steps and eta at every step, so the
likelihood-ratio (HO) terms have noise to work with; ZO steps add parameter noise
``zo_sigma``, and evaluation samples the same chain without it.

Run (from the repository root):

    python experiments/finetune_cpu.py --jobs 2     # full run, writes docs/results/finetune_*
    python experiments/finetune_cpu.py --quick      # smoke test, about a minute of CPU time, writes runs/finetune-quick

Outputs in ``--out``: finetune_reward_vs_compute.png, finetune_diversity_vs_reward.png,
finetune_samples.png, finetune_table.md, finetune_results.json.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as a script: make `experiments` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import finetune_report as report  # noqa: E402
from experiments.shapes.classifier import CircleReward, ClassifierConfig, pretrained_classifier  # noqa: E402
from experiments.shapes.data import SHAPES, sample_shapes  # noqa: E402
from experiments.shapes.pretrain import PretrainConfig, ddim_scheduler, pretrained_unet  # noqa: E402
from halforder.diffusion import Components, DiffusionTask, ImageView, add_lora, rollout  # noqa: E402
from halforder.estimators import Pairing, SavedTensorMeter, estimate, group_means, grouped, make_sampler  # noqa: E402
from halforder.training import Hooks, LoopConfig, make_accelerator, train  # noqa: E402
from halforder.training.files import write_json  # noqa: E402

ROLES = ("FO", "HO", "ZO")
UNCONDITIONAL = [""]   # the model has no text conditioning: every batch item is the empty prompt


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole experiment.

    Attributes:
      pretrain: the base model.
      reward: the classifier whose circle probability is maximised.
      heldout: a second classifier (another seed and width), never optimised: a drop of its
        circle probability against the trained one's signals reward hacking.
      T: DDIM steps of the chain.
      eta: DDIM eta at every step (sigma_t > 0 everywhere).
      zo_sigma: parameter-noise scale tau on ZO steps.
      batch: samples per gradient estimate (the leave-one-out baseline needs >= 2).
      budget: UNet evaluations (per sample, forward + backward) that each run may spend;
        a run stops at the first step that reaches it.
      lrs: the Adam learning rates swept for every method on ``sweep_seed``; each method
        then runs ``seeds`` with the rate that gave it the highest mean reward over the
        budget in the sweep.
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
    reward: ClassifierConfig = ClassifierConfig()
    heldout: ClassifierConfig = ClassifierConfig(width=24, seed=1)
    T: int = 10
    eta: float = 1.0
    zo_sigma: float = 0.05
    batch: int = 8
    budget: int = 4800
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    sweep_seed: int = 100
    lora_rank: int = 2
    lora_targets: tuple[str, ...] = ("conv1", "conv2")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    n_eval: int = 48
    n_points: int = 5
    n_var: int = 32
    methods: tuple[str, ...] = ("full", "draft1", "alignprop", "reinforce", "reinforce_paired", "zeroth_order",
                                "zeroth_order_paired", "rlr_h0", "rlr_h1", "rlr_h2", "rlr_h3", "rlr_h0_paired",
                                "rlr_h1_paired", "rlr_h2_paired", "rlr_h3_paired", "rlr_h2_paired4", "rlr_h2_noZO")


QUICK = ExperimentConfig(pretrain=PretrainConfig(channels=(16, 32), steps=20, batch=16),
                         reward=ClassifierConfig(steps=20, batch=32),
                         heldout=ClassifierConfig(width=8, steps=20, batch=32, seed=1),
                         T=4, batch=8, budget=192, lrs=(1e-3, 3e-3), seeds=(0,), n_eval=8, n_points=2, n_var=8,
                         methods=("full", "draft1", "reinforce", "reinforce_paired", "zeroth_order",
                                  "zeroth_order_paired", "rlr_h2_paired", "rlr_h2_paired4", "rlr_h2_noZO"))


@dataclass(frozen=True)
class Method:
    """A method: a plan sampler of the library, gradient checkpointing, and a pairing."""

    sampler: object
    checkpointing: bool = False
    pairing: str = "none"


def methods(T: int) -> dict[str, Method]:
    """Every method by name. AlignProp and the ZO-dropping RLR are the library's biased
    samplers (``truncated_random``, ``rlr_no_zo``). ``_paired``: antithetic pairs with the
    parameter noise mirrored (REINFORCE, which has no ZO part: the noise where its blocks
    end); ``_paired4``: groups of four mirroring both."""
    out = {"full": Method(make_sampler("full", T), True),
           "draft1": Method(make_sampler("truncated", T, k=1)),
           "alignprop": Method(make_sampler("truncated_random", T, k=T)),
           "reinforce": Method(make_sampler("reinforce", T)),
           "reinforce_paired": Method(make_sampler("reinforce", T), pairing="ho"),
           "zeroth_order": Method(make_sampler("zeroth_order", T)),
           "zeroth_order_paired": Method(make_sampler("zeroth_order", T), pairing="param")}
    for h in range(0, min(3, T - 1) + 1):
        out[f"rlr_h{h}"] = Method(make_sampler("rlr", T, h=h))
        out[f"rlr_h{h}_paired"] = Method(make_sampler("rlr", T, h=h), pairing="param")
    out["rlr_h2_paired4"] = Method(make_sampler("rlr", T, h=min(2, T - 1)), pairing="param+ho")
    out["rlr_h2_noZO"] = Method(make_sampler("rlr_no_zo", T, h=min(2, T - 1)))
    return out


# ----------------------------------------------------------------------------- instruments
@dataclass
class Counter:
    """UNet evaluations, counted once per sample in each forward and each backward pass."""

    forward: int = 0
    backward: int = 0
    active: bool = True

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def attach(self, unet: torch.nn.Module):
        """Count every call of ``unet`` while ``active`` (also through ``functional_call`` and
        checkpoint recomputation) and the backward pass through its output; returns the
        hook's handle."""
        def hook(module, args, output):
            if not self.active:
                return
            n = args[0].shape[0]
            self.forward += n
            out = output.sample
            if out.requires_grad:
                out.register_hook(lambda g: setattr(self, "backward", self.backward + n))
        return unet.register_forward_hook(hook)


# ----------------------------------------------------------------------------- setup
@dataclass(frozen=True, eq=False)
class Setup:
    """Everything shared by the runs: models, the LoRA start, the evaluation noise."""

    cfg: ExperimentConfig
    unet: torch.nn.Module
    reward: CircleReward
    heldout: CircleReward
    init: dict
    eval_start: torch.Tensor
    eval_noise: list
    probe_noise: torch.Tensor
    reference: dict = field(default_factory=dict)

    def task(self, checkpointing: bool = False) -> DiffusionTask:
        """The library's task over the pretrained UNet, with fresh LoRA weights at the start."""
        cfg = self.cfg
        params = {k: torch.nn.Parameter(v.clone()) for k, v in self.init.items()}
        components = Components(self.unet, None, None, None, ddim_scheduler(cfg.pretrain))
        view = ImageView(None, tuple(self.eval_start.shape[1:]))
        return DiffusionTask(components, params, self.reward, view, cfg.T, guidance_scale=1.0, eta=cfg.eta,
                             zo_sigma=cfg.zo_sigma, gradient_checkpointing=checkpointing)


def build_setup(cfg: ExperimentConfig, cache_dir: str) -> Setup:
    """Load or train the base UNet and the two classifiers, add LoRA, draw evaluation noise."""
    unet = pretrained_unet(cfg.pretrain, cache_dir)
    reward = CircleReward(pretrained_classifier(cfg.reward, cache_dir))
    heldout = CircleReward(pretrained_classifier(cfg.heldout, cache_dir))
    # the LoRA initialisation (A random, B = 0): the same start for all
    init = {k: v.detach().clone() for k, v in add_lora(unet, rank=cfg.lora_rank, target_modules=cfg.lora_targets,
                                                          seed=0).items()}
    g = torch.Generator().manual_seed(12345)
    shape = (3, cfg.pretrain.size, cfg.pretrain.size)
    start = torch.randn((cfg.n_eval, *shape), generator=g)
    noise = [torch.randn((cfg.n_eval, *shape), generator=g) for _ in range(cfg.T)]
    probe = torch.randn((len(PROBE_T), cfg.n_eval, *shape), generator=g)
    setup = Setup(cfg, unet, reward, heldout, init, start, noise, probe)
    data, labels, _ = sample_shapes(1024, cfg.pretrain.size, generator=torch.Generator().manual_seed(999))
    images = (data + 1) / 2
    with torch.no_grad():
        setup.reference.update({
            "data_reward": float(reward(images).mean()), "data_heldout": float(heldout(images).mean()),
            "data_diversity": float(data.var(0).mean()), "data_off_data": off_data(setup, data[:cfg.n_eval]),
            "data_circle_fraction": float((labels == SHAPES.index("circle")).float().mean())})
    return setup


PROBE_T = (50, 150, 300, 500)


def off_data(setup: Setup, x0: torch.Tensor) -> float:
    """Distance to the pretraining distribution: the base model's denoising loss
    E|eps_base(x_t, t) - eps|^2 on the images, at timesteps PROBE_T with fixed noise (a
    proxy for their negative log-likelihood under the base model; lower is closer)."""
    ac = ddim_scheduler(setup.cfg.pretrain).alphas_cumprod
    total = 0.0
    with torch.no_grad():
        for t, eps in zip(PROBE_T, setup.probe_noise):
            a = float(ac[t])
            x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps[:len(x0)]
            total += float((setup.unet(x_t, t).sample - eps[:len(x0)]).pow(2).mean())
    return total / len(PROBE_T)


def evaluate(setup: Setup, task: DiffusionTask) -> tuple[dict, torch.Tensor]:
    """Reward, held-out reward, diversity, distance to the data (:func:`off_data`) and the
    held-out circle fraction, on the fixed evaluation noise (tau = 0). The UNet's own LoRA
    weights stay at their start (B = 0), so ``setup.unet`` called directly is the base model."""
    chain = task.base_chain(UNCONDITIONAL).with_noise(setup.cfg.eta, 0.0)
    x0 = rollout(chain, task.params, setup.eval_start, noise=setup.eval_noise).clamp(-1, 1)
    images = (x0 + 1) / 2
    with torch.no_grad():
        logits = setup.heldout.classifier(x0)
        return {"reward": float(setup.reward(images).mean()), "heldout": float(setup.heldout(images).mean()),
                "diversity": float(x0.var(0).mean()), "off_data": off_data(setup, x0),
                "circle_fraction": float((logits.argmax(-1) == SHAPES.index("circle")).float().mean())}, x0


def gradient_variance(setup: Setup, method: Method) -> dict:
    """Variance per chain evaluation of the estimate at the start, per role: G x the trace of
    the covariance of a group mean (G = 1 unpaired), from ``n_var`` samples (per_sample)."""
    g = torch.Generator().manual_seed(777)
    plan = method.sampler.sample(method.sampler.init(), g)
    task = setup.task(method.checkpointing)
    G = Pairing.parse(method.pairing).size
    n = setup.cfg.n_var
    chain = task.chain(plan, UNCONDITIONAL * n, g)
    est = estimate(chain, plan, task.params, grouped(chain.sample_start(n // G, g), G), generator=g,
                   per_sample=True, baseline="loo", pairing=method.pairing)
    var = (lambda d: G * sum(float(group_means(v, G).var(0).sum()) for v in d.values()))  # noqa: E731
    out = {role: var(est.parts[role]) for role in ROLES}
    out["total"] = var(est.grad)
    out["mean_sq_norm"] = sum(float(v.mean(0).pow(2).sum()) for v in est.grad.values())
    return out


# ----------------------------------------------------------------------------- one run
def run(setup: Setup, name: str, seed: int, lr: float, progress=None) -> dict:
    """Fine-tune from the start with method ``name`` at learning rate ``lr`` until the budget
    is spent, through the library's training loop."""
    cfg = setup.cfg
    method = methods(cfg.T)[name]
    task = setup.task(method.checkpointing)
    counter = Counter()
    meter = SavedTensorMeter(exclude=[*setup.unet.parameters(), *task.params.values()])
    first, x0 = evaluate(setup, task)
    curve, train_curve, plans = [{"compute": 0, "seconds": 0.0, **first}], [], []
    marks = [cfg.budget * (i + 1) / cfg.n_points for i in range(cfg.n_points)]

    def on_step(rec, est):
        nonlocal x0
        plans.append(rec["plan"])
        train_curve.append({"compute": counter.total, "reward": rec["reward_mean"]})
        while marks and counter.total >= marks[0]:
            marks.pop(0)
            counter.active = False          # evaluations are not part of the budget
            point, x0 = evaluate(setup, task)
            counter.active = True
            curve.append({"compute": counter.total, "seconds": rec["elapsed_s"], **point})
        if progress is not None:
            progress.set_postfix(method=name, seed=seed, compute=counter.total, refresh=False)

    loop = LoopConfig(steps=10 ** 9, lr=lr, batch_size=cfg.batch, grad_accum=1, clip_norm=0.0, baseline="loo",
                      pairing=method.pairing, seed=seed, output_dir=None, eval_every=0, progress=False)
    hooks = Hooks(on_step=on_step, stop=lambda rec: counter.total >= cfg.budget, around_estimate=lambda: meter)
    handle = counter.attach(setup.unet)
    try:
        result = train(task, method.sampler, UNCONDITIONAL, loop, accelerator=make_accelerator(cpu=True), hooks=hooks)
    finally:
        handle.remove()
    times = [r["time_s"] for r in result.metrics]
    return {"method": name, "seed": seed, "lr": lr, "pairing": method.pairing, "curve": curve, "train": train_curve, "steps": result.step,
            "forward": counter.forward, "backward": counter.backward,
            "time_per_step": sum(times) / len(times), "activation_bytes": meter.peak,
            "plans": plans[:5], "final_samples": x0[:16].tolist() if seed == cfg.seeds[0] else None,
            "seconds": result.metrics[-1]["elapsed_s"]}


# ----------------------------------------------------------------------------- main
_WORKER: dict = {}


def _init_worker(cfg, cache):
    torch.set_num_threads(1)
    _WORKER["setup"] = build_setup(cfg, cache)


def _run_in_worker(job):
    return run(_WORKER["setup"], *job)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and budget: a smoke test (writes to runs/)")
    p.add_argument("--out", help="where figures and tables go (default: docs/results; with --quick, "
                                 "runs/finetune-quick)")
    p.add_argument("--cache", help="weights cache directory (default: experiments/cache, which holds the "
                                   "committed weights; with --quick, runs/cache)")
    p.add_argument("--budget", type=int, help="override the compute budget (UNet evaluations)")
    p.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    p.add_argument("--methods", nargs="+", help="override the methods")
    p.add_argument("--zo-sigma", type=float, help="override the ZO parameter-noise scale tau")
    p.add_argument("--lrs", type=float, nargs="+", help="override the learning rates swept (one value: no sweep)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes, one thread each)")
    args = p.parse_args(argv)
    out = args.out or (os.path.join("runs", "finetune-quick") if args.quick else os.path.join("docs", "results"))
    cache = args.cache or (os.path.join("runs", "cache") if args.quick else os.path.join("experiments", "cache"))
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else ExperimentConfig()
    over = {k: v for k, v in (("budget", args.budget), ("seeds", tuple(args.seeds or ()) or None),
                               ("methods", tuple(args.methods or ()) or None), ("zo_sigma", args.zo_sigma),
                               ("lrs", tuple(args.lrs or ()) or None)) if v is not None}
    cfg = dataclasses.replace(cfg, **over)
    unknown = set(cfg.methods) - set(methods(cfg.T))
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; known: {sorted(methods(cfg.T))}")
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    setup = build_setup(cfg, cache)
    base, base_samples = evaluate(setup, setup.task())
    gvar = {name: gradient_variance(setup, methods(cfg.T)[name]) for name in cfg.methods}
    sweep_jobs = [(name, cfg.sweep_seed, lr) for name in cfg.methods for lr in cfg.lrs] if len(cfg.lrs) > 1 else []
    with _runner(setup, cfg, cache, args.jobs) as run_all:
        sweep = run_all(sweep_jobs, "learning-rate sweep")
        chosen = {name: max(cfg.lrs, key=lambda lr: next(report.auc(r) for r in sweep
                                                         if r["method"] == name and r["lr"] == lr))
                  for name in cfg.methods} if sweep else {name: cfg.lrs[0] for name in cfg.methods}
        results = run_all([(name, seed, chosen[name]) for name in cfg.methods for seed in cfg.seeds], "runs")
    table = report.summarise(results, setup, gvar, methods(cfg.T))
    claims = report.claims(results, cfg.methods, setup.reference, gvar)
    sweep_md = report.sweep_table(sweep, chosen, cfg.lrs) if sweep else []
    report.write_table(table, setup, os.path.join(out, "finetune_table.md"),
                       ["", "## Claims", "", *claims, "", *sweep_md])
    report.plot(results, setup, out, base_samples)
    summary = {"config": dataclasses.asdict(cfg), "reference": setup.reference, "base": base, "chosen_lr": chosen,
               "table": table, "wall_seconds": time.perf_counter() - t0,
               "sweep": [{k: v for k, v in r.items() if k != "final_samples"} for r in sweep],
               "runs": [{k: v for k, v in r.items() if k != "final_samples"} for r in results]}
    write_json(os.path.join(out, "finetune_results.json"), summary)
    return summary


@contextlib.contextmanager
def _runner(setup: Setup, cfg: ExperimentConfig, cache: str, jobs: int):
    """``run_all(jobs, desc) -> results``: runs in this process, or in ``jobs`` worker processes."""
    pool = None
    if jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(jobs, mp.get_context("spawn"), _init_worker, (cfg, cache))

    def run_all(todo, desc):
        with tqdm(total=len(todo), desc=desc) as bar:
            results = []
            for r in (pool.map(_run_in_worker, todo) if pool else (run(setup, *job, bar) for job in todo)):
                results.append(r)
                bar.update()
        return results

    try:
        yield run_all
    finally:
        if pool is not None:
            pool.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
