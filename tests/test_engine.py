"""The engine computes each role exactly: deterministic identities, then statistical
unbiasedness on the exact linear chain (the acceptance set of seven plans), bias detection for
truncated backprop, and the leave-one-out baseline.

Every statistical assertion is Hotelling's T^2 test at level ALPHA (its false-failure
rate under the null) with fixed seeds, so results are deterministic."""
import pytest
import torch

from halforder.estimators import Plan, Role, draw_estimates, estimate, flatten, leave_one_out
from halforder.toy import Quadratic, linear_chain, mean_test, tanh_chain, two_sample_test

ALPHA = 1e-3  # per-assertion false-failure rate; the 6 acceptance plans together: <= 0.6%


def two_blocks(T=8):
    return Plan.from_roles(["FO", "FO", "HO", "HO", "ZO", "HO", "HO", "HO"][:T], blocks=[(3, 2), (6, 3)])


ACCEPTANCE = [Plan.full(8), Plan.reinforce(8), Plan.zeroth_order(8), Plan.rlr(8, 2, 3), Plan.rlr(8, 0), two_blocks()]


@pytest.fixture(scope="module")
def chain8():
    return linear_chain(T=8, d=3, sigma=0.5, tau=0.2, seed=1)


@pytest.mark.parametrize("plan", ACCEPTANCE, ids=str)
def test_acceptance_plans_are_unbiased_with_2e5_samples(chain8, plan):
    chain, params = chain8
    truth = flatten(chain.exact_grad(params))
    s = draw_estimates(chain, plan, params, 200_000, generator=torch.Generator().manual_seed(11))
    result = mean_test(s.grad, truth)
    assert not result.rejects(ALPHA), (str(plan), result.pvalue, result.z)


def test_truncated_backprop_is_rejected_and_its_bias_is_proposition_6_1(chain8):
    chain, params = chain8
    truth = flatten(chain.exact_grad(params))
    bias = flatten(chain.exact_truncation_bias(params, 2))
    s = draw_estimates(chain, Plan.truncated(8, 2), params, 200_000, generator=torch.Generator().manual_seed(12))
    assert mean_test(s.grad, truth).rejects(ALPHA)            # the test can fail ...
    assert not mean_test(s.grad, truth - bias).rejects(ALPHA)  # ... and the bias is exactly Prop. 6.1's


def test_deterministic_chain_full_backprop_is_the_exact_gradient():
    chain, params = linear_chain(T=5, d=3, sigma=0.0, tau=0.0, seed=4, x_T_std=0.0)
    x_T = chain.sample_start(7, torch.Generator().manual_seed(0))
    est = estimate(chain, Plan.full(5), params, x_T)
    exact = chain.exact_grad(params)
    for k in params:
        assert torch.allclose(est.grad[k], exact[k], rtol=1e-12, atol=1e-12)
    # per-step split: a truncated plan's estimate is the exact sum of the first k step gradients
    steps = chain.exact_step_grads(params)
    est2 = estimate(chain, Plan.truncated(5, 2), params, x_T)
    for k in params:
        assert torch.allclose(est2.grad[k], steps[k][:2].sum(0), rtol=1e-12, atol=1e-12)


def test_per_sample_estimates_average_to_the_batch_estimate_and_parts_add_up(chain8):
    chain, params = chain8
    plan = two_blocks()
    x_T = chain.sample_start(64, torch.Generator().manual_seed(0))
    a = estimate(chain, plan, params, x_T, generator=torch.Generator().manual_seed(5), per_sample=True)
    b = estimate(chain, plan, params, x_T, generator=torch.Generator().manual_seed(5))
    for k in params:
        assert a.grad[k].shape == (64, *params[k].shape)
        assert torch.allclose(a.grad[k].mean(0), b.grad[k], rtol=1e-10, atol=1e-12)
        assert torch.allclose(sum(b.parts[r][k] for r in ("FO", "HO", "ZO")), b.grad[k])
    assert torch.equal(a.reward, b.reward)
    for r in ("FO", "HO", "ZO"):  # every role of this plan contributes
        assert flatten(b.parts[r]).abs().sum() > 0


def test_role_parts_are_unbiased_for_their_steps(chain8):
    """E[part of role r] = sum over the steps with role r of grad_{theta_t} J."""
    chain, params = chain8
    plan = two_blocks()
    steps = chain.exact_step_grads(params)
    s = draw_estimates(chain, plan, params, 100_000, generator=torch.Generator().manual_seed(13))
    for role in ("FO", "HO", "ZO"):
        idx = [t - 1 for t in plan.steps(Role(role))]
        truth = flatten({k: v[idx].sum(0) for k, v in steps.items()})
        assert not mean_test(s.parts[role], truth).rejects(ALPHA / 3), role


def test_leave_one_out_baseline_is_unbiased_and_cuts_likelihood_ratio_variance():
    # a reward with a large mean (+50) is where a baseline matters
    base, params = linear_chain(T=6, d=2, sigma=0.5, tau=0.2, seed=7)
    r = base.reward_fn
    chain, _ = linear_chain(T=6, d=2, sigma=0.5, tau=0.2, seed=7, reward=Quadratic(r.A, r.c, r.const + 50.0))
    truth = flatten(chain.exact_grad(params))
    plan = Plan.rlr(6, 2, 3)
    plain = draw_estimates(chain, plan, params, 100_000, generator=torch.Generator().manual_seed(1))
    loo = draw_estimates(chain, plan, params, 100_000, generator=torch.Generator().manual_seed(2), baseline="loo")
    assert not mean_test(loo.grad, truth).rejects(ALPHA)
    for role in ("HO", "ZO"):
        ratio = loo.parts[role].var(0).sum() / plain.parts[role].var(0).sum()
        assert ratio < 0.1, (role, float(ratio))
    assert torch.allclose(loo.parts["FO"].var(0).sum(), plain.parts["FO"].var(0).sum(), rtol=0.1)


def test_leave_one_out_values():
    R = torch.tensor([1.0, 2.0, 6.0])
    assert torch.allclose(leave_one_out(R), torch.tensor([4.0, 3.5, 1.5]))
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out(R[:1])


def test_rlr_matches_full_backprop_on_a_nonlinear_chain():
    chain, params = tanh_chain(T=6, d=2, sigma=0.4, tau=0.15, seed=3)
    full = draw_estimates(chain, Plan.full(6), params, 100_000, generator=torch.Generator().manual_seed(3))
    rlr = draw_estimates(chain, Plan.rlr(6, 2, 3), params, 100_000, generator=torch.Generator().manual_seed(4))
    trunc = draw_estimates(chain, Plan.truncated(6, 1), params, 100_000, generator=torch.Generator().manual_seed(5))
    assert not two_sample_test(rlr.grad, full.grad).rejects(ALPHA)
    assert two_sample_test(trunc.grad, full.grad).rejects(ALPHA)


class _HistoryChain:
    """The linear chain with a tuple state (x, previous mean): history is carried, unused."""

    def __init__(self, inner):
        self.inner, self.T = inner, inner.T

    def step(self, t, x, params):
        m = self.inner.step(t, x[0], params)
        return (m, m)

    def sigma(self, t):
        return self.inner.sigma(t)

    def tau(self, t):
        return self.inner.tau(t)

    def reward(self, x0):
        return self.inner.reward(x0)

    def sample_start(self, n, generator=None):
        x = self.inner.sample_start(n, generator)
        return (x, torch.zeros_like(x))


def test_tuple_states_give_the_same_estimates(chain8):
    chain, params = chain8
    x_T = chain.sample_start(32, torch.Generator().manual_seed(0))
    for plan in ACCEPTANCE:
        a = estimate(chain, plan, params, x_T, generator=torch.Generator().manual_seed(9), baseline="loo")
        b = estimate(_HistoryChain(chain), plan, params, (x_T, torch.zeros_like(x_T)),
                     generator=torch.Generator().manual_seed(9), baseline="loo")
        for k in params:
            assert torch.allclose(a.grad[k], b.grad[k], rtol=1e-12, atol=1e-12)


def test_bad_inputs_raise(chain8):
    chain, params = chain8
    x_T = chain.sample_start(4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="unknown baseline"):
        estimate(chain, Plan.full(8), params, x_T, baseline="mean")
    with pytest.raises(ValueError, match="plan has T=7"):
        estimate(chain, Plan.full(7), params, x_T)
    with pytest.raises(ValueError, match="baseline tensor"):
        estimate(chain, Plan.zeroth_order(8), params, x_T, baseline=torch.zeros(3))


def test_float32_estimates_are_float32():
    chain, params = linear_chain(T=4, d=3, dtype=torch.float32, seed=0)
    x_T = chain.sample_start(5, torch.Generator().manual_seed(0), dtype=torch.float32)
    est = estimate(chain, Plan.rlr(4, 2, 2), params, x_T, generator=torch.Generator().manual_seed(0))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in est.grad.values())


def test_grpo_advantage_replaces_r_minus_b():
    """``baseline="grpo"`` weighs the likelihood-ratio terms by (R - mean R) / (std R + 1e-4)
    over the batch, with the population std (Flow-GRPO's np.std): the estimate with the
    tensor baseline R - advantage, on the same noise."""
    from halforder.estimators.baselines import normalised_advantage
    from halforder.toy import linear_chain

    chain, params = linear_chain(T=6, d=3)
    plan = Plan.rlr(6, 2, 3)

    def run(baseline):
        g = torch.Generator().manual_seed(4)
        return estimate(chain, plan, params, chain.sample_start(16, g), generator=g, per_sample=True,
                        baseline=baseline)

    R = run(None).reward
    adv = normalised_advantage(R)
    assert torch.allclose(adv.mean(), torch.zeros((), dtype=adv.dtype), atol=1e-12)
    s = R.std(correction=0)
    assert float(adv.std(correction=0)) == pytest.approx(float(s / (s + 1e-4)), rel=1e-9)
    grpo, same = run("grpo"), run(R - adv)
    for role in ("HO", "ZO"):
        for k in params:
            assert grpo.parts[role][k].abs().max() > 0
            torch.testing.assert_close(grpo.parts[role][k], same.parts[role][k])
