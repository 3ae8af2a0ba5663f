"""Antithetic pairing: groups of samples that share their noise but a mirrored part.

Statistical tests are Hotelling's T^2 at level ALPHA on i.i.d. group means with fixed
seeds. The property test runs MAX_EXAMPLES derandomized examples, so its false-failure
rate over the choice of seeds is at most MAX_EXAMPLES * ALPHA = 0.15%; each other
statistical assertion has false-failure rate ALPHA. The bias checks must reject: they are
the proof that the tests can fail (truncated backprop, and a leave-one-out baseline that
wrongly keeps a sample's partner).
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from halforder.estimators import PAIRINGS, Pairing, Plan, draw_estimates, estimate, flatten, group_means, grouped
from halforder.estimators import baselines as baselines_module
from halforder.estimators.baselines import leave_one_out
from halforder.toy import linear_chain, mean_test
from test_properties import random_plan

ALPHA = 1e-4
MAX_EXAMPLES = 15
N = 20_000


def test_signs_and_groups():
    assert Pairing.parse(None).size == 1 and Pairing.parse("none").size == 1
    assert Pairing.parse("param").signs("param") == (1.0, -1.0)
    assert Pairing.parse("param").signs("ho") == (1.0, 1.0)
    quad = Pairing.parse("param+ho")
    assert quad.size == 4
    assert quad.signs("param") == (1.0, -1.0, 1.0, -1.0) and quad.signs("ho") == (1.0, 1.0, -1.0, -1.0)
    z = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert quad.expand(z, "param").tolist() == [[1, 2], [-1, -2], [1, 2], [-1, -2], [3, 4], [-3, -4], [3, 4], [-3, -4]]
    assert quad.expand(z, "other").tolist() == [[1, 2]] * 4 + [[3, 4]] * 4
    assert grouped(["a", "b"], 2) == ["a", "a", "b", "b"]
    assert grouped(torch.arange(2), 2).tolist() == [0, 0, 1, 1]
    assert group_means(torch.arange(4.0), 2).tolist() == [0.5, 2.5]
    with pytest.raises(ValueError, match="unknown pairing"):
        Pairing.parse("params")


def test_group_leave_one_out_leaves_the_whole_group_out():
    R = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert leave_one_out(R).tolist() == pytest.approx([(21 - r) / 5 for r in R.tolist()])
    assert leave_one_out(R, group=2).tolist() == pytest.approx([18 / 4, 18 / 4, 14 / 4, 14 / 4, 10 / 4, 10 / 4])
    with pytest.raises(ValueError, match="2 groups"):
        leave_one_out(R[:2], group=2)
    with pytest.raises(ValueError, match="groups of 4"):
        leave_one_out(R, group=4)


def test_x_T_must_split_into_groups():
    chain, params = linear_chain(T=3, d=2)
    x_T = chain.sample_start(3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="groups of 2 samples, but x_T has 3 rows"):
        estimate(chain, Plan.zeroth_order(3), params, x_T, pairing="param")


def test_members_share_every_noise_but_the_mirrored_one():
    """With the parameter noise mirrored, the members of a pair differ only through it: on
    a chain without parameter noise they are identical; with "ho", only where blocks end."""
    chain, params = linear_chain(T=4, d=2, tau=0.0, seed=1)
    g = torch.Generator().manual_seed(0)
    x_T = grouped(chain.sample_start(3, g), 2)
    est = estimate(chain, Plan.full(4), params, x_T, generator=g, per_sample=True, pairing="param")
    assert torch.equal(est.reward[0::2], est.reward[1::2])
    assert not torch.equal(est.reward[0::2], est.reward[2::2].roll(1))
    est = estimate(chain, Plan.reinforce(4), params, x_T, generator=g, per_sample=True, pairing="ho")
    assert not torch.equal(est.reward[0::2], est.reward[1::2])


@settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), T=st.integers(1, 6), d=st.integers(1, 3), seed=st.integers(0, 2 ** 16),
       pairing=st.sampled_from(PAIRINGS[1:]), baseline=st.sampled_from([None, "loo"]))
def test_paired_estimates_are_unbiased_on_random_linear_chains(data, T, d, seed, pairing, baseline):
    sigmas = data.draw(st.lists(st.floats(0.2, 1.0), min_size=T, max_size=T), label="sigmas")
    taus = data.draw(st.lists(st.floats(0.1, 0.5), min_size=T, max_size=T), label="taus")
    plan = data.draw(random_plan(T), label="plan")
    chain, params = linear_chain(T=T, d=d, sigma=sigmas, tau=taus, seed=seed, spectral_radius=0.8)
    truth = flatten(chain.exact_grad(params))
    s = draw_estimates(chain, plan, params, N, generator=torch.Generator().manual_seed(seed), pairing=pairing,
                       baseline=baseline)
    result = mean_test(s.grad, truth)
    assert not result.rejects(ALPHA), (str(plan), pairing, result.pvalue, result.z)


@pytest.mark.parametrize("pairing", PAIRINGS[1:])
def test_truncated_backprop_is_still_caught(pairing):
    chain, params = linear_chain(T=8, d=3, sigma=0.5, tau=0.2, seed=0)
    truth = flatten(chain.exact_grad(params))
    s = draw_estimates(chain, Plan.truncated(8, 2), params, N, generator=torch.Generator().manual_seed(3),
                       pairing=pairing)
    assert mean_test(s.grad, truth).rejects(ALPHA)
    bias = flatten(chain.exact_truncation_bias(params, 2))       # ... and its mean is truth - bias
    assert not mean_test(s.grad, truth - bias).rejects(ALPHA)


def test_leave_one_out_under_pairing_is_unbiased_and_keeping_the_partner_is_not(monkeypatch):
    """The partner shares the sample's noise (mirrored eps'), so a baseline that keeps it
    correlates with the score: b_n = mean over m != n is biased under pairing, b_n = mean
    over the other pairs is not. Small batches (two pairs) make the difference large: the
    partner's weight 1/3 in b_n scales the pair's ZO term by 4/3."""
    chain, params = linear_chain(T=2, d=2, sigma=0.5, tau=0.3, seed=2)
    truth = flatten(chain.exact_grad(params))
    plan = Plan.zeroth_order(2)
    kw = dict(generator=torch.Generator().manual_seed(5), pairing="param", baseline="loo", chunk=4)
    good = draw_estimates(chain, plan, params, N, **kw)
    assert not mean_test(good.grad, truth).rejects(ALPHA)
    monkeypatch.setattr(baselines_module, "leave_one_out", lambda R, group, size=None: leave_one_out(R, 1, size))
    kw["generator"] = torch.Generator().manual_seed(5)
    bad = draw_estimates(chain, plan, params, N, **kw)
    assert mean_test(bad.grad, truth).rejects(ALPHA)


def test_paired_zo_is_the_directional_derivative_on_a_linear_quadratic_chain():
    """Exact identity. One ZO step t, parameter noise only there, a linear chain and a
    quadratic reward: x_0 is affine in the perturbation delta = tau eps' and R quadratic,
    so R(+delta) - R(-delta) = 2 g . delta with g = dR/dtheta_t at the shared noise. g is
    the difference of truncated backprop to t and to t-1 (same seed, so the same noise),
    averaged over the pair (the gradient is affine in delta); eps' comes from the ZO part."""
    T, t, tau = 5, 3, 0.2
    chain, params = linear_chain(T=T, d=3, sigma=0.5, tau=[tau if s == t else 0.0 for s in range(1, T + 1)], seed=4)
    roles = ["NONE"] * T
    roles[t - 1] = "ZO"
    n = 6

    def run(plan):
        g = torch.Generator().manual_seed(11)
        x_T = grouped(chain.sample_start(n, g), 2)
        return estimate(chain, plan, params, x_T, generator=g, per_sample=True, pairing="param")

    zo = run(Plan.from_roles(roles))
    fo_t, fo_before = run(Plan.truncated(T, t)), run(Plan.truncated(T, t - 1))
    g = group_means(flatten(fo_t.grad, True) - flatten(fo_before.grad, True), 2)
    R = zo.reward
    eps = flatten(zo.parts["ZO"], True)[0::2] * tau / R[0::2, None]      # member 1: R eps' / tau
    assert torch.allclose((R[0::2] - R[1::2]) / (2 * tau), (g * eps).sum(1), rtol=1e-9, atol=1e-12)
    pair_mean = group_means(flatten(zo.parts["ZO"], True), 2)
    assert torch.allclose(pair_mean, (g * eps).sum(1, keepdim=True) * eps, rtol=1e-9, atol=1e-12)
