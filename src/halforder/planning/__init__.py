"""Choosing the estimator: a search over plans under memory and time budgets, from costs
and variances measured on the user's chain (docs/plan-search.md).

    from halforder.planning import Space, search
    result = search(chain, params, memory_budget=2 * 2**30, generator=g, n=4)
    result.best.candidate.plan, result.table(), result.why()

:mod:`.space` is what is searched, :mod:`.search` the scoring and ranking, :mod:`.stages`
the steps of a search, :mod:`.memory_model`, :mod:`.time_model` and :mod:`.part_variances`
the three columns, :mod:`.shared_pilot` the FO and ZO parts from one set of rollouts,
:mod:`.pruning` which HO parts are piloted, :mod:`.cost` what the search spent and
:mod:`.units` sizes and durations as people write them. It builds on
:mod:`halforder.estimators` and nothing there imports it.
"""
from .cost import SearchCost
from .search import Measured, Scored, SearchResult, measure, search
from .space import Candidate, Space
from .units import format_bytes, parse_bytes, parse_seconds

__all__ = ["Candidate", "Measured", "Scored", "SearchCost", "SearchResult", "Space", "format_bytes", "measure",
           "parse_bytes", "parse_seconds", "search"]
