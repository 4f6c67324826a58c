"""The budget's statistical decision: the t distribution, alpha spending, the exact fall test,
and the paired sequential rule measured on noisy synthetic return streams (its false-pass rate
over many simulated runs, its early stop when the answer is clear, its sampling to the cap when
it is not)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from compressor.core.stats import (
    cvar,
    mean_bounds,
    sign_test_greater,
    spending_levels,
    summarize_returns,
    t_cdf,
    t_quantile,
)
from compressor.evaluate import EvalResult
from compressor.search.sequential import (
    FAIL,
    PASS,
    UNDECIDED,
    PairedRule,
    Plan,
    ReferenceSeries,
    decide,
)

PLAN = Plan(first=16, batch=16, cap=64, alpha=0.05)
MARGIN = 150.0  # the loss the budget allows


def test_t_distribution_matches_tables() -> None:
    # textbook quantiles (two decimals) and the normal limit
    for p, df, want in [(0.975, 10, 2.228), (0.95, 15, 1.753), (0.99, 2, 6.965), (0.95, 1, 6.314)]:
        assert t_quantile(p, df) == pytest.approx(want, abs=1e-3)
    assert t_quantile(0.95, 2000) == pytest.approx(1.6456, abs=1e-3)
    assert t_quantile(0.05, 7) == pytest.approx(-t_quantile(0.95, 7))
    for df in (1, 2, 5, 30):
        assert t_cdf(0.0, df) == 0.5 and t_cdf(t_quantile(0.9, df), df) == pytest.approx(0.9)


def test_spending_sums_to_alpha_and_front_loads_little() -> None:
    levels = spending_levels(PLAN.looks, 0.05)
    assert PLAN.looks == [16, 32, 48, 64]
    assert sum(levels) == pytest.approx(0.05) and all(x > 0 for x in levels)
    assert levels[0] < 0.05 / 2
    with pytest.raises(ValueError):
        spending_levels([16, 16], 0.05)


def test_sign_test_and_cvar() -> None:
    assert sign_test_greater(5, 0) == pytest.approx(1 / 32)
    assert sign_test_greater(0, 0) == 1.0
    assert sign_test_greater(3, 3) > 0.5
    assert cvar([5.0, 1.0, 9.0, 3.0]) == 1.0  # worst 10% of 4 episodes: one episode
    assert cvar(list(range(20))) == 0.5  # two episodes of twenty
    b = mean_bounds([1.0, 1.0, 1.0], 0.05)
    assert b.lower == b.upper == 1.0
    assert math.isinf(mean_bounds([3.0], 0.05).lower)


def _ev(seeds: list[int], returns: np.ndarray, fell: np.ndarray, name: str = "clean") -> EvalResult:
    stats = summarize_returns(returns, n_boot=2)
    term = [bool(x) for x in fell]
    return EvalResult(name, stats, None, 0, 0.0, None, seeds, [1] * len(seeds), term)


def _simulate(rng: np.random.Generator, shift: float, spread: float, fall_p: float):
    """One decision on a synthetic stream: the dense policy returns ~3000 ± 200 and falls
    (return ~1200) with probability ``fall_p``; the candidate has its own noise and falls, and
    its mean differs from the dense one by ``shift``."""
    n = PLAN.cap
    base = rng.normal(3000, 200, n)
    d_fell, c_fell = rng.random(n) < fall_p, rng.random(n) < fall_p
    dense = np.where(d_fell, rng.normal(1200, 300, n), base)
    cand = np.where(c_fell, rng.normal(1200, 300, n), base + rng.normal(0, spread, n)) + shift
    seeds = list(range(n))

    def stream(vals: np.ndarray, fell: np.ndarray):
        def run(names: list[str], ss: list[int]) -> dict[str, EvalResult]:
            return {k: _ev(ss, vals[ss[0] : ss[-1] + 1], fell[ss[0] : ss[-1] + 1]) for k in names}

        return run

    more = stream(cand, c_fell)
    # falls are equally likely for both: only the returns should decide
    rule = PairedRule(MARGIN, None, None, fall_on_termination=False)
    decision, _ = decide(
        more(["clean"], seeds[: PLAN.first]),
        more,
        ReferenceSeries(stream(dense, d_fell)),
        rule,
        PLAN,
        seeds,
    )
    return decision


@pytest.mark.parametrize(("spread", "fall_p"), [(50.0, 0.0), (50.0, 0.3), (400.0, 0.1)])
def test_false_pass_rate_is_at_most_alpha(spread: float, fall_p: float) -> None:
    """A candidate that loses exactly the allowed loss plus a hair (the hardest case to reject)
    passes in at most 5% of 600 simulated runs, on steady, falling and very noisy streams."""
    rng = np.random.default_rng(0)
    runs = [_simulate(rng, -MARGIN - 1.0, spread, fall_p) for _ in range(600)]
    false_pass = sum(d.status == PASS for d in runs) / len(runs)
    assert false_pass <= 0.05
    # not vacuous: the same rule passes a candidate that loses nothing
    fine = [_simulate(rng, 0.0, spread, 0.0) for _ in range(100)]
    assert sum(d.status == PASS for d in fine) / len(fine) >= 0.5


def test_stops_early_when_clear_and_samples_to_the_cap_when_not() -> None:
    rng = np.random.default_rng(1)
    clear_pass = [_simulate(rng, 0.0, 30.0, 0.0) for _ in range(50)]
    assert all(d.status == PASS and d.episodes == PLAN.first for d in clear_pass)
    clear_fail = [_simulate(rng, -1000.0, 30.0, 0.0) for _ in range(50)]
    assert all(d.status == FAIL and d.episodes == PLAN.first for d in clear_fail)
    # falls independent of the policy make a 5% budget undecidable: every look is used
    close = [_simulate(rng, -MARGIN / 2, 50.0, 0.3) for _ in range(50)]
    assert sum(d.status == UNDECIDED for d in close) >= 40
    assert np.mean([d.episodes for d in close]) > 0.9 * PLAN.cap
    undecided = next(d for d in close if d.status == UNDECIDED)
    assert undecided.reasons and "straddle" in undecided.reasons[0]
    assert undecided.tests[0].n == PLAN.cap and undecided.tests[0].look == len(PLAN.looks)


def test_more_falls_than_chance_fail_a_candidate_whose_mean_passes() -> None:
    seeds = list(range(16))
    dense = _ev(seeds, np.full(16, 1000.0), np.zeros(16, bool))
    fell = np.arange(16) < 8  # falls in 8 of 16 episodes, the dense policy in none
    cand = _ev(seeds, np.full(16, 1000.0), fell)
    rule = PairedRule(MARGIN, None, None, fall_on_termination=True)
    decision, _ = decide(
        {"clean": cand},
        lambda names, ss: pytest.fail("a decided condition got more episodes"),
        ReferenceSeries(lambda names, ss: {"clean": dense}),
        rule,
        PLAN,
        list(range(64)),
    )
    assert decision.status == FAIL
    assert "falls in 8 of 16" in decision.reasons[0]
    t = decision.test("clean")
    assert t is not None and t.falls == 8 and t.reference_falls == 0 and t.lower == 0.0
    # the same episodes, falls not counted (a task whose termination is success): it passes
    ok, _ = decide(
        {"clean": cand},
        lambda names, ss: {},
        ReferenceSeries(lambda names, ss: {"clean": dense}),
        PairedRule(MARGIN, None, None, fall_on_termination=False),
        PLAN,
        list(range(64)),
    )
    assert ok.status == PASS


def test_attacks_are_compared_with_the_dense_policys_strongest_attack() -> None:
    seeds = list(range(16))
    flat = np.zeros(16, bool)
    dense = {
        "clean": _ev(seeds, np.full(16, 1000.0), flat),
        "random": _ev(seeds, np.full(16, 990.0), flat, "random"),
        "mad": _ev(seeds, np.full(16, 600.0), flat, "mad"),
    }
    cand = {
        "clean": _ev(seeds, np.full(16, 1000.0), flat),
        "random": _ev(seeds, np.full(16, 700.0), flat, "random"),  # far below dense random
        "mad": _ev(seeds, np.full(16, 500.0), flat, "mad"),  # 100 below dense mad: within 150
    }
    decision, _ = decide(
        cand,
        lambda names, ss: {},
        ReferenceSeries(lambda names, ss: dense),
        PairedRule(MARGIN, "mad", None),
        PLAN,
        list(range(64)),
    )
    assert decision.status == PASS
    t = decision.test("random")
    assert t is not None and t.reference == "mad" and t.mean_diff == pytest.approx(100.0)
