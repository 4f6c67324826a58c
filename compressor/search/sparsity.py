"""The search for the highest sparsity that satisfies the budget: a coarse grid in ascending
order with an early stop, then bisection between the last passing and the first failing level.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from compressor.search.budget import Budget
from compressor.search.candidate import Candidate


@dataclass
class SearchResult:
    """All evaluated candidates (ascending sparsity) and the chosen one, if any."""

    candidates: list[Candidate]
    chosen: Candidate | None


def search_sparsity(
    evaluate_many: Callable[[list[float]], list[Candidate]],
    grid: list[float],
    refine: int,
    budget: Budget,
    decisive_fraction: float = 0.5,
    width: int = 1,
) -> SearchResult:
    """Evaluate a coarse grid, then bisect between the last passing and first failing level.

    The search is defined sequentially (grid levels in ascending order with an early stop,
    then ``refine`` bisection steps); with ``width`` > 1 it asks for up to ``width`` levels at
    once — the next grid levels, or the bisection levels of every outcome of the next steps —
    and keeps only those the sequential search would have visited. The visited levels, and so
    the result, are the same at every width.

    :param evaluate_many: prunes, fine-tunes, evaluates and certifies the given levels (any
        order, side by side); returns their candidates in the same order.
    :param grid: coarse sparsity levels (visited in ascending order).
    :param refine: number of bisection steps after the grid.
    :param budget: the acceptance rule (used for the early stop).
    :param decisive_fraction: stop the coarse grid once a level loses more than this fraction
        of the return scale in clean return: higher sparsities will not recover.
    :param width: levels evaluated per round (the executor's workers).
    """
    cache: dict[float, Candidate] = {}
    while True:
        need, result = _walk(cache, grid, refine, budget, decisive_fraction, max(1, width))
        if result is not None:
            return result
        for s, c in zip(need, evaluate_many(need), strict=True):
            cache[s] = c


def _walk(
    cache: dict[float, Candidate],
    grid: list[float],
    refine: int,
    budget: Budget,
    decisive_fraction: float,
    width: int,
) -> tuple[list[float], SearchResult | None]:
    """Replays the sequential search on ``cache``: its result, or the levels to evaluate next
    (the first missing level, then up to ``width`` - 1 levels it may visit after it)."""
    visited: dict[float, Candidate] = {}
    levels = sorted(set(grid))
    for i, s in enumerate(levels):
        if s not in cache:
            return [x for x in levels[i:] if x not in cache][:width], None
        c = visited[s] = cache[s]
        lost = budget.dense_clean - c.suite.clean.stats.mean
        if not c.passed and lost > decisive_fraction * budget.scale:
            break
    for step in range(refine):
        lo, hi = _bracket(visited)
        if hi is None:
            break
        mid = _midpoint(lo, hi)
        if mid is None or mid in visited:
            break
        if mid not in cache:
            return _bisection_levels(lo, hi, refine - step, width, cache), None
        visited[mid] = cache[mid]
    ordered = [visited[s] for s in sorted(visited)]
    chosen = max((c for c in ordered if c.passed), key=lambda c: c.sparsity, default=None)
    return [], SearchResult(ordered, chosen)


def _bracket(visited: dict[float, Candidate]) -> tuple[float, float | None]:
    """The highest passing level (0 if none) and the lowest failing level above it."""
    lo = max((s for s, c in visited.items() if c.passed), default=0.0)
    hi = min((s for s, c in visited.items() if s > lo and not c.passed), default=None)
    return lo, hi


def _midpoint(lo: float, hi: float) -> float | None:
    """The next bisection level, or None once the bracket is narrower than 2 points."""
    return None if hi - lo < 0.02 else round((lo + hi) / 2, 4)


def _bisection_levels(
    lo: float, hi: float, depth: int, width: int, cache: dict[float, Candidate]
) -> list[float]:
    """Up to ``width`` uncached bisection levels of the next ``depth`` steps, breadth first over
    both outcomes of each step (the passing branch first); the first is the next step's."""
    out: list[float] = []
    brackets = [(lo, hi)]
    for _ in range(depth):
        nxt: list[tuple[float, float]] = []
        for a, b in brackets:
            m = _midpoint(a, b)
            if m is None:
                continue
            if m not in cache and m not in out:
                out.append(m)
            nxt += [(m, b), (a, m)]
        brackets = nxt
    return out[:width]
