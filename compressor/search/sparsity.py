"""The budget rule and the search for the highest sparsity that satisfies it.

A candidate passes when (design.md, "Threat model and budget"), with
``scale = J_clean(dense) - J_clean(uniform random actions)``:
``J_clean(c) ≥ J_clean(dense) - b·scale``, ``J_robust(c) ≥ J_robust(dense) - b·scale``
(``J_robust`` = minimum over the attack suite) and its certificate is no looser than the dense
one (its certified Lipschitz bound is not larger), plus an optional absolute TV ceiling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from compressor.certify.global_bound import GlobalCertificate
from compressor.evaluate import SuiteResult
from compressor.finetune.common import FinetuneStats
from compressor.policy.model import Policy

#: relative slack for comparing certificates computed in floating point
CERT_RTOL = 1e-9


@dataclass
class Budget:
    """The acceptance rule, fixed by the dense policy's measurements.

    :param budget: the fraction ``b`` of the return scale a candidate may lose.
    :param dense_clean: dense clean return. :param dense_robust: dense robust return.
    :param random_return: return of uniformly random actions (the scale's floor).
    :param dense_lipschitz: the dense certificate's Lipschitz bound.
    :param max_tv: optional absolute ceiling on the certified TV at ε.
    """

    budget: float
    dense_clean: float
    dense_robust: float
    random_return: float
    dense_lipschitz: float
    max_tv: float | None = None

    @property
    def scale(self) -> float:
        """``J_clean(dense) - J_clean(random)``; floored at a tiny positive value."""
        return max(self.dense_clean - self.random_return, 1e-9)

    @property
    def clean_floor(self) -> float:
        """Lowest clean return a candidate may have."""
        return self.dense_clean - self.budget * self.scale

    @property
    def robust_floor(self) -> float:
        """Lowest robust return a candidate may have."""
        return self.dense_robust - self.budget * self.scale

    def check(self, suite: SuiteResult, cert: GlobalCertificate) -> list[str]:
        """Reasons the candidate fails (empty: it passes)."""
        reasons = []
        if suite.clean.stats.mean < self.clean_floor:
            reasons.append(
                f"clean return {suite.clean.stats.mean:.1f} < floor {self.clean_floor:.1f}"
            )
        if suite.robust_return < self.robust_floor:
            reasons.append(
                f"robust return {suite.robust_return:.1f} ({suite.strongest_attack}) "
                f"< floor {self.robust_floor:.1f}"
            )
        if cert.lipschitz > self.dense_lipschitz * (1 + CERT_RTOL):
            reasons.append(
                f"certificate looser than dense (Lipschitz {cert.lipschitz:.4g} > "
                f"{self.dense_lipschitz:.4g})"
            )
        if self.max_tv is not None and cert.tv_bound is not None and cert.tv_bound > self.max_tv:
            reasons.append(f"certified TV {cert.tv_bound:.4g} > max_tv {self.max_tv}")
        return reasons

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict including the derived floors."""
        return {
            "budget": self.budget,
            "scale": self.scale,
            "random_return": self.random_return,
            "dense_clean": self.dense_clean,
            "dense_robust": self.dense_robust,
            "clean_floor": self.clean_floor,
            "robust_floor": self.robust_floor,
            "dense_lipschitz": self.dense_lipschitz,
            "max_tv": self.max_tv,
        }


@dataclass
class Candidate:
    """One evaluated sparsity level (pruned, fine-tuned, evaluated, certified).

    :param target_sparsity: the level asked for. :param sparsity: the level reached.
    :param suite: clean and attacked evaluation on the shared seeds.
    :param certificate: the global certificate under the run's threat model.
    :param finetune: fine-tuning statistics. :param params_nonzero: non-zero parameters.
    :param reasons: why it fails the budget (empty: it passes). :param wall_s: seconds.
    :param local: local (per-state) certificate vs PGD at the dense policy's visited states.
    :param policy: the candidate policy itself (not serialised).
    """

    target_sparsity: float
    sparsity: float
    suite: SuiteResult
    certificate: GlobalCertificate
    finetune: FinetuneStats | None
    params_nonzero: int
    reasons: list[str]
    wall_s: float
    local: dict[str, Any] | None = None
    policy: Policy | None = field(default=None, repr=False)

    @property
    def passed(self) -> bool:
        """Whether the candidate meets the budget."""
        return not self.reasons

    @classmethod
    def from_dict(cls, d: dict[str, Any], policy: Policy | None = None) -> Candidate:
        """Inverse of :meth:`to_dict` (the policy is stored beside the journal)."""
        return cls(
            target_sparsity=d["target_sparsity"],
            sparsity=d["sparsity"],
            suite=SuiteResult.from_dict(d["evaluation"]),
            certificate=GlobalCertificate.from_dict(d["certificate"]),
            finetune=FinetuneStats(**d["finetune"]) if d.get("finetune") else None,
            params_nonzero=d["params_nonzero"],
            reasons=list(d["reasons"]),
            wall_s=d["wall_s"],
            local=d.get("local_certificate"),
            policy=policy,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (without the policy)."""
        return {
            "target_sparsity": self.target_sparsity,
            "sparsity": self.sparsity,
            "passed": self.passed,
            "reasons": self.reasons,
            "evaluation": self.suite.to_dict(),
            "certificate": self.certificate.to_dict(),
            "finetune": self.finetune.to_dict() if self.finetune else None,
            "params_nonzero": self.params_nonzero,
            "local_certificate": self.local,
            "wall_s": round(self.wall_s, 3),
        }


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
