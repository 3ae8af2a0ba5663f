"""The diagnosis's statistics on the exact linear chain: per-step shares against the exact
per-step gradients, and the predicted cos(B) against cosines measured on independent batches.

Tolerances are stated per test: the pilot's sampling error at its size (the shares of a
pilot of 4,000 pathwise rows: about 0.01; cos(B) from 200 prompt groups: within 0.05 of the
cosine measured on 2,000 independent batches, whose own error is below 0.01)."""
import math

import pytest
import torch

from halforder.estimators import Plan, estimate, flatten
from halforder.estimators.baselines import LeaveOneOut
from halforder.estimators.families import make_sampler
from halforder.planning.diagnose import diagnose, kind_of
from halforder.planning.diagnosis import StepShares, batch_curve, step_shares, trace_covariance, unbiased_dot
from halforder.toy import linear_chain

T = 6


class LinearTask:
    """The linear chain as a training task (one chain for every item)."""

    def __init__(self):
        self.base, p = linear_chain(T=T, d=2, sigma=0.5, tau=0.0, seed=1)
        self.params = {k: torch.nn.Parameter(v.clone()) for k, v in p.items()}
        self.T = T

    def trainable(self):
        return self.params

    def chain(self, plan, items, generator=None):
        return self.base


@pytest.fixture(scope="module")
def task():
    return LinearTask()


def _exact_shares(task):
    exact = task.base.exact_step_grads({k: v.detach() for k, v in task.params.items()})
    m = torch.cat([exact[k].reshape(T, -1) for k in exact], 1)
    return (m @ m.sum(0)) / (m.sum(0) @ m.sum(0))


def test_u_statistics_are_unbiased_where_the_plug_in_is_not():
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([0.3, -0.1])
    X = mu + torch.randn((20_000, 5, 2), generator=g, dtype=torch.float64)   # 20,000 sets of 5 rows
    u = torch.stack([unbiased_dot(x, x) for x in X])
    plug = torch.stack([x.mean(0) @ x.mean(0) for x in X])
    assert float(u.mean()) == pytest.approx(float(mu @ mu), abs=0.01)          # E|mean|^2 = |mu|^2 + 2/5
    assert float(plug.mean()) == pytest.approx(float(mu @ mu) + 2 / 5, abs=0.02)
    assert float(torch.stack([trace_covariance(x) for x in X]).mean()) == pytest.approx(2.0, abs=0.02)


def test_pathwise_step_shares_are_the_exact_ones(task):
    d = diagnose(task, make_sampler("full", T), ["a"], estimator="full", budget=2 * T * 4000 + 100, max_groups=500)
    assert d.pilot["rows"] >= 4000 and d.spent <= d.budget
    exact = _exact_shares(task)
    for t in range(T):
        assert d.steps.share[t] == pytest.approx(float(exact[t]), abs=0.02), t
    assert sum(d.steps.share) == pytest.approx(1.0, abs=1e-9)


def test_predicted_cosines_match_the_formula_on_independent_batches(task):
    """REINFORCE with the leave-one-out baseline in groups of G = 4: the pilot's cos(B) against
    the formula's exact value |m| / sqrt(E|g_B|^2), with m the exact gradient and E|g_B|^2 from
    2,000 independent batches of B samples. (The mean cosine itself is larger at small B in
    these 6 dimensions: 0.50 against 0.43 at B = 8; the formula, a ratio of root mean squares,
    is exact only as the dimension grows: docs/why-my-reward-does-not-rise.md.)"""
    d = diagnose(task, make_sampler("reinforce", T), ["a", "b"], estimator="reinforce", group_size=8,
                 budget=3 * T * 8 * 200 + 10_000, max_groups=200)
    curve = next(c for c in d.curves if c.name == "reinforce, leave-one-out" and c.group == 4)
    params = {k: v.detach() for k, v in task.params.items()}
    truth = flatten(task.base.exact_grad(params))
    for B in (8, 32):
        n = 2000 * B
        x_T = task.base.sample_start(n, torch.Generator().manual_seed(B))
        est = estimate(task.base, Plan.reinforce(T), params, x_T, per_sample=True, baseline=LeaveOneOut(4),
                       generator=torch.Generator().manual_seed(B + 1))
        batches = flatten(est.grad, True).view(2000, B, -1).mean(1)
        formula = float(truth.norm() / batches.pow(2).sum(1).mean().sqrt())
        assert curve.cosine(B) == pytest.approx(formula, abs=0.05), (B, curve.cosine(B), formula)
        lo, hi = curve.interval(B)
        assert lo < curve.cosine(B) < hi


def test_a_biased_estimator_has_a_limit_below_one_and_the_smallest_batch_follows_the_curve():
    g = torch.Generator().manual_seed(3)
    m = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    Y = m + 2.0 * torch.randn((4000, 3), generator=g, dtype=torch.float64)
    X = Y * torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) + torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    c = batch_curve("tilted", X, Y, 1, generator=g)
    assert c.limit == pytest.approx(1 / math.sqrt(2), abs=0.05)
    assert c.smallest_batch(0.9) is None
    u = batch_curve("unbiased", Y, Y, 2, generator=g)
    B = u.smallest_batch(0.5)
    assert u.cosine(B) >= 0.5 > u.cosine(B - 2) and B % 2 == 0


def test_the_suggestion_keeps_the_steps_that_carry_the_signal():
    s = StepShares((0.05, 0.5, 0.4, 0.05), (0.1, 0.9, 0.8, 0.1), (1.0,) * 4, 1.0)
    assert s.suggest() == {"steps": [2, 3], "window": [2, 3]}
    assert step_shares(torch.ones((4, 3, 2))).share == pytest.approx((1 / 3,) * 3)


def test_families_without_a_per_step_term_are_refused():
    for name in ("zeroth_order", "rlr", "rlr_no_zo"):
        with pytest.raises(ValueError, match="use halforder plan"):
            kind_of(name)


def test_a_budget_too_small_for_one_pilot_is_refused_before_any_evaluation(task):
    with pytest.raises(ValueError, match="too small for the pilot"):
        diagnose(task, make_sampler("reinforce", T), ["a"], estimator="reinforce", budget=100)
