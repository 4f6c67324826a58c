"""Fine-tuning a pruned policy with its masks fixed. :func:`finetune_candidate` is the one entry
point (``compress prune``, the search and the pipeline all call it); it runs ``cfg.method``:

- ``distill``: distillation from the dense policy with DAgger rounds
  (:mod:`compressor.finetune.distill`);
- ``ppo``: PPO on the env's reward from the file's critic or a learned one
  (:mod:`compressor.finetune.ppo`);
- ``distill+ppo``: the first, then the second from where it stopped.

With ``select_episodes`` > 0 (and a selection evaluator in :class:`FinetuneInputs`) every
checkpoint — the pruned policy before training, the end of each distillation phase, the end of
PPO — is evaluated on seeds apart from the verdict's and the best one is kept
(:mod:`compressor.finetune.select`); its evaluations also stop DAgger rounds that no longer
help and fine-tuning of a level that is clearly lost.

What both share (the run's :class:`~compressor.finetune.common.FinetuneStats`, the step hook,
SA-PPO's smoothness regulariser, the mask/certificate projection) is in
:mod:`compressor.finetune.common`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from compressor.core.config import FinetuneConfig, check_finetune_settings
from compressor.core.threat import ThreatModel
from compressor.finetune.common import FinetuneStats, StepHook
from compressor.finetune.distill import dagger_total_steps, distill_with_dagger
from compressor.finetune.ppo import ppo_finetune, ppo_total_steps
from compressor.finetune.select import CheckpointSelector, SelectFn
from compressor.policy.model import Policy
from compressor.policy.value import ValueNet

__all__ = ["FinetuneInputs", "FinetuneStats", "finetune_candidate", "finetune_total_steps"]


@dataclass(frozen=True)
class FinetuneInputs:
    """What fine-tuning a candidate reads besides its settings.

    :param dense: the dense policy (the teacher, the projection's bounds; unchanged).
    :param states: raw observations the dense policy visited, shape (n, obs_dim):
        distillation's data; PPO measures its divergence from the dense policy on them.
    :param threat: the ε-ball of the perturbed rows and of the smoothness regulariser
        (None: neither).
    :param collect: DAgger's state collector: rolls out a policy and returns the raw
        observations it visited.
    :param critic: the value function loaded with the dense policy, or None (PPO then learns
        one first).
    :param env_id: gymnasium id. :param env_kwargs: its kwargs.
    :param seed: seed of everything random.
    :param select: evaluates a policy on the selection seeds (its returns and env steps), or
        None (no checkpoint selection whatever ``select_episodes`` says).
    :param fall_fraction: a selection episode below this share of the dense median is a fall.
    """

    dense: Policy
    states: np.ndarray
    threat: ThreatModel | None
    collect: Callable[[Policy], np.ndarray]
    critic: ValueNet | None
    env_id: str
    env_kwargs: dict[str, Any]
    seed: int = 0
    select: SelectFn | None = None
    fall_fraction: float = 0.5


def finetune_total_steps(cfg: FinetuneConfig) -> int:
    """Optimiser steps :func:`finetune_candidate` runs on the student, i.e. how many times it
    calls ``on_step`` (micro-pruning places its cuts on this count).

    :param cfg: the settings.
    """
    distill_steps = dagger_total_steps(cfg) if "distill" in cfg.method else 0
    return distill_steps + (ppo_total_steps(cfg) if "ppo" in cfg.method else 0)


def finetune_candidate(
    policy: Policy,
    inputs: FinetuneInputs,
    cfg: FinetuneConfig,
    on_step: StepHook | None = None,
) -> FinetuneStats:
    """Fine-tune a pruned candidate in place with ``cfg.method`` (masks fixed throughout).

    :param policy: the pruned policy (changed in place).
    :param inputs: the dense policy, its states, the threat, the env and the critic.
    :param cfg: the settings.
    :param on_step: called with the global optimiser step index before every step of the
        student, counted across both stages (:func:`finetune_total_steps` in all).
    :returns: which method ran and what it cost (optimiser steps, env steps, seconds).
    """
    check_finetune_settings(
        cfg.method, cfg.ppo_steps, cfg.ppo_num_envs, cfg.ppo_num_steps, cfg.ppo_minibatches
    )
    t0 = time.perf_counter()
    selector = _selector(policy, inputs, cfg)
    stats = _run_methods(policy, inputs, cfg, on_step, selector)
    if selector is None:
        return stats
    if "ppo" in cfg.method:
        selector.offer(policy, "ppo")
    chosen = selector.restore_best(policy)
    wall = time.perf_counter() - t0
    return replace(stats, selection=selector.summary(chosen), wall_s=wall)


def _selector(
    policy: Policy, inputs: FinetuneInputs, cfg: FinetuneConfig
) -> CheckpointSelector | None:
    """The run's checkpoint selector, its first checkpoint the untrained pruned policy (None:
    selection is off)."""
    if inputs.select is None or cfg.select_episodes <= 0:
        return None
    sel = CheckpointSelector.for_dense(
        inputs.select,
        inputs.dense,
        fall_fraction=inputs.fall_fraction,
        lost_fraction=cfg.lost_fraction,
    )
    sel.offer(policy, "pruned")
    return sel


def _run_methods(
    policy: Policy,
    inputs: FinetuneInputs,
    cfg: FinetuneConfig,
    on_step: StepHook | None,
    selector: CheckpointSelector | None,
) -> FinetuneStats:
    """Distillation and/or PPO as ``cfg.method`` says (PPO skipped on a clearly lost level)."""
    first: FinetuneStats | None = None
    if "distill" in cfg.method:
        first = distill_with_dagger(
            policy,
            inputs.dense,
            inputs.states,
            inputs.threat,
            cfg,
            inputs.collect,
            seed=inputs.seed,
            on_step=on_step,
            selector=selector,
        )
    lost = selector is not None and selector.stopped == "lost"
    if "ppo" not in cfg.method or (lost and first is not None):
        assert first is not None
        return first
    stats = ppo_finetune(
        policy,
        inputs.dense,
        inputs.critic,
        inputs.env_id,
        inputs.env_kwargs,
        inputs.threat,
        cfg,
        inputs.seed,
        on_step,
        states=inputs.states,
        step_offset=dagger_total_steps(cfg) if first else 0,
    )
    if first is None:
        return stats
    return replace(
        stats,
        method=cfg.method,
        loss_start=first.loss_start,
        steps=(dagger_total_steps(cfg) if first.steps == cfg.steps else first.steps) + stats.steps,
        wall_s=first.wall_s + stats.wall_s,
        dagger_rounds_run=first.dagger_rounds_run,
    )
