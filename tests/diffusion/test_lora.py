"""LoRA through peft: only adapter weights train, and the saved adapter loads in diffusers."""
import os

import pytest
import torch

from halforder.diffusion import add_lora, lora_params, make_chain, rollout, save_lora, set_lora, tiny_components
from halforder.diffusion.rewards import make_reward
from halforder.estimators import Plan

diffusers = pytest.importorskip("diffusers")


def test_only_adapter_weights_are_trainable(tiny):
    params = add_lora(tiny.unet, rank=2, seed=0)
    trainable = {n for n, p in tiny.unet.named_parameters() if p.requires_grad}
    assert trainable == set(params) == set(lora_params(tiny.unet))
    assert all(".lora_A." in n or ".lora_B." in n for n in params)
    # peft's default init (B = 0) leaves the UNet's output unchanged
    base = tiny_components(0).unet
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 16)
    torch.testing.assert_close(tiny.unet(x, 10, encoder_hidden_states=ctx).sample,
                               base(x, 10, encoder_hidden_states=ctx).sample, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not found"):
        add_lora(tiny_components(0).unet, target_modules=["no_such_layer"])


def test_saved_adapter_loads_in_stable_diffusion_pipeline(tiny, tmp_path):
    """save_lora -> StableDiffusionPipeline.load_lora_weights(dir): the pipeline's UNet
    equals the in-memory adapted UNet, and its samples follow the adapter."""
    params = add_lora(tiny.unet, rank=2, alpha=3.0, seed=0)  # alpha != rank: the scale must travel too
    g = torch.Generator().manual_seed(0)
    set_lora(tiny.unet, {k: 0.5 * torch.randn(v.shape, generator=g) for k, v in params.items()})
    path = save_lora(tiny.unet, tmp_path)
    assert os.path.basename(path) == "pytorch_lora_weights.safetensors" and os.path.isfile(path)

    fresh = tiny_components(0)
    pipe = diffusers.StableDiffusionPipeline(vae=fresh.vae, text_encoder=fresh.text_encoder, tokenizer=fresh.tokenizer,
                                             unet=fresh.unet, scheduler=fresh.scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    x_T = torch.randn(1, 4, 8, 8, generator=g)
    before = pipe(prompt="a cat", latents=x_T, num_inference_steps=3, guidance_scale=2.0,
                  output_type="latent").images
    pipe.load_lora_weights(tmp_path)
    after = pipe(prompt="a cat", latents=x_T, num_inference_steps=3, guidance_scale=2.0, output_type="latent").images

    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 16, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, 10, encoder_hidden_states=ctx).sample,
                                   tiny.unet(x, 10, encoder_hidden_states=ctx).sample, rtol=1e-5, atol=1e-5)
    chain = make_chain(tiny, 3, ["a cat"], make_reward("brightness"), guidance_scale=2.0).for_plan(Plan.full(3),
                                                                                                  eta=0.0)
    ours = rollout(chain, dict(lora_params(tiny.unet)), x_T)
    torch.testing.assert_close(after, ours, rtol=1e-5, atol=1e-5)
    assert (after - before).abs().max() > 1e-2


def test_save_without_adapter_fails(tiny, tmp_path):
    with pytest.raises(ValueError, match="no LoRA"):
        save_lora(tiny.unet, tmp_path)
    assert not os.listdir(tmp_path)


def test_building_and_adapting_leave_the_global_rng_alone():
    before = torch.random.get_rng_state()
    a = add_lora(tiny_components(3).unet, rank=2, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = add_lora(tiny_components(3).unet, rank=2, seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a)  # reproducible from the seeds alone
