"""A task built from a run's config carries every setting it uses, under the setting's name.

Each field of :class:`DiffusionTask` and of its :class:`NoiseScales` is either a config
setting of the same name, holding that setting's value (set here away from its default), or
one of the few a run builds otherwise (:data:`BUILT`); a new field must be one or the other,
so a setting the run forgets to pass on fails here."""
import dataclasses

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from halforder.diffusion import NoiseScales  # noqa: E402
from halforder.diffusion.app.config import TrainConfig  # noqa: E402
from halforder.diffusion.app.run import build_components, build_reward, build_task  # noqa: E402
from halforder.training.config import field_default  # noqa: E402

#: the task's fields that are no config setting: built from several settings, or none
BUILT = {"components", "params", "view", "step_prompts", "noise_scales", "tau"}
#: the settings the task holds in the form the chain takes them
AS_TAKEN = {"eta": TrainConfig.eta_value, "compile": lambda cfg: None if cfg.compile == "no" else cfg.compile}
CARRIED = {"T", "guidance_scale", "negative_prompt", "gradient_checkpointing", "batching", "compile", "noise",
           "eta", "eta_plan", "zo_sigma"}


def _held(task) -> dict:
    fields = {f.name: getattr(task, f.name) for f in dataclasses.fields(task) if f.init}
    return {**fields, **{f.name: getattr(task.noise_scales, f.name) for f in dataclasses.fields(NoiseScales)}}


@pytest.mark.parametrize("eta", [{"eta_plan": 0.3}, {"eta": "0.5"}], ids=["eta plan", "eta a number"])
def test_a_task_built_from_a_config_carries_each_of_its_settings(eta):
    cfg = TrainConfig(model="tiny-sd3", reward="brightness", T=3, guidance_scale=3.0, negative_prompt="blurry",
                      zo_sigma=0.02, gradient_checkpointing=True, batching="loop", compile="default", noise="cps",
                      lora_rank=2, output_dir=None, progress=False, **eta)
    held = _held(build_task(cfg, build_components(cfg), build_reward(cfg)))
    settings = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(held) - set(settings) == BUILT
    assert set(held) & set(settings) == CARRIED | {"reward"}    # the reward: the one the setting names, built
    for name in CARRIED:
        assert held[name] == AS_TAKEN.get(name, lambda c: getattr(c, name))(cfg), name
    varied = {name for name in CARRIED if getattr(cfg, name) != field_default(settings[name])}
    assert varied == CARRIED - ({"eta"} if "eta_plan" in eta else {"eta_plan"})   # a lost value would show


def test_the_planner_and_the_task_give_a_plan_the_same_noise(monkeypatch):
    """The plan search's chains (plan_choice) and the training chains get the task's noise scales."""
    from halforder.diffusion.app import plan_choice
    from halforder.estimators import Plan

    cfg = TrainConfig(model="tiny", reward="brightness", T=4, eta_plan=0.4, zo_sigma=0.03, lora_rank=2,
                      batch_size=2, grad_accum=1, pairing="none", estimator="auto", memory_budget="8GiB",
                      plan_pilots=2, output_dir=None, progress=False)
    task = build_task(cfg, build_components(cfg), build_reward(cfg))
    assert task.noise_scales == NoiseScales(eta="plan", eta_plan=0.4, zo_sigma=0.03)
    plan = Plan.rlr(4, 2, 2)
    chain = task.chain(plan, ["a cat"])
    assert [chain.sigma(t) > 0 for t in range(1, 5)] == [t in {j for j, _ in plan.blocks} for t in range(1, 5)]
    assert chain.taus == NoiseScales(zo_sigma=0.03).taus(plan)
    seen = []

    def measure(base, params, *, chain_for, **kw):   # the search's chain of the plan, then no search
        seen.append(chain_for(plan))
        raise RuntimeError("out of memory")
    monkeypatch.setattr(plan_choice, "measure", measure)
    with pytest.raises(ValueError, match="ran out of memory"):
        plan_choice.choose(cfg, task, ["a cat"])
    assert seen[0].solver.etas == chain.solver.etas and seen[0].taus == chain.taus
