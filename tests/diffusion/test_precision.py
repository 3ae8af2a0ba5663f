"""The precision policy: a bf16 (or fp16) frozen model, float32 LoRA weights, float32 estimator
sums, no autocast; the attention kernels under vmap; a compiled UNet."""
from dataclasses import dataclass

import pytest
import torch

from halforder.diffusion import NoiseScales, add_lora, make_chain, make_reward, tiny_components
from halforder.diffusion.app.config import TrainConfig
from halforder.diffusion.sampling.denoiser import vmap_attention_backends
from halforder.diffusion.app.run import build_components, model_dtype
from halforder.estimators import Checkpointed, ComputeMeter, Plan, estimate, expected_evaluations
from halforder.toy.stats import mean_test

BF16_UNIT_ROUNDOFF = 2.0 ** -8   # bfloat16 keeps 8 significant bits


def _setup(dtype, batching="vmap", n=4, seed=1, compile=None):
    comp = tiny_components(0)
    params = add_lora(comp.unet, rank=2, init=False, seed=seed)
    comp.to(dtype=dtype)
    params = {k: v.detach().float() for k, v in params.items()}
    plan = Plan.rlr(6, 2, 3)
    chain = make_chain(comp, 6, ["a red square"] * n, make_reward("brightness"), guidance_scale=2.0,
                       batching=batching, compile=compile).for_plan(plan, NoiseScales(eta_plan=1.0,
                                                                                      zo_sigma=1e-2))
    return chain, plan, params


def _per_sample(dtype, batching="vmap", n=4, seed=0):
    chain, plan, params = _setup(dtype, batching, n)
    g = torch.Generator().manual_seed(seed)
    return estimate(chain, plan, params, chain.sample_start(n, g), generator=g, per_sample=True)


def test_a_bf16_model_runs_with_float32_lora_and_float32_estimates():
    """Without autocast, float32 states meet a bf16 UNet and VAE: the denoiser and the decode
    cast at the boundary, and every part of the estimate is float32."""
    est = _per_sample(torch.bfloat16)
    for part in est.parts.values():
        for v in part.values():
            assert v.dtype == torch.float32 and torch.isfinite(v).all()
    assert est.reward.dtype == torch.float32
    assert any(v.abs().max() > 0 for v in est.parts["HO"].values())


def test_vmap_and_loop_agree_on_a_bf16_model_within_rounding():
    """The two per-sample paths run the same bf16 operations batched differently, so they
    differ only by rounding. Each bf16 operation rounds to a relative 2^-8; the differences
    add up through the 6 steps and the UNet's layers with no bound we can derive, so the
    tolerance is a stated heuristic: 8 units of roundoff (2^-5) relative to each part's
    largest entry, here (eta 1, no baseline). Measured on this chain: about 1.1e-2 (HO), 5e-3
    (FO) and 1.3e-4 (ZO). With a leave-one-out baseline over 2 samples the weight R_i - R_j
    loses relative precision to cancellation and the HO part differs more (7e-2 in
    ``benchmarks/sd_scale.py --tiny``). The same comparison with the samples' parameters
    mismatched (a vmap bug) is off by far more and fails."""
    vmap, loop = _per_sample(torch.bfloat16, "vmap"), _per_sample(torch.bfloat16, "loop")
    bound = 8 * BF16_UNIT_ROUNDOFF
    for part in ("FO", "HO", "ZO"):
        scale = max(loop.parts[part][k].abs().max() for k in loop.grad)
        diff = max((vmap.parts[part][k] - loop.parts[part][k]).abs().max() for k in loop.grad)
        assert diff <= bound * scale, (part, float(diff / scale))
        swapped = max((vmap.parts[part][k] - loop.parts[part][k].roll(1, 0)).abs().max() for k in loop.grad)
        assert swapped > bound * scale, part


def test_bf16_and_fp32_estimates_from_the_same_noise_show_no_mean_difference():
    """Paired per-sample estimates from the same noise, bf16 model minus float32 model:
    Hotelling's test of mean difference 0 on 6 fixed random projections of 96 i.i.d. pairs,
    at a false-failure rate of 1e-3. A bf16 model is a slightly different model, so this
    does not show the mean difference is 0, only that it is below what 96 pairs resolve. Its power is checked on the same differences shifted
    by 8 standard errors along one projection (power above 0.99). The spread (std of the
    difference over the std of the estimate, 2.3e-4 here) is reported in docs/training.md."""
    n, P = 96, 6
    bf, fp = _per_sample(torch.bfloat16, n=n, seed=3), _per_sample(torch.float32, n=n, seed=3)
    flat = (lambda e: torch.cat([e.grad[k].reshape(n, -1) for k in sorted(e.grad)], 1).double())
    d = flat(bf) - flat(fp)
    proj = torch.randn(d.shape[1], P, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = d @ proj
    assert z.abs().max() > 0
    assert not mean_test(z, torch.zeros(P)).rejects(1e-3)
    shifted = z.clone()
    shifted[:, 0] += 8 * z[:, 0].std() / n ** 0.5
    assert mean_test(shifted, torch.zeros(P)).rejects(1e-3)


def test_mixed_precision_sets_the_model_dtype_and_refuses_fp16_on_a_cpu():
    cfg = TrainConfig(model="tiny", mixed_precision="bf16")
    comp = build_components(cfg)
    assert {m.dtype for m in comp.modules()} == {torch.bfloat16}
    assert model_dtype(TrainConfig(model="tiny")) == torch.float32
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        model_dtype(TrainConfig(model="tiny", mixed_precision="fp16"), "cpu")
    assert model_dtype(TrainConfig(model="tiny", mixed_precision="fp16"), "cuda") == torch.float16


def test_vmap_keeps_to_the_math_attention_kernel_on_cuda_only():
    """The fused CUDA attention kernels fail in vmap's backward; the math kernel does not.
    Elsewhere no kernel is excluded."""
    from torch.nn.attention import SDPBackend

    assert vmap_attention_backends("cuda") == [SDPBackend.MATH]
    assert vmap_attention_backends("cpu") is None


@dataclass
class _Output:
    sample: torch.Tensor


class _SmallNet(torch.nn.Module):
    """A UNet-shaped stand-in (``net(x, timestep, encoder_hidden_states).sample``) that
    compiles in seconds; the UNet itself takes minutes on a CPU."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.proj = torch.nn.Linear(16, 4)

    def forward(self, x, timestep, encoder_hidden_states):
        h = self.conv(x) * torch.cos(timestep / 1000) + self.proj(encoder_hidden_states.mean(1))[:, :, None, None]
        return _Output(torch.tanh(h))


@pytest.mark.parametrize("per_sample,checkpointed", [(False, False), (True, True)])
def test_a_compiled_denoiser_gives_the_eager_estimate(per_sample, checkpointed, monkeypatch):
    """A compiled denoiser (``--compile``) traced through the functional call, vmap over
    per-sample parameters (the ZO steps' parameter noise; every step with ``per_sample``),
    guidance and checkpointed steps gives the eager estimate. The test compiles with
    AOTAutograd and no code generation (inductor takes minutes on this CPU; the benchmark
    runs it), on a small network in place of the UNet."""
    from torch._dynamo.utils import counters

    from halforder.diffusion.sampling import denoiser as module
    from halforder.diffusion.sampling.chain import DiffusionChain
    from halforder.diffusion.models.components import SD_SCHEDULER_CONFIG, make_scheduler
    from halforder.diffusion.sampling.solvers import make_solver

    monkeypatch.setattr(module, "_compiled", lambda mode: torch.compile(module._apply, backend="aot_eager"))
    with torch.random.fork_rng(devices=[]):   # the same network whatever ran before
        torch.manual_seed(0)
        net = _SmallNet().requires_grad_(False)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    solver = make_solver(make_scheduler("ddim", SD_SCHEDULER_CONFIG), 6)
    g = torch.Generator().manual_seed(0)
    context, negative = torch.randn(2, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    plan = Plan.rlr(6, 2, 3)
    results = []
    for compiled in (None, "default"):
        torch._dynamo.reset()
        counters.clear()
        denoiser = module.ModuleDenoiser(net, solver.timesteps, context, negative, 2.0, "vmap", compiled)
        chain = DiffusionChain(denoiser, solver, 0.0, lambda z: z.mean((1, 2, 3)), (4, 8, 8)).for_plan(
            plan, NoiseScales(eta_plan=1.0, zo_sigma=1e-2))
        chain = Checkpointed(chain) if checkpointed else chain
        g = torch.Generator().manual_seed(5)
        with ComputeMeter() as meter:    # the compute meter sees through the compiled call
            results.append(estimate(chain, plan, params, chain.sample_start(2, g), generator=g,
                                    per_sample=per_sample))
        assert bool(counters["stats"]["unique_graphs"]) == (compiled is not None)
        want = expected_evaluations(plan, 2, checkpointed=checkpointed)
        assert (meter.forward, meter.backward) == (want["forward"], want["backward"])
    eager, comp = results
    for k in eager.grad:
        assert eager.grad[k].abs().max() > 0
        torch.testing.assert_close(comp.grad[k], eager.grad[k], rtol=1e-5, atol=1e-7)
