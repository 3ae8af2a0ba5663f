"""The plan search as a composition of stages (halforder.planning.stages): on a toy chain
with the timing made deterministic, :func:`measure` spends, prunes and chooses exactly what
the search did before it was split into stages, and its parts are keyed as the variance
model looks them up."""
import pytest
import torch

import halforder.planning.time_model as time_model
from halforder.estimators import ComputeMeter
from halforder.planning.part_variances import HOKey, ZOKey, predicted_variance
from halforder.planning.search import measure
from halforder.planning.space import Space
from halforder.toy import linear_chain

BUDGETS = [(1500, None), (1e9, None)]


@pytest.fixture
def fixed_timing(monkeypatch):
    """Each timing probe runs once (so the generator advances alike) and is given fixed seconds
    (so the time model, the bounds and the pruning are the same in every run)."""
    def median_seconds(calls, repeats, device, block=0.05, seconds=None):
        for fn in calls:
            fn()
        return [1e-4 * (1 + (7 * i) % 11) for i in range(len(calls))]

    monkeypatch.setattr(time_model, "median_seconds", median_seconds)


# (flags, spent per stage, (pruned by bound, by halving), per budget the best and its variance)
PINNED = [
    (dict(), ((500, 180), (384, 384), (800, 368)), (14, 4),
     [("HO2-tiles(1..6)", 4480.089860293319), ("FO6", 76.26007865660522)]),
    (dict(baseline="loo"), ((500, 180), (192, 192), (736, 352)), (18, 0),
     [("HO1-tiles(1..6)", 505.4965697998395), ("FO6", 74.0153187270685)]),
    (dict(shared=False, prune=False), ((500, 180), (2496, 112), (1696, 544)), (0, 0),
     [("HO(1,2)+ZO[param]", 3639.3962591327017), ("FO6", 45.28708534754464)]),
]


@pytest.mark.parametrize("flags, spent, pruned, chosen", PINNED)
def test_measure_spends_prunes_and_chooses_as_pinned(fixed_timing, flags, spent, pruned, chosen):
    chain, params = linear_chain(T=6, d=3, sigma=0.5, tau=0.2, seed=0)
    with ComputeMeter() as meter:
        m = measure(chain, params, generator=torch.Generator().manual_seed(0), n=4, pilot_samples=16, repeats=1,
                    space=Space(ks=(0, 1, 6), hs=(1, 2), positions=2), budgets=BUDGETS, **flags)
    assert (m.spent.memory_and_timing, m.spent.fo_zo, m.spent.ho) == spent
    assert (meter.forward, meter.backward) == tuple(map(sum, zip(*spent)))
    notes = [s.note for s in m.scored]
    assert (notes.count("bound"), notes.count("halving")) == pruned and len(notes) == 30
    for budget, (name, variance) in zip(BUDGETS, chosen):
        best = m.choose(*budget).best
        assert best.candidate.name == name and best.variance == pytest.approx(variance, rel=1e-9)
    for s in m.scored:
        if not s.note:
            c = s.candidate
            assert s.variance == predicted_variance(m.parts, c.plan, c.pairing)
            assert not c.plan.blocks or HOKey.of(c.plan, c.pairing) in m.parts.ho
            assert not c.plan.steps("ZO") or ZOKey.of(c.plan, c.pairing) in m.parts.zo
