"""SD3 and FLUX: tiny models built from configs, saved with ``save_pretrained`` and loaded back
through ``load_components``, sample exactly as their diffusers pipelines do; their LoRA files
load into the pipelines exactly; per-sample parameters give the same estimates under vmap and
the loop."""
import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from halforder.diffusion import (NoiseScales, add_lora, load_components, make_chain, make_reward, rollout,  # noqa: E402
                                 tiny_model)
from halforder.diffusion.models.lora import load_lora, save_lora  # noqa: E402
from halforder.diffusion.models.sd_chain import image_view  # noqa: E402
from halforder.estimators import Plan, estimate  # noqa: E402

PROMPTS = ["a red square", "a blue circle"]


def pipeline(c):
    """The diffusers pipeline over tiny components (no progress bar)."""
    import diffusers

    if c.family == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=c.unet, scheduler=c.scheduler, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
            text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2, text_encoder_3=c.text_encoder_3,
            tokenizer_3=c.tokenizer_3)
    else:
        pipe = diffusers.FluxPipeline(transformer=c.unet, scheduler=c.scheduler, vae=c.vae, text_encoder=c.text_encoder,
                                      tokenizer=c.tokenizer, text_encoder_2=c.text_encoder_2,
                                      tokenizer_2=c.tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def packed(c, z):
    """The pipeline's latent layout of the chain's (FLUX: [N, h/2 w/2, 4C])."""
    return z.flatten(1, 2) if c.family == "flux" else z


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-flux"])
def saved(request, tmp_path_factory):
    """(components loaded back from a saved pipeline folder, the folder), with the tiny T5 length
    (the pipeline call's ``max_sequence_length=16``)."""
    path = tmp_path_factory.mktemp(request.param)
    pipeline(tiny_model(request.param)).save_pretrained(path)
    loaded = load_components(str(path), local_files_only=True)
    assert loaded.family == request.param.removeprefix("tiny-") and loaded.max_sequence_length is None
    return dataclasses.replace(loaded, max_sequence_length=16), path


@pytest.mark.parametrize("T,guidance", [(4, 2.0), (10, 4.5)])
def test_rollouts_at_eta_zero_are_the_pipelines(saved, T, guidance):
    import diffusers

    c, path = saved
    chain = make_chain(c, T, PROMPTS, make_reward("brightness"), guidance_scale=guidance)
    x_T = chain.sample_start(2, torch.Generator().manual_seed(T))
    ours = rollout(chain, {}, x_T)
    pipe = diffusers.DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=16, width=16, num_inference_steps=T, latents=packed(c, x_T), max_sequence_length=16,
              guidance_scale=guidance)
    theirs = pipe(PROMPTS, output_type="latent", **kw).images
    torch.testing.assert_close(packed(c, ours), theirs, rtol=0, atol=1e-6)
    images = pipe(PROMPTS, output_type="pt", **kw).images      # the decode: shift factor, unpacking
    torch.testing.assert_close(decoded(chain, ours), images,
                               rtol=0, atol=1e-5)


def decoded(chain, z):
    from halforder.diffusion.sampling.views import decode_latents
    with torch.no_grad():
        rf = chain.reward_fn
        return decode_latents(rf.vae, z if rf.unpack is None else rf.unpack(z))


def test_sd3_with_dynamic_shifting_is_the_pipelines(tmp_path):
    """SD3's pipeline computes mu from the image tokens when the scheduler shifts dynamically."""
    c = tiny_model("tiny-sd3")
    c = dataclasses.replace(c, scheduler=type(c.scheduler).from_config(c.scheduler.config, use_dynamic_shifting=True))
    chain = make_chain(c, 6, PROMPTS, make_reward("brightness"), guidance_scale=3.0)
    assert chain.solver.sigmas != make_chain(tiny_model("tiny-sd3"), 6, PROMPTS, make_reward("brightness")).solver.sigmas
    x_T = chain.sample_start(2, torch.Generator().manual_seed(0))
    theirs = pipeline(c)(PROMPTS, height=16, width=16, num_inference_steps=6, latents=x_T, max_sequence_length=16,
                         guidance_scale=3.0, output_type="latent").images
    torch.testing.assert_close(rollout(chain, {}, x_T), theirs, rtol=0, atol=1e-6)


def test_sd3_without_t5_feeds_zeros_as_the_pipeline(tmp_path):
    import diffusers

    c = tiny_model("tiny-sd3")
    pipeline(c).save_pretrained(tmp_path)
    lean = dataclasses.replace(load_components(str(tmp_path), local_files_only=True, t5=False), max_sequence_length=16)
    assert lean.text_encoder_3 is None and all(m is not c.text_encoder_3 for m in lean.modules())
    chain = make_chain(lean, 4, PROMPTS, make_reward("brightness"), guidance_scale=2.0)
    x_T = chain.sample_start(2, torch.Generator().manual_seed(1))
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(tmp_path, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, height=16, width=16, num_inference_steps=4, latents=x_T, max_sequence_length=16,
                  guidance_scale=2.0, output_type="latent").images
    torch.testing.assert_close(rollout(chain, {}, x_T), theirs, rtol=0, atol=1e-6)


def test_loading_refuses_what_it_cannot_load(tmp_path):
    pipeline(tiny_model("tiny-flux")).save_pretrained(tmp_path / "flux")
    with pytest.raises(ValueError, match="no_t5 applies to SD3"):
        load_components(str(tmp_path / "flux"), t5=False)
    with pytest.raises(ValueError, match="flow-matching Euler|FlowMatchEulerDiscreteScheduler"):
        load_components(str(tmp_path / "flux"), scheduler="dpm")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ValueError, match="KandinskyPipeline"):
        load_components(str(tmp_path / "other"))
    with pytest.raises(OSError, match="hf download"):
        load_components("no-such-org/no-such-flux", local_files_only=True)


ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
FEED_FORWARD = ["ff.net.0.proj", "ff.net.2"]


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
@pytest.mark.parametrize("targets", [ATTENTION, ATTENTION + FEED_FORWARD], ids=["attention", "attention+ff"])
def test_lora_files_load_into_the_pipelines_exactly(tmp_path, name, targets):
    trained = tiny_model(name)
    params = add_lora(trained.unet, rank=2, target_modules=targets, init=False, seed=1)
    assert any(".ff." in k for k in params) == (targets != ATTENTION)
    save_lora(trained.unet, tmp_path, prefix="transformer")
    pipe = pipeline(tiny_model(name))
    pipe.load_lora_weights(tmp_path)
    chain = make_chain(trained, 2, PROMPTS, make_reward("brightness"), guidance_scale=2.0)
    x = chain.sample_start(2, torch.Generator().manual_seed(0))
    base = make_chain(tiny_model(name), 2, PROMPTS, make_reward("brightness"), guidance_scale=2.0)
    loaded = base.denoiser.__class__(pipe.transformer, base.denoiser.timesteps, base.denoiser.context,
                                     base.denoiser.negative_context, base.denoiser.guidance_scale, call=base.denoiser.call)
    with torch.no_grad():
        want, got = chain.denoiser(x, 2, {}), loaded(x, 2, {})
        assert not torch.equal(want, base.denoiser(x, 2, {}))       # the adapter changes the output
    assert float((want - got).abs().max()) == 0.0
    restored = tiny_model(name)
    load_lora(restored.unet, tmp_path)
    with torch.no_grad():
        again = base.denoiser.__class__(restored.unet, base.denoiser.timesteps, base.denoiser.context,
                                        base.denoiser.negative_context, base.denoiser.guidance_scale,
                                        call=base.denoiser.call)(x, 2, {})
    assert torch.equal(again, want)


@pytest.mark.parametrize("name, size", [("tiny-sd3", None), ("tiny-flux", None), ("tiny-qwen-image", 8),
                                        ("tiny-sana", 16)])
def test_per_sample_estimates_agree_under_vmap_and_the_loop(name, size):
    """Every flow-matching family (``size``: its latent size where the default is a real model's)."""
    c = tiny_model(name)
    params = add_lora(c.unet, rank=2, init=False, seed=0)
    plan = Plan.rlr(4, 2, 2)
    out = {}
    for batching in ("vmap", "loop"):
        chain = make_chain(c, 4, PROMPTS, make_reward("brightness"), view=image_view(c, size), guidance_scale=2.0,
                           batching=batching).for_plan(plan, NoiseScales(eta_plan=0.7))
        g = torch.Generator().manual_seed(0)
        out[batching] = estimate(chain, plan, params, chain.sample_start(2, g), generator=g, per_sample=True)
    for role in ("FO", "HO", "ZO"):
        for k in params:
            a, b = out["vmap"].parts[role][k], out["loop"].parts[role][k]
            assert a.shape[0] == 2
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_a_runs_lora_loads_into_the_pipeline(tmp_path, name):
    """`halforder train --preset tiny-sd3` (or tiny-flux) trains through the CLI and its lora/ is what
    the pipeline's load_lora_weights reads: the loaded transformer's adapter equals the trained one."""
    from safetensors.torch import load_file

    from halforder.diffusion.app.cli import main

    out = tmp_path / "run"
    assert main(["--preset", name, "--steps", "2", "--eval-every", "0", "--checkpoint-every", "0",
                 "--output-dir", str(out), "--no-progress"]) == 0
    trained = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert trained and all(k.startswith("transformer.") for k in trained)
    assert any(float(v.abs().max()) > 0 for k, v in trained.items() if ".lora_B." in k)   # B starts at 0
    pipe = pipeline(tiny_model(name))
    pipe.load_lora_weights(out / "lora")
    loaded = {n: p for n, p in pipe.transformer.named_parameters() if ".lora_" in n}
    assert len(loaded) == len(trained)
    for k, v in trained.items():
        name_in_model = k.removeprefix("transformer.").replace(".weight", ".default_0.weight")
        torch.testing.assert_close(loaded[name_in_model], v, rtol=0, atol=0)
