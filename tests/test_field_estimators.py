"""The field's estimators on the exact linear chain: per-step weights, random step sets
(weighted and as the field runs them), per-prompt groups, and PPO's clipped ratio with reuse
and a KL penalty.

Deterministic identities first (weights, the ratio at the first update). Then calibrated
tests: Hotelling's T^2 at level ALPHA (its false-failure rate under the null, per assertion),
fixed seeds, on i.i.d. observations. A random step set is shared by a block of rows, so an
observation is a block's mean (its own set and its own noise); a baseline couples the rows
of a group, so an observation is a group's mean. Each biased form is shown rejected at the
sample size used.
"""
import dataclasses

import pytest
import torch

from halforder.estimators import Plan, estimate, flatten
from halforder.estimators.baselines import GroupNormalised, LeaveOneOut
from halforder.estimators.clipped_ratio import check_reusable, clipped_surrogate, record, surrogate_evaluations
from halforder.estimators.compute import ComputeMeter
from halforder.estimators.step_sets import RandomSubset, RandomTruncation, RandomWindow
from halforder.estimators.theory import step_gradients
from halforder.planning.diagnose import coefficients
from halforder.toy import linear_chain, mean_test

ALPHA = 1e-3          # per assertion; the 12 calibrated assertions together: <= 1.2%
T, ROWS, BLOCKS = 6, 120_000, 3_000


@pytest.fixture(scope="module")
def chain():
    """A linear-Gaussian chain with Gaussian steps of equal sigma (no parameter noise)."""
    return linear_chain(T=T, d=2, sigma=0.5, tau=0.0, seed=1)


@pytest.fixture(scope="module")
def step_terms(chain):
    """Per-sample, per-step terms on ROWS rollouts of one seed: REINFORCE's likelihood ratio
    ``[T, n, P]`` (one single-step plan per step, the same noise) and the pathwise g_t."""
    c, params = chain
    x_T = c.sample_start(ROWS, torch.Generator().manual_seed(0))
    lr = torch.stack([flatten(estimate(c, Plan.reinforce(T, [t]), params, x_T, per_sample=True,
                                       generator=torch.Generator().manual_seed(1)).grad, True)
                      for t in range(1, T + 1)])
    g, _, _ = step_gradients(c, params, x_T, generator=torch.Generator().manual_seed(1))
    return lr, g.transpose(0, 1).double()


def _block_means(sampler, terms, seed=2):
    """One plan drawn per block of rows; the block's mean of sum_t c_t term_t: i.i.d. rows."""
    gen, state = torch.Generator().manual_seed(seed), sampler.init()
    coef = []
    for _ in range(BLOCKS):
        plan = sampler.sample(state, gen)
        state = sampler.update(state, plan, None)
        coef.append(coefficients(plan))
    per_row = terms.view(T, BLOCKS, ROWS // BLOCKS, -1)
    return torch.einsum("bt,tbrp->brp", torch.stack(coef), per_row).mean(1)


# ----------------------------------------------------------------------------- identities
def test_weights_multiply_each_steps_term_in_every_role_and_leave_the_forward_values():
    c, params = linear_chain(T=4, d=2, sigma=0.5, tau=0.2, seed=3)
    x_T = c.sample_start(5, torch.Generator().manual_seed(0))
    w = [2.0, 0.5, 3.0, 1.5]

    def run(plan):
        return estimate(c, plan, params, x_T, per_sample=True, generator=torch.Generator().manual_seed(4))

    def own_term(plan, t):   # step t's term alone, on the same noise
        role = plan.roles[t - 1].value
        if role == "FO":          # truncated(t) - truncated(t-1)
            prev = run(Plan.truncated(4, t - 1)).grad if t > 1 else {k: 0.0 for k in params}
            return {k: run(Plan.truncated(4, t)).grad[k] - prev[k] for k in params}
        return run(Plan.from_roles([role if s == t else "NONE" for s in range(1, 5)])).grad

    for plan in (Plan.full(4), Plan.reinforce(4), Plan.zeroth_order(4), Plan.from_roles(["FO", "HO", "ZO", "HO"])):
        weighted, plain = run(plan.with_weights(w)), run(plan)
        assert torch.equal(weighted.reward, plain.reward)                 # forward values unchanged
        terms = [own_term(plan, t) for t in range(1, 5)]
        for k in params:
            want = sum(wt * g[k] for wt, g in zip(w, terms))
            torch.testing.assert_close(weighted.grad[k], want, rtol=1e-10, atol=1e-12)


def test_plan_weights_are_checked():
    with pytest.raises(ValueError, match="needs 3 weights"):
        Plan.full(3).with_weights([1.0, 2.0])
    with pytest.raises(ValueError, match="step 2: weight 0.0"):
        Plan.full(3).with_weights([1.0, 0.0, 1.0])
    assert Plan.truncated(3, 1).with_weights([2.0, 5.0, 5.0]).weights == (2.0, 1.0, 1.0)   # dropped: stored as 1
    assert not Plan.full(3).with_weights([1.0, 2.0, 1.0]).is_unbiased


def test_the_ratio_is_one_at_the_first_update_and_the_estimate_is_reinforce(chain):
    """The check users of DDPO and Flow-GRPO make by hand: at theta = theta_old every r_t is 1
    and PPO's gradient is the engine's REINFORCE on the same noise."""
    c, params = chain
    x_T = c.sample_start(32, torch.Generator().manual_seed(0))
    for plan in (Plan.reinforce(T), Plan.reinforce(T, [2, 5]).with_weights([1, 3, 1, 1, 2, 1])):
        for baseline in (None, LeaveOneOut(8), GroupNormalised(8)):
            ref = estimate(c, plan, params, x_T, generator=torch.Generator().manual_seed(3), baseline=baseline)
            rec = record(c, plan, params, x_T, generator=torch.Generator().manual_seed(3), baseline=baseline)
            est = clipped_surrogate(rec, params, clip_range=1e-4)
            assert est.stats["ratio_mean"] == 1.0 and est.stats["ratio_max_deviation"] == 0.0
            assert est.stats["clip_fraction"] == 0.0
            for k in params:
                torch.testing.assert_close(est.grad[k], ref.grad[k], rtol=1e-12, atol=1e-14)


def test_with_parameter_noise_the_ratio_is_still_one_at_the_first_update():
    """A chain with parameter noise on the trained steps: each step is recomputed at the recorded
    perturbed parameters, as the engine's term is, so r = 1 and the estimates agree."""
    c, params = linear_chain(T=4, d=2, sigma=0.5, tau=0.2, seed=2)
    x_T = c.sample_start(16, torch.Generator().manual_seed(0))
    ref = estimate(c, Plan.reinforce(4), params, x_T, generator=torch.Generator().manual_seed(3), baseline="loo")
    rec = record(c, Plan.reinforce(4), params, x_T, generator=torch.Generator().manual_seed(3), baseline="loo")
    est = clipped_surrogate(rec, params, clip_range=1e-4)
    assert est.stats["ratio_max_deviation"] == 0.0
    for k in params:
        torch.testing.assert_close(est.grad[k], ref.grad[k], rtol=1e-12, atol=1e-14)


def test_a_recorded_rollout_and_its_passes_cost_what_surrogate_evaluations_says(chain):
    """The meter's count of a rollout feeding U passes, with and without the KL's reference pass."""
    c, params = chain
    x_T = c.sample_start(8, torch.Generator().manual_seed(0))
    ref = {k: v.detach() + 0.1 for k, v in params.items()}
    for plan in (Plan.reinforce(T), Plan.reinforce(T, [2, 5])):
        for U, beta in ((1, 0.0), (2, 0.0), (2, 0.5)):
            with ComputeMeter() as meter:
                rec = record(c, plan, params, x_T, generator=torch.Generator().manual_seed(3))
                for _ in range(U):
                    clipped_surrogate(rec, params, clip_range=1e-4, kl_beta=beta, reference=ref)
            want = surrogate_evaluations(plan, 8, updates=U, kl=beta > 0)
            assert (meter.forward, meter.backward) == (want["forward"], want["backward"]), (plan, U, beta)
    assert surrogate_evaluations(Plan.reinforce(T, [2, 5]), 8, updates=2, kl=False) != \
        surrogate_evaluations(Plan.reinforce(T, [2, 5]), 8, updates=1, kl=False)


def test_the_clipped_ratio_refuses_pathwise_plans():
    for plan in (Plan.full(4), Plan.rlr(4, 2, 2), Plan.zeroth_order(4), Plan.from_roles(["NONE", "HO", "HO", "NONE"])):
        with pytest.raises(ValueError, match="likelihood-ratio steps only"):
            check_reusable(plan)


def test_the_kl_penalty_is_the_gaussian_steps_closed_form(chain):
    """beta * sum_t |mu_theta - mu_ref|^2 / (2 sigma_t^2) at the recorded states: on the linear
    chain its gradient in b is -beta * sum_t (mu_theta(x_t) - mu_ref(x_t)) / sigma_t^2."""
    c, params = chain
    ref = {"W": params["W"] + 0.05, "b": params["b"] - 0.1}
    x_T = c.sample_start(16, torch.Generator().manual_seed(0))
    rec = record(c, Plan.reinforce(T), params, x_T, generator=torch.Generator().manual_seed(1))
    rec = dataclasses.replace(rec, advantage=torch.zeros_like(rec.advantage))     # the penalty alone
    est = clipped_surrogate(rec, params, kl_beta=0.04, reference=ref)
    want_b, kl = 0.0, 0.0
    for t, s in rec.rollout.steps.items():
        diff = s.x @ (params["W"] - ref["W"]).T + (params["b"] - ref["b"])
        want_b = want_b - 0.04 * (diff / c.sigma(t) ** 2).mean(0)
        kl = kl + (diff.pow(2).sum(1) / (2 * c.sigma(t) ** 2)).mean()
    torch.testing.assert_close(est.grad["b"], want_b, rtol=1e-12, atol=1e-14)
    assert est.stats["kl"] == pytest.approx(float(kl), rel=1e-12)
    assert float(clipped_surrogate(rec, params, kl_beta=0.04, reference=params).grad["b"].abs().max()) == 0.0


# ----------------------------------------------------------------------------- calibrated
@pytest.mark.parametrize("sampler", [RandomSubset(T, 0.5), RandomWindow(T, 2), RandomWindow(T, 4)], ids=str)
def test_weighted_step_sets_are_unbiased_and_the_fields_are_not(chain, step_terms, sampler):
    c, params = chain
    truth = flatten(c.exact_grad(params))
    assert sampler.unbiased
    obs = _block_means(sampler, step_terms[0])
    result = mean_test(obs, truth)
    assert not result.rejects(ALPHA), (str(sampler), result.pvalue)
    field = dataclasses.replace(sampler, weighting="field")
    assert not field.unbiased and mean_test(_block_means(field, step_terms[0]), truth).rejects(ALPHA)


def test_russian_roulette_truncation_is_unbiased_and_alignprops_is_not(chain, step_terms):
    c, params = chain
    truth = flatten(c.exact_grad(params))
    roulette = RandomTruncation(T, T, weighting="unbiased")
    assert not mean_test(_block_means(roulette, step_terms[1]), truth).rejects(ALPHA)
    alignprop = RandomTruncation(T, T)
    assert mean_test(_block_means(alignprop, step_terms[1]), truth).rejects(ALPHA)


def _prompted(chain, offsets):
    """The chain with a reward level per prompt: R_n + offsets[n] (rows in prompt groups)."""
    base = chain.reward_fn
    return dataclasses.replace(chain, reward_fn=lambda x0: base(x0) + offsets.to(x0)[: x0.shape[0]])


def test_per_prompt_leave_one_out_is_unbiased_and_grpos_normalisation_is_not(chain):
    """P prompts x G samples whose reward level differs by prompt: leave-one-out within each
    prompt's group is unbiased; GRPO's per-prompt normalisation is rejected."""
    c, params = chain
    G, n = 4, 60_000
    offsets = torch.arange(n // G, dtype=torch.float64).remainder(8).mul(3.0).repeat_interleave(G)
    pc = _prompted(c, offsets)
    truth = flatten(c.exact_grad(params))
    x_T = pc.sample_start(n, torch.Generator().manual_seed(5))
    for baseline, unbiased in ((LeaveOneOut(G), True), (GroupNormalised(G), False)):
        est = estimate(pc, Plan.reinforce(T), params, x_T, per_sample=True, baseline=baseline,
                       generator=torch.Generator().manual_seed(6))
        obs = flatten(est.grad, True).view(n // G, G, -1).mean(1)       # one observation per group
        assert mean_test(obs, truth).rejects(ALPHA) is not unbiased, baseline


def test_ppo_is_unbiased_at_the_first_update_and_reuse_is_not(chain):
    """U = 1 with the leave-one-out advantage: unbiased. A later update on the same rollout,
    at theta = theta_old + delta (|delta| = 0.3 along grad J), estimates grad J(theta) with a
    bias the test rejects: the per-step ratio corrects the last transition, not the law of x_t."""
    c, params = chain
    G, n = 8, 80_000
    x_T = c.sample_start(n, torch.Generator().manual_seed(7))
    rec = record(c, Plan.reinforce(T), params, x_T, generator=torch.Generator().manual_seed(8),
                 baseline=LeaveOneOut(G))

    def observations(at):
        est = clipped_surrogate(rec, at, clip_range=0.2, per_sample=True)
        return flatten(est.grad, True).view(n // G, G, -1).mean(1)

    assert not mean_test(observations(params), flatten(c.exact_grad(params))).rejects(ALPHA)
    g = c.exact_grad(params)
    norm = float(flatten(g).norm())
    moved = {k: v + 0.3 * g[k] / norm for k, v in params.items()}
    assert mean_test(observations(moved), flatten(c.exact_grad(moved))).rejects(ALPHA)
