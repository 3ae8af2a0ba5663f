"""The toy chains' exact quantities are exact: moments against Monte Carlo, gradients
against finite differences."""
import math

import torch

from halforder.toy import Cosine, Quadratic, linear_chain, mean_test

ALPHA = 1e-4  # false-failure rate of each statistical assertion


def _rollout(chain, params, n, g):
    x = chain.sample_start(n, g)
    W, b = params["W"], params["b"]
    for t in range(chain.T, 0, -1):
        E = torch.randn((n, chain.d, chain.d), generator=g, dtype=x.dtype)
        e = torch.randn((n, chain.d), generator=g, dtype=x.dtype)
        Wt = W + chain.tau(t) * E
        x = (Wt @ x.unsqueeze(-1)).squeeze(-1) + b + chain.tau(t) * e
        x = x + chain.sigma(t) * torch.randn(x.shape, generator=g, dtype=x.dtype)
    return x


def test_exact_moments_match_monte_carlo():
    chain, params = linear_chain(T=5, d=3, sigma=0.4, tau=0.3, seed=3)
    mu, cov = chain.moments(params)
    x = _rollout(chain, params, 200_000, torch.Generator().manual_seed(0))
    # first and second moments jointly: E[x] = mu and E[x x^T] = cov + mu mu^T
    feats = torch.cat([x, (x.unsqueeze(2) * x.unsqueeze(1)).flatten(1)], 1)
    truth = torch.cat([mu, (cov + torch.outer(mu, mu)).flatten()])
    assert not mean_test(feats, truth).rejects(ALPHA)
    r = chain.reward(x)
    assert abs(r.mean() - chain.exact_objective(params)) < 5 * r.std() / math.sqrt(len(r))


def test_exact_gradient_matches_finite_differences():
    chain, params = linear_chain(T=6, d=3, sigma=0.3, tau=0.2, seed=5)
    grad = chain.exact_grad(params)
    for name, p in params.items():
        for idx in [(0,) * p.dim(), tuple(s - 1 for s in p.shape)]:
            hi = {k: v.clone() for k, v in params.items()}
            lo = {k: v.clone() for k, v in params.items()}
            hi[name][idx] += 1e-6
            lo[name][idx] -= 1e-6
            fd = (chain.exact_objective(hi) - chain.exact_objective(lo)) / 2e-6
            assert torch.isclose(fd, grad[name][idx], rtol=1e-6, atol=1e-8)


def test_per_step_gradients_sum_to_the_gradient_and_give_the_truncation_bias():
    chain, params = linear_chain(T=7, d=2, seed=1)
    steps = chain.exact_step_grads(params)
    total = chain.exact_grad(params)
    bias = chain.exact_truncation_bias(params, 3)
    for k in params:
        assert steps[k].shape == (7, *params[k].shape)
        assert torch.allclose(bias[k], total[k] - steps[k][:3].sum(0))
    assert all(torch.allclose(v, torch.zeros_like(v)) for v in chain.exact_truncation_bias(params, 7).values())


def test_cosine_expectation_is_exact_on_a_gaussian_chain():
    reward = Cosine(torch.tensor([1.0, -0.5], dtype=torch.float64), k=3.0)
    chain, params = linear_chain(T=4, d=2, sigma=0.3, tau=0.0, reward=reward, seed=2)
    r = reward(_rollout(chain, params, 200_000, torch.Generator().manual_seed(1)))
    assert abs(r.mean() - chain.exact_objective(params)) < 5 * r.std() / math.sqrt(len(r))


def test_quadratic_target_reward():
    target = torch.tensor([1.0, 2.0], dtype=torch.float64)
    R = Quadratic.target(target, scale=2.0)
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(R(x), torch.tensor([0.0, -10.0], dtype=torch.float64))
