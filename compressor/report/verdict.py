"""The report's decision blocks (schema v4): how the run decides (``evaluation_method``), what
the final check did (``final_check``: every level tried as its ONNX model, and the fallback),
the tail of every evaluation (falls, worst-decile mean), and the verdict with its one
recommendation.

Built from the stages' values (compressor/run/results.py) at report time; the renderers read
only the JSON.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compressor.core.naming import CERT_NAME, cert_unit, pruning_description, sparsity_text
from compressor.core.stats import CVAR_SHARE

if TYPE_CHECKING:
    from compressor.evaluate import EvalResult, SuiteResult
    from compressor.run.results import FinalCheck, RunSetup
    from compressor.search.budget import Budget
    from compressor.search.candidate import Candidate
    from compressor.search.sequential import Decision

PAIRED_TEST = (
    "paired on common seeds and noise: per episode, candidate − dense (clean vs clean; each "
    "attack vs the dense policy's strongest attack); a condition passes when the one-sided "
    "Student-t lower bound on the mean difference at the look's level is ≥ −(b·scale), fails "
    "when the upper bound is below it, else gets [evaluation] batch more episodes "
    "(candidate and dense) up to max_episodes, and is undecided there; a policy passes only "
    "when every condition passes"
)
FALLS_TEST = (
    "an episode is a fall when it terminates before the time limit or ends below the fall "
    "threshold; a condition fails when the candidate falls more often than the dense policy "
    "beyond chance: McNemar's exact one-sided test on the seeds where exactly one of the two "
    "fell, at the look's level"
)
ERROR_RATE = (
    "the levels spend α over the planned looks (Pocock-type spending, summed by the union "
    "bound), so a candidate that truly loses more than the budget allows passes with "
    "probability at most α, whatever the number of looks"
)


def tail(e: EvalResult, rule: Budget) -> dict[str, Any]:
    """Falls and worst-decile mean of one evaluation under the run's fall rule."""
    falls = e.falls(rule.fall_below, rule.fall_on_termination)
    return {
        "n": e.stats.n,
        "falls": int(sum(falls)),
        "terminated": int(sum(e.terminated or [])),
        "cvar10": e.cvar10,
    }


def tails(suite: SuiteResult, rule: Budget) -> dict[str, dict[str, Any]]:
    """:func:`tail` of the clean evaluation and of every attack, by condition."""
    return {
        "clean": tail(suite.clean, rule),
        **{k: tail(v, rule) for k, v in suite.attacks.items()},
    }


def evaluation_method(setup: RunSetup, rule: Budget) -> dict[str, Any]:
    """How every number of the run was measured and decided (``evaluation_method``)."""
    from compressor.search.sequential import Plan

    ev, noise = setup.profile.evaluation, setup.noise
    seeds = setup.profile.decision_seeds()
    t = setup.target
    return {
        "noise": noise.to_dict() if noise is not None else None,
        "sequential": {
            **Plan.from_section(ev).to_dict(),
            "test": PAIRED_TEST,
            "error_rate": ERROR_RATE,
        },
        "cvar_share": CVAR_SHARE,
        "falls": {
            "rule": FALLS_TEST,
            "fall_fraction": ev.fall_fraction,
            "below": rule.fall_below,
            "on_termination": ev.fall_on_termination,
        },
        "decision_seeds": [seeds[0], seeds[-1]],
        "search_runtime": "torch (the candidate's own weights)",
        "final_runtime": {
            "runtime": "onnxruntime",
            "providers": list(t.providers),
            "threads": t.threads,
            "batch_size": t.batch_size,
        },
    }


def decision_line(d: Decision) -> str:
    """One sentence on a decision: what it decided, on how many episodes, and why."""
    why = "; ".join(d.reasons)
    return f"{d.status} after {d.episodes} episodes" + (f" ({why})" if why else "")


def final_check_block(
    final: FinalCheck, rule: Budget, search: list[Candidate]
) -> dict[str, Any] | None:
    """The ``final_check`` block: the dense ONNX model, each level tried, and the story."""
    if not final.attempts:
        return None
    assert final.dense_suite is not None and final.rule is not None
    dense = final.dense_suite
    attempts = [
        {
            "target_sparsity": a.candidate.target_sparsity,
            "sparsity": a.candidate.sparsity,
            "status": a.decision.status,
            "episodes": a.decision.episodes,
            "decision": a.decision.to_dict(),
            "evaluation": a.suite.to_dict(),
            "tail": tails(a.suite, rule),
            "onnx_sha256": a.export.sha256,
        }
        for a in final.attempts
    ]
    margin = final.rule.margin
    return {
        "choose": final.choose,
        "batch_size": final.batch_size,
        "reference_attack": final.rule.reference_attack,
        "dense": {
            "evaluation": dense.to_dict(),
            "tail": tails(dense, rule),
            "onnx_sha256": final.dense_export.sha256 if final.dense_export else None,
        },
        "floors": {
            "margin": margin,
            "clean_floor": dense.clean.stats.mean - margin,
            "robust_floor": dense.robust_return - margin,
        },
        "attempts": attempts,
        "story": story(final, search),
    }


def story(final: FinalCheck, search: list[Candidate]) -> str:
    """What the final check did, in words: the levels it tried and where it ended."""
    parts: list[str] = []
    for a in final.attempts:
        s = sparsity_text(a.candidate.sparsity)
        if a.decision.passed:
            lead = "fell back to " if parts else ""
            parts.append(f"{lead}{s}, which passed the final suite")
        else:
            why = "; ".join(a.decision.reasons)
            parts.append(f"{s} {a.decision.status} on the final suite ({why})")
    if final.chosen is None:
        undecided = [c for c in search if c.status == "undecided"]
        tail_note = f"; {len(undecided)} level(s) of the search were undecided" if undecided else ""
        parts.append(f"no level is left to fall back to{tail_note}")
    return "; ".join(parts) + "."


def verdict(
    setup: RunSetup, rule: Budget, final: FinalCheck, search: list[Candidate]
) -> dict[str, Any]:
    """The verdict: pass, fail or undecided, one policy to deploy and why."""
    prof = setup.profile
    method = pruning_description(prof.prune.method)
    spent = sum(c.decision.episodes for c in search if c.decision) + sum(
        a.decision.episodes for a in final.attempts
    )
    c = final.chosen
    if c is not None:
        s = sparsity_text(c.candidate.sparsity)
        cert = (
            f"{CERT_NAME} {c.candidate.certificate.lipschitz:.4g} ≤ dense "
            f"{rule.dense_lipschitz:.4g} {cert_unit(c.candidate.certificate.shift_name)}"
        )
        if c.decision is not None:
            where = f"policy.onnx in onnxruntime at batch {final.batch_size}"
            tests = "; ".join(_test_text(t) for t in c.decision.tests)
            summary = (
                f"sparsity {s} ({method}) meets budget {rule.budget} on the final suite, "
                f"measured as {where}, paired with the dense policy on the same seeds: {tests}; "
                f"{cert}"
            )
        else:  # a chosen policy judged on point estimates only
            summary = (
                f"sparsity {s} ({method}) meets budget {rule.budget}: clean "
                f"{c.suite.clean.stats.mean:.1f} ≥ {rule.clean_floor:.1f}, robust "
                f"{c.suite.robust_return:.1f} ≥ {rule.robust_floor:.1f}; {cert}"
            )
        status = "pass"
        deploy: dict[str, Any] | None = {
            "file": "policy.onnx",
            "sparsity": c.candidate.sparsity,
            "why": _why(final.choose),
        }
    else:
        open_ = [x for x in search if x.status == "undecided"]
        open_ += [a.candidate for a in final.attempts if a.decision.status == "undecided"]
        status = "undecided" if open_ else "fail"
        deploy = None
        levels = ", ".join(sparsity_text(x.sparsity) for x in open_)
        summary = (
            f"no sparsity was shown to meet budget {rule.budget}: {levels} stayed undecided "
            f"after {prof.evaluation.cap} episodes per condition (too noisy to tell), the "
            "others failed; nothing was exported"
            if open_
            else f"no evaluated sparsity met budget {rule.budget}; nothing was exported"
        )
    return {
        "passed": c is not None,
        "chosen_sparsity": c.candidate.sparsity if c is not None else None,
        "summary": summary,
        "status": status,
        "pruning": method,
        "deploy": deploy,
        "final_check": story(final, search) if final.attempts else None,
        "episodes": spent,
    }


def _why(choose: str) -> str:
    if choose == "sweet-spot":
        return (
            "the passing level with the best mean of normalised clean and robust score "
            "(--choose sweet-spot) that also passed the final check"
        )
    return "the sparsest level that passed the search and the final check (--choose max-sparsity)"


def _test_text(t: Any) -> str:
    lower = "−∞" if t.lower == -float("inf") else f"{t.lower:+.1f}".replace("-", "−")
    return (
        f"{t.condition} {t.candidate_mean:.1f} vs dense {t.reference} {t.reference_mean:.1f} "
        f"(lower bound {lower} ≥ −{t.margin:.1f}, {t.n} episodes, falls {t.falls} vs "
        f"{t.reference_falls})"
    )
