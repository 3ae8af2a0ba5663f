"""The fine-tuning experiment's world: the base UNet, the reward, the LoRA start and the fixed
evaluation noise (:class:`Setup`), and what an evaluation measures (:func:`evaluate`)."""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

import torch

from halforder.diffusion import Components, DiffusionTask, ImageView, NoiseScales, add_lora, rollout

from .classifier import CircleReward, pretrained_classifier
from .data import SHAPES, sample_shapes
from .pretrain import ddim_scheduler, pretrained_unet
from .target import TargetReward

UNCONDITIONAL = [""]   # the model has no text conditioning: every batch item is the empty prompt


@dataclass(frozen=True, eq=False)
class Setup:
    """Everything shared by the runs: models, the LoRA start, the evaluation noise."""

    cfg: object   # an experiments.finetune_cpu.ExperimentConfig
    unet: torch.nn.Module
    reward: TargetReward
    circle: CircleReward
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
        return DiffusionTask(components, params, self.reward, view, cfg.T, guidance_scale=1.0,
                             noise_scales=NoiseScales(eta=cfg.eta, zo_sigma=cfg.zo_sigma),
                             gradient_checkpointing=checkpointing)

    @functools.cached_property
    def start(self) -> tuple[dict, torch.Tensor]:
        """:func:`evaluate` at the LoRA start, where every run begins (B = 0: the base model):
        the same for every run, so evaluated once."""
        return evaluate(self, self.task())


def build_setup(cfg, cache_dir: str) -> Setup:
    """Load or train the base UNet and the classifier, add LoRA, draw evaluation noise, for
    ``cfg`` (an :class:`experiments.finetune_cpu.ExperimentConfig`)."""
    unet = pretrained_unet(cfg.pretrain, cache_dir)
    reward = TargetReward.from_config(dataclasses.replace(cfg.target, size=cfg.pretrain.size))
    circle = CircleReward(pretrained_classifier(dataclasses.replace(cfg.classifier, size=cfg.pretrain.size),
                                                cache_dir))
    # the LoRA initialisation (A random, B = 0): the same start for all
    init = {k: v.detach().clone() for k, v in add_lora(unet, rank=cfg.lora_rank, target_modules=cfg.lora_targets,
                                                          seed=0).items()}
    g = torch.Generator().manual_seed(12345)
    shape = (3, cfg.pretrain.size, cfg.pretrain.size)
    start = torch.randn((cfg.n_eval, *shape), generator=g)
    noise = [torch.randn((cfg.n_eval, *shape), generator=g) for _ in range(cfg.T)]
    probe = torch.randn((len(PROBE_T), cfg.n_eval, *shape), generator=g)
    setup = Setup(cfg, unet, reward, circle, init, start, noise, probe)
    data, labels, _ = sample_shapes(1024, cfg.pretrain.size, generator=torch.Generator().manual_seed(999))
    images = (data + 1) / 2
    with torch.no_grad():
        setup.reference.update({
            "data_reward": float(reward(images).mean()), "data_circle": float(circle(images).mean()),
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
    """Reward, the classifier's P(circle), diversity and distance to the data
    (:func:`off_data`), on the fixed evaluation noise (tau = 0). The UNet's own LoRA weights
    stay at their start (B = 0), so ``setup.unet`` called directly is the base model."""
    chain = task.base_chain(UNCONDITIONAL).with_noise(setup.cfg.eta, 0.0)
    x0 = rollout(chain, task.params, setup.eval_start, noise=setup.eval_noise).clamp(-1, 1)
    images = (x0 + 1) / 2
    with torch.no_grad():
        return {"reward": float(setup.reward(images).mean()), "circle": float(setup.circle(images).mean()),
                "diversity": float(x0.var(0).mean()), "off_data": off_data(setup, x0)}, x0
