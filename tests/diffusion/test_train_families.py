"""Every estimator family trains through the one training-loop code path on a tiny SD UNet with LoRA."""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from halforder.diffusion.app.config import TrainConfig  # noqa: E402
from halforder.diffusion.app.run import build_components, build_reward, build_task  # noqa: E402
from halforder.estimators.families import FAMILIES, make_sampler  # noqa: E402
from halforder.training.loop import Hooks, train  # noqa: E402

PROMPTS = ["a red square", "a blue circle", "a green field"]


def _frozen(comp):
    return {f"{name}.{k}": v.detach().clone()
            for name, m in (("unet", comp.unet), ("vae", comp.vae), ("text_encoder", comp.text_encoder))
            for k, v in m.state_dict().items() if ".lora_" not in k}


@pytest.mark.parametrize("estimator", FAMILIES)
def test_three_updates_train_only_the_lora_weights(tmp_path, estimator):
    k = {"k": 2} if estimator.startswith("truncated") else {}   # k applies to truncated families only
    cfg = TrainConfig(model="tiny", reward="brightness", T=4, estimator=estimator, h=2, **k, guidance_scale=2.0,
                      steps=3, batch_size=4, grad_accum=1, lr=1e-2, lora_rank=2, eval_every=0, checkpoint_every=0,
                      output_dir=str(tmp_path / "run"), progress=False)
    comp = build_components(cfg)
    task = build_task(cfg, comp, build_reward(cfg))
    frozen = _frozen(comp)
    lora = {k: v.detach().clone() for k, v in task.params.items()}
    assert all(".lora_A." in k or ".lora_B." in k for k in lora)
    trainable = [n for m in (comp.unet, comp.vae, comp.text_encoder) for n, p in m.named_parameters()
                 if p.requires_grad]
    assert sorted(trainable) == sorted(lora)

    seen = []
    train(task, make_sampler(estimator, cfg.T, h=cfg.h, k=cfg.k), PROMPTS, cfg,
          hooks=Hooks(on_step=lambda rec, est: seen.append((rec, est))))
    assert len(seen) == 3
    for rec, est in seen:
        assert not rec["skipped"]
        assert set(est.grad) == set(lora)
        flat = torch.cat([g.reshape(-1) for g in est.grad.values()])
        assert torch.isfinite(flat).all() and flat.abs().max() > 0
    assert any(not torch.equal(lora[k], v.detach()) for k, v in task.params.items())
    after = _frozen(comp)
    assert after.keys() == frozen.keys()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    for m in (comp.unet, comp.vae, comp.text_encoder):
        assert all(p.grad is None for p in m.parameters())
