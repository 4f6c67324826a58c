"""Pruning schedules: *when* to cut. One-shot prunes once, then fine-tunes; micro-pruning cuts
many small magnitude steps on Zhu & Gupta's cubic schedule while fine-tuning runs.

Zhu & Gupta ("To prune, or not to prune", 2017): at pruning step ``k`` of ``n``,
``s_k = s_f + (s_0 - s_f)·(1 - k/n)³``. The cube prunes fast while many redundant weights
remain and slowly near the target, where each weight matters; the last step is the target
itself, so the schedule ends exactly there. Between steps the fine-tuning repairs the damage,
so each step removes weights of an already-adapted network.

The schedule only says when and how much; :func:`compressor.prune.criteria.prune` says which
weights (criterion) and how (mask maker), and :func:`compressor.finetune.finetune_candidate`
does the training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from compressor.core.errors import CompressorError
from compressor.finetune.common import FinetuneStats, StepHook
from compressor.policy.model import Policy
from compressor.prune.criteria import prune

#: a fine-tuning run on a student (:func:`compressor.finetune.finetune_candidate` with its inputs
#: bound), calling the hook (if any) with the global step index before each optimiser step
Tuner = Callable[[Policy, StepHook | None], FinetuneStats]


def cubic_sparsity(k: int, n: int, final: float, initial: float = 0.0) -> float:
    """Sparsity after pruning step ``k`` of ``n`` (``k = n`` gives ``final`` exactly).

    :param k: step index in ``0..n``. :param n: number of pruning steps (≥ 1).
    :param final: target sparsity. :param initial: sparsity at ``k = 0``.
    """
    if n < 1:
        raise CompressorError(f"a pruning schedule needs at least one step, got {n}")
    frac = min(max(k / n, 0.0), 1.0)
    return final + (initial - final) * (1.0 - frac) ** 3


@dataclass(frozen=True)
class MicroSchedule:
    """Micro-pruning: ``n_steps`` magnitude cuts spread evenly over the first ``end_fraction`` of
    the fine-tuning steps; the rest fine-tunes with the final mask fixed.

    :param n_steps: number of pruning steps. :param end_fraction: share of the fine-tuning
        steps during which pruning happens, in (0, 1].
    """

    n_steps: int = 16
    end_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.n_steps < 1:
            raise CompressorError(f"prune.micro_steps must be at least 1, got {self.n_steps}")
        if not 0.0 < self.end_fraction <= 1.0:
            raise CompressorError(f"prune.micro_end must be in (0, 1], got {self.end_fraction}")

    def cut_steps(self, total_steps: int) -> list[int]:
        """Optimiser step indices (``0 ≤ t < total_steps``) before which step ``k = 1..n`` cuts.

        The first cut is at step 0, the last at ``end_fraction · total_steps``, so there are
        always fine-tuning steps after the final cut.
        """
        end = max(0, min(total_steps - 1, int(self.end_fraction * total_steps)))
        if self.n_steps == 1:
            return [0]
        return [round(end * (k - 1) / (self.n_steps - 1)) for k in range(1, self.n_steps + 1)]


def micro_prune(
    dense: Policy,
    sparsity: float,
    tune: Tuner,
    total_steps: int,
    schedule: MicroSchedule,
    scope: str = "global",
) -> tuple[Policy, FinetuneStats]:
    """Prune ``dense`` to ``sparsity`` in small magnitude steps interleaved with fine-tuning.

    :param dense: the dense policy (unchanged).
    :param sparsity: final target sparsity, reached exactly at the last cut.
    :param tune: runs the fine-tuning on the student; it must call the hook with the global
        optimiser step before every step.
    :param total_steps: the number of optimiser steps ``tune`` will run.
    :param schedule: how many cuts, and over which share of the steps.
    :param scope: ``global`` or ``layer`` magnitude threshold.
    :returns: the pruned, fine-tuned student and the fine-tuning statistics (its
        ``loss_start`` is measured before the first cut, so it is the dense policy's: 0).
    """
    student = dense.clone()
    cuts = schedule.cut_steps(total_steps)
    # a step index may repeat when there are more cuts than steps: apply each level in order
    plan: dict[int, float] = {}
    for k, t in enumerate(cuts, start=1):
        plan[t] = cubic_sparsity(k, schedule.n_steps, sparsity)

    def hook(step: int) -> None:
        level = plan.get(step)
        if level is not None:
            # magnitude on the *current* (partly fine-tuned) weights; pruned weights stay pruned
            cut = prune(student, level, "magnitude", scope)
            student.set_masks(cut.masks())

    stats = tune(student, hook)
    if plan and max(plan) >= total_steps:  # fewer steps than planned: still reach the target
        student.set_masks(prune(student, sparsity, "magnitude", scope).masks())
    return student, stats


def prune_and_finetune(
    dense: Policy,
    sparsity: float,
    method: str,
    tune: Tuner,
    total_steps: int,
    *,
    scope: str = "global",
    seed: int = 0,
    schedule: MicroSchedule | None = None,
) -> tuple[Policy, FinetuneStats]:
    """One candidate: prune ``dense`` to ``sparsity`` with ``method`` and fine-tune it.

    One-shot methods (``magnitude``, ``structured``, ``random``) cut once, then ``tune`` runs
    with the mask fixed; ``micro`` cuts on the cubic schedule while ``tune`` runs.

    :param dense: the dense policy (unchanged).
    :param sparsity: target sparsity in [0, 1).
    :param method: one of :data:`compressor.prune.criteria.PRUNE_METHODS`.
    :param tune: the fine-tuning run (see :data:`Tuner`).
    :param total_steps: optimiser steps ``tune`` runs (places micro-pruning's cuts).
    :param scope: ``global`` or ``layer``. :param seed: seed of the random criterion.
    :param schedule: micro-pruning's schedule (default :class:`MicroSchedule()`).
    """
    if method == "micro":
        if not 0.0 <= sparsity < 1.0:
            raise CompressorError(f"sparsity must be in [0, 1), got {sparsity}")
        return micro_prune(dense, sparsity, tune, total_steps, schedule or MicroSchedule(), scope)
    student = prune(dense, sparsity, method, scope, seed=seed)
    return student, tune(student, None)
