"""Error rates of the budget's paired sequential decision, on synthetic return streams.

    python benchmarks/decision_error_rate.py [--runs 4000]

Each simulated run is one candidate decided against the dense policy by
:func:`compressor.search.sequential.decide`, exactly as ``compress run`` decides (its default
``[evaluation]`` plan: 16 episodes, 16 more per look, at most 64, α = 0.05). The dense policy
returns about 3000 ± 200 per episode and, in the streams with falls, falls (return ~1200 ± 300)
with the stated probability; the candidate shares the episode's base return (common seeds),
adds its own noise and falls independently, and its mean differs from the dense one by the
shift. The allowed loss is 150.

- shift = −151 (just beyond the budget): a pass is a **false pass**; the rule promises ≤ α.
- shift = 0 (no loss): how often it passes, and on how many episodes.

Prints one Markdown table (the README quotes it).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from compressor.core.stats import summarize_returns
from compressor.evaluate import EvalResult
from compressor.search.sequential import PASS, UNDECIDED, PairedRule, Plan, ReferenceSeries, decide

PLAN = Plan(first=16, batch=16, cap=64, alpha=0.05)
MARGIN = 150.0
STREAMS = [
    ("steady (±50 own noise, no falls)", 50.0, 0.0),
    ("falls in 30% of episodes", 50.0, 0.3),
    ("very noisy (±400) and 10% falls", 400.0, 0.1),
]


def _ev(seeds: list[int], returns: np.ndarray, fell: np.ndarray) -> EvalResult:
    stats = summarize_returns(returns, n_boot=2)
    return EvalResult("clean", stats, None, 0, 0.0, None, seeds, [1] * len(seeds), list(fell))


def one_run(
    rng: np.random.Generator, shift: float, spread: float, fall_p: float
) -> tuple[str, int]:
    """One decision on a fresh synthetic stream: its status and the candidate episodes spent."""
    n = PLAN.cap
    base = rng.normal(3000, 200, n)
    d_fell, c_fell = rng.random(n) < fall_p, rng.random(n) < fall_p
    dense = np.where(d_fell, rng.normal(1200, 300, n), base)
    cand = np.where(c_fell, rng.normal(1200, 300, n), base + rng.normal(0, spread, n)) + shift
    seeds = list(range(n))

    def stream(vals: np.ndarray, fell: np.ndarray):  # noqa: ANN202
        def run(names: list[str], ss: list[int]) -> dict[str, EvalResult]:
            return {k: _ev(ss, vals[ss[0] : ss[-1] + 1], fell[ss[0] : ss[-1] + 1]) for k in names}

        return run

    more = stream(cand, c_fell)
    rule = PairedRule(MARGIN, None, None, fall_on_termination=False)
    first = more(["clean"], seeds[: PLAN.first])
    d, _ = decide(first, more, ReferenceSeries(stream(dense, d_fell)), rule, PLAN, seeds)
    return d.status, d.episodes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=4000)
    a = ap.parse_args()
    t0 = time.perf_counter()
    print(
        "| stream | false-pass rate (shift −151) | pass rate (shift 0) | undecided (shift 0) "
        "| mean episodes (shift 0) |"
    )
    print("|---|---:|---:|---:|---:|")
    for i, (name, spread, fall_p) in enumerate(STREAMS):
        rng = np.random.default_rng(i)
        bad = [one_run(rng, -MARGIN - 1.0, spread, fall_p)[0] for _ in range(a.runs)]
        good = [one_run(rng, 0.0, spread, fall_p) for _ in range(a.runs)]
        fp = sum(s == PASS for s in bad) / a.runs
        ok = sum(s == PASS for s, _ in good) / a.runs
        und = sum(s == UNDECIDED for s, _ in good) / a.runs
        eps = float(np.mean([e for _, e in good]))
        print(f"| {name} | {fp:.2%} | {ok:.1%} | {und:.1%} | {eps:.1f} |")
    print(f"\n{a.runs} runs per cell, {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
