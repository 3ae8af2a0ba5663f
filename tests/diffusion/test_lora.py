"""LoRA through peft: only adapter weights train (in float32), and the saved adapter loads
exactly, for any target modules, in diffusers' pipeline and through our own loader."""
import os

import pytest
import torch

from halforder.diffusion import (NoiseScales, add_lora, lora_params, make_chain, rollout, save_lora, set_lora,
                                 tiny_components)
from halforder.diffusion.models.lora import DEFAULT_TARGETS, LORA_FILE, layer_names, load_lora
from halforder.diffusion.rewards import make_reward
from halforder.diffusion.models.video import tiny_video_components
from halforder.estimators import Plan

diffusers = pytest.importorskip("diffusers")
Linear, Conv2d, Conv3d = torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d

# target sets: names, or a function of the UNet giving exact module paths
TARGETS_2D = {
    "attention": DEFAULT_TARGETS,
    "proj_in/out": ("proj_in", "proj_out"),
    "attention and proj_in/out": DEFAULT_TARGETS + ("proj_in", "proj_out"),
    "feed-forward": ("ff.net.0.proj", "ff.net.2"),
    "convs": ("conv_in", "conv1", "conv2", "conv_shortcut", "conv", "conv_out"),
    "every linear": lambda unet: layer_names(unet, (Linear,)),
    "every linear and conv": layer_names,  # the paper's recipe
}


def trained_lora(unet, targets, seed=0):
    """A rank-2, alpha-3 adapter (the scale alpha / rank != 1 must travel too) with random
    non-zero A and B, as after training; returns its parameters."""
    params = add_lora(unet, rank=2, alpha=3.0, target_modules=targets(unet) if callable(targets) else targets,
                      seed=seed)
    g = torch.Generator().manual_seed(seed)
    set_lora(unet, {k: 0.5 * torch.randn(v.shape, generator=g) for k, v in params.items()})
    return params


def unet_out(unet, x, ctx):
    with torch.no_grad():
        return unet(x, 10, encoder_hidden_states=ctx).sample


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


def test_saved_adapter_loads_in_stable_diffusion_pipeline(tiny, tmp_path, sd_pipeline):
    """save_lora -> StableDiffusionPipeline.load_lora_weights(dir): the pipeline's UNet
    equals the in-memory adapted UNet, and its samples follow the adapter."""
    params = add_lora(tiny.unet, rank=2, alpha=3.0, seed=0)  # alpha != rank: the scale must travel too
    g = torch.Generator().manual_seed(0)
    set_lora(tiny.unet, {k: 0.5 * torch.randn(v.shape, generator=g) for k, v in params.items()})
    path = save_lora(tiny.unet, tmp_path)
    assert os.path.basename(path) == "pytorch_lora_weights.safetensors" and os.path.isfile(path)

    pipe = sd_pipeline(tiny_components(0))
    x_T = torch.randn(1, 4, 8, 8, generator=g)
    before = pipe(prompt="a cat", latents=x_T, num_inference_steps=3, guidance_scale=2.0,
                  output_type="latent").images
    pipe.load_lora_weights(tmp_path)
    after = pipe(prompt="a cat", latents=x_T, num_inference_steps=3, guidance_scale=2.0, output_type="latent").images

    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 16, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, 10, encoder_hidden_states=ctx).sample,
                                   tiny.unet(x, 10, encoder_hidden_states=ctx).sample, rtol=1e-5, atol=1e-5)
    chain = make_chain(tiny, 3, ["a cat"], make_reward("brightness"), guidance_scale=2.0).for_plan(
        Plan.full(3), NoiseScales(eta=0.0))
    ours = rollout(chain, dict(lora_params(tiny.unet)), x_T)
    torch.testing.assert_close(after, ours, rtol=1e-5, atol=1e-5)
    assert (after - before).abs().max() > 1e-2


@pytest.mark.parametrize("targets", TARGETS_2D.values(), ids=TARGETS_2D.keys())
def test_any_targets_load_exactly(tiny, tmp_path, targets, sd_pipeline):
    """For every target set, the saved file loads into a UNet built from the same base weights,
    through StableDiffusionPipeline.load_lora_weights and through load_lora, as the same
    number of LoRA tensors, and the UNet's output equals the trained one's."""
    params = trained_lora(tiny.unet, targets)
    if callable(targets):  # exact paths: one A and one B per listed module
        assert len(params) == 2 * len(targets(tiny_components(0).unet))
    save_lora(tiny.unet, tmp_path)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 16, generator=g)
    want = unet_out(tiny.unet, x, ctx)
    assert (want - unet_out(tiny_components(0).unet, x, ctx)).abs().max() > 1e-2  # the adapter matters

    pipe = sd_pipeline(tiny_components(0))
    pipe.load_lora_weights(tmp_path)
    assert len(lora_params(pipe.unet)) == len(params)
    torch.testing.assert_close(unet_out(pipe.unet, x, ctx), want, rtol=1e-5, atol=1e-6)

    unet = tiny_components(0).unet
    loaded = load_lora(unet, tmp_path / LORA_FILE)
    assert {k: v.shape for k, v in loaded.items()} == {k: v.shape for k, v in params.items()}
    torch.testing.assert_close(unet_out(unet, x, ctx), want, rtol=1e-5, atol=1e-6)


VIDEO_TARGETS = {
    "attention": DEFAULT_TARGETS,
    "every linear and conv": lambda unet: layer_names(unet, (Linear, Conv2d, Conv3d)),
}


@pytest.mark.parametrize("fps_cond", [False, True], ids=["unet3d", "fps-unet3d"])
@pytest.mark.parametrize("targets", VIDEO_TARGETS.values(), ids=VIDEO_TARGETS.keys())
def test_video_lora_loads_exactly(tmp_path, targets, fps_cond):
    """The UNet3D (and VideoCrafter2's fps-conditioned one), which TextToVideoSDPipeline cannot
    load LoRA into: load_lora restores the saved adapter into a fresh UNet of the same base
    weights, with the trained output; the restored weights train on (float32, requires grad)."""
    unet = tiny_video_components(0, fps_cond=fps_cond).unet
    params = trained_lora(unet, targets)
    save_lora(unet, tmp_path)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 16, 16, generator=g)
    want = unet_out(unet, x, ctx)
    fresh = tiny_video_components(0, fps_cond=fps_cond).unet
    assert (want - unet_out(fresh, x, ctx)).abs().max() > 1e-2
    loaded = load_lora(fresh, tmp_path)
    assert set(loaded) == set(params) == {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in loaded.values())
    torch.testing.assert_close(unet_out(fresh, x, ctx), want, rtol=1e-5, atol=1e-6)


def test_load_lora_reads_files_of_the_earlier_layout(tiny, tmp_path):
    """Adapters saved with the attention keys in diffusers' naming and the others in peft's
    (the earlier save_lora, which load_lora_weights loads only in part) load exactly."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    trained_lora(tiny.unet, ("proj_in", "to_q", "ff.net.2"))
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(tiny.unet))
    assert any(".lora.down." in k for k in state) and any(".lora_A." in k for k in state)  # mixed
    diffusers.StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=state,
                                                        unet_lora_adapter_metadata=tiny.unet.peft_config["default"].to_dict())
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 16)
    unet = tiny_components(0).unet
    load_lora(unet, tmp_path)
    torch.testing.assert_close(unet_out(unet, x, ctx), unet_out(tiny.unet, x, ctx), rtol=1e-5, atol=1e-6)


def test_load_lora_refuses_what_it_cannot_restore(tiny, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="no LoRA file"):
        load_lora(tiny.unet, tmp_path)
    save_file({"unet.conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3)}, str(tmp_path / LORA_FILE))
    with pytest.raises(ValueError, match="no UNet or transformer LoRA adapter with its config"):
        load_lora(tiny.unet, tmp_path)
    params = trained_lora(tiny.unet, ("to_q",))
    save_lora(tiny.unet, tmp_path)
    with safe_open(str(tmp_path / LORA_FILE), framework="pt") as f:  # a file cut short: the rest would stay random
        kept = {k: f.get_tensor(k) for k in list(f.keys())[:2]}
        meta = f.metadata()
    save_file(kept, str(tmp_path / LORA_FILE), metadata=meta)
    with pytest.raises(ValueError, match=f"2 tensors for {len(params)} LoRA weights"):
        load_lora(tiny_components(0).unet, tmp_path)


def test_lora_weights_are_float32_over_a_half_precision_base():
    """A bf16 base gets float32 trainable LoRA weights (frozen base left in bf16); the
    untrained adapter (B = 0) leaves the bf16 output unchanged."""
    unet, base = tiny_components(0).unet.to(torch.bfloat16), tiny_components(0).unet.to(torch.bfloat16)
    params = add_lora(unet, rank=2, target_modules=layer_names(unet), seed=0)
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params.values())
    assert all(p.dtype == torch.bfloat16 for n, p in unet.named_parameters() if n not in params)
    x, ctx = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16), torch.randn(2, 16, 16, dtype=torch.bfloat16)
    out = unet_out(unet, x, ctx)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, unet_out(base, x, ctx), rtol=0, atol=0)


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


def test_the_saved_file_does_not_depend_on_the_order_of_the_targets(tmp_path):
    """Identical adapters give identical files: the target modules are saved sorted (peft keeps
    them in a set) and so are the header's metadata entries (safetensors writes a hash order)."""
    import json

    from safetensors import safe_open

    names, files = [*DEFAULT_TARGETS, "proj_in", "proj_out"], []
    for i, targets in enumerate([names, names[::-1]]):
        unet = tiny_components(0).unet
        add_lora(unet, rank=2, target_modules=targets, init=False, seed=0)
        files.append(save_lora(unet, tmp_path / str(i)))
    with safe_open(files[0], "pt") as f:
        saved = json.loads(f.metadata()["lora_adapter_metadata"])["unet.target_modules"]
    assert saved == sorted(names)
    assert open(files[0], "rb").read() == open(files[1], "rb").read()
