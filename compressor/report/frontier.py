"""The performance–robustness frontier and its three-term regret decomposition.

For every evaluated sparsity: clean return, robust return (minimum over the attack suite) and
certificate; and the regret against the best return known for the task, split as in the paper
(background.md), for dense ``θ``, pruned ``θ'`` and the strongest adversary ``ν``::

    J(π*) − J̃(π_θ'∘ν) = [J(π*) − J(π_θ)] + [J(π_θ) − J(π_θ')] + [J(π_θ') − J̃(π_θ'∘ν)]
                          clean regret       pruning loss         attack gap

The terms sum to the total by construction; pruning loss and attack gap can be negative
(fine-tuning can gain clean return; a pruned policy can be harder to attack). The sweet spot is
the sparsity with the highest mean of normalised clean and robust scores, shown beside the
budget's choice, which is the *highest* sparsity within budget: the two answer different
questions (best trade-off vs smallest acceptable model).

Everything here is computed from numbers already measured; nothing is re-evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pure arithmetic on measured numbers: the renderers may import this freely
    from compressor.search.budget import Budget
    from compressor.search.candidate import Candidate


@dataclass(frozen=True)
class RegretTerms:
    """:param clean_regret: ``J(π*) − J(dense)``. :param pruning_loss: ``J(dense) − J(pruned)``.
    :param attack_gap: ``J(pruned) − J̃(pruned under the strongest attack)``."""

    clean_regret: float
    pruning_loss: float
    attack_gap: float

    @property
    def total(self) -> float:
        """``J(π*) − J̃``: the sum of the three terms."""
        return self.clean_regret + self.pruning_loss + self.attack_gap


def regret_terms(
    best_return: float, dense_clean: float, clean: float, robust: float
) -> RegretTerms:
    """The three terms for one policy (``clean``/``robust`` of the pruned policy; pass the dense
    policy's own returns for the dense row, whose pruning loss is then 0).

    :param best_return: ``J(π*)``, the best return known for the task.
    :param dense_clean: the dense policy's clean return.
    :param clean: the pruned policy's clean return. :param robust: its robust return.
    """
    return RegretTerms(best_return - dense_clean, dense_clean - clean, clean - robust)


def best_known(
    reference: float | None, measured: Sequence[float], source: str = ""
) -> tuple[float, str]:
    """``J(π*)``: the profile's reference return, unless a measured return beats it.

    :param reference: ``[reference] best_return`` of the profile (None: not given).
    :param measured: clean returns measured in the run (dense and every candidate).
    :param source: where the reference comes from.
    :returns: the value and a sentence naming where it comes from.
    """
    top = max(measured)
    if reference is not None and reference >= top:
        return float(reference), f"profile [reference] best_return ({source or 'no source given'})"
    if reference is not None:
        return top, (
            f"best clean return measured in this run ({top:.1f}); it beats the profile's "
            f"reference {reference:.1f} ({source or 'no source given'})"
        )
    return top, "best clean return measured in this run (the profile gives no reference)"


def _point(
    label: str,
    sparsity: float,
    clean: float,
    robust: float,
    strongest: str | None,
    lipschitz: float,
    radius: float | None,
    passed: bool | None,
    rule: Budget,
    best: float,
) -> dict[str, Any]:
    clean_score = (clean - rule.random_return) / rule.scale
    robust_score = (robust - rule.random_return) / rule.scale
    terms = regret_terms(best, rule.dense_clean, clean, robust)
    return {
        "label": label,
        "sparsity": sparsity,
        "clean_return": clean,
        "robust_return": robust,
        "strongest_attack": strongest,
        "lipschitz": lipschitz,
        "certified_radius": radius,
        "passed": passed,
        "clean_score": clean_score,
        "robust_score": robust_score,
        "score": (clean_score + robust_score) / 2,
        "regret": {**asdict(terms), "total": terms.total},
    }


def frontier_analysis(
    rule: Budget,
    dense_clean: float,
    dense_robust: float,
    dense_strongest: str | None,
    dense_radius: float | None,
    candidates: Sequence[Candidate],
    chosen: Candidate | None,
    reference: float | None = None,
    reference_source: str = "",
) -> dict[str, Any]:
    """The ``frontier_analysis`` block of ``report.json``.

    :param rule: the budget rule (dense returns, random-action return, scale).
    :param dense_clean: dense clean return. :param dense_robust: dense robust return (the
        minimum over the same attacks as the candidates, so the rows compare).
    :param dense_strongest: the attack that reached it.
    :param dense_radius: the dense certified radius ε*(τ).
    :param candidates: every evaluated candidate (any order).
    :param chosen: the budget's choice (None: nothing passed).
    :param reference: the profile's best known return. :param reference_source: its source.
    """
    ordered = sorted(candidates, key=lambda c: c.sparsity)
    best, source = best_known(
        reference, [dense_clean, *(c.suite.clean.stats.mean for c in ordered)], reference_source
    )
    dense = _point(
        "dense",
        0.0,
        dense_clean,
        dense_robust,
        dense_strongest,
        rule.dense_lipschitz,
        dense_radius,
        None,
        rule,
        best,
    )
    points = [
        _point(
            "candidate",
            c.sparsity,
            c.suite.clean.stats.mean,
            c.suite.robust_return,
            c.suite.strongest_attack,
            c.certificate.lipschitz,
            c.certificate.to_dict()["certified_radius"],
            c.passed,
            rule,
            best,
        )
        for c in ordered
    ]
    sweet = max([dense, *points], key=lambda p: (p["score"], p["sparsity"]))
    return {
        "best_known_return": best,
        "best_known_source": source,
        "reference_return": reference,
        "reference_source": reference_source or None,
        "score_definition": "(J - J_random) / (J_clean(dense) - J_random); score = mean of clean "
        "and robust scores",
        "dense": dense,
        "points": points,
        "sweet_spot": {"sparsity": sweet["sparsity"], "score": sweet["score"]},
        "budget_choice": (
            {"sparsity": chosen.sparsity, "score": _score_of(points, chosen.sparsity)}
            if chosen is not None
            else None
        ),
    }


def _score_of(points: list[dict[str, Any]], sparsity: float) -> float | None:
    return next((p["score"] for p in points if p["sparsity"] == sparsity), None)
