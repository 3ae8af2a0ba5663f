"""SANA: tiny parts saved as a ``SanaPipeline`` folder and loaded back through ``load_components``
sample as the pipeline does (latents and decoded images), with guidance and without; the prompts'
conditioning is the pipeline's, the instruction prepended to the prompt and not to the negative
prompt; a LoRA file loads into the pipeline exactly; the SDE (eta 1) rolls out and REINFORCE's
gradient is finite (estimates under vmap and the loop: test_flow_models.py)."""
import dataclasses
import inspect

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from halforder.diffusion import (add_lora, load_components, make_chain, make_reward, rollout,  # noqa: E402
                                 tiny_model)
from halforder.diffusion.models.families import sana  # noqa: E402
from halforder.diffusion.models.lora import save_lora  # noqa: E402
from halforder.diffusion.models.sd_chain import image_view  # noqa: E402
from halforder.estimators import Plan, estimate  # noqa: E402

PROMPTS = ["A red square", "  a Blue circle in a green field "]   # the pipeline lowercases and strips
NEGATIVE = "Blurry, dark"
SIZE, LENGTH = 16, 32         # 16x16 latents = 32x32 px (the pipeline wants multiples of 32); the tiny prompt length


def pipeline(c):
    import diffusers

    pipe = diffusers.SanaPipeline(tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=c.vae, transformer=c.unet,
                                  scheduler=c.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(components loaded back from a saved pipeline folder, the pipeline loaded from it), with the
    tiny prompt length (the pipeline call's ``max_sequence_length``)."""
    import diffusers

    path = tmp_path_factory.mktemp("sana")
    pipeline(tiny_model("tiny-sana")).save_pretrained(path)
    loaded = load_components(str(path), local_files_only=True)
    assert loaded.family == "sana" and loaded.max_sequence_length is None
    pipe = diffusers.DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return dataclasses.replace(loaded, max_sequence_length=LENGTH), pipe


def test_the_prompt_has_the_instruction_and_the_negative_prompt_not(saved):
    c, pipe = saved
    instruction = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
    assert "\n".join(instruction) == sana.INSTRUCTION
    with torch.no_grad():
        want = pipe.encode_prompt(PROMPTS, negative_prompt=NEGATIVE, max_sequence_length=LENGTH,
                                  complex_human_instruction=instruction)
    ours, negative = sana.encode(c, PROMPTS), sana.encode(c, [NEGATIVE])
    got = (ours["encoder_hidden_states"], ours["encoder_attention_mask"],
           negative["plain_hidden_states"].expand(2, -1, -1), negative["plain_attention_mask"].expand(2, -1))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("T,guidance,negative", [(4, 1.0, None), (3, 4.5, NEGATIVE)], ids=["no-cfg", "cfg"])
def test_rollouts_at_eta_zero_are_the_pipelines(saved, T, guidance, negative):
    c, pipe = saved
    chain = make_chain(c, T, PROMPTS, make_reward("brightness"), view=image_view(c, SIZE), guidance_scale=guidance,
                       negative_prompt=negative or "")
    x_T = chain.sample_start(2, torch.Generator().manual_seed(T))
    ours = rollout(chain, {}, x_T)
    kw = dict(height=2 * SIZE, width=2 * SIZE, num_inference_steps=T, latents=x_T[0], max_sequence_length=LENGTH,
              guidance_scale=guidance, negative_prompt=negative or "", use_resolution_binning=False)
    # without guidance the same to 1e-6 (measured: 7.2e-7 on latents up to 5). With it the pipeline too runs the two
    # branches as one batch and the network's outputs agree, but each second-order DPM-Solver step rounds its float32
    # arithmetic in another order than diffusers' (at most 1 ulp a step, 2.4e-7 to 4.8e-7 measured; the gap grows with
    # T), and guidance amplifies that through the network (measured: 1.4e-6 at w = 4.5)
    tol = 1e-6 if guidance <= 1 else 1e-5
    torch.testing.assert_close(ours, pipe(PROMPTS, output_type="latent", **kw).images, rtol=0, atol=tol)
    images = pipe(PROMPTS, output_type="pt", **kw).images      # the decode: scaling_factor, no shift
    with torch.no_grad():
        rf = chain.reward_fn
        torch.testing.assert_close(rf.decode(rf.vae, ours), images, rtol=0, atol=1e-5)


def test_lora_files_load_into_the_pipeline_exactly(tmp_path, lora_loads_exactly):
    trained = tiny_model("tiny-sana")
    add_lora(trained.unet, rank=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.conv_inverted",
                                                   "ff.conv_point"], init=False, seed=1)
    save_lora(trained.unet, tmp_path, prefix="transformer")
    pipe = pipeline(tiny_model("tiny-sana"))
    pipe.load_lora_weights(tmp_path)
    ours, base = (make_chain(m, 2, PROMPTS, make_reward("brightness"), view=image_view(m, SIZE), guidance_scale=3.0)
                  for m in (trained, tiny_model("tiny-sana")))
    x = ours.sample_start(2, torch.Generator().manual_seed(0))[0]
    lora_loads_exactly(ours, base, pipe.transformer, x)


def test_the_sde_rolls_out_and_reinforce_has_a_finite_gradient():
    c = tiny_model("tiny-sana")
    params = add_lora(c.unet, rank=2, init=False, seed=0)
    chain = make_chain(c, 3, PROMPTS, make_reward("brightness"), view=image_view(c, SIZE), guidance_scale=3.0)
    x_T = chain.sample_start(2, torch.Generator().manual_seed(0))
    sde = chain.with_noise(1.0, 0.0)
    assert all(sde.solver.sigma(t) > 0 for t in (2, 3)) and sde.solver.sigma(1) == 0   # the last step lands on x_0
    x0 = rollout(sde, params, x_T, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(x0).all() and not torch.allclose(x0, rollout(chain, params, x_T))
    plan = Plan.reinforce(3, steps=[2, 3])      # step 1 is noiseless (final sigma zero): no likelihood ratio
    est = estimate(chain.for_plan(plan), plan, params, x_T, generator=torch.Generator().manual_seed(2))
    grads = torch.cat([g.flatten() for g in est.grad.values()])
    assert torch.isfinite(grads).all() and grads.abs().max() > 0
