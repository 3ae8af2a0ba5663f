"""Plan construction, roles, blocks, cost model and validation against a chain."""
import pytest

from halforder.estimators import Plan, Role
from halforder.toy import linear_chain


def test_named_plans_have_the_roles_of_design_section_2():
    assert Plan.full(4).roles == (Role.FO,) * 4
    assert Plan.truncated(5, 2).roles == (Role.FO, Role.FO, Role.NONE, Role.NONE, Role.NONE)
    assert Plan.zeroth_order(3).roles == (Role.ZO,) * 3
    assert Plan.reinforce(3).blocks == ((1, 1), (2, 1), (3, 1))
    rlr = Plan.rlr(T=50, h=2, j=17)
    assert rlr.roles[0] is Role.FO and rlr.roles[16] is Role.HO and rlr.roles[17] is Role.HO
    assert rlr.blocks == ((17, 2),)
    assert rlr.steps(Role.ZO) == tuple(t for t in range(2, 51) if t not in (17, 18))
    assert Plan.rlr(6, 0).roles == (Role.FO,) + (Role.ZO,) * 5


def test_unbiasedness_flag():
    assert Plan.full(3).is_unbiased and Plan.rlr(6, 2, 2).is_unbiased and Plan.reinforce(2).is_unbiased
    assert not Plan.truncated(6, 5).is_unbiased


def test_from_roles_infers_maximal_runs_or_takes_blocks():
    p = Plan.from_roles(["FO", "HO", "HO", "ZO", "HO"])
    assert p.blocks == ((2, 2), (5, 1))
    q = Plan.from_roles(["FO", "HO", "HO", "ZO", "HO"], blocks=[(2, 1), (3, 1), (5, 1)])
    assert q.blocks == ((2, 1), (3, 1), (5, 1)) and q != p


def test_cost_model_counts_graphs_kept_at_once():
    assert Plan.full(10).cost() == {"graph_steps": 10, "forward": 10, "backward": 10, "reward_backward": 1}
    assert Plan.rlr(10, 3, 4).cost() == {"graph_steps": 3, "forward": 13, "backward": 4, "reward_backward": 1}
    assert Plan.reinforce(10).cost()["graph_steps"] == 1
    assert Plan.zeroth_order(10).cost() == {"graph_steps": 0, "forward": 10, "backward": 0, "reward_backward": 0}


@pytest.mark.parametrize("make, message", [
    (lambda: Plan.rlr(8, 2, 1), "got j=1"),            # j < 2
    (lambda: Plan.rlr(8, 2, 8), "got j=8"),            # block beyond T
    (lambda: Plan.rlr(8, 8, 2), "h <= T-1"),           # h too large
    (lambda: Plan.rlr(8, -1), "h"),
    (lambda: Plan.rlr(8, 2), "got j=None"),            # j missing
    (lambda: Plan.rlr(8, 0, 3), "j must be None"),
    (lambda: Plan.truncated(8, 0), "k"),
    (lambda: Plan.full(0), "positive"),
    (lambda: Plan.from_roles(["FO", "ZO", "FO"]), "step 3: FO steps must form a prefix"),
    (lambda: Plan.from_roles(["FO", "HO", "HO"], blocks=[(2, 1)]), "step 3: role HO but in no HO block"),
    (lambda: Plan.from_roles(["FO", "HO", "ZO"], blocks=[(2, 2)]), "step 3: in HO block"),
    (lambda: Plan.from_roles(["HO", "HO"], blocks=[(1, 2), (2, 1)]), "step 2: lies in two HO blocks"),
    (lambda: Plan.from_roles(["FO", "XX"]), "XX"),
])
def test_invalid_plans_raise_value_error_naming_the_step(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_validate_against_chain_names_step_and_reason():
    chain, _ = linear_chain(T=6, d=2, sigma=[0.5, 0.5, 0.0, 0.5, 0.5, 0.5], tau=[0.1, 0.1, 0.1, 0.0, 0.1, 0.1])
    with pytest.raises(ValueError, match="step 3: HO block .* sigma_3 = 0"):
        Plan.rlr(6, 2, 3).validate(chain)
    with pytest.raises(ValueError, match="step 4: ZO needs parameter noise, but tau_4 = 0"):
        Plan.zeroth_order(6).validate(chain)
    with pytest.raises(ValueError, match="plan has T=5 steps but the chain has T=6"):
        Plan.full(5).validate(chain)
    Plan.from_roles(["FO", "HO", "HO", "HO", "ZO", "ZO"], blocks=[(2, 3)]).validate(chain)  # sigma_3 = 0 inside a block is fine
