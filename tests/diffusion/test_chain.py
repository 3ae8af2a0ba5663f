"""The SD chain matches diffusers: its steps, its rollouts, and per-sample parameters."""
import pytest
import torch

from halforder.diffusion import (DiffusionChain, ModuleDenoiser, NoiseScales, add_lora, encode_prompts, eta_schedule,
                                 lora_params, make_chain, make_solver, rollout, tau_schedule)
from halforder.diffusion.rewards import make_reward
from halforder.estimators import Plan, estimate
from halforder.estimators.protocol import Chain

diffusers = pytest.importorskip("diffusers")
BRIGHT = make_reward("brightness")


def _scheduler(c, T, **kw):
    s = type(c.scheduler).from_config(c.scheduler.config, **kw)
    s.set_timesteps(T)
    return s


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_matches_scheduler(tiny, prediction_type):
    c = tiny
    c = type(c)(c.unet, c.vae, c.text_encoder, c.tokenizer,
                type(c.scheduler).from_config(c.scheduler.config, prediction_type=prediction_type))
    T, etas = 6, [0.3, 0.0, 1.0, 0.5, 0.0, 0.7]
    chain = make_chain(c, T, ["a cat", "a dog"], BRIGHT, guidance_scale=3.0).for_plan(Plan.full(T),
                                                                                   NoiseScales(eta=etas))
    assert isinstance(chain, Chain)
    sched = _scheduler(c, T)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for t in range(T, 0, -1):
        eps = torch.randn(x.shape, generator=g)
        out = chain.denoiser(x, t, {})
        ref = sched.step(out, sched.timesteps[T - t], x, eta=etas[t - 1], variance_noise=eps).prev_sample
        mine = chain.step(t, x, {}) + chain.sigma(t) * eps
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
        assert (chain.sigma(t) > 0) == (etas[t - 1] > 0)
        x = ref


def test_ddim_rollout_matches_pipeline(tiny, sd_pipeline):
    T = 5
    prompts = ["a red cat", "a blue dog"]
    pipe = sd_pipeline(tiny)
    pe, ne = pipe.encode_prompt(prompts, "cpu", 1, True, [""] * 2)
    torch.testing.assert_close(encode_prompts(tiny, prompts), pe, rtol=0, atol=0)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, latents=x_T, num_inference_steps=T,
               guidance_scale=4.0, eta=0.0, output_type="latent").images
    chain = make_chain(tiny, T, prompts, BRIGHT, guidance_scale=4.0).for_plan(Plan.full(T), NoiseScales(eta=0.0))
    mine = rollout(chain, {}, chain.initial_state(x_T))
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,karras", [(6, False), (16, False), (6, True)])  # 16: no lower-order 2nd-to-last step
def test_dpm_steps_match_scheduler(tiny_dpm, T, karras):
    """eta = 1 is diffusers' sde-dpmsolver++ step, eta = 0 its dpmsolver++ (ODE) step;
    a mixed schedule switches between them with the multistep history carried over."""
    c = tiny_dpm
    c = type(c)(c.unet, c.vae, c.text_encoder, c.tokenizer,
                type(c.scheduler).from_config(c.scheduler.config, use_karras_sigmas=karras))
    etas = [float(i % 3 == 1) for i in range(T)]
    chain = make_chain(c, T, ["a cat"], BRIGHT, guidance_scale=3.0).for_plan(Plan.full(T), NoiseScales(eta=etas))
    sde, ode = _scheduler(c, T), _scheduler(c, T, algorithm_type="dpmsolver++")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    state = chain.initial_state(x)
    for t in range(T, 0, -1):
        eps = torch.randn(x.shape, generator=g)
        out = chain.denoiser(x, t, {})
        s, other = (sde, ode) if etas[t - 1] > 0 else (ode, sde)
        ref = s.step(out, s.timesteps[T - t], x, variance_noise=eps).prev_sample
        other.model_outputs, other.lower_order_nums, other._step_index = \
            list(s.model_outputs), s.lower_order_nums, s._step_index
        mean = chain.step(t, state, {})
        torch.testing.assert_close(mean[0] + chain.sigma(t) * eps, ref, rtol=1e-5, atol=1e-5)
        assert (chain.sigma(t) > 0) == (etas[t - 1] > 0 and t > 1)  # the last step (to sigma = 0) is noiseless
        x, state = ref, (ref, mean[1])


def test_dpm_sde_rollout_matches_pipeline(tiny_dpm, sd_pipeline):
    """With eta = 1 everywhere the chain is the pipeline's SDE-DPM-Solver++(2M) sampler;
    the pipeline draws the step noise from its generator in generation order."""
    T, prompts = 5, ["a red cat", "a blue dog"]
    pipe = sd_pipeline(tiny_dpm)
    pe, ne = pipe.encode_prompt(prompts, "cpu", 1, True, [""] * 2)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, latents=x_T, num_inference_steps=T, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(7), output_type="latent").images
    chain = make_chain(tiny_dpm, T, prompts, BRIGHT, guidance_scale=4.0).for_plan(Plan.full(T), NoiseScales(eta=1.0))
    g = torch.Generator().manual_seed(7)
    noise = [torch.randn(x_T.shape, generator=g) for _ in range(T)]
    mine = rollout(chain, {}, chain.initial_state(x_T), noise=noise)
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_per_sample_params(tiny, cfg):
    """A leading sample axis on the LoRA params: vmap == one call per sample == shared
    params when the copies are equal."""
    params = add_lora(tiny.unet, rank=2, init=False, seed=0)
    chain = make_chain(tiny, 2, ["a cat", "a dog", "a cow"], BRIGHT, guidance_scale=cfg).for_plan(
        Plan.full(2), NoiseScales(eta=0.0))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    per = {k: v.detach() + 0.3 * torch.randn((3, *v.shape), generator=g) for k, v in params.items()}
    batched = chain.step(2, x, per)
    loop = ModuleDenoiser(chain.denoiser.module, chain.denoiser.timesteps, chain.denoiser.context,
                          chain.denoiser.negative_context, cfg, batching="loop")
    torch.testing.assert_close(batched, chain.solver.step(2, x, loop(x, 2, per)), rtol=1e-5, atol=1e-5)
    for i in range(3):
        one = chain.step(2, x, {k: v[i] for k, v in per.items()})
        torch.testing.assert_close(batched[i], one[i], rtol=1e-5, atol=1e-5)
    same = {k: v.detach().expand(3, *v.shape) for k, v in params.items()}
    torch.testing.assert_close(chain.step(2, x, same), chain.step(2, x, dict(params)), rtol=1e-5, atol=1e-5)
    # gradients through the vmapped step (shared leaves + per-sample noise, as the engine
    # builds them) equal those through the per-sample loop
    w = torch.randn(x.shape, generator=g)
    noise = {k: v - params[k].detach() for k, v in per.items()}
    grads = []
    for den in (chain.denoiser, loop):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        out = chain.solver.step(2, x, den(x, 2, {k: leaves[k] + noise[k] for k in leaves}))
        grads.append(torch.autograd.grad((out * w).sum(), list(leaves.values())))
    for a, b in zip(*grads):  # float32 sums in another order (in float64 they agree to 1e-14)
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    assert sum(a.abs().sum() for a in grads[0]) > 0


def test_schedules_follow_the_plan():
    plan = Plan.rlr(T=6, h=2, j=3)
    assert eta_schedule(plan, "plan", eta_plan=0.1) == (0, 0, 0.1, 0, 0, 0)
    assert eta_schedule(plan, 0.5) == (0.5,) * 6
    assert tau_schedule(plan, "plan", zo_sigma=0.01) == (0, 0.01, 0, 0, 0.01, 0.01)
    assert tau_schedule(plan, 0.2) == (0.2,) * 6
    assert eta_schedule(Plan.reinforce(3), "plan", eta_plan=1.0) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="eta"):
        eta_schedule(plan, [0.1] * 5)
    with pytest.raises(ValueError, match="unknown eta schedule"):
        eta_schedule(plan, "everywhere")


def test_for_plan_takes_the_noise_scales_as_one_record(tiny):
    """``for_plan(plan, NoiseScales(...))``; the keywords of earlier versions (``ho_eta`` for
    ``eta_plan``) give the same chain with a DeprecationWarning, and not beside a record."""
    plan = Plan.rlr(T=4, h=2, j=2)
    base = make_chain(tiny, plan.T, ["a cat"], BRIGHT)
    chain = base.for_plan(plan, NoiseScales(eta_plan=0.3, zo_sigma=0.01))
    assert chain.solver.etas == eta_schedule(plan, "plan", 0.3) and chain.taus == tau_schedule(plan, "plan", 0.01)
    with pytest.warns(DeprecationWarning, match=r"NoiseScales\(eta_plan=0.3, zo_sigma=0.01\)"):
        old = base.for_plan(plan, ho_eta=0.3, zo_sigma=0.01)
    assert (old.solver.etas, old.taus) == (chain.solver.etas, chain.taus)
    assert base.for_plan(plan).solver.etas == eta_schedule(plan) == NoiseScales().etas(plan)
    with pytest.raises(TypeError, match="not both"):
        base.for_plan(plan, NoiseScales(), zo_sigma=0.01)
    with pytest.raises(TypeError, match="eta_pln"):
        base.for_plan(plan, eta_pln=0.3)
    assert NoiseScales(eta=[0.1, 0.2]).eta == (0.1, 0.2)     # a frozen record holds no list


def test_plan_chain_validates(tiny):
    plan = Plan.rlr(T=4, h=2, j=2)
    chain = make_chain(tiny, plan.T, ["a cat"], BRIGHT).for_plan(plan, NoiseScales(zo_sigma=0.01))
    plan.validate(chain)
    eta0 = make_chain(tiny, plan.T, ["a cat"], BRIGHT).for_plan(plan, NoiseScales(eta=0.0, zo_sigma=0.01))
    with pytest.raises(ValueError, match="step 2"):  # the HO block ends where sigma = 0
        plan.validate(eta0)


def test_per_step_prompts(tiny):
    """Different step ranges use different prompts: each step's denoiser sees the
    embedding of its own prompts, and the reward sees step 1's."""
    T = 4
    by_step = {t: (["a cat"] if t > 2 else ["a dog"]) for t in range(1, T + 1)}
    seen = []
    chain = make_chain(tiny, T, lambda t: by_step[t], lambda im, p: seen.append(p) or im.mean((1, 2, 3)),
                       guidance_scale=1.0).for_plan(Plan.full(T), NoiseScales(eta=0.0))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in (4, 1):
        ts = chain.solver.timesteps[t - 1]
        ref = tiny.unet(x, ts, encoder_hidden_states=encode_prompts(tiny, by_step[t])).sample
        torch.testing.assert_close(chain.denoiser(x, t, {}), ref)
    other = tiny.unet(x, chain.solver.timesteps[0], encoder_hidden_states=encode_prompts(tiny, ["a cat"])).sample
    assert not torch.allclose(chain.denoiser(x, 1, {}), other)
    chain.reward(x)
    assert seen == [["a dog"]]


@pytest.mark.parametrize("plan", [Plan.full(3), Plan.truncated(3, 1), Plan.reinforce(3), Plan.zeroth_order(3),
                                  Plan.rlr(3, h=1, j=2), Plan.rlr(3, h=2, j=2)], ids=str)
def test_every_plan_gives_lora_gradients(tiny, plan):
    params = add_lora(tiny.unet, rank=2, init=False, seed=0)
    frozen = {k: v.clone() for k, v in tiny.unet.state_dict().items() if "lora_" not in k}
    chain = make_chain(tiny, plan.T, ["a cat"], make_reward("random_cnn"), guidance_scale=2.0).for_plan(
        plan, NoiseScales(eta_plan=1.0, zo_sigma=0.05))
    est = estimate(chain, plan, params, chain.sample_start(2, torch.Generator().manual_seed(0)),
                   generator=torch.Generator().manual_seed(1))
    assert set(est.grad) == set(lora_params(tiny.unet))
    flat = torch.cat([g.flatten() for g in est.grad.values()])
    assert torch.isfinite(flat).all() and flat.abs().sum() > 0
    for k, v in tiny.unet.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen[k]), k


def test_unconditional_pixel_unet():
    """A UNet2DModel (no text, no VAE) drives the chain; the step matches DDIMScheduler."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval().requires_grad_(False)
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000)
    solver = make_solver(sched, 4, 0.5)
    from halforder.diffusion import DecodedReward
    chain = DiffusionChain(ModuleDenoiser(unet, solver.timesteps), solver, (0.0,) * 4,
                           DecodedReward(BRIGHT, ("",)), (3, 8, 8))
    x = chain.sample_start(2, torch.Generator().manual_seed(0))
    ref_s = _scheduler(type("C", (), {"scheduler": sched})(), 4)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    ref = ref_s.step(unet(x, ref_s.timesteps[0]).sample, ref_s.timesteps[0], x, eta=0.5, variance_noise=eps)
    torch.testing.assert_close(chain.step(4, x, {}) + chain.sigma(4) * eps, ref.prev_sample, rtol=1e-5, atol=1e-5)
    assert chain.reward(rollout(chain, {}, x, generator=torch.Generator())).shape == (2,)


def test_video_unet_latents():
    """A UNet3DConditionModel (latents [N, C, F, H, W]) drives the chain, with per-sample params."""
    torch.manual_seed(0)
    unet = diffusers.UNet3DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                          block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
                                          attention_head_dim=4,
                                          down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                          up_block_types=("UpBlock3D", "CrossAttnUpBlock3D")).eval()
    params = add_lora(unet, rank=2, init=False, seed=0)
    solver = make_solver(diffusers.DDIMScheduler(num_train_timesteps=1000), 2, 1.0)
    ctx = torch.randn(1, 3, 16)
    chain = DiffusionChain(ModuleDenoiser(unet, solver.timesteps, ctx), solver, (0.0, 0.0),
                           lambda z: z.mean((1, 2, 3, 4)), (4, 2, 8, 8))
    x = chain.sample_start(2, torch.Generator().manual_seed(0))
    per = {k: v.detach() + 0.1 * torch.randn((2, *v.shape)) for k, v in params.items()}
    out = chain.step(2, x, per)
    assert out.shape == (2, 4, 2, 8, 8)
    torch.testing.assert_close(out[1], chain.step(2, x, {k: v[1] for k, v in per.items()})[1], rtol=1e-5, atol=1e-5)


def test_bad_input(tiny):
    with pytest.raises(ValueError, match="unsupported scheduler"):
        make_solver(diffusers.EulerDiscreteScheduler(), 4)
    with pytest.raises(ValueError, match="prompts"):
        make_chain(tiny, 2, [], BRIGHT).for_plan(Plan.full(2))
    chain = make_chain(tiny, 2, ["a", "b"], BRIGHT).for_plan(Plan.full(2))
    with pytest.raises(ValueError, match="rows"):
        chain.step(2, torch.zeros(3, 4, 8, 8), {})


def test_dpm_chain_drives_the_engine(tiny_dpm):
    """The tuple state (latent, previous data prediction) goes through every role."""
    params = add_lora(tiny_dpm.unet, rank=2, init=False, seed=0)
    plan = Plan.rlr(4, h=2, j=2)
    chain = make_chain(tiny_dpm, plan.T, ["a cat"], make_reward("random_cnn"), guidance_scale=2.0).for_plan(
        plan, NoiseScales(eta_plan=1.0, zo_sigma=0.05))
    x_T = chain.sample_start(2, torch.Generator().manual_seed(0))
    assert isinstance(x_T, tuple) and len(x_T) == 2
    est = estimate(chain, plan, params, x_T, generator=torch.Generator().manual_seed(1))
    for role in ("FO", "HO", "ZO"):
        flat = torch.cat([g.flatten() for g in est.parts[role].values()])
        assert torch.isfinite(flat).all() and flat.abs().sum() > 0, role
