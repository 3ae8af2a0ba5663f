"""Unbiasedness carries over to a real (tiny) UNet chain.

Chain: tiny SD (latents 4x4), DDIM, T = 4, RLR(h=2, j=2) schedules: inherent noise at
step 2 (eta = 1, the HO block's end), parameter noise tau = 0.02 at step 4 (its ZO
step); reward = mean brightness of the VAE-decoded image. theta = the 4 LoRA-B weights
of a rank-1 LoRA on ``conv_out`` (LoRA-A fixed at a random value), so the test works in
4 dimensions; all samples start from one fixed x_T, so the only randomness is the
chain's own noise.

Test: a two-sample Wald test of equal means, W = d^T (S_a/n_a + S_b/n_b)^{-1} d, which is
chi^2(4) under H0 for these sample sizes; it rejects at alpha = 1e-3, the false-failure
rate of the RLR check. Power: the same test must reject two biased estimators, truncated
backprop (K = 1) and RLR with its ZO step dropped (a biased plan with the same kind of
variance as RLR), so the RLR check could have seen a bias of either size. Truncated's bias
is about 9 RLR standard errors at n = 2048 in its largest coordinate (its own W ~ 3e7 at
n = 512). The dropped ZO term is the subtle control: over six seeds at n = 2048 its W was
17.6 to 49 (mean 29, noncentrality about 25: power 0.85 against the threshold 18.5), so it
is drawn at n = 4608, noncentrality about 56, power 0.9995 (a false-failure rate of 5e-4).
Measured with the seeds below: RLR vs full W = 3.9 (p = 0.43); RLR without ZO W = 29.8
(seeds 15-17 gave 61-68).
"""
import pytest
import torch
from scipy import stats

from halforder.diffusion import NoiseScales, add_lora, make_chain, tiny_components
from halforder.diffusion.rewards import make_reward
from halforder.estimators import Plan, estimate, flatten

ALPHA = 1e-3
T = 4


def _wald(a: torch.Tensor, b: torch.Tensor):
    """(W, p-value, per-coordinate z) for H0: E[a] = E[b], rows i.i.d., a and b independent."""
    a, b = a.double(), b.double()
    d = a.mean(0) - b.mean(0)
    C = torch.cov(a.T) / len(a) + torch.cov(b.T) / len(b)
    W = float(d @ torch.linalg.solve(C, d))
    return W, float(stats.chi2.sf(W, len(d))), (d / C.diagonal().sqrt()).numpy()


@pytest.fixture(scope="module")
def setup():
    c = tiny_components(0, latent_size=4)
    lora = add_lora(c.unet, rank=1, target_modules=["conv_out"], init=False, seed=0)
    params = {k: v for k, v in lora.items() if ".lora_B." in k}
    rlr = Plan.rlr(T, h=2, j=2)
    chain = make_chain(c, rlr.T, ["a photo"], make_reward("brightness"), guidance_scale=1.0).for_plan(
        rlr, NoiseScales(eta="plan", eta_plan=1.0, tau="plan", zo_sigma=0.02))
    assert chain.sigma(2) > 0 and chain.tau(4) > 0
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    return chain, params, x_T, rlr


def _draw(setup, plan, n, seed, chunk=512):
    chain, params, x_T, _ = setup
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n // chunk):
        est = estimate(chain, plan, params, x_T.expand(chunk, -1, -1, -1), generator=g, per_sample=True,
                       baseline="loo")
        out.append(flatten(est.grad, True))
    return torch.cat(out)


def test_rlr_agrees_with_full_backprop_and_the_test_has_power(setup):
    n = 2048
    full = _draw(setup, Plan.full(T), 512, seed=11)  # pathwise: ~100x smaller spread than RLR
    rlr = _draw(setup, setup[3], n, seed=12)
    W, p, z = _wald(rlr, full)
    assert p > ALPHA, f"RLR disagrees with full backprop: W={W:.1f}, p={p:.2g}, z={z}"

    truncated = _draw(setup, Plan.truncated(T, 1), 512, seed=13)   # pathwise: its mean is precise at 512
    W, p, z = _wald(truncated, full)
    assert p < ALPHA, f"the test cannot see truncation bias: W={W:.1f}, z={z}"
    bias_in_rlr_se = (truncated.mean(0) - full.mean(0)) / (rlr.std(0) / n ** 0.5)
    assert bias_in_rlr_se.abs().max() > 8, bias_in_rlr_se

    no_zo = Plan.from_roles(["FO", "HO", "HO", "NONE"])  # RLR's plan with its ZO term dropped
    W, p, z = _wald(_draw(setup, no_zo, 9 * 512, seed=14), full)
    assert p < ALPHA, f"the test cannot see a dropped ZO term: W={W:.1f}, z={z}"
