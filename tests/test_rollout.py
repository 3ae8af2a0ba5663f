"""One rollout: every estimator, the per-step gradients, the memory model and the diffusion
sampler draw their noise and roll the chain out through :mod:`halforder.estimators.rollout`.

The oracles below are the rollouts as each caller wrote them before they shared one function
(kept verbatim in their logic, as optax keeps a reference Adam): the shared rollout must give
the same draws and the same results, bit for bit, on the toy chains and the tiny SD chain.
"""
import pytest
import torch

from halforder.estimators import Plan, estimate
from halforder.estimators.pairing import Pairing, grouped
from halforder.estimators.protocol import detach, latent, with_latent
from halforder.estimators.rollout import draw_noise, roll_out
from halforder.estimators.theory import step_gradients
from halforder.toy import linear_chain, tanh_chain


# ----------------------------------------------------------------------------- oracles
def _step(chain, t, x, params, dtheta, sig, eps):
    if dtheta is not None:
        params = {k: v + dtheta[k] for k, v in params.items()}
    mean = chain.step(t, x, params)
    return mean if eps is None else with_latent(mean, latent(mean) + sig * eps)


def _grads(surrogate, leaves):
    gs = torch.autograd.grad(surrogate, list(leaves.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), gs)}


def leave_one_out(R, group):
    N = R.shape[0]
    own = R.reshape(N // group, group).sum(1, keepdim=True).expand(N // group, group).reshape(N)
    return (R.sum(0, keepdim=True) - own) / (N - group)


def oracle_estimate(chain, plan, params, x_T, generator, baseline, pairing):
    """The engine's rollout and terms as written before the shared rollout (per-sample)."""
    pairing = Pairing.parse(pairing)
    G, N = pairing.size, latent(x_T).shape[0]
    ends = {j for j, _ in plan.blocks}
    leaves = {k: v.detach().unsqueeze(0).repeat(N, *([1] * v.dim())).requires_grad_() for k, v in params.items()}
    frozen = {k: v.detach() for k, v in leaves.items()}
    K = plan.fo_steps
    block_start = {j + h - 1: (j, h) for j, h in plan.blocks}
    ho_steps, zo_steps = set(plan.steps("HO")), set(plan.steps("ZO"))
    zo_sum = {k: v.new_zeros((N, *v.shape)) for k, v in params.items()}
    stored, noise, x = {}, {}, x_T
    for t in range(plan.T, 0, -1):
        tau, sig = float(chain.tau(t)), float(chain.sigma(t))
        dtheta = {k: pairing.expand(torch.randn((N // G, *v.shape), generator=generator, dtype=v.dtype)
                                    .mul_(tau), "param") for k, v in params.items()} if tau > 0 else None
        lat = latent(x)
        eps = pairing.expand(torch.randn((N // G, *lat.shape[1:]), generator=generator, dtype=lat.dtype),
                             "ho" if t in ends else "inherent") if sig > 0 else None
        if t in block_start:
            stored[block_start[t]] = detach(x)
        if t in ho_steps:
            noise[t] = (dtheta, eps)
        if t in zo_steps:
            for k in zo_sum:
                zo_sum[k].add_(dtheta[k], alpha=1.0 / tau ** 2)
        with torch.set_grad_enabled(t <= K):
            x = _step(chain, t, x, leaves if t <= K else frozen, dtheta, sig, eps)
    with torch.set_grad_enabled(K > 0):
        R = chain.reward(latent(x))
    zeros = {k: v.new_zeros((N, *v.shape)) for k, v in params.items()}
    fo = _grads(R.sum(), leaves) if K > 0 else dict(zeros)
    w = R.detach() - (leave_one_out(R.detach(), G) if baseline == "loo" else 0.0)
    ho = dict(zeros)
    for (j, h), x_in in stored.items():
        with torch.enable_grad():
            xb = x_in
            for t in range(j + h - 1, j, -1):
                dtheta, eps = noise[t]
                xb = _step(chain, t, xb, leaves, dtheta, float(chain.sigma(t)), eps)
            dtheta, eps_j = noise[j]
            mean = chain.step(j, xb, leaves if dtheta is None else {k: v + dtheta[k] for k, v in leaves.items()})
            score = (latent(mean) * eps_j).flatten(1).sum(1) / float(chain.sigma(j))
            g = _grads((w * score).sum(), leaves)
        ho = {k: ho[k] + g[k] for k in ho}
    zo = {k: s * w.view(N, *([1] * (s.dim() - 1))) for k, s in zo_sum.items()} if zo_steps else dict(zeros)
    return {k: fo[k] + ho[k] + zo[k] for k in params}, R.detach()


def oracle_sampler(chain, x_T, generator):
    """The diffusion sampler's rollout as written before (no parameter noise, eps drawn where
    sigma_t > 0)."""
    x = x_T
    with torch.no_grad():
        for t in range(chain.T, 0, -1):
            mean = chain.step(t, x, {})
            sig = float(chain.sigma(t))
            if sig > 0:
                z = latent(mean)
                mean = with_latent(mean, z + sig * torch.randn(z.shape, generator=generator, dtype=z.dtype))
            x = mean
    return latent(x)


# ----------------------------------------------------------------------------- the tests
def _plans(T):
    return [Plan.full(T), Plan.truncated(T, 2), Plan.reinforce(T), Plan.zeroth_order(T), Plan.rlr(T, 0),
            Plan.rlr(T, 2, 3), Plan.from_roles(["FO", "HO", "HO", "ZO", "HO", "NONE"][:T], blocks=[(2, 2), (5, 1)])]


@pytest.mark.parametrize("make", [lambda: linear_chain(T=6, d=3, seed=1), lambda: tanh_chain(T=6, d=3, seed=2)],
                         ids=["linear", "tanh"])
@pytest.mark.parametrize("pairing", ["none", "param", "ho", "param+ho"])
def test_estimate_draws_and_results_are_the_old_engine_bit_for_bit(make, pairing):
    chain, params = make()
    G = Pairing.parse(pairing).size
    for plan in _plans(chain.T):
        for baseline in (None, "loo"):
            g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
            x_T = grouped(chain.sample_start(8 // G, torch.Generator().manual_seed(3)), G)
            new = estimate(chain, plan, params, x_T, generator=g1, per_sample=True, baseline=baseline,
                           pairing=pairing)
            old, R = oracle_estimate(chain, plan, params, x_T, g2, baseline, pairing)
            assert torch.equal(new.reward, R), (plan, baseline)
            for k in params:
                assert torch.equal(new.grad[k], old[k]), (str(plan), baseline, k)
            assert torch.equal(g1.get_state(), g2.get_state())     # the same number of draws


def test_step_gradients_draw_as_the_engine_does():
    """The per-step gradients' rollout is the engine's: summed over steps 1..K they are
    truncated(K)'s estimate on the same seed, and full backprop's at K = T."""
    chain, params = linear_chain(T=5, d=3, seed=4)
    x_T = chain.sample_start(6, torch.Generator().manual_seed(0))
    g, R, _ = step_gradients(chain, params, x_T, generator=torch.Generator().manual_seed(5))
    for K in (1, 3, 5):
        est = estimate(chain, Plan.truncated(5, K), params, x_T, generator=torch.Generator().manual_seed(5),
                       per_sample=True)
        flat = torch.cat([est.grad[k].reshape(6, -1) for k in params], 1)
        torch.testing.assert_close(g[:, :K].sum(1), flat, rtol=1e-12, atol=1e-12)
        assert torch.equal(est.reward, R)


def test_one_draw_function_in_the_source():
    """Every noise draw of a step goes through draw_noise: no other module draws eps or eps'."""
    import pathlib
    import re
    src = pathlib.Path(__file__).resolve().parents[1] / "src" / "halforder"
    drawing = [p.relative_to(src).as_posix() for p in src.rglob("*.py")
               if re.search(r"randn\(\s*\(?\s*(N\s*//\s*G|lat\.shape|z\.shape)", p.read_text())]
    assert drawing == ["estimators/rollout.py"], drawing


def test_draw_noise_draws_parameter_noise_then_inherent_noise():
    chain, params = linear_chain(T=3, d=2, seed=0, tau=0.2, sigma=0.5)
    x = chain.sample_start(4, torch.Generator().manual_seed(0))
    noise = draw_noise(chain, 2, x, params, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    W, b = (torch.randn((4, *params[k].shape), generator=g, dtype=torch.float64) * 0.2 for k in ("W", "b"))
    eps = torch.randn((4, 2), generator=g, dtype=torch.float64)
    assert torch.equal(noise.dtheta["W"], W) and torch.equal(noise.dtheta["b"], b) and torch.equal(noise.eps, eps)
    assert (noise.sigma, noise.tau) == (0.5, 0.2)


def test_roll_out_records_states_noise_and_means():
    chain, params = tanh_chain(T=4, d=2, seed=0)
    x_T = chain.sample_start(3, torch.Generator().manual_seed(0))
    out = roll_out(chain, x_T, params, generator=torch.Generator().manual_seed(1), record=(1, 3))
    assert set(out.steps) == {1, 3}
    s = out.steps[1]
    torch.testing.assert_close(latent(out.x), s.mean + s.noise.sigma * s.noise.eps, rtol=0, atol=0)


@pytest.mark.slow
def test_the_tiny_sd_sampler_is_the_old_rollout_bit_for_bit():
    pytest.importorskip("diffusers")
    from halforder.diffusion import tiny_components
    from halforder.diffusion.sampling.chain import rollout
    from halforder.diffusion.models.sd_chain import make_chain
    c = tiny_components(0)
    chain = make_chain(c, 4, ["a red square", "a blue circle"], lambda x, p: x.mean((1, 2, 3))).with_noise(
        (0.0, 1.0, 0.3, 1.0), 0.0)
    x_T = chain.sample_start(2, torch.Generator().manual_seed(0))
    new = rollout(chain, {}, x_T, generator=torch.Generator().manual_seed(1))
    old = oracle_sampler(chain, x_T, torch.Generator().manual_seed(1))
    assert torch.equal(new, old)
