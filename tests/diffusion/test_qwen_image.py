"""Qwen-Image: tiny parts saved as a ``QwenImagePipeline`` folder and loaded back through
``load_components`` sample as the pipeline does (latents and decoded images), with its true CFG
and without; the tiny tokenizer's template drop is the system prompt; a LoRA file loads into the
pipeline exactly (estimates under vmap and the loop: test_flow_models.py)."""
import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from halforder.diffusion import (add_lora, load_components, make_chain, make_reward, rollout,  # noqa: E402
                                 tiny_model)
from halforder.diffusion.models.families import qwen_image  # noqa: E402
from halforder.diffusion.models.lora import save_lora  # noqa: E402
from halforder.diffusion.models.sd_chain import image_view  # noqa: E402

PROMPTS = ["a red square", "a blue circle in a green field"]   # two lengths: the pipeline pads, with a mask
SIZE, LENGTH = 8, 32          # 8x8 latents (16 packed tokens) = 16x16 px; the tiny prompt length


def pipeline(c):
    import diffusers

    pipe = diffusers.QwenImagePipeline(scheduler=c.scheduler, vae=c.vae, text_encoder=c.text_encoder,
                                       tokenizer=c.tokenizer, transformer=c.unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(components loaded back from a saved pipeline folder, the folder), with the tiny prompt length
    (the pipeline call's ``max_sequence_length``)."""
    path = tmp_path_factory.mktemp("qwen-image")
    pipeline(tiny_model("tiny-qwen-image")).save_pretrained(path)
    loaded = load_components(str(path), local_files_only=True)
    assert loaded.family == "qwen-image" and loaded.max_sequence_length is None
    return dataclasses.replace(loaded, max_sequence_length=LENGTH), path


@pytest.mark.parametrize("T,guidance,negative", [(4, 1.0, None), (3, 4.0, "blurry, dark")],
                         ids=["no-cfg", "true-cfg"])
def test_rollouts_at_eta_zero_are_the_pipelines(saved, T, guidance, negative):
    import diffusers

    c, path = saved
    chain = make_chain(c, T, PROMPTS, make_reward("brightness"), view=image_view(c, SIZE), guidance_scale=guidance,
                       negative_prompt=negative or "")
    x_T = chain.sample_start(2, torch.Generator().manual_seed(T))
    ours = rollout(chain, {}, x_T)
    pipe = diffusers.DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=2 * SIZE, width=2 * SIZE, num_inference_steps=T, latents=x_T.flatten(1, 2),
              max_sequence_length=LENGTH, true_cfg_scale=guidance, negative_prompt=negative)
    # without guidance the same to 1e-6 (measured: 2.4e-7 to 4.8e-7). With it the pipeline runs the two branches as
    # separate calls on prompt states padded to its batch's longest prompt, and we as one batch of 2n padded to
    # max_sequence_length: float32 sums in another order (each ~3e-7), which the guidance's w and its rescaling to
    # the conditional norm amplify (measured: 7e-7 to 1.2e-6 at w = 4)
    tol = 1e-6 if guidance <= 1 else 1e-5
    torch.testing.assert_close(ours.flatten(1, 2), pipe(PROMPTS, output_type="latent", **kw).images, rtol=0, atol=tol)
    images = pipe(PROMPTS, output_type="pt", **kw).images      # the decode: unpacking, latents_mean and _std
    with torch.no_grad():
        rf = chain.reward_fn
        torch.testing.assert_close(rf.decode(rf.vae, rf.unpack(ours)), images, rtol=0, atol=1e-5)


def test_the_template_tokens_dropped_are_the_system_prompt():
    tokenizer = qwen_image.tiny_tokenizer()
    prefix = qwen_image.TEMPLATE[:qwen_image.TEMPLATE.index("{}")]
    ids = tokenizer(qwen_image.TEMPLATE.format("a red square")).input_ids
    assert len(tokenizer(prefix).input_ids) == qwen_image.DROP
    assert tokenizer.decode(ids[:qwen_image.DROP]) == prefix


def test_lora_files_load_into_the_pipeline_exactly(tmp_path, lora_loads_exactly):
    trained = tiny_model("tiny-qwen-image")
    add_lora(trained.unet, rank=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "img_mlp.net.0.proj",
                                                   "img_mlp.net.2"], init=False, seed=1)
    save_lora(trained.unet, tmp_path, prefix="transformer")
    pipe = pipeline(tiny_model("tiny-qwen-image"))
    pipe.load_lora_weights(tmp_path)
    ours, base = (make_chain(m, 2, PROMPTS, make_reward("brightness"), view=image_view(m, SIZE), guidance_scale=3.0)
                  for m in (trained, tiny_model("tiny-qwen-image")))
    x = ours.sample_start(2, torch.Generator().manual_seed(0))
    lora_loads_exactly(ours, base, pipe.transformer, x)
