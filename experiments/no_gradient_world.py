"""The world of :mod:`experiments.no_gradient`: its configuration, the methods, the shared
model and rewards (:class:`World`), the group size ``halforder diagnose`` advises, and what
an evaluation measures (:func:`evaluate`)."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch

from experiments.shapes.classifier import ClassifierConfig
from experiments.shapes.data import sample_shapes
from experiments.shapes.prompt_rewards import PromptFollowing, prompt_classifier
from experiments.shapes.prompted import PROMPTS, FlowPretrainConfig, pretrained_components, prompt_of
from halforder.diffusion import DiffusionTask, ImageView, NoiseScales, add_lora, rollout
from halforder.diffusion.rewards.compressibility import JpegCompressibility
from halforder.estimators import FixedPlan, Plan, make_sampler
from halforder.planning.diagnose import diagnose

ZO_METHODS = ("zo", "zo_paired", "rlr_no_fo", "rlr_no_fo_paired")


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole experiment.

    Attributes:
      pretrain, classifier, check_classifier: the base model, the trained reward's classifier
        and a second one from another seed (reported, never trained on).
      T: flow steps of the chain (Flow-GRPO trains on 10 of its 40).
      eta: Flow-GRPO's SDE noise level a on every step (0.7); ``fast_eta``: Flow-GRPO-Fast's CPS level.
      zo_sigma: the parameter-noise scale tau on ZO steps.
      batch: samples per update (prompts x group).
      group: samples per prompt group; None: the group ``halforder diagnose`` advises.
      diagnose_budget: the evaluations ``diagnose`` may spend on that advice.
      budget: denoiser evaluations each run on ``prompt`` may spend (the library's meter); a run
        stops at the first step that reaches it. ``jpeg_budget``: the same on ``jpeg``, which
        learns within fewer.
      lrs, lr_extend, sweep_seed: the learning-rate sweep (as :mod:`experiments.finetune_cpu`).
      lora_rank, lora_targets: the adapter.
      seeds: one run per seed, method and reward.
      n_eval: evaluation samples per prompt (fixed start noise, deterministic sampler).
      n_points: evaluations along the budget (besides the start).
      kl_betas: the KL weights of the Flow-GRPO recipe (one method each).
      held_out: prompts never trained on (each shape and colour is trained in other pairs).
      window_every: updates between moves of MixGRPO's sliding window.
      methods: names from :func:`methods`; rewards: ``prompt`` and/or ``jpeg``; jpeg_methods: the
        methods also run on ``jpeg``.
    """

    pretrain: FlowPretrainConfig = FlowPretrainConfig()
    classifier: ClassifierConfig = ClassifierConfig(steps=1500)
    check_classifier: ClassifierConfig = ClassifierConfig(steps=1500, seed=1)
    T: int = 8
    eta: float = 0.7
    fast_eta: float = 0.8
    zo_sigma: float = 0.05
    batch: int = 16
    group: int | None = None
    diagnose_budget: int = 12000
    budget: int = 24000
    jpeg_budget: int = 12000
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    lr_extend: int = 2
    sweep_seed: int = 100
    lora_rank: int = 4
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    n_eval: int = 8
    n_points: int = 6
    kl_betas: tuple[float, ...] = (0.0, 0.01, 0.04)
    held_out: tuple[str, ...] = ("red triangle", "green circle", "blue square")
    window_every: int = 5
    methods: tuple[str, ...] = ()
    rewards: tuple[str, ...] = ("prompt", "jpeg")
    jpeg_methods: tuple[str, ...] = ("reinforce_loo", "flow_grpo_kl0", "dance", "dance_weighted", "zo_paired",
                                     "rlr_no_fo_paired")

    def __post_init__(self):
        if not self.methods:
            object.__setattr__(self, "methods", method_names(self))


def method_names(cfg: ExperimentConfig) -> tuple[str, ...]:
    """Every method of the configuration, in table order."""
    return ("reinforce_loo", *(f"flow_grpo_kl{b:g}" for b in cfg.kl_betas), "dance", "dance_weighted", "mix",
            "mix_weighted", "fast", "fast_weighted", *ZO_METHODS)


METHODS = method_names(ExperimentConfig(methods=("x",)))


@dataclass(frozen=True)
class Method:
    """A method: a plan sampler, the advantage (``baseline`` within prompt groups of ``group``,
    GRPO's with the batch's std where ``global_std``), the update rule (PPO's ``clip_range``,
    ``updates`` per rollout, ``kl_beta``), a pairing and the chain's noise."""

    sampler: object
    group: int
    baseline: str = "loo"
    global_std: bool = False
    clip_range: float | None = None
    updates: int = 1
    kl_beta: float = 0.0
    pairing: str = "none"
    noise: str = "sde"
    scales: NoiseScales = NoiseScales()

    @property
    def clipped(self) -> bool:
        """Whether the loop runs the clipped-ratio rule (a recorded rollout) for it."""
        return self.clip_range is not None or self.updates > 1 or self.kl_beta > 0


def methods(cfg: ExperimentConfig, group: int) -> dict[str, Method]:
    """Every method by name, at prompt groups of ``group`` (module docstring of
    :mod:`experiments.no_gradient`). ``_weighted``: the same steps weighed by 1 / P(t trained)
    at a random position, so the step set is unbiased; the advantage is the recipe's own."""
    T = cfg.T
    sde = NoiseScales(eta=cfg.eta)                                       # noise on every step
    window = NoiseScales(eta="plan", eta_plan=cfg.eta)                   # noise on the trained steps only
    es = NoiseScales(eta="plan", eta_plan=cfg.eta, zo_sigma=cfg.zo_sigma)
    grpo = dict(baseline="grpo", clip_range=1e-4)
    out = {"reinforce_loo": Method(FixedPlan(Plan.reinforce(T)), group, scales=sde)}
    for b in cfg.kl_betas:
        out[f"flow_grpo_kl{b:g}"] = Method(make_sampler("reinforce", T, reinforce_window=(2, T)), group, global_std=True,
                                           updates=2, kl_beta=b, scales=sde, **grpo)
    for w, suffix in (("field", ""), ("unbiased", "_weighted")):
        out["dance" + suffix] = Method(make_sampler("reinforce", T, step_fraction=0.6, step_weighting=w), group,
                                       scales=sde, **grpo)
        out["mix" + suffix] = Method(make_sampler("reinforce", T, window_length=T // 2, step_weighting=w,
                                                  window_position="sliding" if w == "field" else "random",
                                                  window_every=cfg.window_every), group, scales=window, **grpo)
        out["fast" + suffix] = Method(make_sampler("reinforce", T, reinforce_window=(T // 2 + 1, T), window_length=2,
                                                   step_weighting=w), group, baseline="grpo", global_std=True,
                                      clip_range=1e-5, updates=2, noise="cps",
                                      scales=NoiseScales(eta="plan", eta_plan=cfg.fast_eta))
    paired = max(group, 4)   # leave-one-out over antithetic pairs needs two pairs in a group
    out["zo"] = Method(FixedPlan(Plan.zeroth_order(T)), group, scales=es)
    out["zo_paired"] = Method(FixedPlan(Plan.zeroth_order(T)), paired, pairing="param", scales=es)
    out["rlr_no_fo"] = Method(make_sampler("rlr_no_fo", T, h=min(2, T - 1)), group, scales=es)
    out["rlr_no_fo_paired"] = Method(make_sampler("rlr_no_fo", T, h=min(2, T - 1)), paired, pairing="param", scales=es)
    return out


@dataclass(frozen=True, eq=False)
class World:
    """Everything shared by the runs: the model, its LoRA start, the rewards, the prompts."""

    cfg: ExperimentConfig
    components: object
    init: dict
    rewards: dict
    checks: dict
    train_prompts: tuple[str, ...]
    eval_start: torch.Tensor
    group: int = 4
    advice: dict = field(default_factory=dict)
    reference: dict = field(default_factory=dict)

    @property
    def eval_prompts(self) -> list[str]:
        """Every prompt ``n_eval`` times: the training prompts, then the held-out ones."""
        return [p for p in (*self.train_prompts, *self.cfg.held_out) for _ in range(self.cfg.n_eval)]

    def task(self, reward: str, method: Method) -> DiffusionTask:
        """The library's task on ``reward`` with ``method``'s noise, fresh LoRA weights at the start."""
        params = {k: torch.nn.Parameter(v.clone()) for k, v in self.init.items()}
        view = ImageView(None, (3, self.cfg.pretrain.size, self.cfg.pretrain.size))
        return DiffusionTask(self.components, params, self.rewards[reward], view, self.cfg.T, guidance_scale=1.0,
                             noise_scales=method.scales, noise=method.noise)

    @functools.cached_property
    def start(self) -> tuple[dict, torch.Tensor]:
        """:func:`evaluate` at the LoRA start (B = 0, the base model), where every run begins."""
        m = Method(FixedPlan(Plan.reinforce(self.cfg.T)), self.group)
        return evaluate(self, self.task("prompt", m))


def build_world(cfg: ExperimentConfig, cache_dir: str) -> World:
    """Load or train the model and the classifiers, add LoRA, draw the evaluation noise, and
    ask ``halforder diagnose`` for the group size where ``cfg.group`` is None."""
    components = pretrained_components(cfg.pretrain, cache_dir)
    prompt = PromptFollowing(prompt_classifier(cfg.classifier, cache_dir))
    check = PromptFollowing(prompt_classifier(cfg.check_classifier, cache_dir))
    init = {k: v.detach().clone() for k, v in add_lora(components.transformer, rank=cfg.lora_rank,
                                                          target_modules=cfg.lora_targets, seed=0).items()}
    train_prompts = tuple(p for p in PROMPTS if p not in cfg.held_out)
    n = (len(train_prompts) + len(cfg.held_out)) * cfg.n_eval
    start = torch.randn((n, 3, cfg.pretrain.size, cfg.pretrain.size), generator=torch.Generator().manual_seed(12345))
    world = World(cfg, components, init, {"prompt": prompt, "jpeg": JpegCompressibility()},
                  {"prompt_check": check}, train_prompts, start)
    if cfg.group is None:
        group, advice = advised_group(world)
        world = dataclasses.replace(world, group=group, advice=advice)
    else:
        world = dataclasses.replace(world, group=cfg.group, advice={"given": cfg.group})
    world = dataclasses.replace(world, cfg=dataclasses.replace(cfg, group=world.group))
    x, shape, colour = sample_shapes(512, cfg.pretrain.size, generator=torch.Generator().manual_seed(999))
    images, prompts = (x + 1) / 2, prompt_of(shape, colour)
    world.reference.update({"data_prompt": float(prompt(images, prompts).mean()),
                            "data_prompt_check": float(check(images, prompts).mean()),
                            "data_jpeg": float(world.rewards["jpeg"](images).mean())})
    return world


def advised_group(world: World) -> tuple[int, dict]:
    """The group size ``halforder diagnose`` advises for the Flow-GRPO recipe on the prompt
    reward at the start: the group whose smallest batch for cos >= 0.5 costs the fewest
    evaluations per update (group 4 where no group reaches it, which the advice records)."""
    cfg = world.cfg
    method = Method(make_sampler("reinforce", cfg.T, reinforce_window=(2, cfg.T)), 8,
                    scales=NoiseScales(eta=cfg.eta))
    d = diagnose(world.task("prompt", method), method.sampler, list(world.train_prompts), estimator="reinforce",
                 budget=cfg.diagnose_budget, group_size=8, baseline="grpo", global_std=True)
    advice = {"spent": d.spent, "pilot": d.pilot, "target": d.target, "curves": {},
              "step_shares": [float(x) for x in d.steps.share], "signal": d.steps.signal, "suggest": d.steps.suggest()}
    for c in d.curves:
        B = c.smallest_batch(d.target)
        advice["curves"][f"{c.name}, group {c.group}"] = {
            "group": c.group, "batch": B, "evaluations": None if B is None else B * d.cost[c.name],
            "limit": c.limit}
    run = [v for k, v in advice["curves"].items() if k.startswith("the run's") and v["batch"] is not None]
    best = min(run, key=lambda v: v["evaluations"]) if run else None
    advice["chosen"] = best
    return (best["group"] if best else 4), advice


def grid(world: World, x0: torch.Tensor, per_prompt: int = 4) -> torch.Tensor:
    """The first ``per_prompt`` evaluation samples of every prompt, for sample grids."""
    return x0.view(-1, world.cfg.n_eval, *x0.shape[1:])[:, :per_prompt].flatten(0, 1)


def evaluate(world: World, task: DiffusionTask) -> tuple[dict, torch.Tensor]:
    """Each reward, the check classifier and the diversity on the training and the held-out
    prompts: deterministic sampling (eta = 0) from the fixed start noise."""
    prompts = world.eval_prompts
    chain = task.base_chain(prompts)
    x0 = rollout(chain, task.params, world.eval_start).clamp(-1, 1)
    images = (x0 + 1) / 2
    k = len(world.train_prompts) * world.cfg.n_eval
    out = {}
    with torch.no_grad():
        for name, r in {**world.rewards, **world.checks}.items():
            v = r(images, prompts)
            out[f"{name}/train"], out[f"{name}/held_out"] = float(v[:k].mean()), float(v[k:].mean())
        per_prompt = x0.view(-1, world.cfg.n_eval, *x0.shape[1:])
        spread = per_prompt.var(1).flatten(1).mean(1) if world.cfg.n_eval > 1 else torch.zeros(len(per_prompt))
        out["diversity/train"] = float(spread[:len(world.train_prompts)].mean())
        out["diversity/held_out"] = float(spread[len(world.train_prompts):].mean())
    return out, x0
