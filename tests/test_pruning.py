"""Which HO parts the search pilots: branch and bound with successive halving under an
evaluation budget (halforder.planning.pruning), on synthetic layouts whose variances are
known, and the search's refusal to choose for budgets it did not prune for."""
import pytest
import torch

from halforder.estimators import ComputeMeter
from halforder.planning.pruning import Bound, halving_factor, pilot_ho_parts
from halforder.planning.search import measure
from halforder.planning.space import Space
from halforder.toy import linear_chain


def _layouts(variances, seed=0):
    """draw(key, rows): Gaussian rows of dimension 4 whose trace variance is variances[key],
    each draw recorded (key, rows); cost: one chain evaluation per row."""
    g = torch.Generator().manual_seed(seed)
    log = []

    def draw(key, rows):
        log.append((key, rows))
        return torch.randn((rows, 4), generator=g, dtype=torch.float64) * (variances[key] / 4) ** 0.5

    return draw, (lambda key, rows: rows), log


def test_bound_prunes_what_cannot_beat_the_best_and_halving_what_its_first_rows_rule_out():
    """Best without HO: 1.0. Layout a: bound 0.5, true variance 0.1 (best becomes 0.5 + 0.1)
    is piloted in full; b: bound 2.0 is pruned by the bound and never drawn; c: bound 0.1 but
    variance 1e6 is pruned after its first stage (q x estimate far above the best); d:
    bound 0.55 and variance 1.0, pruned at its first stage or later since 0.55 + 1.0 > 0.6.
    The layouts are drawn best-bound first."""
    variances = {"a": 0.1, "b": 0.1, "c": 1e6, "d": 1.0}
    bounds = {"a": [Bound(0.5, 1.0, 0)], "b": [Bound(2.0, 1.0, 0)], "c": [Bound(0.1, 1.0, 0)],
              "d": [Bound(0.55, 1.0, 0)]}
    draw, cost, log = _layouts(variances)
    with ComputeMeter() as meter:
        ho, skipped = pilot_ho_parts(bounds, [1.0], draw, cost, 64, meter=meter, T=1, max_evaluations=None, first=4)
    assert set(ho) == {"a"} and ho["a"] == pytest.approx(0.1, rel=0.5)
    assert skipped == {"b": "bound", "c": "halving", "d": "halving"}
    assert [k for k, _ in log if k == "b"] == [] and sum(r for k, r in log if k == "c") == 4
    assert sum(r for k, r in log if k == "a") == 64 and [r for k, r in log if k == "a"] == [4, 12, 48]
    assert log[0][0] == "c"


def test_without_pruning_every_layout_is_piloted_in_full():
    variances = {"a": 0.1, "b": 0.1, "c": 1e6}
    bounds = {"a": [Bound(0.5, 1.0, 0)], "b": [Bound(2.0, 1.0, 0)], "c": [Bound(0.1, 1.0, 0)]}
    draw, cost, log = _layouts(variances)
    with ComputeMeter() as meter:
        ho, skipped = pilot_ho_parts(bounds, [1.0], draw, cost, 64, meter=meter, T=1, max_evaluations=None,
                                     prune=False)
    assert set(ho) == {"a", "b", "c"} and not skipped and sorted(r for _, r in log) == [64, 64, 64]


def test_a_layout_is_kept_while_any_budget_needs_it():
    """Under budget 0 the best without HO is 0.1, under budget 1 it is 10: a layout with
    bound 1.0 under budget 1 only must be piloted."""
    draw, cost, log = _layouts({"a": 0.1})
    with ComputeMeter() as meter:
        ho, skipped = pilot_ho_parts({"a": [Bound(1.0, 1.0, 1)]}, [0.1, 10.0], draw, cost, 16, meter=meter, T=1,
                                     max_evaluations=None, first=4)
    assert "a" in ho and not skipped


def test_the_evaluation_budget_stops_stages_that_would_exceed_it():
    """The meter counts what is spent; a stage whose cost would take it past the budget is not
    drawn (one forward evaluation per chain evaluation here, T = 1)."""
    draw, cost, log = _layouts({"a": 0.1, "b": 0.1})
    with ComputeMeter() as meter:
        def counted(key, rows):
            meter.forward += rows
            return draw(key, rows)
        ho, skipped = pilot_ho_parts({"a": [Bound(0.0, 1.0, 0)], "b": [Bound(0.0, 1.0, 0)]}, [1.0], counted, cost,
                                     64, meter=meter, T=1, max_evaluations=80, first=4)
    assert len(ho) == 1 and list(skipped.values()) == ["budget"] and meter.forward <= 80


def test_halving_factor_is_the_chi_square_quantile():
    """q = chi2_{B-1}(alpha) / (B - 1): 0.0383 at 3 degrees of freedom and alpha = 0.01, and
    it tends to 1 with many rows."""
    assert halving_factor(4, 0.01) == pytest.approx(0.1148 / 3, rel=1e-3)
    assert 0.9 < halving_factor(10_000, 0.01) < 1


def test_a_search_pruned_for_one_budget_refuses_to_choose_for_another():
    chain, params = linear_chain(T=6, d=3, sigma=0.5, tau=0.2, seed=0)
    m = measure(chain, params, generator=torch.Generator().manual_seed(0), n=4, pilot_samples=16, repeats=1,
                space=Space(ks=(0, 1, 6), hs=(1, 2), positions=2, checkpoint=False), budgets=[(1e9, None)])
    assert any(s.note for s in m.scored)
    m.choose(1e9)
    with pytest.raises(ValueError, match="pruned for the budgets"):
        m.choose(100)


def test_a_result_whose_candidates_were_not_piloted_has_no_best():
    """If the budget left every candidate within the budgets without a variance, the search
    says so instead of returning an unscored plan."""
    from halforder.estimators import Plan
    from halforder.planning.search import Scored, SearchResult
    from halforder.planning.space import Candidate

    unscored = Scored(Candidate(Plan.reinforce(4)), 10, 1.0, float("inf"), "budget")
    result = SearchResult((unscored,), (), 100, None)
    with pytest.raises(ValueError, match="no candidate within the budgets was piloted"):
        result.best
    assert "not piloted: budget" in result.table()
