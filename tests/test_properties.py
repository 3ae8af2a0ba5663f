"""Property-based unbiasedness: over random linear-Gaussian chains (T, d, per-step noise
scales) and random valid plans (every named family and random role assignments), the mean
of the per-sample estimates matches the exact gradient.

Each example is Hotelling's T^2 test at level ALPHA; hypothesis runs MAX_EXAMPLES derandomized
examples with seeds drawn from the example, so the test is deterministic and its
false-failure rate (over the choice of seeds) is at most MAX_EXAMPLES * ALPHA = 0.2%."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from halforder.estimators import Plan, Role, draw_estimates, flatten
from halforder.toy import linear_chain, mean_test

ALPHA = 1e-4
MAX_EXAMPLES = 20
N = 40_000


@st.composite
def random_plan(draw, T):
    """A named family, or FO on a prefix 1..K, then HO/ZO at random, HO runs cut into blocks."""
    kind = draw(st.sampled_from(["full", "reinforce", "zeroth_order", "rlr", "random"]))
    if kind == "full":
        return Plan.full(T)
    if kind == "reinforce":
        return Plan.reinforce(T)
    if kind == "zeroth_order":
        return Plan.zeroth_order(T)
    if kind == "rlr":
        h = draw(st.integers(0, T - 1))
        return Plan.rlr(T, h, None if h == 0 else draw(st.integers(2, T - h + 1)))
    K = draw(st.integers(0, T))
    roles = [Role.FO] * K + [draw(st.sampled_from([Role.HO, Role.ZO])) for _ in range(T - K)]
    blocks, t = [], 1
    while t <= T:
        if roles[t - 1] is Role.HO:
            h = 1
            while t + h <= T and roles[t + h - 1] is Role.HO and draw(st.booleans()):
                h += 1
            blocks.append((t, h))
            t += h
        else:
            t += 1
    return Plan.from_roles(roles, blocks=blocks)


@settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), T=st.integers(1, 6), d=st.integers(1, 3), seed=st.integers(0, 2 ** 16))
def test_every_valid_plan_is_unbiased_on_random_linear_chains(data, T, d, seed):
    sigmas = data.draw(st.lists(st.floats(0.2, 1.0), min_size=T, max_size=T), label="sigmas")
    taus = data.draw(st.lists(st.floats(0.1, 0.5), min_size=T, max_size=T), label="taus")
    plan = data.draw(random_plan(T), label="plan")
    chain, params = linear_chain(T=T, d=d, sigma=sigmas, tau=taus, seed=seed, spectral_radius=0.8)
    truth = flatten(chain.exact_grad(params))
    s = draw_estimates(chain, plan, params, N, generator=torch.Generator().manual_seed(seed))
    result = mean_test(s.grad, truth)
    assert not result.rejects(ALPHA), (str(plan), result.pvalue, result.z)
