"""Reward fine-tuning of a small pixel-space diffusion model on CPU with every estimator.

A ``UNet2DModel`` pretrained here on 16x16 coloured shapes (:mod:`halforder.diffusion.pretrain`)
is fine-tuned through a LoRA adapter to maximise a learned, hackable reward, the
probability that a classifier sees a circle (:mod:`halforder.diffusion.shape_reward`).
Every method starts from the same weights and the same LoRA initialisation and gets the
same compute budget, counted in UNet evaluations: one per sample in every forward pass
(the rollout, checkpoint recomputation, HO recomputation) and every backward pass, by
counters on the denoiser. (The classifier reward is a small fraction of a UNet call.)

One code path: every method is a plan sampler (:mod:`halforder.estimators.samplers`)
and a ``checkpoint`` flag; the step is ``estimate(chain, plan, params, x_T, baseline="loo")``.

The chain is the same for every method: DDIM with T steps and eta at every step, so the
likelihood-ratio (HO) terms have noise to work with; ZO steps add parameter noise
``zo_sigma`` (``tau_schedule(plan)``), and evaluation samples the same chain without it.

Run (from the repository root):

    python experiments/finetune_cpu.py              # full run, writes docs/results/finetune_*
    python experiments/finetune_cpu.py --quick      # smoke test, under a minute

Outputs in ``--out``: finetune_reward_vs_compute.png, finetune_diversity_vs_reward.png,
finetune_samples.png, finetune_table.md, finetune_results.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint
from tqdm.auto import tqdm

from halforder.diffusion.chain import DDIMSolver, DiffusionChain, ModuleDenoiser, rollout, tau_schedule
from halforder.diffusion.lora import add_lora
from halforder.diffusion.pretrain import PretrainConfig, ddim_scheduler, pretrained_unet
from halforder.diffusion.shape_reward import CircleReward, ClassifierConfig, pretrained_classifier
from halforder.diffusion.shapes import SHAPES, sample_shapes
from halforder.estimators import Plan, estimate
from halforder.estimators.samplers import FixedPlan, UniformRLR

ROLES = ("FO", "HO", "ZO")


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
      lr: Adam learning rate, the same for every method.
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
    lr: float = 1e-3
    lora_rank: int = 2
    lora_targets: tuple[str, ...] = ("conv1", "conv2")
    seeds: tuple[int, ...] = (0, 1, 2)
    n_eval: int = 48
    n_points: int = 5
    n_var: int = 16
    methods: tuple[str, ...] = ("full", "draft1", "alignprop", "reinforce", "zeroth_order",
                                "rlr_h0", "rlr_h1", "rlr_h2", "rlr_h3", "rlr_h2_noZO")


QUICK = ExperimentConfig(pretrain=PretrainConfig(channels=(16, 32), steps=20, batch=16),
                         reward=ClassifierConfig(steps=20, batch=32),
                         heldout=ClassifierConfig(width=8, steps=20, batch=32, seed=1),
                         T=4, batch=4, budget=96, seeds=(0,), n_eval=8, n_points=2, n_var=4)


# ----------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class RandomTruncation:
    """AlignProp's randomized truncation: truncated backprop with K uniform on 1..k_max,
    drawn afresh every step (a plan sampler)."""

    T: int
    k_max: int

    def init(self) -> dict:
        return {}

    def sample(self, state, generator=None) -> Plan:
        k = int(torch.randint(1, self.k_max + 1, (1,), generator=generator))
        return Plan.truncated(self.T, k)

    def update(self, state, plan, estimate):
        return state


def methods(T: int) -> dict[str, tuple[object, bool]]:
    """name -> (plan sampler, checkpoint the denoiser on FO/HO steps)."""
    out = {"full": (FixedPlan(Plan.full(T)), True),
           "draft1": (FixedPlan(Plan.truncated(T, 1)), False),
           "alignprop": (RandomTruncation(T, T), False),
           "reinforce": (FixedPlan(Plan.reinforce(T)), False),
           "zeroth_order": (FixedPlan(Plan.zeroth_order(T)), False)}
    for h in range(0, min(3, T - 1) + 1):
        out[f"rlr_h{h}"] = (UniformRLR(T, h), False)
    out["rlr_h2_noZO"] = (NoZO(UniformRLR(T, min(2, T - 1))), False)
    return out


@dataclass(frozen=True)
class NoZO:
    """A sampler's plans with their ZO steps set to NONE (biased): RLR without its
    zeroth-order term, which is what the official RLR code computes (design.md §5)."""

    inner: object

    @property
    def T(self) -> int:
        return self.inner.T

    def init(self) -> dict:
        return self.inner.init()

    def sample(self, state, generator=None) -> Plan:
        plan = self.inner.sample(state, generator)
        roles = ["NONE" if r.value == "ZO" else r.value for r in plan.roles]
        return Plan.from_roles(roles, plan.blocks, name=f"{plan}-noZO")

    def update(self, state, plan, estimate):
        return self.inner.update(state, plan, estimate)


# ----------------------------------------------------------------------------- instruments
@dataclass
class Counter:
    """UNet evaluations, counted once per sample in each forward and each backward pass."""

    forward: int = 0
    backward: int = 0

    @property
    def total(self) -> int:
        return self.forward + self.backward


@dataclass(frozen=True, eq=False)
class CountingDenoiser:
    """A denoiser that counts its forward and backward evaluations (per sample) and, with
    ``checkpoint``, recomputes its activations in the backward pass instead of storing them."""

    denoiser: ModuleDenoiser
    counter: Counter
    checkpoint: bool = False

    def _forward(self, x, t, params):
        self.counter.forward += x.shape[0]
        return self.denoiser(x, t, params)

    def __call__(self, x, t, params):
        if self.checkpoint and torch.is_grad_enabled():
            out = _checkpoint(self._forward, x, t, params, use_reentrant=False)
        else:
            out = self._forward(x, t, params)
        if out.requires_grad:
            n = x.shape[0]
            out.register_hook(lambda g: setattr(self.counter, "backward", self.counter.backward + n))
        return out


class SavedTensorMeter:
    """Peak bytes of tensors saved for backward (activation memory), counted once per
    storage and excluding the ``exclude`` storages (weights). Use as a context manager.

    With checkpointing, torch's own hooks hold the saved tensors of a checkpointed call, so
    they are not seen here (they are recomputed, one step at a time, in the backward pass)."""

    def __init__(self, exclude=()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.refs: dict[int, list] = {}
        self.live = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t):
        return _Held(self, t)

    @staticmethod
    def _unpack(held):
        return held.t

    def _acquire(self, key, nbytes):
        ref = self.refs.setdefault(key, [0, nbytes])
        if ref[0] == 0:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        ref[0] += 1

    def _release(self, key):
        ref = self.refs[key]
        ref[0] -= 1
        if ref[0] == 0:
            self.live -= ref[1]
            del self.refs[key]

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class _Held:
    __slots__ = ("meter", "t", "key")

    def __init__(self, meter, t):
        self.meter, self.t, self.key = meter, t, None
        if t.layout == torch.strided and t.device.type == "cpu":
            key = t.untyped_storage().data_ptr()
            if key not in meter.exclude:
                self.key = key
                meter._acquire(key, t.untyped_storage().nbytes())

    def __del__(self):
        if self.key is not None:
            self.meter._release(self.key)


# ----------------------------------------------------------------------------- setup
@dataclass(frozen=True, eq=False)
class Setup:
    """Everything shared by the runs: models, the LoRA start, the evaluation noise."""

    cfg: ExperimentConfig
    unet: torch.nn.Module
    reward: CircleReward
    heldout: CircleReward
    init: dict
    solver: DDIMSolver
    eval_start: torch.Tensor
    eval_noise: list
    probe_noise: torch.Tensor
    reference: dict = field(default_factory=dict)


def build_setup(cfg: ExperimentConfig, cache_dir: str) -> Setup:
    """Load or train the base UNet and the two classifiers, add LoRA, draw evaluation noise."""
    unet = pretrained_unet(cfg.pretrain, cache_dir)
    reward = CircleReward(pretrained_classifier(cfg.reward, cache_dir))
    heldout = CircleReward(pretrained_classifier(cfg.heldout, cache_dir))
    # the LoRA initialisation (A random, B = 0): the same start for all
    init = {k: v.detach().clone() for k, v in add_lora(unet, rank=cfg.lora_rank, target_modules=cfg.lora_targets,
                                                          seed=0).items()}
    solver = DDIMSolver.from_scheduler(ddim_scheduler(cfg.pretrain), cfg.T, cfg.eta)
    g = torch.Generator().manual_seed(12345)
    shape = (3, cfg.pretrain.size, cfg.pretrain.size)
    start = torch.randn((cfg.n_eval, *shape), generator=g)
    noise = [torch.randn((cfg.n_eval, *shape), generator=g) for _ in range(cfg.T)]
    probe = torch.randn((len(PROBE_T), cfg.n_eval, *shape), generator=g)
    setup = Setup(cfg, unet, reward, heldout, init, solver, start, noise, probe)
    data, labels, _ = sample_shapes(1024, cfg.pretrain.size, generator=torch.Generator().manual_seed(999))
    with torch.no_grad():
        setup.reference.update({
            "data_reward": float(reward(data).mean()), "data_heldout": float(heldout(data).mean()),
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


def make_chain(setup: Setup, plan: Plan, counter: Counter, ckpt: bool = False, tau: bool = True) -> DiffusionChain:
    """The chain for ``plan``: eta at every step, ``zo_sigma`` on its ZO steps (if ``tau``)."""
    cfg = setup.cfg
    den = CountingDenoiser(ModuleDenoiser(setup.unet, setup.solver.timesteps), counter, ckpt)
    taus = tau_schedule(plan, "plan", cfg.zo_sigma) if tau else (0.0,) * cfg.T
    return DiffusionChain(den, setup.solver, taus, setup.reward, tuple(setup.eval_start.shape[1:]))


def evaluate(setup: Setup, params) -> tuple[dict, torch.Tensor]:
    """Reward, held-out reward, diversity, distance to the data (:func:`off_data`) and the
    held-out circle fraction, on the fixed evaluation noise. The base UNet's own LoRA
    weights stay at their start (B = 0), so ``setup.unet`` called directly is the base model."""
    chain = make_chain(setup, Plan.full(setup.cfg.T), Counter(), tau=False)
    x0 = rollout(chain, params, setup.eval_start, noise=setup.eval_noise).clamp(-1, 1)
    with torch.no_grad():
        logits = setup.heldout.classifier(x0)
        return {"reward": float(setup.reward(x0).mean()), "heldout": float(setup.heldout(x0).mean()),
                "diversity": float(x0.var(0).mean()), "off_data": off_data(setup, x0),
                "circle_fraction": float((logits.argmax(-1) == SHAPES.index("circle")).float().mean())}, x0


def gradient_variance(setup: Setup, sampler, ckpt: bool) -> dict:
    """Trace of the covariance of a one-sample estimate, per role, at the start (per_sample)."""
    g = torch.Generator().manual_seed(777)
    plan = sampler.sample(sampler.init(), g)
    chain = make_chain(setup, plan, Counter(), ckpt)
    x_T = chain.sample_start(setup.cfg.n_var, g)
    est = estimate(chain, plan, setup.init, x_T, generator=g, per_sample=True, baseline="loo")
    out = {}
    for role in ROLES:
        out[role] = sum(float(v.var(0).sum()) for v in est.parts[role].values())
    out["total"] = sum(float(v.var(0).sum()) for v in est.grad.values())
    out["mean_sq_norm"] = sum(float(v.mean(0).pow(2).sum()) for v in est.grad.values())
    return out


# ----------------------------------------------------------------------------- one run
def run(setup: Setup, name: str, seed: int, progress=None) -> dict:
    """Fine-tune from the start with method ``name`` until the budget is spent."""
    cfg = setup.cfg
    sampler, ckpt = methods(cfg.T)[name]
    params = {k: v.clone() for k, v in setup.init.items()}
    opt = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    state = sampler.init()
    g_plan = torch.Generator().manual_seed(seed)
    g_noise = torch.Generator().manual_seed(100_000 + seed)
    counter = Counter()
    weights = [*setup.unet.parameters(), *setup.reward.classifier.parameters(), *params.values()]
    meter = SavedTensorMeter(exclude=weights)
    first, _ = evaluate(setup, params)
    curve = [{"compute": 0, **first}]
    train, times, plans = [], [], []
    marks = [cfg.budget * (i + 1) / cfg.n_points for i in range(cfg.n_points)]
    while counter.total < cfg.budget:
        plan = sampler.sample(state, g_plan)
        chain = make_chain(setup, plan, counter, ckpt)
        x_T = chain.sample_start(cfg.batch, g_noise)
        t0 = time.perf_counter()
        with meter:
            est = estimate(chain, plan, params, x_T, generator=g_noise, baseline="loo")
        for k, p in params.items():
            p.grad = -est.grad[k]
        opt.step()
        times.append(time.perf_counter() - t0)
        state = sampler.update(state, plan, est)
        plans.append(str(plan))
        train.append({"compute": counter.total, "reward": float(est.reward.mean())})
        while marks and counter.total >= marks[0]:
            marks.pop(0)
            point, x0 = evaluate(setup, params)
            curve.append({"compute": counter.total, **point})
        if progress is not None:
            progress.set_postfix(method=name, seed=seed, compute=counter.total, refresh=False)
    return {"method": name, "seed": seed, "curve": curve, "train": train, "steps": len(times),
            "forward": counter.forward, "backward": counter.backward,
            "time_per_step": sum(times) / len(times), "activation_bytes": meter.peak,
            "plans": plans[:5], "final_samples": x0[:16].tolist() if seed == cfg.seeds[0] else None}


# ----------------------------------------------------------------------------- reporting
def _ci(values) -> tuple[float, float]:
    """Mean and half-width of a 95% Student-t interval (0 for one value)."""
    from scipy import stats

    v = torch.tensor(values, dtype=torch.float64)
    n = len(values)
    if n < 2:
        return float(v.mean()), 0.0
    return float(v.mean()), float(stats.t.ppf(0.975, n - 1) * v.std() / math.sqrt(n))


def summarise(results: list, setup: Setup, gvar: dict) -> dict:
    """Per method: final metrics (mean, CI) over seeds, memory, time per step, cost."""
    cfg = setup.cfg
    table = {}
    for name in cfg.methods:
        runs = [r for r in results if r["method"] == name]
        sampler, _ = methods(cfg.T)[name]
        plan = sampler.sample(sampler.init(), torch.Generator().manual_seed(0))
        row = {k: _ci([r["curve"][-1][k] for r in runs]) for k in ("reward", "heldout", "diversity", "off_data",
                                                                 "circle_fraction")}
        row["steps"] = sum(r["steps"] for r in runs) / len(runs)
        row["activation_mb"] = max(r["activation_bytes"] for r in runs) / 2 ** 20
        row["time_per_step"] = sum(r["time_per_step"] for r in runs) / len(runs)
        row["cost"] = plan.cost()
        row["grad_var"] = gvar[name]
        table[name] = row
    return table


def write_table(table: dict, setup: Setup, path: str) -> None:
    """Markdown in the shape of the paper's Table 9, with the extra columns measured here."""
    cfg = setup.cfg
    ref = setup.reference
    lines = [f"Fine-tuning at equal compute ({cfg.budget} UNet evaluations, one per sample per forward or backward pass), "
             f"T={cfg.T}, eta={cfg.eta}, batch {cfg.batch}, seeds {list(cfg.seeds)}; mean ± 95% t-interval over seeds.",
             "",
             f"Pretraining data: reward {ref['data_reward']:.3f}, held-out {ref['data_heldout']:.3f}, "
             f"diversity {ref['data_diversity']:.3f}, off-data {ref['data_off_data']:.3f}, "
             f"circles {ref['data_circle_fraction']:.3f}.",
             "",
             "| Method | Reward | Held-out reward | Circle fraction | Diversity | Off-data | Activation memory (MB) "
             "| Time per step (s) | Steps | Plan cost fwd/bwd/graph | Grad var FO / HO / ZO |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        c, gv = row["cost"], row["grad_var"]
        f = (lambda k: f"{row[k][0]:.3f} ± {row[k][1]:.3f}")
        lines.append(f"| {name} | {f('reward')} | {f('heldout')} | {f('circle_fraction')} | {f('diversity')} | {f('off_data')} | "
                     f"{row['activation_mb']:.2f} | {row['time_per_step']:.3f} | {row['steps']:.0f} | "
                     f"{c['forward']}/{c['backward']}/{c['graph_steps']} | "
                     f"{gv['FO']:.3g} / {gv['HO']:.3g} / {gv['ZO']:.3g} |")
    lines += ["", "Plan cost is `Plan.cost()` of one draw (AlignProp and RLR draw K or j per step). "
              "Gradient variance: trace of the covariance of a one-sample estimate at the start, per role. "
              "Activation memory: peak bytes saved for backward (checkpointed calls excluded, see notes). "
              "Diversity: per-pixel variance over the evaluation samples. Off-data: the base model's denoising "
              "loss on the samples (lower = closer to the pretraining data)."]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def _welch(a, b) -> tuple[float, float]:
    """Difference of means a - b and the half-width of its 95% Welch interval."""
    from scipy import stats

    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    d = float(a.mean() - b.mean())
    if min(len(a), len(b)) < 2:
        return d, float("nan")
    va, vb = float(a.var()) / len(a), float(b.var()) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return d, 0.0
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return d, float(stats.t.ppf(0.975, df) * se)


def _auc(run: dict, key: str = "reward") -> float:
    """Mean of ``key`` over the budget (trapezoid rule over the evaluation points)."""
    c = run["curve"]
    area = sum((q["compute"] - p["compute"]) * (p[key] + q[key]) / 2 for p, q in zip(c, c[1:]))
    return area / c[-1]["compute"]


def claims(runs: list, methods_run, reference: dict) -> list[str]:
    """Markdown lines with the numbers behind the paper's claims (mean ± 95% interval over seeds)."""
    by = {m: [r for r in runs if r["method"] == m] for m in methods_run}
    fin = {m: [r["curve"][-1]["reward"] for r in rs] for m, rs in by.items()}
    auc = {m: [_auc(r) for r in rs] for m, rs in by.items()}
    f = (lambda v: "{:.3f} ± {:.3f}".format(*_ci(v)))
    g = (lambda d: "{:+.3f} ± {:.3f}".format(*d))
    lines = ["| Method | final reward | mean reward over the budget (sample efficiency) | final held-out | "
             "final diversity / data | final off-data / data | reward at half budget |",
             "|---|---|---|---|---|---|---|"]
    for m, rs in by.items():
        half = [min(r["curve"], key=lambda p: abs(p["compute"] - r["curve"][-1]["compute"] / 2))["reward"] for r in rs]
        lines.append(f"| {m} | {f(fin[m])} | {f(auc[m])} | {f([r['curve'][-1]['heldout'] for r in rs])} | "
                     f"{f([r['curve'][-1]['diversity'] / reference['data_diversity'] for r in rs])} | "
                     f"{f([r['curve'][-1]['off_data'] / reference['data_off_data'] for r in rs])} | {f(half)} |")
    lines.append("")
    for m in [m for m in methods_run if m.startswith("rlr")]:
        if "reinforce" in by:
            lines.append(f"- {m} − reinforce: final reward {g(_welch(fin[m], fin['reinforce']))}, "
                         f"mean reward over the budget {g(_welch(auc[m], auc['reinforce']))} (Welch 95%).")
    hs = [m for m in ("rlr_h0", "rlr_h1", "rlr_h2", "rlr_h3") if m in by]
    for a, b in zip(hs, hs[1:]):
        lines.append(f"- {b} − {a}: final reward {g(_welch(fin[b], fin[a]))}, "
                     f"mean reward over the budget {g(_welch(auc[b], auc[a]))}.")
    return lines


def plot(results: list, table: dict, setup: Setup, out: str, base_samples: torch.Tensor) -> None:
    """Reward vs compute, diversity vs reward, and the final sample grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = setup.cfg
    colours = plt.cm.tab10.colors
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, name in enumerate(cfg.methods):
        runs = [r for r in results if r["method"] == name]
        for ax, key in zip(axes, ("reward", "heldout")):
            xs = torch.tensor([[p["compute"] for p in r["curve"]] for r in runs], dtype=torch.float64).mean(0)
            ys = torch.tensor([[p[key] for p in r["curve"]] for r in runs], dtype=torch.float64)
            m = ys.mean(0)
            ax.plot(xs, m, color=colours[i % 10], label=name, marker="o", ms=3)
            if len(runs) > 1:
                ax.fill_between(xs, ys.min(0).values, ys.max(0).values, color=colours[i % 10], alpha=0.12)
    for ax, title in zip(axes, ("trained reward (classifier A)", "held-out reward (classifier B)")):
        ax.set_xlabel("UNet evaluations (per sample, forward + backward)")
        ax.set_ylabel("P(circle)")
        ax.set_title(title)
        ax.axhline(setup.reference["data_reward" if "A" in title else "data_heldout"], color="k", ls=":", lw=1)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Reward vs compute: mean over seeds, band = min..max")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(os.path.join(out, "finetune_reward_vs_compute.png"), dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = {"diversity": "diversity (per-pixel variance over samples)",
              "off_data": "off-data (base model's denoising loss)"}
    for ax, key in zip(axes, labels):
        for i, name in enumerate(cfg.methods):
            runs = [r for r in results if r["method"] == name]
            rw = torch.tensor([[p["reward"] for p in r["curve"]] for r in runs]).mean(0)
            dv = torch.tensor([[p[key] for p in r["curve"]] for r in runs]).mean(0)
            ax.plot(rw, dv, color=colours[i % 10], lw=1, alpha=0.6)
            ax.scatter([r["curve"][-1]["reward"] for r in runs], [r["curve"][-1][key] for r in runs],
                       color=colours[i % 10], label=name, s=18)
        ax.axhline(setup.reference[f"data_{key}"], color="k", ls=":", lw=1, label="data")
        ax.set_xlabel("reward P(circle)")
        ax.set_ylabel(labels[key])
    axes[0].legend(fontsize=7)
    fig.suptitle("Collapse and drift vs reward (lines: mean path over seeds; dots: final, per seed)")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(os.path.join(out, "finetune_diversity_vs_reward.png"), dpi=120)
    plt.close(fig)

    rows = [("base", base_samples[:16])]
    rows += [(r["method"], torch.tensor(r["final_samples"])) for r in results if r["final_samples"] is not None]
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 0.62 * len(rows) + 0.3))
    for ax, (name, x) in zip(axes, rows):
        img = torch.cat([torch.nn.functional.pad((x[i] + 1) / 2, (1, 1, 1, 1), value=1.0) for i in range(len(x))], 2)
        ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"Samples at the end (seed {cfg.seeds[0]}, fixed evaluation noise)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "finetune_samples.png"), dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
_WORKER: dict = {}


def _init_worker(cfg, cache):
    torch.set_num_threads(1)
    _WORKER["setup"] = build_setup(cfg, cache)


def _run_in_worker(job):
    return run(_WORKER["setup"], *job)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and budget: a smoke test")
    p.add_argument("--out", default=os.path.join("docs", "results"), help="where figures and tables go")
    p.add_argument("--cache", default=os.path.join("experiments", "cache"), help="weights cache directory")
    p.add_argument("--budget", type=int, help="override the compute budget (UNet evaluations)")
    p.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    p.add_argument("--methods", nargs="+", help="override the methods")
    p.add_argument("--zo-sigma", type=float, help="override the ZO parameter-noise scale tau")
    p.add_argument("--lr", type=float, help="override the learning rate")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes, one thread each)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else ExperimentConfig()
    over = {k: v for k, v in (("budget", args.budget), ("seeds", tuple(args.seeds or ()) or None),
                               ("methods", tuple(args.methods or ()) or None), ("zo_sigma", args.zo_sigma),
                               ("lr", args.lr)) if v is not None}
    cfg = dataclasses.replace(cfg, **over)
    unknown = set(cfg.methods) - set(methods(cfg.T))
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {sorted(methods(cfg.T))}")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    setup = build_setup(cfg, args.cache)
    base, base_samples = evaluate(setup, setup.init)
    gvar = {name: gradient_variance(setup, *methods(cfg.T)[name]) for name in cfg.methods}
    jobs = [(name, seed) for name in cfg.methods for seed in cfg.seeds]
    with tqdm(total=len(jobs), desc="runs") as bar:
        if args.jobs > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(args.jobs, mp.get_context("spawn"), _init_worker, (cfg, args.cache)) as pool:
                results = []
                for r in pool.map(_run_in_worker, jobs):
                    results.append(r)
                    bar.update()
        else:
            results = []
            for name, seed in jobs:
                results.append(run(setup, name, seed, bar))
                bar.update()
    table = summarise(results, setup, gvar)
    path = os.path.join(args.out, "finetune_table.md")
    write_table(table, setup, path)
    with open(path, "a") as fh:
        fh.write("\n## Claims\n\n" + "\n".join(claims(results, cfg.methods, setup.reference)) + "\n")
    plot(results, table, setup, args.out, base_samples)
    summary = {"config": dataclasses.asdict(cfg), "reference": setup.reference, "base": base,
               "table": table, "wall_seconds": time.perf_counter() - t0,
               "runs": [{k: v for k, v in r.items() if k != "final_samples"} for r in results]}
    with open(os.path.join(args.out, "finetune_results.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
