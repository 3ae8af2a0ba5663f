"""The plan search as a composition of stages (halforder.planning.stages): on a toy chain
with the timing made deterministic, :func:`measure` spends, prunes and chooses as pinned
(values recorded when the search was split into stages, and again when the timing probes
got a generator of their own), and its parts are keyed as the variance model looks them up;
the pilots do not depend on how often the clock has the timing probes run."""
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
    (dict(), ((500, 180), (384, 384), (736, 352)), (18, 0),
     [("HO2-tiles(1..6)", 2282.550447046507), ("FO6", 52.25639537875673)]),
    (dict(baseline="loo"), ((500, 180), (192, 192), (736, 352)), (18, 0),
     [("FO1+HO2-tiles(2..6)", 1552.2978452775676), ("FO6", 53.658377935848904)]),
    (dict(shared=False, prune=False), ((500, 180), (2496, 112), (1696, 544)), (0, 0),
     [("HO2-tiles(1..6)", 1942.7100812502263), ("FO6", 65.53544746984389)]),
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


def test_the_pilots_do_not_depend_on_how_often_the_probes_ran(monkeypatch):
    """The timing probes draw from a generator of their own: a search whose probes ran once
    each and one whose probes ran three times each measure the same parts and choose alike."""
    def run(times):
        def median_seconds(calls, repeats, device, block=0.05, seconds=None):
            for fn in calls:
                for _ in range(times):
                    fn()
            return [1e-4 * (1 + (7 * i) % 11) for i in range(len(calls))]

        monkeypatch.setattr(time_model, "median_seconds", median_seconds)
        chain, params = linear_chain(T=6, d=3, sigma=0.5, tau=0.2, seed=0)
        return measure(chain, params, generator=torch.Generator().manual_seed(0), n=4, pilot_samples=16,
                       repeats=1, space=Space(ks=(0, 1, 6), hs=(1, 2), positions=2), budgets=BUDGETS)

    a, b = run(1), run(3)
    assert a.parts == b.parts and [s.variance for s in a.scored] == [s.variance for s in b.scored]
    assert [a.choose(*x).best.candidate for x in BUDGETS] == [b.choose(*x).best.candidate for x in BUDGETS]
