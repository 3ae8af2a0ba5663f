"""The shared pilot: every FO part and every ZO part of the variance model from one set of
per-step gradients (halforder.planning.shared_pilot)."""
import numpy as np
import pytest
import torch

from halforder.estimators import Plan, draw_estimates, estimate, flatten, grouped
from halforder.planning.part_variances import ZOKey, layout, measure_part_variances, zo_pilot
from halforder.estimators.theory import step_gradients
from halforder.planning.shared_pilot import PAIR, measure_step_gradients
from halforder.toy import linear_chain

T, N = 8, 6


@pytest.mark.parametrize("tau", [0.0, 0.2])
def test_sums_of_step_gradients_are_truncated_backprop_on_the_same_noise(tau):
    """sum_{t <= K} g_t is truncated(K)'s per-sample estimate, to rounding, for every K from
    one rollout: on a chain with parameter noise (drawn in mirrored pairs, as the engine
    draws pairing "param") and without. Leaving out one step's leaf (a truncated backward)
    would break the equality at that step."""
    chain, params = linear_chain(T=T, d=3, sigma=0.5, tau=tau, seed=0)
    pairing = PAIR if tau else None
    G = 2 if tau else 1

    def start(seed):
        g = torch.Generator().manual_seed(seed)
        return grouped(chain.sample_start(N // G, g, torch.float64), G), g

    x, g = start(3)
    grads, R, eps = step_gradients(chain, params, x, generator=g, **({"pairing": PAIR} if tau else {}))
    assert grads.shape == (N, T, 12) and eps.shape == (N, T, 12)
    for K in range(1, T + 1):
        x, g = start(3)
        est = estimate(chain, Plan.truncated(T, K), params, x, generator=g, per_sample=True, pairing=pairing)
        torch.testing.assert_close(flatten(est.grad, True), grads[:, :K].sum(1), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(est.reward, R)
    assert (eps.abs().sum() > 0) == bool(tau)


def _direct(chain_for, plan, params, rows, pairing, baseline=None, batch=N):
    """tr Var of one row of ``plan``'s estimate as training draws it (batch x Var(batch mean)
    with the leave-one-out baseline)."""
    G = 2 if pairing == "param" else 1
    if baseline is None:
        s = draw_estimates(chain_for(plan), plan, params, rows, generator=torch.Generator().manual_seed(6),
                           pairing=pairing)
        return float(s.grad.double().var(0).sum())
    B = rows // (batch // G)
    s = draw_estimates(chain_for(plan), plan, params, B * (batch // G), generator=torch.Generator().manual_seed(6),
                       pairing=pairing, baseline=baseline, chunk=batch // G)
    return (batch // G) * float(s.grad.double().reshape(B, batch // G, -1).mean(1).var(0).sum())


@pytest.mark.parametrize("pairing", ["none", "param"])
def test_direct_zo_parts_equal_the_zo_pilots_on_a_chain_whose_noise_is_the_plans(pairing):
    """On a chain with the same parameter noise for every plan (the toy chain, tau = 0.2) the
    ZO part of every layout comes from the shared pilot exactly in distribution, and
    matches the separate ZO pilots of the old search. Both sides from 4000 rows: per-row
    squared deviations with sd/mean below 2.1, so relative standard errors below 3.3% each
    and below 5% for the ratio; the 20% tolerance is 4 standard errors (false-failure rate
    below 1e-4 per layout for other seeds; these are fixed). The paired and unpaired parts
    differ by more than 3x here, so using the wrong row (R instead of (R(+) - R(-))/2) fails."""
    chain, params = linear_chain(T=T, d=3, sigma=0.5, tau=0.2, seed=0)
    m = measure_step_gradients(lambda p: chain, params, T, 4000, N, generator=torch.Generator().manual_seed(0))
    noisy = {t: 0.2 for t in range(1, T + 1)}
    layouts = [(0, ()), (2, ()), (2, ((5, 2),)), (4, ((8, 1),))]
    pilots = measure_part_variances(chain, params, ks=(), blocks=(), zo={ZOKey(K, b, pairing) for K, b in layouts},
                                    n=4000, batch=N, generator=torch.Generator().manual_seed(5))
    for K, b in layouts:
        S = zo_pilot(T, K, b).steps("ZO")
        shared = m.zo({t: 0.2 for t in S}, noisy, pairing, None)
        assert shared == pytest.approx(pilots.zo[ZOKey(K, b, pairing)], rel=0.2), (K, b)
    other = "param" if pairing == "none" else "none"
    ratio = m.zo(noisy, noisy, pairing, None) / m.zo(noisy, noisy, other, None)
    assert not 1 / 3 < ratio < 3


@pytest.mark.parametrize("pairing, baseline", [("param", None), ("none", "loo")])
def test_first_order_zo_parts_match_plans_whose_chain_has_noise_on_their_zo_steps_only(pairing, baseline):
    """As on a diffusion chain, each plan's chain here has parameter noise on its ZO steps
    only (tau from 0.005 to 0.02, small as in the recipes), and the shared pilot's chain has
    none: the ZO part is the first-order formula of the shared_pilot docstring. Against the
    plan's ZO-only estimate measured directly (4000 rows, or 4000 batch means of a batch of
    6 with the leave-one-out baseline): relative standard errors below 5% each, so 20% is
    4 standard errors of the ratio (false-failure rate below 1e-4 per plan; fixed seeds).
    Keeping only the largest step's tau^-2 of the sum over the ZO steps is off by 4x or
    more here and fails."""
    taus = np.linspace(0.005, 0.02, T)

    def chain_for(plan):
        return linear_chain(T=T, d=3, sigma=0.5, tau=[float(taus[t]) if r == "ZO" else 0.0
                                                      for t, r in enumerate(plan.roles)], seed=0)[0]

    _, params = linear_chain(T=T, d=3, sigma=0.5, tau=0.0, seed=0)
    m = measure_step_gradients(chain_for, params, T, 4000, N, generator=torch.Generator().manual_seed(0),
                               baseline=baseline)
    for K, b in [(0, ()), (2, ()), (1, ((4, 2),))]:
        pilot = zo_pilot(T, K, b)
        S = {t: float(taus[t - 1]) for t in pilot.steps("ZO")}
        plan_chain = chain_for(layout(T, K, b))
        direct = _direct(lambda p: plan_chain, pilot, params, 4000, pairing, baseline)
        model = m.zo(S, S, pairing, N if baseline else None)
        assert model == pytest.approx(direct, rel=0.2), (K, b)
        wrong = model / sum(v ** -2 for v in S.values()) * max(S.values()) ** -2
        assert not wrong == pytest.approx(direct, rel=0.5)


def test_the_first_order_model_refuses_a_chain_it_does_not_cover():
    """Parameter noise on steps other than the ZO steps, on a pilot without it, is neither
    case of the model: a clear error, not a number."""
    chain, params = linear_chain(T=T, d=3, sigma=0.5, tau=0.0, seed=0)
    m = measure_step_gradients(lambda p: chain, params, T, 8, N, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="parameter noise"):
        m.zo({3: 0.1}, {3: 0.1, 4: 0.1}, "param", None)


def test_a_checkpointed_shared_pilot_measures_the_same_moments():
    """Where full backprop does not fit the memory budget the shared pilot checkpoints every
    step: the same noise, the same per-step gradients, the same moments (to rounding)."""
    chain, params = linear_chain(T=T, d=3, sigma=0.5, tau=0.2, seed=0)
    a, b = (measure_step_gradients(lambda p: chain, params, T, 24, N, generator=torch.Generator().manual_seed(0),
                                   checkpoint=ck) for ck in (False, True))
    torch.testing.assert_close(a.g.gram, b.g.gram)
    torch.testing.assert_close(a.direct["param"].mean, b.direct["param"].mean)
    assert a.fo(T) > 0


def test_a_shared_pilot_in_smaller_calls_measures_the_same_parts():
    """Where one batch does not fit the memory budget the pilot runs it in calls of fewer
    samples (the leave-one-out baseline still over the whole batch). Other draws, the
    same law: V_FO(T) and the unpaired ZO part from 2000 rows each agree within 27%
    (relative standard errors below 4.7% each, so 4 standard errors of the ratio; fixed
    seeds)."""
    chain, params = linear_chain(T=T, d=3, sigma=0.5, tau=0.2, seed=0)
    noisy = {t: 0.2 for t in range(1, T + 1)}
    a, b = (measure_step_gradients(lambda p: chain, params, T, 2000, N, generator=torch.Generator().manual_seed(s),
                                   baseline="loo", per_call=k) for s, k in ((0, None), (1, 2)))
    assert b.fo(T) == pytest.approx(a.fo(T), rel=0.27)
    assert b.zo(noisy, noisy, "none", N) == pytest.approx(a.zo(noisy, noisy, "none", N), rel=0.27)
