"""Tests of halforder.estimators.theory: h* against brute force, the budget, eq. (19),
the truncation bias of Prop. 6.1 against Monte Carlo, and the Thm. 6.4 algebra."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from halforder.estimators import Plan
from halforder.estimators import theory
from halforder.estimators import draw_estimates, flatten
from halforder.toy import LinearGaussianChain, Quadratic, mean_test

ALPHA = 1e-3  # Hotelling tests below: false-failure rate 1e-3 per test under H0


def brute_surrogate(h, T, V_h, V_z, ordered_pairs=False):
    """Eq. (14) summed term by term: per-step stds s_t, sum s_t^2 + 2 sum_{t<t'} s_t s_t'
    (x2 again for ordered pairs)."""
    s = np.array([V_h] * (h + 1) + [V_z] * (T - 1 - h))
    pairs = np.triu(np.outer(s, s), 1).sum()
    return float((s ** 2).sum() + (4 if ordered_pairs else 2) * pairs)


costs = st.floats(0.0, 10.0, allow_nan=False)
stds = st.floats(0.0, 100.0, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(T=st.integers(2, 80), V_h=stds, V_z=stds, B_h=costs, B_z=costs, frac=st.floats(-0.2, 1.2),
       ordered=st.booleans())
def test_h_star_is_brute_force_minimum_and_feasible(T, V_h, V_z, B_h, B_z, frac, ordered):
    lo, hi = min(B_z * (T - 1), B_h * (T - 1)), max(B_z * (T - 1), B_h * (T - 1))
    B = lo + frac * (hi - lo)
    feas = [h for h in range(T) if B_h * h + B_z * (T - 1 - h) <= B]
    if not feas:
        with pytest.raises(ValueError):
            theory.solve_h_star(T, V_h, V_z, B, B_h, B_z, ordered)
        return
    r = theory.solve_h_star(T, V_h, V_z, B, B_h, B_z, ordered)
    assert list(r.feasible) == feas
    # the budget constraint is never violated
    assert B_h * r.h + B_z * (T - 1 - r.h) <= B
    # exact minimum over all feasible integers (float rounding of two summation orders only)
    brute = [brute_surrogate(h, T, V_h, V_z, ordered) for h in feas]
    assert brute[feas.index(r.h)] <= min(brute) * (1 + 1e-12) + 1e-12
    if not ordered:
        # derived in the module docstring: S(h) = (sum of stds)^2 is monotone in h,
        # so h* is the largest affordable h when V_h < V_z and the smallest otherwise
        # (up to exact float ties of the surrogate when V_z - V_h is below rounding)
        expected = max(feas) if V_h < V_z else min(feas)
        S = theory.variance_surrogate
        assert r.h == expected or S(r.h, T, V_h, V_z) == S(expected, T, V_h, V_z)


@given(T=st.integers(2, 200), V_h=st.floats(0.0, 10.0), gap=st.floats(1e-3, 10.0), h=st.integers(0, 199))
def test_eq18_coefficients_and_vertex(T, V_h, gap, h):
    h = h % T
    V_z = V_h + gap
    a, b, c = theory.quadratic_coefficients(T, V_h, V_z)
    Q = a * (h + 1) ** 2 + b * (h + 1) + c
    assert Q == pytest.approx(theory.variance_surrogate(h, T, V_h, V_z), rel=1e-9, abs=1e-9 * c)
    vertex = theory.vertex_h(T, V_h, V_z)
    assert vertex + 1 == pytest.approx(-b / (2 * a), rel=1e-12)
    assert vertex >= T - 1 - 1e-9  # the minimum of Q lies at or beyond the last feasible h
    # eq. (19) as printed is the vertex of Q halved (in h + 1)
    assert theory.paper_vertex_h(T, V_h, V_z) + 1 == pytest.approx((vertex + 1) / 2, rel=1e-12)


def test_paper_setting_and_where_eq8_disagrees():
    # sec. 4.2: B_h = 8 GB, B_z = 0.24 GB, T = 50; a 30 GB budget gives h = 2
    T, B_h, B_z, V_h, V_z = 50, 8.0, 0.24, 1.0, 100.0
    for B, h in ((30.0, 2), (40.0, 3)):
        r = theory.solve_h_star(T, V_h, V_z, B, B_h, B_z)
        assert (r.h, r.paper_h, r.h_budget) == (h, h, h)
    # a budget that affords every h: the surrogate keeps decreasing up to h = T-1 = 49,
    # but eq. (8) stops at floor(T V_z / (2 (V_z - V_h)) - 1) = 24
    r = theory.solve_h_star(T, V_h, V_z, 1000.0, B_h, B_z)
    assert r.h == 49 and r.decreasing
    assert r.paper_h == math.floor(50 * 100 / (2 * 99) - 1) == 24
    assert theory.variance_surrogate(49, T, V_h, V_z) < theory.variance_surrogate(24, T, V_h, V_z)


def test_input_errors():
    with pytest.raises(ValueError, match="no h"):
        theory.solve_h_star(10, 1.0, 2.0, B=0.5, B_h=1.0, B_z=0.1)
    with pytest.raises(ValueError, match="T >= 2"):
        theory.variance_surrogate(0, 1, 1.0, 2.0)
    with pytest.raises(ValueError, match="h=10 is too large"):
        theory.budget_cost(10, 10, 1.0, 0.1)
    with pytest.raises(ValueError, match="V_h < V_z"):
        theory.paper_h_star(10, 2.0, 1.0, 5.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="gamma"):
        theory.sgd_bound(10, gamma=1.0, L=2.0, delta0=1.0, sigma2=1.0)


def _long_memory_chain(T=6, d=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    reward = Quadratic.target(torch.tensor([1.0, -0.5], dtype=torch.float64))
    chain = LinearGaussianChain(T, d, 0.5, 0.1, reward, torch.tensor([0.5, 1.0], dtype=torch.float64))
    return chain, {"W": 0.95 * Q, "b": torch.tensor([0.2, -0.1], dtype=torch.float64)}


def test_truncation_bias_matches_monte_carlo():
    chain, params = _long_memory_chain()
    truth = flatten(chain.exact_grad(params))
    norms, rel, total = theory.truncation_bias_curve(chain, params)
    assert total == pytest.approx(float(truth.norm()), rel=1e-12)
    assert norms[-1] == 0.0
    g = torch.Generator().manual_seed(0)
    for k in (1, 3):
        bias = flatten(theory.truncation_bias(chain, params, k))
        assert float(bias.norm()) == pytest.approx(norms[k - 1], rel=1e-12)
        s = draw_estimates(chain, Plan.truncated(chain.T, k), params, 40_000, generator=g)
        # E[truncated-k] = grad J - bias: Hotelling at ALPHA
        assert not mean_test(s.grad, truth - bias).rejects(ALPHA)
        # and the bias is large enough here that the same samples reject "no bias" (power check)
        assert mean_test(s.grad, truth).rejects(ALPHA)


def test_truncation_bias_needs_exact_chain():
    with pytest.raises(ValueError, match="exact"):
        theory.truncation_bias(object(), {}, 1)


@given(K=st.integers(0, 10_000), L=st.floats(1e-3, 1e3), delta0=st.floats(1e-6, 1e3), sigma2=st.floats(0.0, 1e3))
def test_theorem_6_4_step_size_achieves_the_bound(K, L, delta0, sigma2):
    gamma = theory.theorem_6_4_step_size(K, L, delta0, sigma2)
    assert 0 < gamma <= 1 / L
    bound = theory.theorem_6_4_bound(K, L, delta0, sigma2)
    assert theory.sgd_bound(K, gamma, L, delta0, sigma2) <= bound * (1 + 1e-12) + 1e-300


def test_smoothness_of_a_quadratic():
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    L = theory.smoothness(lambda p: -(p["x"] @ A @ p["x"]) + p["y"].sum(), {"x": torch.ones(2, dtype=torch.float64),
                                                                            "y": torch.ones(3, dtype=torch.float64)})
    assert L == pytest.approx(2 * float(torch.linalg.eigvalsh(A).max()), rel=1e-12)


def test_measured_step_variances_order_on_linear_chain():
    # HO's score x_t eps/sigma has per-sample trace variance ~ R^2 d (|x|^2 + 1) / sigma^2,
    # ZO's eps'/tau ~ R^2 (d^2 + d) / tau^2: with sigma = 0.5, tau = 0.1, d = 2 ZO is larger.
    chain, params = _long_memory_chain()
    sv = theory.measure_step_variances(chain, params, 4096, generator=torch.Generator().manual_seed(1), steps=(2, 4))
    assert sv.steps == (2, 4) and len(sv.ho) == len(sv.zo) == 2
    assert sv.V_h == pytest.approx(math.sqrt(np.mean(sv.ho)))
    assert sv.V_h < sv.V_z and sv.fo1 < min(sv.ho)


def test_paired_zo_variance_meets_its_first_order_floor():
    """On a linear-Gaussian chain paired ZO's variance per pair is its floor
    m d sum_t E|g_t|^2 + 2 E|G|^2 - |E G|^2 (theory.paired_zo_floor) up to O(tau^2), and not
    the floor of one shared perturbation, d sum_t E|g_t|^2, which is m times smaller.
    Both are estimates: the test allows 4 combined standard errors (false failure about 6e-5
    under normality; fixed seeds)."""
    from halforder.estimators.theory import paired_zo_floor, pathwise_step_gradients
    from halforder.toy import linear_chain

    T, n, pairs = 6, 4000, 20000
    base, params = linear_chain(T=T, d=3, sigma=0.5, tau=0.0)
    noisy, _ = linear_chain(T=T, d=3, sigma=0.5, tau=1e-3)
    g = pathwise_step_gradients(lambda plan: base, params, T, n, seed=0)
    assert g.shape == (T, n, 12)
    floor = paired_zo_floor(g)
    m, d = T, 12
    G = g.sum(0)
    per_sample = m * d * g.pow(2).sum((0, 2)) + 2 * G.pow(2).sum(1)
    floor_se = float(per_sample.std()) / n ** 0.5
    z = draw_estimates(noisy, Plan.zeroth_order(T), params, pairs, generator=torch.Generator().manual_seed(1),
                       pairing="param").grad
    dev = (z - z.mean(0)).pow(2).sum(1)
    measured, measured_se = float(dev.mean()), float(dev.std()) / pairs ** 0.5
    se = (floor_se ** 2 + measured_se ** 2) ** 0.5
    assert abs(measured - floor) < 4 * se, (measured, floor, se)
    shared = d * float(g.pow(2).sum((0, 2)).mean())
    assert abs(measured - shared) > 20 * se
