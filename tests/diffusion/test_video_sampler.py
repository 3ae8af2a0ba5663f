"""VideoCrafter2's DDIM: the latent scale s(tau) of its forward process
x_tau = sqrt(abar_tau) s(tau) x_0 + sqrt(1 - abar_tau) eps (docs/video.md).

An ideal denoiser (one that knows the target x_0 and answers with the exact eps or v of
that process at any x) makes the scaled sampler return x_0; the unscaled sampler does not.
The solver also matches VideoCrafter's DDIM written out from its formulas, the scale leaves
sigma_t alone, VideoCrafter2's parts carry the scale, and DPM-Solver is refused."""
import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from halforder.diffusion.sampling.chain import DiffusionChain, rollout  # noqa: E402
from halforder.diffusion.models.components import SD_SCHEDULER_CONFIG  # noqa: E402
from halforder.diffusion.models.sd_chain import make_chain, model_solver  # noqa: E402
from halforder.diffusion.sampling.solvers import LatentScale, make_solver  # noqa: E402
from halforder.diffusion.models.video import (VIDEOCRAFTER2_SCALE, load_videocrafter2,  # noqa: E402
                                              tiny_video_components, video_view)
from halforder.diffusion.rewards.video import make_video_reward  # noqa: E402

SHAPE = (2, 4, 3, 5, 6)      # [N, C, F, h, w]


def _scheduler(set_alpha_to_one=False, prediction_type="epsilon"):
    """VideoCrafter2's DDIM schedule (SD's betas; its last step goes to abar_0, set_alpha_to_one
    False); with set_alpha_to_one the last step lands on the data (abar = 1)."""
    return diffusers.DDIMScheduler.from_config(dict(SD_SCHEDULER_CONFIG, set_alpha_to_one=set_alpha_to_one,
                                                    prediction_type=prediction_type))


class Oracle:
    """The ideal denoiser of a point mass at ``x0`` under the scaled forward process: at x_t it
    returns eps = (x_t - sqrt(abar) s x0) / sqrt(1 - abar), or v = sqrt(abar) eps - sqrt(1 - abar) s x0."""

    def __init__(self, scheduler, solver, x0, scale):
        self.ac, self.timesteps, self.x0, self.scale = scheduler.alphas_cumprod.double(), solver.timesteps, x0, scale
        self.v = scheduler.config.prediction_type == "v_prediction"

    def __call__(self, x, t, params):
        tau = int(self.timesteps[t - 1])
        a, s = float(self.ac[tau]), self.scale(tau)
        eps = (x - math.sqrt(a) * s * self.x0) / math.sqrt(1 - a)
        return math.sqrt(a) * eps - math.sqrt(1 - a) * s * self.x0 if self.v else eps


def _sample(sched, T, eta, x0, x_T, noise, latent_scale):
    """The oracle chain's final latent (float64) with the given start and step noises."""
    solver = make_solver(sched, T, eta, latent_scale)
    chain = DiffusionChain(Oracle(sched, solver, x0, VIDEOCRAFTER2_SCALE), solver, 0.0, lambda z: z.sum(),
                           SHAPE[1:])
    return rollout(chain, {}, x_T, noise=noise)


def _draws(T, seed):
    g = torch.Generator().manual_seed(seed)
    x0, x_T = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(2))
    return x0, x_T, [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(T)]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("T", [10, 25, 50])
def test_ideal_denoiser_returns_x0(T, eta, prediction_type):
    """With the last step landing on the data (abar = 1, sigma_1 = 0), the scaled sampler
    returns x_0 to float64 precision from any x_T and any step noise: the oracle's prediction
    of x_0 is exact at every step. The unscaled sampler returns s(tau_1) x_0 (tau_1 = 1)."""
    sched = _scheduler(set_alpha_to_one=True, prediction_type=prediction_type)
    x0, x_T, noise = _draws(T, seed=T)
    torch.testing.assert_close(_sample(sched, T, eta, x0, x_T, noise, VIDEOCRAFTER2_SCALE), x0,
                               rtol=1e-12, atol=1e-12)
    unscaled = _sample(sched, T, eta, x0, x_T, noise, None)
    assert not torch.allclose(unscaled, x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(unscaled, VIDEOCRAFTER2_SCALE(1) * x0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("T", [10, 25, 50])
def test_ideal_denoiser_follows_videocrafter2_forward_process(T, eta):
    """VideoCrafter2's own schedule (last step to abar_0 < 1). From x_T drawn from the scaled
    forward process at tau_T (x_T = sqrt(abar) s x0 + sqrt(1 - abar) eps), the output's x_0
    part is exactly the forward process's at tau = 0: the output minus sqrt(abar_0) x0 is the
    same for two targets with the same noises, for any eta; with eta = 0 every step stays on
    the forward path of eps, so the output is sqrt(abar_0) x0 + sqrt(1 - abar_0) eps. From
    the noiseless path (eps = 0), the unscaled sampler returns a visibly smaller multiple of
    sqrt(abar_0) x0 (about 0.961 at T = 25)."""
    sched = _scheduler()
    solver = make_solver(sched, T)
    ac, a0 = sched.alphas_cumprod.double(), float(solver.base[0][1])
    tau_T = int(solver.timesteps[T - 1])
    a_T, s_T = float(ac[tau_T]), VIDEOCRAFTER2_SCALE(tau_T)

    def start(x0, eps):
        return math.sqrt(a_T) * s_T * x0 + math.sqrt(1 - a_T) * eps

    x0, eps, noise = _draws(T, seed=100 + T)
    x0b = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out = _sample(sched, T, eta, x0, start(x0, eps), noise, VIDEOCRAFTER2_SCALE)
    outb = _sample(sched, T, eta, x0b, start(x0b, eps), noise, VIDEOCRAFTER2_SCALE)
    torch.testing.assert_close(out - math.sqrt(a0) * x0, outb - math.sqrt(a0) * x0b, rtol=1e-12, atol=1e-12)
    if eta == 0:
        torch.testing.assert_close(out, math.sqrt(a0) * x0 + math.sqrt(1 - a0) * eps, rtol=1e-12, atol=1e-12)
        zero = torch.zeros_like(x0)
        target = math.sqrt(a0) * x0
        torch.testing.assert_close(_sample(sched, T, 0.0, x0, start(x0, zero), noise, VIDEOCRAFTER2_SCALE),
                                   target, rtol=1e-12, atol=1e-12)
        unscaled = _sample(sched, T, 0.0, x0, start(x0, zero), noise, None)
        assert not torch.allclose(unscaled, target, rtol=1e-3, atol=1e-3)


def test_latent_scale_is_videocrafters_linspace():
    """s(tau) = linspace(1, 0.7, 400)[tau] for tau < 400, then 0.7; the final step's
    previous timestep (below 0) gets s(0)."""
    ref = np.concatenate([np.linspace(1.0, 0.7, 400), np.full(600, 0.7)])
    np.testing.assert_allclose([VIDEOCRAFTER2_SCALE(t) for t in range(1000)], ref, rtol=1e-15, atol=0)
    assert VIDEOCRAFTER2_SCALE(-19) == 1.0
    with pytest.raises(ValueError, match="ramp"):
        LatentScale(1.0, 0.7, 1)


def _videocrafter_ddim_step(abar, x, e_t, noise, T, index, eta):
    """One step of VideoCrafter's DDIM with use_scale, written out from its formulas:
    uniform timesteps range(0, 1000, 1000 // T) + 1, abar_prev and s_prev of the previous
    DDIM timestep (abar[0] and s(0) at the last step), sigma = eta sqrt((1 - a_prev) /
    (1 - a) (1 - a / a_prev)), pred_x0 = (x - sqrt(1 - a) e_t) / sqrt(a) / s_t,
    x_prev = sqrt(a_prev) s_prev pred_x0 + sqrt(1 - a_prev - sigma^2) e_t + sigma noise."""
    scale = np.concatenate([np.linspace(1.0, 0.7, 400), np.full(600, 0.7)])
    steps = np.arange(0, 1000, 1000 // T) + 1
    prev = np.concatenate([[0], steps[:-1]])
    a, a_prev, s_t, s_prev = abar[steps[index]], abar[prev[index]], scale[steps[index]], scale[prev[index]]
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    pred_x0 = (x - np.sqrt(1 - a) * e_t) / np.sqrt(a) / s_t
    return np.sqrt(a_prev) * s_prev * pred_x0 + np.sqrt(1 - a_prev - sigma ** 2) * e_t + sigma * noise


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_step_matches_videocrafters_ddim(eta):
    """Every step of the scaled solver equals VideoCrafter's DDIM step (from its formulas)
    for the same model output and noise, T = 25; the sigma_t are the unscaled solver's.
    Both use abar in float32 (VideoCrafter rounds its float64 schedule to float32; diffusers
    computes it in float32): the two agree to float32 precision, and the step comparison
    uses the scheduler's."""
    T, g, sched = 25, torch.Generator().manual_seed(0), _scheduler()
    abar = np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)   # VideoCrafter2's betas
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), abar, rtol=1e-6)
    solver = make_solver(sched, T, eta, VIDEOCRAFTER2_SCALE)
    plain = make_solver(sched, T, eta)
    for t in range(1, T + 1):
        x, out, z = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(3))
        ours = solver.step(t, x, out) + solver.sigma(t) * z
        ref = _videocrafter_ddim_step(sched.alphas_cumprod.double().numpy(), x.numpy(), out.numpy(), z.numpy(),
                                      T, t - 1, eta)
        np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10, atol=1e-10)
        assert solver.sigma(t) == plain.sigma(t)


def test_videocrafter2_parts_carry_the_scale(tmp_path, monkeypatch):
    """load_videocrafter2 attaches the scale and VideoCrafter2's schedule (not the base's
    scheduler config), and the chain builder uses them; a plain model's chain is unscaled;
    DPM-Solver is refused (for VideoCrafter2, before anything is loaded)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c = tiny_video_components(0, fps_cond=True)
    c.unet.save_pretrained(tmp_path / "vc2")
    for name in ("vae", "text_encoder", "tokenizer"):
        getattr(c, name).save_pretrained(tmp_path / "base" / name)
    diffusers.DDIMScheduler.from_config(c.scheduler.config, steps_offset=0, timestep_spacing="trailing",
                                        set_alpha_to_one=True).save_pretrained(tmp_path / "base" / "scheduler")
    loaded = load_videocrafter2(str(tmp_path / "vc2"), str(tmp_path / "base"), local_files_only=True)
    assert loaded.latent_scale == VIDEOCRAFTER2_SCALE and c.latent_scale is None
    reward = make_video_reward("brightness")
    chain = make_chain(loaded, 4, ["a cat"], reward, view=video_view(loaded, 2, "all"))
    ref = make_solver(_scheduler(), 4, latent_scale=VIDEOCRAFTER2_SCALE)
    assert chain.solver.timesteps.tolist() == [1, 251, 501, 751] and chain.solver.base == ref.base
    assert chain.solver.scales == ref.scales
    assert chain.solver.scales[1] == (VIDEOCRAFTER2_SCALE(251), VIDEOCRAFTER2_SCALE(1))
    assert model_solver(c, 4).scales == ()
    with pytest.raises(ValueError, match="DPM-Solver"):
        load_videocrafter2(str(tmp_path / "nowhere"), str(tmp_path / "base"), scheduler="dpm")
    with pytest.raises(ValueError, match="DPM-Solver"):
        model_solver(tiny_video_components(0, scheduler="dpm", latent_scale=VIDEOCRAFTER2_SCALE), 4)
    model_solver(tiny_video_components(0, scheduler="dpm"), 4)           # unscaled DPM is fine
