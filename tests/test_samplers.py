"""Plan samplers: ranges, laws (chi-square tests with stated false-failure rates), validation."""
import math

import pytest
import torch
from scipy import stats

from halforder.estimators import Plan
from halforder.estimators.families import make_sampler
from halforder.estimators.samplers import FixedPlan, PlanSampler, SoftmaxRLR, UniformRLR, WindowRLR, parts_norm


def _counts(sampler, state, n, seed, lo, hi):
    g = torch.Generator().manual_seed(seed)
    c = torch.zeros(hi - lo + 1)
    for _ in range(n):
        (j, _), = sampler.sample(state, g).blocks
        assert lo <= j <= hi
        c[j - lo] += 1
    return c


def _chisq_p(counts, probs):
    return stats.chisquare(counts.numpy(), (probs * counts.sum()).numpy()).pvalue


def test_fixed_plan_families():
    for name, plan in [("full", Plan.full(6)), ("reinforce", Plan.reinforce(6)),
                       ("zeroth_order", Plan.zeroth_order(6))]:
        s = make_sampler(name, 6)
        assert isinstance(s, PlanSampler) and s.T == 6
        assert s.sample(s.init(), torch.Generator()) == plan
    assert make_sampler("truncated", 6, k=3).sample({}) == Plan.truncated(6, 3)
    assert make_sampler("rlr", 6, h=2, j_sampling="fixed", j=3).sample({}) == Plan.rlr(6, 2, 3)
    s = FixedPlan(Plan.full(3))
    assert s.update(s.init(), Plan.full(3), None) == {}


def test_uniform_j_is_uniform_on_its_range():
    # chi-square goodness of fit at level 1e-3: false-failure rate 0.1% for this fixed seed's draw.
    T, h = 10, 3
    s = UniformRLR(T, h)
    c = _counts(s, s.init(), 4000, 0, 2, T - h + 1)
    assert _chisq_p(c, torch.full((T - h,), 1.0 / (T - h))) > 1e-3
    assert (c > 0).all()


def test_uniform_h0_and_extremes():
    assert UniformRLR(5, 0).sample({}) == Plan.rlr(5, 0)
    # h = T-1 leaves one position, j = 2
    assert UniformRLR(5, 4).sample({}, torch.Generator()).blocks == ((2, 4),)
    with pytest.raises(ValueError, match="h"):
        UniformRLR(5, 5)


def test_window_law_and_validation():
    s = WindowRLR(T=50, h=2, a=30, b=40)
    c = _counts(s, s.init(), 3000, 1, 30, 40)
    assert _chisq_p(c, torch.full((11,), 1 / 11)) > 1e-3   # false-failure rate 0.1%
    with pytest.raises(ValueError, match="b - a > h"):
        WindowRLR(T=50, h=3, a=30, b=33)
    with pytest.raises(ValueError, match="does not fit"):
        WindowRLR(T=50, h=2, a=45, b=50)
    with pytest.raises(ValueError, match="does not fit"):
        WindowRLR(T=50, h=2, a=1, b=10)
    with pytest.raises(ValueError, match="window"):
        make_sampler("rlr", 50, h=2, j_sampling="window")


def test_softmax_starts_uniform_and_follows_the_softmax_of_norms():
    T, h = 8, 2
    s = SoftmaxRLR(T, h)
    st = s.init()
    assert torch.allclose(s.probabilities(st), torch.full((T - h,), 1 / (T - h), dtype=torch.float64))
    norms = [0.0, 0.5, 1.0, 2.0, 0.2, 1.5]
    for j, v in zip(s.js, norms):
        st = s.observe(st, j, v)
    expected = torch.softmax(torch.tensor(norms, dtype=torch.float64), 0)
    assert torch.allclose(s.probabilities(st), expected)
    c = _counts(s, st, 5000, 2, 2, T - h + 1)
    assert _chisq_p(c, expected) > 1e-3   # false-failure rate 0.1%


def test_softmax_running_average_and_unseen_fill():
    s = SoftmaxRLR(6, 1, temperature=0.5, decay=0.75)
    st = s.observe(s.init(), 3, 2.0)
    st2 = s.observe(st, 3, 4.0)
    assert st["norm"][1] == 2.0 and st2["norm"][1] == 0.75 * 2.0 + 0.25 * 4.0
    assert int(st2["count"][1]) == 2 and int(st["count"][1]) == 1   # state is not mutated in place
    # unseen positions take the mean of the seen ones (here 2.5), so the law is uniform
    p = s.probabilities(st2)
    assert torch.allclose(p, torch.full_like(p, 1 / len(s.js)))
    with pytest.raises(ValueError):
        s.observe(st, 7, 1.0)
    with pytest.raises(ValueError):
        s.observe(st, 3, float("nan"))


def test_softmax_update_reads_the_HO_part():
    class Est:
        parts = {"HO": {"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}}
    s = SoftmaxRLR(5, 2)
    plan = Plan.rlr(5, 2, 3)
    st = s.update(s.init(), plan, Est())
    assert math.isclose(parts_norm(Est.parts["HO"]), 5.0)
    assert float(st["norm"][3 - 2]) == 5.0


def test_sampling_uses_only_the_given_generator():
    s = SoftmaxRLR(20, 2)
    st = s.init()
    a = [s.sample(st, torch.Generator().manual_seed(5)) for _ in range(3)]
    torch.manual_seed(0)
    b = s.sample(st, torch.Generator().manual_seed(5))
    torch.manual_seed(1)
    c = s.sample(st, torch.Generator().manual_seed(5))
    assert a[0] == a[1] == a[2] == b == c


def test_bad_names():
    with pytest.raises(ValueError, match="unknown estimator"):
        make_sampler("ppo", 5)
    with pytest.raises(ValueError, match="unknown j sampling"):
        make_sampler("rlr", 5, h=1, j_sampling="greedy")
    with pytest.raises(ValueError, match="h <= T-1"):
        make_sampler("rlr", 5, h=7)
    with pytest.raises(ValueError):
        SoftmaxRLR(5, 2, temperature=0.0)
