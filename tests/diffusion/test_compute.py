"""The compute meter counts every denoiser evaluation per sample on the tiny SD chain: for
every plan family, with and without pairing, gradient checkpointing and the loop over
samples, the count equals ``Plan.cost()`` times the batch, plus one forward pass per
backpropagated step when checkpointed, as exact integers; the training loop writes it to
``metrics.jsonl``, across a resume and across processes."""
import json
import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from halforder.diffusion.app.config import TrainConfig  # noqa: E402
from halforder.diffusion.app.run import build_components, build_reward, build_task  # noqa: E402
from halforder.estimators import ComputeMeter, Plan, estimate, expected_evaluations, grouped, make_sampler  # noqa: E402
from halforder.training.loop import train  # noqa: E402

T, N = 4, 8
PROMPTS = ["a red square", "a blue circle"]
# every family the samplers name, RLR at every h the chain admits
PLANS = {"full": ("full", {}), "truncated": ("truncated", {"k": 2}), "alignprop": ("truncated_random", {"k": T}),
         "reinforce": ("reinforce", {}), "zeroth_order": ("zeroth_order", {}),
         **{f"rlr_h{h}": ("rlr", {"h": h}) for h in range(T)}, "rlr_no_zo": ("rlr_no_zo", {"h": 2})}


def _task(checkpointing, batching):
    cfg = TrainConfig(model="tiny", reward="brightness", T=T, guidance_scale=2.0, batch_size=N, lora_rank=2,
                      gradient_checkpointing=checkpointing, batching=batching, output_dir=None, progress=False)
    return build_task(cfg, build_components(cfg), build_reward(cfg))


@pytest.fixture(scope="module")
def tasks():
    return {(ck, b): _task(ck, b) for ck in (False, True) for b in ("vmap", "loop")}


@pytest.mark.parametrize("checkpointing,batching", [(False, "vmap"), (True, "vmap"), (False, "loop"),
                                                    (True, "loop")])
@pytest.mark.parametrize("pairing", ["none", "param+ho"])
@pytest.mark.parametrize("name", list(PLANS))
def test_the_meter_counts_what_the_plan_costs(tasks, name, pairing, checkpointing, batching):
    task = tasks[(checkpointing, batching)]
    family, kw = PLANS[name]
    g = torch.Generator().manual_seed(3)
    plan = make_sampler(family, T, **kw).sample({}, g)
    G = 4 if pairing == "param+ho" else 1
    chain = task.chain(plan, grouped(PROMPTS * (N // 2 // G), G), g)
    x_T = grouped(chain.sample_start(N // G, g), G)
    with ComputeMeter() as meter:
        est = estimate(chain, plan, task.params, x_T, generator=g, baseline="loo", pairing=pairing)
    assert sum(float(v.abs().sum()) for v in est.grad.values()) > 0
    want = expected_evaluations(plan, N, checkpointed=checkpointing)
    assert (meter.forward, meter.backward) == (want["forward"], want["backward"]), plan


def test_per_sample_estimates_cost_the_same(tasks):
    """``per_sample=True`` runs every step under vmap with per-sample parameters: the same count."""
    task = tasks[(True, "vmap")]
    plan = Plan.rlr(T, 2, 2)
    g = torch.Generator().manual_seed(0)
    chain = task.chain(plan, PROMPTS * (N // 2), g)
    with ComputeMeter() as meter:
        estimate(chain, plan, task.params, chain.sample_start(N, g), generator=g, per_sample=True)
    want = expected_evaluations(plan, N, checkpointed=True)
    assert (meter.forward, meter.backward) == (want["forward"], want["backward"])


def test_a_truncated_backward_is_caught(tasks):
    """The meter is not the formula: a backward pass that stops early counts fewer backward
    evaluations than the plan costs."""
    task = tasks[(False, "vmap")]
    plan = Plan.full(T)
    g = torch.Generator().manual_seed(0)
    chain = task.chain(plan, PROMPTS * (N // 2), g)
    x = chain.sample_start(N, g)
    with ComputeMeter() as meter:
        with torch.enable_grad():
            for t in range(T, 0, -1):
                x = chain.step(t, x.detach() if t == 2 else x, task.params)   # cut after the top two steps
            torch.autograd.grad(chain.reward(x).sum(), list(task.params.values()), allow_unused=True)
    assert meter.forward == N * T and meter.backward == N * 2 < expected_evaluations(plan, N)["backward"]


def test_nested_meters_and_nothing_outside(tasks):
    task = tasks[(False, "vmap")]
    plan = Plan.zeroth_order(T)
    g = torch.Generator().manual_seed(0)
    chain = task.chain(plan, PROMPTS * (N // 2), g)
    estimate(chain, plan, task.params, chain.sample_start(N, g), generator=g)     # no meter open: nothing kept
    with ComputeMeter() as outer:
        with ComputeMeter() as inner:
            estimate(chain, plan, task.params, chain.sample_start(N, g), generator=g)
        estimate(chain, plan, task.params, chain.sample_start(N, g), generator=g)
    assert inner.total == N * T and outer.total == 2 * N * T


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "eval" not in r]


@pytest.mark.parametrize("estimator,checkpointing", [("rlr", True), ("truncated_random", False)])
def test_the_loop_writes_the_running_count_and_resume_keeps_it(tmp_path, estimator, checkpointing):
    def run(out, steps, resume=None):
        cfg = TrainConfig(model="tiny", reward="brightness", T=T, estimator=estimator, h=2, guidance_scale=2.0,
                          steps=steps, batch_size=4, grad_accum=2, lr=1e-2, lora_rank=2, eval_every=0,
                          checkpoint_every=1, keep_checkpoints=0, gradient_checkpointing=checkpointing,
                          output_dir=str(out), resume=resume, progress=False)
        task = build_task(cfg, build_components(cfg), build_reward(cfg))
        sampler = make_sampler(estimator, T, h=2, k=T)
        train(task, sampler, PROMPTS, cfg)
        return cfg, sampler

    cfg, sampler = run(tmp_path / "a", 3)
    recs = _metrics(tmp_path / "a")
    g = torch.Generator().manual_seed(cfg.seed)      # the loop's plan generator: the plans it drew
    total = 0
    for rec in recs:
        plan = sampler.sample({}, g)
        assert rec["plan"] == str(plan)
        want = expected_evaluations(plan, cfg.batch_size * cfg.grad_accum, checkpointed=checkpointing)
        assert (rec["evaluations_forward"], rec["evaluations_backward"]) == (want["forward"], want["backward"])
        total += want["forward"] + want["backward"]
        assert rec["evaluations"] == total
    run(tmp_path / "b", 2)
    run(tmp_path / "b", 3, resume="latest")
    assert [r["evaluations"] for r in _metrics(tmp_path / "b")] == [r["evaluations"] for r in recs]


def test_two_processes_sum_their_counts(two_process_run):
    """Under torchrun each process counts its own samples; the record holds their sum. The
    run (the preset's RLR, shared with test_multiprocess.py) drew its plan from the seed."""
    from halforder.diffusion.app.config import load_config
    from halforder.training.loop import TrainRNG

    out, flags = two_process_run
    rec, = _metrics(out)
    cfg = load_config(None, dict(flags, output_dir=None))
    sampler = cfg.sampler()
    plan = sampler.sample(sampler.init(), TrainRNG.seeded(cfg.seed).plan)
    assert rec["plan"] == str(plan) and plan.fo_steps and plan.blocks      # forward and backward counts
    config = json.load(open(out / "config.json"))
    want = expected_evaluations(plan, 2 * config["batch_size"] * config["grad_accum"],
                                checkpointed=config["gradient_checkpointing"])
    assert (rec["evaluations_forward"], rec["evaluations_backward"]) == (want["forward"], want["backward"])
