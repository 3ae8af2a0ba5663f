"""Checkpointing the reward's VAE decode: the same estimate, less activation memory, and the
switch that turns it on."""
import torch

from halforder.diffusion import add_lora, make_chain, make_reward, tiny_components
from halforder.diffusion.app.config import TrainConfig
from halforder.diffusion.app.run import build_components
from halforder.estimators import Plan, SavedTensorMeter, estimate
from halforder.estimators.gradient_checkpointing import checkpoint_blocks


def test_a_checkpointed_decode_gives_the_same_estimate_with_less_memory():
    comp = tiny_components(0)
    params = add_lora(comp.unet, rank=2, init=False, seed=1)
    plan = Plan.truncated(4, 1)
    chain = make_chain(comp, 4, ["a red square"] * 2, make_reward("brightness"), guidance_scale=2.0)
    weights = [t for m in comp.modules() for t in (*m.parameters(), *m.buffers())]
    runs = []
    for lean in (False, True):
        checkpoint_blocks(comp.vae, lean)
        g = torch.Generator().manual_seed(0)
        with SavedTensorMeter(weights) as meter:
            est = estimate(chain, plan, params, chain.sample_start(2, g), generator=g)
        runs.append((est, meter.peak))
    (plain, plain_peak), (lean, lean_peak) = runs
    for k in plain.grad:
        torch.testing.assert_close(lean.grad[k], plain.grad[k], rtol=1e-5, atol=1e-8)
    assert any(v.abs().max() > 0 for v in plain.grad.values())
    assert lean_peak < plain_peak


def test_checkpoint_decode_turns_on_the_vae_checkpointing():
    assert not build_components(TrainConfig(model="tiny")).vae.is_gradient_checkpointing
    assert build_components(TrainConfig(model="tiny", checkpoint_decode=True)).vae.is_gradient_checkpointing
