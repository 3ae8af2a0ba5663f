"""Text-to-video: the UNet3D chain matches diffusers, every estimator trains LoRA weights
only, RLR stays unbiased, fps conditioning, frame subsets, video rewards, GIF samples."""
import json
import os

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from halforder.diffusion.sampling.chain import NoiseScales, rollout  # noqa: E402
from halforder.diffusion.models.lora import add_lora, lora_params  # noqa: E402
from halforder.diffusion.app.previews import write_video  # noqa: E402
from halforder.diffusion.models.sd_chain import make_chain  # noqa: E402
from halforder.diffusion.app.task import DiffusionTask  # noqa: E402
from halforder.diffusion.models.video import (VIDEOCRAFTER2_SCALE, DecodedVideoReward, decode_frames,  # noqa: E402
                                              fps_unet_class, frame_indices, load_video_components,
                                              load_videocrafter2, tiny_video_components, video_view)
from halforder.diffusion.rewards.video import make_video_reward, per_frame, temporal_consistency, weighted  # noqa: E402
from halforder.estimators import Plan, estimate, flatten  # noqa: E402
from halforder.toy.stats import two_sample_test  # noqa: E402

BRIGHT = make_video_reward("brightness")


def _video_chain(c, plan, prompts, reward, *, num_frames=16, frames="all", scales=NoiseScales(), guidance_scale=7.5):
    """The video chain of ``plan``: the chain builder with a video view, then the plan's noise."""
    return make_chain(c, plan.T, prompts, reward, view=video_view(c, num_frames, frames),
                      guidance_scale=guidance_scale).for_plan(plan, scales)


def _pipeline(c):
    pipe = diffusers.TextToVideoSDPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                                           unet=c.unet, scheduler=c.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("fps_cond", [False, True], ids=["unet3d", "videocrafter2-fps"])
def test_rollout_matches_text_to_video_pipeline(fps_cond):
    """eta = 0: the chain's rollout equals TextToVideoSDPipeline(output_type="latent")
    from the same initial latents, with classifier-free guidance."""
    c = tiny_video_components(0, fps_cond=fps_cond, fps=12.0)
    T, F, prompts = 3, 3, ["a red cat", "a blue dog"]
    pipe = _pipeline(c)
    pe, ne = pipe.encode_prompt(prompts, "cpu", 1, True, [""] * 2)
    x_T = torch.randn(2, 4, F, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, latents=x_T, num_inference_steps=T, num_frames=F,
               guidance_scale=4.0, eta=0.0, output_type="latent").frames
    chain = _video_chain(c, Plan.full(T), prompts, BRIGHT, num_frames=F, scales=NoiseScales(eta=0.0),
                         guidance_scale=4.0)
    assert chain.latent_shape == (4, F, 8, 8)
    torch.testing.assert_close(rollout(chain, {}, chain.initial_state(x_T)), ref, rtol=1e-5, atol=1e-5)


def test_fps_conditioning_is_videocrafters():
    """fps_proj is VideoCrafter's timestep_embedding ([cos, sin] of fps * 10000^(-k/half));
    with a zero fps embedding the model is the stock UNet3D; fps changes the output."""
    torch.manual_seed(0)
    c = tiny_video_components(0, fps_cond=True)
    unet = c.unet
    fps = torch.tensor([8.0, 28.0])
    half = unet.config.block_out_channels[0] // 2
    args = fps[:, None] * torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half) / half)
    torch.testing.assert_close(unet.fps_proj(fps), torch.cat([args.cos(), args.sin()], -1))
    x, ctx = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 5, 16)
    out8 = unet(x, 500, encoder_hidden_states=ctx, fps=8).sample
    assert not torch.allclose(out8, unet(x, 500, encoder_hidden_states=ctx, fps=28).sample)
    torch.testing.assert_close(out8, unet(x, 500, encoder_hidden_states=ctx,
                                          fps=torch.tensor([8.0])).sample)   # tensor or number
    stock = diffusers.UNet3DConditionModel(**{k: v for k, v in unet.config.items()
                                              if not k.startswith("_") and k not in ("fps", "fps_cond")}).eval()
    stock.load_state_dict({k: v for k, v in unet.state_dict().items() if not k.startswith("fps_")})
    with torch.no_grad():
        unet.fps_embedding.linear_2.weight.zero_()
        unet.fps_embedding.linear_2.bias.zero_()
    torch.testing.assert_close(unet(x, 500, encoder_hidden_states=ctx).sample,   # float32 rounding only
                               stock(x, 500, encoder_hidden_states=ctx).sample)


def _save_base(c, root):
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        getattr(c, name).save_pretrained(os.path.join(root, name))


def test_videocrafter2_loading(tmp_path, monkeypatch):
    """A VideoCrafter2-style checkpoint (UNet with fps weights + a T2V base) loads with its
    fps embedding; stock diffusers would drop those weights; a checkpoint without them is
    refused; missing paths and offline hub ids give clear errors."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c = tiny_video_components(0, fps_cond=True)
    c.unet.save_pretrained(tmp_path / "vc2")
    _save_base(c, tmp_path / "base")
    loaded = load_videocrafter2(str(tmp_path / "vc2"), str(tmp_path / "base"), fps=8, local_files_only=True)
    assert loaded.unet.config.fps == 8 and loaded.unet.config.fps_cond
    x, ctx = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 5, 16)
    torch.testing.assert_close(loaded.unet(x, 300, encoder_hidden_states=ctx).sample,
                               c.unet(x, 300, encoder_hidden_states=ctx, fps=8).sample)
    _, info = diffusers.UNet3DConditionModel.from_pretrained(tmp_path / "vc2", output_loading_info=True)
    assert sorted(k for k in info["unexpected_keys"] if k.startswith("fps_"))  # what stock diffusers lacks
    plain = tiny_video_components(0)
    plain.unet.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="fps-embedding"):
        load_videocrafter2(str(tmp_path / "plain"), str(tmp_path / "base"), local_files_only=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_videocrafter2(str(tmp_path / "nowhere"), str(tmp_path / "base"), local_files_only=True)
    with pytest.raises(FileNotFoundError, match="subfolders"):
        load_video_components(str(tmp_path / "base"))                       # no unet/ subfolder
    with pytest.raises(OSError, match="local copy|--local-dir"):
        load_video_components("halforder-test/no-such-t2v-model", local_files_only=True)


def test_frame_subsets():
    F = 5
    assert frame_indices("all", F, 2).tolist() == [list(range(F))] * 2
    assert frame_indices("ends", F, 1).tolist() == [[0, 2, 4]]
    assert frame_indices("ends", 2, 1).tolist() == [[0, 1]]
    assert frame_indices((4, -5), F, 1).tolist() == [[0, 4]]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    r = frame_indices("random", F, 1000, g1)
    assert r.shape == (1000, 1) and torch.equal(r, frame_indices("random", F, 1000, g2))
    assert torch.bincount(r.flatten(), minlength=F).min() > 150           # uniform over the F frames
    with pytest.raises(ValueError, match="unknown frame selection"):
        frame_indices("middle-ish", F, 1)
    with pytest.raises(ValueError, match="out of range"):
        frame_indices([5], F, 1)


def test_subset_decoding_is_exact_and_noise_free():
    """Decoding a subset gives exactly those frames of the full decoding; the random frame
    comes from the reward's own generator, whatever the latents (i.e. the sample's noise)."""
    c = tiny_video_components(0)
    z = torch.randn(2, 4, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    full = decode_frames(c.vae, z)
    torch.testing.assert_close(decode_frames(c.vae, z, frame_indices("ends", 5, 2)), full[:, [0, 2, 4]])
    seen = []
    reward = DecodedVideoReward(lambda fr, p: seen.append(fr) or fr.mean((1, 2, 3, 4)), ("a",), c.vae, "random",
                                torch.Generator())
    picks = []
    for latents in (z, torch.randn(2, 4, 5, 8, 8)):
        reward.frame_generator.manual_seed(11)
        reward(latents)
        picks.append(frame_indices("random", 5, 2, torch.Generator().manual_seed(11)))
        torch.testing.assert_close(seen[-1], decode_frames(c.vae, latents, picks[-1]))
    assert torch.equal(picks[0], picks[1]) and seen[-1].shape[1] == 1


@pytest.mark.parametrize("plan", [Plan.full(3), Plan.truncated(3, 1), Plan.reinforce(3), Plan.zeroth_order(3),
                                  Plan.rlr(3, h=2, j=2)], ids=str)
def test_every_plan_gives_lora_gradients(plan):
    c = tiny_video_components(0)
    params = add_lora(c.unet, rank=2, init=False, seed=0)
    frozen = {k: v.clone() for k, v in c.unet.state_dict().items() if "lora_" not in k}
    reward = make_video_reward("random_cnn+0.5*temporal")
    chain = _video_chain(c, plan, ["a cat"], reward, num_frames=3, frames="ends",
                         scales=NoiseScales(eta_plan=1.0, zo_sigma=0.05), guidance_scale=2.0)
    est = estimate(chain, plan, params, chain.sample_start(2, torch.Generator().manual_seed(0)),
                   generator=torch.Generator().manual_seed(1), baseline="loo")
    assert set(est.grad) == set(lora_params(c.unet))
    flat = torch.cat([g.flatten() for g in est.grad.values()])
    assert torch.isfinite(flat).all() and flat.abs().sum() > 0
    for k, v in c.unet.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen[k]), k


# Two LoRA targets (one spatial cross-attention, one temporal self-attention), rank 1: 32
# parameters, few enough for a multivariate test with a few hundred samples.
TARGETS = ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
           "down_blocks.0.temp_attentions.0.transformer_blocks.0.attn1.to_out.0")
ALPHA = 1e-3


def _draw(chain, plan, params, x_T, n, seed):
    g, out = torch.Generator().manual_seed(seed), []
    for i in range(0, n, 64):
        m = min(64, n - i)
        est = estimate(chain, plan, params, x_T.expand(m, *x_T.shape[1:]).clone(), generator=g, per_sample=True,
                       baseline="loo")
        out.append(flatten(est.grad, True))
    return torch.cat(out).double()


@pytest.mark.parametrize("videocrafter2", [False, True], ids=["unet3d", "videocrafter2-scaled"])
def test_rlr_mean_gradient_matches_full_backprop(videocrafter2):
    """RLR(h=2, j=2) on a T=4 video chain with both noises (eta = 1 at j = 2, parameter noise
    tau = 0.5 on the ZO step 4; random-CNN reward on all frames; the start x_T is fixed, a
    point-mass start distribution) has the mean gradient of full backprop on the same chain;
    also for a tiny VideoCrafter2 (fps conditioning, DDIM with its latent scale, which moves
    the step means at timesteps 1, 251 and 501 while sigma_t stays the same).

    Test: a two-sample chi^2 test of equal means of the per-sample estimates projected on 4
    directions fixed before the tested draws (the direction of an independent pilot full-
    backprop estimate and 3 random ones); nominal false-failure rate ALPHA = 0.1%. The same
    test rejects truncated backprop (K = 1), and RLR's standard error along the pilot
    direction is small enough that a bias of truncation's size would be seen (> 4 SE)."""
    c = tiny_video_components(0, latent_size=2, fps_cond=videocrafter2,
                              latent_scale=VIDEOCRAFTER2_SCALE if videocrafter2 else None)
    params = add_lora(c.unet, rank=1, init=False, target_modules=TARGETS, seed=0)
    T, rlr = 4, Plan.rlr(4, 2, 2)
    chain = _video_chain(c, rlr, ["a cat"], make_video_reward("random_cnn"), num_frames=2, frames="all",
                         scales=NoiseScales(eta_plan=1.0, zo_sigma=0.5), guidance_scale=1.0)
    x_T = chain.sample_start(1, torch.Generator().manual_seed(3))
    pilot = _draw(chain, Plan.full(T), params, x_T, 32, seed=10).mean(0)
    U = torch.cat([(pilot / pilot.norm())[:, None],
                   torch.randn(len(pilot), 3, generator=torch.Generator().manual_seed(14), dtype=torch.float64)], 1)
    U = U / U.norm(dim=0)
    full = _draw(chain, Plan.full(T), params, x_T, 384, seed=11)
    ests = _draw(chain, rlr, params, x_T, 768, seed=12)
    trunc = _draw(chain, Plan.truncated(T, 1), params, x_T, 64, seed=13)
    assert bool(chain.solver.scales) == videocrafter2
    assert not two_sample_test(ests @ U, full @ U).rejects(ALPHA)
    assert two_sample_test(trunc @ U, full @ U).rejects(ALPHA)
    u = U[:, 0]
    bias = float((full.mean(0) - trunc.mean(0)) @ u)
    se = float(((ests @ u).var() / len(ests) + (full @ u).var() / len(full)) ** 0.5)
    assert abs(bias) > 4 * se


def test_video_rewards():
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(2, 3, 3, 8, 8, generator=g, requires_grad=True)
    prompts = ["a", "b"]
    bright = per_frame(lambda im, p: im.mean((1, 2, 3)))
    torch.testing.assert_close(bright(frames, prompts), frames.mean((1, 2, 3, 4)))
    still = frames[:, :1].expand(2, 3, 3, 8, 8)
    for feats in ("pixels", "random_cnn"):
        tc = temporal_consistency(feats)
        torch.testing.assert_close(tc(still, prompts), torch.ones(2))
        assert (tc(frames, prompts) < 1).all()
    combo = weighted([(1.0, bright), (0.5, temporal_consistency())])
    torch.testing.assert_close(combo(frames, prompts),
                               bright(frames, prompts) + 0.5 * temporal_consistency()(frames, prompts))
    spec = make_video_reward("brightness+0.5*temporal")
    torch.testing.assert_close(spec(frames, prompts), combo(frames, prompts))
    spec(frames, prompts).sum().backward()
    assert torch.isfinite(frames.grad).all() and frames.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown reward"):
        make_video_reward("brightness+motion")
    with pytest.raises(ValueError, match="cannot read"):
        make_video_reward("2*")
    with pytest.raises(ValueError, match="at least 2 decoded frames"):
        temporal_consistency()(frames[:, :1], prompts)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_video_task_trains_and_writes_gif(tmp_path):
    """Two training updates of a video DiffusionTask through the library's loop
    (halforder.diffusion.app.run); metrics, a film-strip grid and a GIF of samples are written."""
    import imageio

    from halforder.diffusion.app.config import load_config
    from halforder.diffusion.app.run import prepare, run

    overrides = dict(steps=2, T=3, eval_every=2, checkpoint_every=0, output_dir=str(tmp_path), progress=False)
    cfg = load_config(None, overrides, preset="tiny-video")
    prepared = prepare(cfg, "cpu")
    task = prepared.task
    before = {k: v.clone() for k, v in task.trainable().items()}
    result = run(cfg, prepared)
    assert result.step == 2
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if "plan" in json.loads(line)]
    assert [r["step"] for r in recs] == [1, 2] and all(not r["skipped"] for r in recs)
    assert any(not torch.equal(before[k], v) for k, v in task.trainable().items())
    assert (tmp_path / "samples" / "step_00000002.png").exists()
    gif = tmp_path / "samples" / "final.gif"        # written by run's export
    frames = imageio.mimread(gif)
    assert len(frames) == cfg.num_frames and frames[0].shape[1] == 2 * 16 + 1   # two 16-pixel videos


def test_write_video_and_bad_input(tmp_path):
    v = torch.rand(2, 4, 3, 6, 5)
    path = write_video(v, str(tmp_path / "v.gif"))
    assert os.path.exists(path)
    with pytest.raises(ValueError, match=r"\[N, F, 3, H, W\]"):
        write_video(v[0], str(tmp_path / "w.gif"))
    c = tiny_video_components(0)
    with pytest.raises(ValueError, match="prompts"):
        _video_chain(c, Plan.full(2), [], BRIGHT)
    with pytest.raises(ValueError, match="num_frames"):
        _video_chain(c, Plan.full(2), ["a"], BRIGHT, num_frames=0)
    assert isinstance(fps_unet_class()(block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
                                       attention_head_dim=4, layers_per_block=1,
                                       down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                       up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), fps_cond=False),
                      diffusers.UNet3DConditionModel)
    task = DiffusionTask(c, {}, BRIGHT, video_view(c, 2, "random"), 2)
    assert task.previews(["a"], torch.Generator().manual_seed(0)).shape == (1, 3, 16, 32)
    from halforder.diffusion.app.config import load_config
    from halforder.diffusion.app.run import build_components, build_reward, build_task
    cfg = load_config(None, {"task": "t2v", "model": "tiny", "reward": "brightness+temporal", "T": 2, "h": 1,
                             "frames": "random"})
    with pytest.raises(ValueError, match="needs at least 2 decoded frames"):
        build_task(cfg, build_components(cfg), build_reward(cfg))


def test_video_resume_is_exact(tmp_path):
    """Interrupted in update 2 (after the checkpoint of update 1) and resumed, a video task run
    with random frames ends with the same LoRA weights and rewards as an uninterrupted one."""
    from halforder.diffusion.app.config import load_config
    from halforder.diffusion.app.run import build_components, build_reward, build_task
    from halforder.estimators.samplers import UniformRLR
    from halforder.training.loop import Hooks, train

    class Interrupt(Exception):
        pass

    def run(out, resume=None, stop_at=None):
        cfg = load_config(None, dict(task="t2v", model="tiny", reward="random_cnn", T=3, h=1, steps=2, batch_size=4,
                                     grad_accum=1, lr=1e-2, lora_rank=2, eta_plan=1.0, zo_sigma=1e-2,
                                     guidance_scale=1.0, eval_every=0, checkpoint_every=1, keep_checkpoints=0,
                                     output_dir=str(out), resume=resume, progress=False, num_frames=3,
                                     frames="random"))
        task = build_task(cfg, build_components(cfg), build_reward(cfg))

        def hook(rec, est):
            if rec["step"] == stop_at:
                raise Interrupt
        try:
            result = train(task, UniformRLR(cfg.T, cfg.h), ["a cat", "a dog", "a cow"], cfg,
                           hooks=Hooks(on_step=hook))
        except Interrupt:
            result = None
        return task, result

    whole, r_whole = run(tmp_path / "a")
    run(tmp_path / "b", stop_at=2)                  # before update 2's checkpoint: resumes from update 1
    resumed, r_resumed = run(tmp_path / "b", resume="latest")
    for k, v in whole.trainable().items():
        assert torch.equal(v, resumed.trainable()[k]), k
    assert r_whole.metrics[-1]["reward_mean"] == r_resumed.metrics[-1]["reward_mean"]


def test_random_frames_follow_the_trainer_generator():
    """task.chain(plan, prompts, generator) seeds the chain's frame generator from the trainer's
    generator (before x_T is drawn from it): the same generator state gives the same frames,
    the next update other ones."""
    c = tiny_video_components(0)
    task = DiffusionTask(c, {}, BRIGHT, video_view(c, 5, "random"), 2)
    g = torch.Generator().manual_seed(0)
    draws = []
    for gen in (g, g, torch.Generator().manual_seed(0)):
        chain = task.chain(Plan.full(2), ["a"], gen)
        chain.sample_start(1, gen)                  # the loop then draws x_T from the same generator
        draws.append(frame_indices("random", 5, 64, chain.reward_fn.frame_generator))
    assert not torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])
