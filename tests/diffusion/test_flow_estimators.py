"""Every estimator on the flow-matching chains (tiny SD3 and FLUX), and unbiasedness there.

1. Every family (full, truncated = DRaFT-K, AlignProp's random truncation, REINFORCE, ZO, RLR
   h = 0..3), unpaired and paired, runs on both chains, and the compute meter counts exactly
   what the plan costs.
2. The calibrated check of ``test_unbiased.py`` on a flow chain (tiny SD3, Flow-GRPO's SDE at
   the HO block's end): theta = the 16 LoRA-B weights of a rank-1 LoRA on ``proj_out`` (LoRA-A
   fixed), one fixed x_T, so the only randomness is the chain's own noise. A two-sample Wald
   test, chi^2(16) under H0, rejects at alpha = 1e-3 (the false-failure rate of each
   agreement check); with the same sample sizes it must reject truncated backprop (K = 1) and
   RLR with its ZO step dropped, so it could have seen a bias of either size.
3. MixGRPO's sampler as a plan: REINFORCE on a window of steps (NONE elsewhere) with the SDE
   only there (eta 'plan': ODE elsewhere). It estimates the gradient through the window's
   parameters alone, sum_{t in W} grad_{theta_t} J, which the pathwise gradient of the same
   chain with the parameters outside the window held fixed gives; the Wald test must accept
   that and reject the full gradient, which the window leaves out. Window 3..4 (the high-noise
   steps): W = 13.3 (p = 0.65) against the window's gradient, W = 330 against the full one.
"""
from dataclasses import dataclass

import pytest
import torch
from scipy import stats

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from halforder.diffusion import NoiseScales, add_lora, make_chain, make_reward, tiny_model  # noqa: E402
from halforder.estimators import (ComputeMeter, Plan, estimate, expected_evaluations, flatten, grouped,  # noqa: E402
                                  make_sampler)

ALPHA = 1e-3
T = 4
PLANS = {"full": ("full", {}), "draft_2": ("truncated", {"k": 2}), "alignprop": ("truncated_random", {"k": T}),
         "reinforce": ("reinforce", {}), "zeroth_order": ("zeroth_order", {}),
         **{f"rlr_h{h}": ("rlr", {"h": h}) for h in range(T)}}


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-flux"])
def lora_chain(request):
    c = tiny_model(request.param)
    return c, add_lora(c.unet, rank=2, init=False, seed=0)


@pytest.mark.parametrize("pairing", ["none", "param+ho"])
@pytest.mark.parametrize("name", list(PLANS))
def test_every_estimator_runs_and_costs_what_its_plan_says(lora_chain, name, pairing):
    c, params = lora_chain
    family, kw = PLANS[name]
    g = torch.Generator().manual_seed(3)
    plan = make_sampler(family, T, **kw).sample({}, g)
    G, n = (4, 8) if pairing == "param+ho" else (1, 4)
    chain = make_chain(c, T, grouped(["a red square", "a blue circle"] * (n // 2 // G), G), make_reward("brightness"),
                       guidance_scale=2.0).for_plan(plan, NoiseScales(eta_plan=0.7))
    x_T = grouped(chain.sample_start(n // G, g), G)
    with ComputeMeter() as meter:
        est = estimate(chain, plan, params, x_T, generator=g, baseline="loo", pairing=pairing)
    flat = flatten(est.grad)
    assert bool(torch.isfinite(flat).all()) and float(flat.abs().sum()) > 0
    want = expected_evaluations(plan, n)
    assert (meter.forward, meter.backward) == (want["forward"], want["backward"]), plan


def _wald(a: torch.Tensor, b: torch.Tensor):
    """(W, p-value) for H0: E[a] = E[b], rows i.i.d., a and b independent."""
    a, b = a.double(), b.double()
    d = a.mean(0) - b.mean(0)
    C = torch.cov(a.T) / len(a) + torch.cov(b.T) / len(b)
    W = float(d @ torch.linalg.solve(C, d))
    return W, float(stats.chi2.sf(W, len(d)))


@dataclass(frozen=True)
class Frozen:
    """``chain`` with the parameters of every step outside ``steps`` held fixed (cut from the
    graph): its full backprop is the pathwise gradient through ``steps`` alone."""

    chain: object
    steps: frozenset

    @property
    def T(self):
        return self.chain.T

    def step(self, t, x, params):
        return self.chain.step(t, x, params if t in self.steps else {k: v.detach() for k, v in params.items()})

    def __getattr__(self, name):
        return getattr(self.chain, name)


@pytest.fixture(scope="module")
def sd3():
    c = tiny_model("tiny-sd3")
    lora = add_lora(c.unet, rank=1, target_modules=["proj_out"], init=False, seed=0)
    params = {k: v for k, v in lora.items() if ".lora_B." in k}
    base = make_chain(c, T, ["a photo"], make_reward("brightness"), guidance_scale=1.0)
    x_T = base.sample_start(1, torch.Generator().manual_seed(0))
    return base, params, x_T


def _draw(chain, plan, params, x_T, n, seed, chunk=512):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n // chunk):
        est = estimate(chain, plan, params, x_T.expand(chunk, *x_T.shape[1:]), generator=g, per_sample=True,
                       baseline="loo")
        out.append(flatten(est.grad, True))
    return torch.cat(out)


def test_rlr_is_unbiased_on_a_flow_chain_and_the_test_has_power(sd3):
    base, params, x_T = sd3
    rlr = Plan.rlr(T, h=1, j=3)                          # FO on 1, HO on 3, ZO on 2 and 4
    chain = base.for_plan(rlr, NoiseScales(eta_plan=0.7, zo_sigma=0.02))
    assert chain.sigma(3) > 0 and chain.tau(2) > 0 and chain.tau(4) > 0 and chain.sigma(2) == 0
    n = 2048
    full = _draw(chain, Plan.full(T), params, x_T, 512, seed=11)
    W, p = _wald(_draw(chain, rlr, params, x_T, n, seed=12), full)
    assert p > ALPHA, f"RLR disagrees with full backprop on the flow chain: W={W:.1f}, p={p:.2g}"
    W, p = _wald(_draw(chain, Plan.truncated(T, 1), params, x_T, n, seed=13), full)
    assert p < ALPHA, f"the test cannot see truncation bias: W={W:.1f}"
    W, p = _wald(_draw(chain, Plan.from_roles(["FO", "NONE", "HO", "NONE"]), params, x_T, n, seed=14), full)
    assert p < ALPHA, f"the test cannot see a dropped ZO term: W={W:.1f}"


def test_windowed_reinforce_estimates_the_windows_gradient(sd3):
    base, params, x_T = sd3
    window = Plan.reinforce(T, steps=[3, 4])
    assert window == Plan.from_roles(["NONE", "NONE", "HO", "HO"], blocks=[(3, 1), (4, 1)]) and not window.is_unbiased
    chain = base.for_plan(window, NoiseScales(eta_plan=0.7))   # MixGRPO: SDE on the window, ODE elsewhere
    assert [chain.sigma(t) > 0 for t in range(1, T + 1)] == [False, False, True, True]
    n = 2048
    est = _draw(chain, window, params, x_T, n, seed=21)
    through_window = _draw(Frozen(chain, frozenset({3, 4})), Plan.full(T), params, x_T, 512, seed=22)
    W, p = _wald(est, through_window)
    assert p > ALPHA, f"windowed REINFORCE disagrees with the window's pathwise gradient: W={W:.1f}, p={p:.2g}"
    W, p = _wald(est, _draw(chain, Plan.full(T), params, x_T, 512, seed=23))
    assert p < ALPHA, f"the test cannot tell the window's gradient from the full one: W={W:.1f}"


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_gradient_checkpointing_gives_the_same_estimate(lora_chain, batching):
    """Every step checkpointed (recomputed in backward) on a transformer chain: the same per-sample
    estimates from the same noise, per-sample parameters under vmap or the loop."""
    from halforder.estimators.gradient_checkpointing import Checkpointed

    c, params = lora_chain
    plan = Plan.rlr(T, 2, 2)
    chain = make_chain(c, T, ["a red square", "a blue circle"], make_reward("brightness"), guidance_scale=2.0,
                       batching=batching).for_plan(plan, NoiseScales(eta_plan=0.7))
    out = []
    for wrapped in (chain, Checkpointed(chain)):
        g = torch.Generator().manual_seed(0)
        out.append(flatten(estimate(wrapped, plan, params, wrapped.sample_start(2, g), generator=g,
                                    per_sample=True).grad, True))
    assert float(out[0].abs().max()) > 0
    torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-7)
