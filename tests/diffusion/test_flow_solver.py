"""The flow-matching solver against diffusers' FlowMatchEulerDiscreteScheduler (ODE steps) and
against the SDE and CPS formulas written out here from their definitions (docs/flow.md)."""
import math

import pytest
import torch

from halforder.diffusion.sampling.solvers import FlowMatchSolver, make_solver


def _scheduler(**kw):
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler(**kw)


SCHEDULES = [dict(shift=1.0), dict(shift=3.0),
             dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                  max_image_seq_len=4096)]


@pytest.mark.parametrize("T", [4, 10, 28])
@pytest.mark.parametrize("config", SCHEDULES, ids=["shift1", "shift3", "dynamic"])
def test_ode_steps_are_the_schedulers_bit_for_bit(T, config):
    dynamic = config.get("use_dynamic_shifting", False)
    mu = 0.83 if dynamic else None
    sched = _scheduler(**config)
    solver = make_solver(sched, T, mu=mu)
    ref = _scheduler(**config)
    ref.set_timesteps(T, **({"mu": mu} if dynamic else {}))
    g = torch.Generator().manual_seed(T)
    x = torch.randn(3, 4, 8, 8, generator=g)
    for i, ts in enumerate(ref.timesteps):
        t = T - i
        assert float(solver.timesteps[t - 1]) == float(ts)
        v = torch.randn(x.shape, generator=g)
        want = ref.step(v, ts, x).prev_sample
        got = solver.step(t, x, v)
        assert solver.sigma(t) == 0.0
        assert torch.equal(got, want), (t, (got - want).abs().max())
        x = want


def test_the_pipelines_own_sigmas_and_mu_are_used():
    import numpy as np

    T, mu = 6, 0.7
    sched = _scheduler(**SCHEDULES[2])
    sigmas = np.linspace(1.0, 1 / T, T)
    solver = make_solver(sched, T, mu=mu, sigmas=sigmas)
    ref = _scheduler(**SCHEDULES[2])
    ref.set_timesteps(sigmas=sigmas, mu=mu)
    assert solver.sigmas == tuple(float(s) for s in ref.sigmas)
    assert torch.equal(solver.timesteps.flip(0), ref.timesteps)


def _sde_reference(x, v, s, s_next, a, first_below_one):
    """Flow-GRPO's reverse SDE step, from the issue's formulas."""
    dt = s_next - s
    std_dev_t = a * math.sqrt(s / (1 - (first_below_one if s == 1 else s)))
    mean = x * (1 + std_dev_t ** 2 * dt / (2 * s)) + v * (1 + std_dev_t ** 2 * (1 - s) / (2 * s)) * dt
    return mean, std_dev_t * math.sqrt(-dt)


def _cps_reference(x, v, s, s_next, a):
    std = s_next * math.sin(a * math.pi / 2)
    x0, x1 = x - s * v, x + (1 - s) * v
    return x0 * (1 - s_next) + x1 * math.sqrt(s_next ** 2 - std ** 2), std


@pytest.mark.parametrize("noise", ["sde", "cps"])
@pytest.mark.parametrize("config", SCHEDULES[:2], ids=["shift1", "shift3"])
def test_sde_and_cps_steps_follow_their_formulas(noise, config):
    T, a = 10, 0.7
    solver = make_solver(_scheduler(**config), T, etas=a, noise=noise)
    sig = solver.sigmas
    assert sig[0] == 1.0 and sig[-1] == 0.0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, generator=g)
    for t in range(T, 0, -1):
        s, s_next = sig[T - t], sig[T - t + 1]
        v = torch.randn(x.shape, dtype=torch.float64, generator=g)
        mean, std = (_sde_reference(x, v, s, s_next, a, sig[1]) if noise == "sde"
                     else _cps_reference(x, v, s, s_next, a))
        torch.testing.assert_close(solver.step(t, x, v), mean, rtol=1e-12, atol=1e-12)
        assert solver.sigma(t) == pytest.approx(std, rel=1e-12)
    # CPS adds no noise on the last step (sigma_next = 0); the SDE does
    assert (solver.sigma(1) == 0) == (noise == "cps")


def test_sde_keeps_the_flow_marginal_to_first_order():
    """A check of the derivation (docs/flow.md): for x_s = (1 - s) x0 + s x1 with a point mass x0
    (so v(x) = (x - x0) / s exactly), one SDE step from x_s lands on the law of x_{s'}: mean
    (1 - s') x0 and variance s'^2, up to O(dt^2)."""
    solver = make_solver(_scheduler(shift=1.0), 1000, etas=0.7)
    t = 500
    s, s_next = solver.sigmas[1000 - t], solver.sigmas[1000 - t + 1]
    x0, n = 0.3, 400_000
    x = (1 - s) * x0 + s * torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean = solver.step(t, x, (x - x0) / s)
    y = mean + solver.sigma(t) * torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # 5 standard errors of the sample moments; the O(dt^2) terms are ~1e-6 here
    assert float(y.mean()) == pytest.approx((1 - s_next) * x0, abs=5 * s_next / n ** 0.5)
    assert float(y.var()) == pytest.approx(s_next ** 2, abs=5 * s_next ** 2 * (2 / n) ** 0.5)


def test_bad_settings_are_refused():
    sched = _scheduler(shift=3.0)
    with pytest.raises(ValueError, match="noise must be"):
        make_solver(sched, 4, noise="ode")
    with pytest.raises(ValueError, match=r"CPS etas must lie in \[0, 1\]"):
        make_solver(sched, 4, etas=1.5, noise="cps")
    with pytest.raises(ValueError, match="give mu"):
        make_solver(_scheduler(**SCHEDULES[2]), 4)
    from halforder.diffusion.models.components import SD_SCHEDULER_CONFIG, make_scheduler
    with pytest.raises(ValueError, match="is for flow-matching models"):
        make_solver(make_scheduler("ddim", SD_SCHEDULER_CONFIG), 4, noise="cps")
    assert isinstance(make_solver(sched, 4).with_etas(0.5), FlowMatchSolver)
