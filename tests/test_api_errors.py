"""Mistakes in a call of ``estimate`` get a message that names them, not a bare
AttributeError, KeyError or RuntimeError from deep inside the rollout."""
import pytest
import torch

from halforder.estimators import Plan, draw_estimates, estimate
from halforder.toy import linear_chain


@pytest.fixture
def setup():
    chain, params = linear_chain(T=8, d=3)
    x_T = chain.sample_start(8, torch.Generator().manual_seed(0))
    return chain, Plan.rlr(8, 2, 3), params, x_T


class _NoTau:
    """The linear chain without ``tau``."""

    def __init__(self, inner):
        self.inner, self.T = inner, inner.T

    def step(self, t, x, params):
        return self.inner.step(t, x, params)

    def sigma(self, t):
        return self.inner.sigma(t)

    def reward(self, x0):
        return self.inner.reward(x0)

    def sample_start(self, n, generator=None):
        return self.inner.sample_start(n, generator)


def test_a_chain_without_tau_names_the_chain_protocol(setup):
    chain, plan, params, x_T = setup
    with pytest.raises(TypeError, match=r"_NoTau is not a chain: it lacks tau of the chain protocol "
                                        r"\(halforder\.estimators\.protocol\.Chain"):
        estimate(_NoTau(chain), plan, params, x_T)


def test_params_missing_a_key_names_the_key(setup):
    chain, plan, params, x_T = setup
    with pytest.raises(ValueError, match=r"parameter 'b', which params lacks \(params holds: W\)"):
        estimate(chain, plan, {"W": params["W"]}, x_T)


def test_other_key_errors_pass_through_unchanged(setup):
    """Only a parameter lookup is reworded: a KeyError elsewhere (here the reward's) keeps its
    own type and text."""
    chain, plan, params, x_T = setup

    class _Reward:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def reward(self, x0):
            return {}["the reward's own lookup"]

    with pytest.raises(KeyError, match="the reward's own lookup"):
        estimate(_Reward(chain), plan, params, x_T)


@pytest.mark.parametrize("shape", [(8, 4), (8,), (8, 3, 1)])
def test_x_T_of_the_wrong_shape_names_both_shapes(setup, shape):
    chain, plan, params, _ = setup
    with pytest.raises(ValueError, match=r"x_T has per-sample shape .* but the chain's start states have \(3,\)"):
        estimate(chain, plan, params, torch.zeros(shape, dtype=torch.float64))


def test_plan_and_chain_swapped(setup):
    chain, plan, params, x_T = setup
    with pytest.raises(TypeError, match="the plan came first; pass the chain first"):
        estimate(plan, chain, params, x_T)


def test_params_and_x_T_swapped(setup):
    chain, plan, params, x_T = setup
    with pytest.raises(TypeError, match="params must map parameter names to tensors, got Tensor"):
        estimate(chain, plan, x_T, params)


def test_draws_go_through_the_same_check(setup):
    chain, plan, params, _ = setup
    with pytest.raises(TypeError, match="the plan came first"):
        draw_estimates(plan, chain, params, 4, generator=torch.Generator().manual_seed(0))


def test_the_check_draws_nothing_from_the_global_rng(setup):
    chain, plan, params, x_T = setup
    before = torch.get_rng_state()
    estimate(chain, plan, params, x_T, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), before)
