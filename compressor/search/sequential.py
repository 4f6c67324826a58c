"""The budget's statistical decision: paired comparisons on common seeds, evaluated sequentially.

A candidate and the dense policy run the same episodes (same seeds, same observation noise).
For each condition (clean, and each attack) the per-episode difference ``candidate − dense`` is
compared with the allowed loss ``m = b · scale``:

- clean: ``D_i = J_clean(c)_i − J_clean(dense)_i``;
- attack ``a``: ``D_i = J_a(c)_i − J_{a*}(dense)_i``, where ``a*`` is the dense policy's
  strongest attack (fixed on the first look). Showing ``E[J_a(c)] ≥ E[J_{a*}(dense)] − m`` for
  every ``a`` shows ``min_a E[J_a(c)] ≥ min_b E[J_b(dense)] − m``: the design's robust rule.

At look ``k`` (``n_k`` episodes) a condition **passes** when the one-sided Student-t lower bound
on ``E[D]`` at level ``α_k`` is ≥ ``−m``, **fails** when the upper bound is < ``−m``, and is
otherwise open: an open condition gets ``batch`` more episodes (candidate and dense, the next
decision seeds), up to ``max_episodes``; still open there, it is **undecided**. The levels
``α_k`` spend ``α`` over the planned looks (:func:`compressor.core.stats.spending_levels`), so
the chance of a false pass (or a false fail) over all looks is at most ``α`` by the union bound.
A candidate passes only when every condition passes (an intersection-union test: its false-pass
rate is at most ``α``, with no further correction).

Falls: a condition also fails when the candidate falls more often than the dense policy beyond
chance: McNemar's exact one-sided test on the seeds where exactly one of the two fell, at the
same ``α_k``. Decided conditions get no more episodes: episodes go where the decision is close.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from compressor.core.config import EvaluationSection
from compressor.core.progress import Progress, no_progress
from compressor.core.stats import (
    mean_bounds,
    sign_test_greater,
    spending_levels,
    summarize_returns,
)
from compressor.evaluate import EvalResult

PASS, FAIL, UNDECIDED = "pass", "fail", "undecided"
#: evaluates one policy under the named conditions on the given seeds
Evaluator = Callable[[list[str], list[int]], dict[str, EvalResult]]


@dataclass(frozen=True)
class Plan:
    """The planned looks of a sequential decision.

    :param first: episodes of the first look. :param batch: episodes added per look.
    :param cap: most episodes. :param alpha: total one-sided error rate.
    """

    first: int
    batch: int
    cap: int
    alpha: float

    @classmethod
    def from_section(cls, ev: EvaluationSection) -> Plan:
        """The plan of a profile's ``[evaluation]`` section."""
        return cls(ev.episodes, ev.batch, ev.cap, ev.alpha)

    @property
    def looks(self) -> list[int]:
        """Cumulative episodes at each look: ``first``, ``first + batch``, … , ``cap``."""
        out = [min(self.first, self.cap)]
        while out[-1] < self.cap:
            out.append(min(out[-1] + self.batch, self.cap))
        return out

    @property
    def levels(self) -> list[float]:
        """One-sided level of each look (they sum to ``alpha``)."""
        return spending_levels(self.looks, self.alpha)

    def look_of(self, n: int) -> int:
        """Index of the look that ``n`` episodes make (the last look at or below ``n``)."""
        return max(i for i, m in enumerate(self.looks) if m <= n) if n >= self.looks[0] else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (looks and their levels included)."""
        return {**asdict(self), "looks": self.looks, "alpha_per_look": self.levels}


@dataclass(frozen=True)
class PairedRule:
    """What a decision compares: the allowed loss, the dense condition the robust tests compare
    with, and what counts as a fall.

    :param margin: allowed loss ``m = b · scale``.
    :param reference_attack: the dense policy's strongest attack ``a*`` (None: no attacks).
    :param fall_below: return under which an episode is a fall (None: no such rule).
    :param fall_on_termination: whether termination before the time limit is a fall.
    """

    margin: float
    reference_attack: str | None
    fall_below: float | None
    fall_on_termination: bool = True

    def reference_of(self, condition: str) -> str:
        """The dense condition a candidate condition is compared with."""
        if condition == "clean" or self.reference_attack is None:
            return "clean"
        return self.reference_attack

    def falls(self, e: EvalResult) -> np.ndarray:
        """Fall flag of each episode of ``e``."""
        return np.array(e.falls(self.fall_below, self.fall_on_termination), dtype=bool)


@dataclass(frozen=True)
class ConditionTest:
    """One condition's paired test at its last look.

    :param condition: ``clean`` or the attack. :param reference: the dense condition compared.
    :param status: pass, fail or undecided (open, when the decision is still running).
    :param n: paired episodes. :param look: its look (1-based). :param alpha: that look's level.
    :param candidate_mean: candidate mean return. :param reference_mean: dense mean return.
    :param mean_diff: mean of candidate − dense. :param lower: one-sided lower bound on it.
    :param upper: one-sided upper bound. :param margin: the allowed loss.
    :param falls: candidate falls. :param reference_falls: dense falls (same condition).
    :param falls_p: exact one-sided p-value that the candidate falls more often.
    :param candidate_cvar10: candidate's worst-decile mean. :param reference_cvar10: dense's.
    :param reason: why it fails or is undecided ("" when it passes).
    """

    condition: str
    reference: str
    status: str
    n: int
    look: int
    alpha: float
    candidate_mean: float
    reference_mean: float
    mean_diff: float
    lower: float
    upper: float
    margin: float
    falls: int
    reference_falls: int
    falls_p: float
    candidate_cvar10: float
    reference_cvar10: float
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (infinite bounds as None)."""
        d = asdict(self)
        for k in ("lower", "upper"):
            d[k] = None if math.isinf(d[k]) else d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConditionTest:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["lower"] = -math.inf if d["lower"] is None else d["lower"]
        d["upper"] = math.inf if d["upper"] is None else d["upper"]
        return cls(**d)


@dataclass(frozen=True)
class Decision:
    """A candidate's verdict: pass, fail or undecided, with every condition's test.

    :param status: pass, fail or undecided. :param tests: per condition.
    :param reasons: why it fails or is undecided (empty: it passes).
    :param episodes: candidate episodes spent (over all conditions).
    """

    status: str
    tests: tuple[ConditionTest, ...] = ()
    reasons: tuple[str, ...] = ()
    episodes: int = 0

    @property
    def passed(self) -> bool:
        """Whether the candidate passes."""
        return self.status == PASS

    def test(self, condition: str) -> ConditionTest | None:
        """The test of one condition, if it ran."""
        return next((t for t in self.tests if t.condition == condition), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "status": self.status,
            "reasons": list(self.reasons),
            "episodes": self.episodes,
            "tests": [t.to_dict() for t in self.tests],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Decision:
        """Inverse of :meth:`to_dict`."""
        tests = tuple(ConditionTest.from_dict(t) for t in d.get("tests", []))
        return cls(d["status"], tests, tuple(d.get("reasons", [])), d.get("episodes", 0))


def _aligned(ref: EvalResult, seeds: list[int]) -> EvalResult:
    """``ref`` restricted to ``seeds`` (in that order)."""
    if ref.seeds == seeds:
        return ref
    assert ref.seeds is not None, "a paired decision needs per-episode seeds"
    at = {s: i for i, s in enumerate(ref.seeds)}
    idx = [at[s] for s in seeds]
    returns = np.array(ref.stats.returns)[idx]
    term = ref.terminated or [False] * len(ref.seeds)
    lengths = ref.lengths or [0] * len(ref.seeds)
    return EvalResult(
        ref.attack,
        summarize_returns(returns),
        ref.mean_tv,
        ref.steps,
        ref.wall_s,
        ref.training,
        list(seeds),
        [lengths[i] for i in idx],
        [term[i] for i in idx],
    )


def paired_test(
    cand: EvalResult,
    same: EvalResult,
    floor: EvalResult,
    rule: PairedRule,
    plan: Plan,
    condition: str,
) -> ConditionTest:
    """One condition's paired test at the look its episode count makes.

    :param cand: the candidate under the condition. :param same: the dense policy under the
        same condition (falls are compared with it). :param floor: the dense condition the
        return is compared with (:meth:`PairedRule.reference_of`).
    """
    assert cand.seeds is not None, "a paired decision needs per-episode seeds"
    same, floor = _aligned(same, cand.seeds), _aligned(floor, cand.seeds)
    c = np.array(cand.stats.returns)
    look = plan.look_of(len(c))
    alpha = plan.levels[look]
    b = mean_bounds(c - np.array(floor.stats.returns), alpha)
    cf, df = rule.falls(cand), rule.falls(same)
    more, fewer = int((cf & ~df).sum()), int((~cf & df).sum())
    p = sign_test_greater(more, fewer)
    m = rule.margin

    def v(x: float) -> str:
        return f"{x:.1f}".replace("-", "−")

    where = f"{condition} vs dense {floor.attack}"
    if p < alpha:
        status = FAIL
        reason = (
            f"{condition}: falls in {int(cf.sum())} of {len(c)} episodes vs dense "
            f"{int(df.sum())} (exact one-sided p = {p:.3g} < {alpha:.3g})"
        )
    elif b.upper < -m:
        status = FAIL
        reason = f"{where}: loss {v(-b.mean)}, at least {v(-b.upper)} > {v(m)} allowed"
    elif b.lower >= -m:
        status, reason = PASS, ""
    else:
        status = UNDECIDED
        reason = (
            f"{where}: difference {v(b.mean)}, one-sided {1 - alpha:.4g} bounds "
            f"{v(b.lower)} to {v(b.upper)} straddle −{v(m)} after {len(c)} episodes"
        )
    return ConditionTest(
        condition,
        floor.attack,
        status,
        len(c),
        look + 1,
        alpha,
        cand.stats.mean,
        floor.stats.mean,
        b.mean,
        b.lower,
        b.upper,
        m,
        int(cf.sum()),
        int(df.sum()),
        p,
        cand.cvar10,
        floor.cvar10,
        reason,
    )


@dataclass
class ReferenceSeries:
    """The dense policy's evaluations on the decision seeds, extended on demand and shared by
    every candidate (each extension runs once).

    Extensions run in the chunks the planned looks make (seeds ``looks[i-1] .. looks[i]``), so
    every dense episode comes from the same rollout whatever order the candidates ask in (a
    resumed run gets the same numbers).

    :param evaluate: runs the dense policy under conditions on seeds.
    :param results: what is known so far, per condition (a prefix of the decision seeds).
    :param looks: cumulative episode counts of the planned looks (None: one chunk).
    """

    evaluate: Evaluator
    results: dict[str, EvalResult] = field(default_factory=dict)
    looks: list[int] | None = None

    def get(self, names: list[str], seeds: list[int]) -> dict[str, EvalResult]:
        """The dense results of ``names`` covering ``seeds``, a prefix of the decision seeds
        (evaluating what is missing)."""
        cuts = sorted({0, *(self.looks or []), len(seeds)})
        todo: dict[tuple[int, int], list[str]] = {}
        for n in names:
            have = len(self.results[n].seeds or []) if n in self.results else 0
            for a, b in zip(cuts, cuts[1:]):
                if b > have and b <= len(seeds):
                    todo.setdefault((max(a, have), b), []).append(n)
        for (a, b), group in sorted(todo.items()):
            for n, e in self.evaluate(group, seeds[a:b]).items():
                self.results[n] = self.results[n].merged(e) if n in self.results else e
        return {n: self.results[n] for n in names}


def decide(
    first: dict[str, EvalResult],
    more: Evaluator,
    reference: ReferenceSeries,
    rule: PairedRule,
    plan: Plan,
    decision_seeds: list[int],
    blocking: list[str] | None = None,
    progress: Progress = no_progress,
) -> tuple[Decision, dict[str, EvalResult]]:
    """Run the sequential paired decision from a candidate's first look to a verdict.

    :param first: the candidate's first-look evaluations, per condition.
    :param more: evaluates the candidate under conditions on more seeds.
    :param reference: the dense policy's evaluations (extended on demand).
    :param rule: margin, reference attack and fall rule. :param plan: the looks.
    :param decision_seeds: the seeds in the order the looks use them.
    :param blocking: reasons that fail the candidate whatever its returns (a looser
        certificate): no more episodes are spent then.
    :param progress: told the looks done, naming the open conditions.
    :returns: the decision and the candidate's evaluations (extended).
    """
    results = dict(first)
    names = list(results)
    looks = plan.looks
    while True:
        # the dense episodes each condition needs: its own (falls) and its floor's (returns)
        need: dict[str, int] = {}
        for n in names:
            for d in (n, rule.reference_of(n)):
                need[d] = max(need.get(d, 0), len(results[n].stats.returns))
        ref: dict[str, EvalResult] = {}
        for k in sorted(set(need.values())):
            ref |= reference.get([d for d, m in need.items() if m == k], decision_seeds[:k])
        tests = {
            n: paired_test(results[n], ref[n], ref[rule.reference_of(n)], rule, plan, n)
            for n in names
        }
        spent = sum(len(r.stats.returns) for r in results.values())
        statuses = {t.status for t in tests.values()}
        failed = [t.reason for t in tests.values() if t.status == FAIL]
        if blocking or failed:
            why = (*(blocking or []), *failed)
            return Decision(FAIL, tuple(tests.values()), why, spent), results
        if statuses == {PASS}:
            return Decision(PASS, tuple(tests.values()), (), spent), results
        open_ = [n for n, t in tests.items() if t.status == UNDECIDED]
        grow = [n for n in open_ if len(results[n].stats.returns) < looks[-1]]
        if not grow:
            reasons = tuple(tests[n].reason for n in open_)
            return Decision(UNDECIDED, tuple(tests.values()), reasons, spent), results
        n_now = len(results[grow[0]].stats.returns)
        n_next = looks[min(plan.look_of(n_now) + 1, len(looks) - 1)]
        progress(plan.look_of(n_now) + 1, len(looks), f"{', '.join(grow)}: {n_next} episodes")
        for n, e in more(grow, decision_seeds[n_now:n_next]).items():
            results[n] = results[n].merged(e)
