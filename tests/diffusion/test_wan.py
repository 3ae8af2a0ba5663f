"""Wan 2.1 text-to-video: tiny parts saved as a ``WanPipeline`` folder and loaded back through
``load_components`` sample as the pipeline does (latents and decoded frames); their LoRA files
load into the pipeline exactly; estimators run on the video chain and cost what their plans say."""
import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from halforder.diffusion import NoiseScales, add_lora, load_components, make_chain, rollout, tiny_model  # noqa: E402
from halforder.diffusion.models.families import wan  # noqa: E402
from halforder.diffusion.models.lora import save_lora  # noqa: E402
from halforder.diffusion.rewards.video import make_video_reward  # noqa: E402
from halforder.estimators import ComputeMeter, Plan, estimate, expected_evaluations  # noqa: E402

PROMPTS = ["a red ball bouncing", "a blue car   driving"]
FRAMES, SIZE = 5, 4          # 5 frames = 2 latent frames; 4x4 latents = 32x32 px


def pipeline(c):
    import diffusers

    pipe = diffusers.WanPipeline(tokenizer=c.tokenizer, text_encoder=c.text_encoder, transformer=c.unet, vae=c.vae,
                                 scheduler=c.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def chain_of(c, T, guidance, frames="all", prompts=PROMPTS):
    view = wan.video_view(c, FRAMES, frames, SIZE)
    return make_chain(c, T, prompts, make_video_reward("brightness"), view=view, guidance_scale=guidance)


@pytest.mark.parametrize("T,guidance", [(4, 5.0), (10, 1.0)])
def test_rollouts_at_eta_zero_are_the_pipelines(tmp_path, T, guidance):
    import diffusers

    pipeline(tiny_model("tiny-wan")).save_pretrained(tmp_path)
    c = load_components(str(tmp_path), local_files_only=True, video=True)
    assert c.family == "wan" and c.max_sequence_length is None
    c = dataclasses.replace(c, max_sequence_length=16)      # the pipeline call's max_sequence_length
    chain = chain_of(c, T, guidance)
    x_T = chain.sample_start(2, torch.Generator().manual_seed(T))
    ours = rollout(chain, {}, x_T)
    pipe = diffusers.WanPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=8 * SIZE, width=8 * SIZE, num_frames=FRAMES, num_inference_steps=T, latents=x_T,
              max_sequence_length=16, guidance_scale=guidance)
    # without guidance the same to 1e-6; with it the pipeline runs the two branches as separate calls and
    # we as one batch of 2n, so float32 sums run in another order (measured: 2.1e-6 at T = 4)
    tol = 1e-6 if guidance <= 1 else 1e-5
    torch.testing.assert_close(ours, pipe(PROMPTS, output_type="latent", **kw).frames, rtol=0, atol=tol)
    frames = pipe(PROMPTS, output_type="pt", **kw).frames                          # [N, F, 3, H, W]
    torch.testing.assert_close(chain.reward_fn.decode(c.vae, ours, None), frames, rtol=0, atol=1e-5)


def test_a_wan_folder_is_refused_as_an_image_model_and_an_image_model_as_video(tmp_path):
    pipeline(tiny_model("tiny-wan")).save_pretrained(tmp_path / "wan")
    with pytest.raises(ValueError, match="text-to-video model: use task t2v"):
        load_components(str(tmp_path / "wan"))
    with pytest.raises(ValueError, match=r"4 k \+ 1 frames"):
        wan.video_view(tiny_model("tiny-wan"), 4)


@pytest.mark.parametrize("targets", [["to_q", "to_k", "to_v", "to_out.0"],
                                     ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]],
                         ids=["attention", "attention+ff"])
def test_lora_files_load_into_the_pipeline_exactly(tmp_path, targets, lora_loads_exactly):
    trained = tiny_model("tiny-wan")
    add_lora(trained.unet, rank=2, target_modules=targets, init=False, seed=1)
    save_lora(trained.unet, tmp_path, prefix="transformer")
    pipe = pipeline(tiny_model("tiny-wan"))
    pipe.load_lora_weights(tmp_path)
    ours, base = chain_of(trained, 2, 5.0), chain_of(tiny_model("tiny-wan"), 2, 5.0)
    x = ours.sample_start(2, torch.Generator().manual_seed(0))
    lora_loads_exactly(ours, base, pipe.transformer, x)


@pytest.mark.parametrize("plan", [Plan.full(4), Plan.rlr(4, 2, 2), Plan.zeroth_order(4), Plan.reinforce(4, [3, 4])],
                         ids=lambda p: p.name)
def test_estimators_run_on_the_video_chain(plan):
    c = tiny_model("tiny-wan")
    params = add_lora(c.unet, rank=2, init=False, seed=0)
    chain = chain_of(c, 4, 5.0, frames="random", prompts=PROMPTS * 2).for_plan(plan, NoiseScales(eta_plan=0.7))
    g = torch.Generator().manual_seed(0)
    with ComputeMeter() as meter:
        est = estimate(chain, plan, params, chain.sample_start(4, g), generator=g, baseline="loo")
    assert all(bool(torch.isfinite(v).all()) for v in est.grad.values())
    assert sum(float(v.abs().sum()) for v in est.grad.values()) > 0
    want = expected_evaluations(plan, 4)
    assert (meter.forward, meter.backward) == (want["forward"], want["backward"])


def test_a_unet3d_folder_loads_as_video_with_or_without_its_model_index(tmp_path):
    """`--task t2v` with a TextToVideoSDPipeline folder (model_index.json names it) or a bare
    folder of its parts loads the UNet3D model; the same folder as an image model is refused."""
    import diffusers

    from halforder.diffusion.models.video import tiny_video_components

    c = tiny_video_components(0)
    pipe = diffusers.TextToVideoSDPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                           scheduler=c.scheduler)
    pipe.save_pretrained(tmp_path / "t2v")
    loaded = load_components(str(tmp_path / "t2v"), local_files_only=True, video=True)
    assert type(loaded.unet).__name__ == "UNet3DConditionModel" and loaded.family == "sd"
    (tmp_path / "t2v" / "model_index.json").unlink()
    assert type(load_components(str(tmp_path / "t2v"), local_files_only=True, video=True).unet).__name__ == \
        "UNet3DConditionModel"
    pipe.save_pretrained(tmp_path / "again")
    with pytest.raises(ValueError, match="a text-to-video model: use task t2v"):
        load_components(str(tmp_path / "again"), local_files_only=True)
