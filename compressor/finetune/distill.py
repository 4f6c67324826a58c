"""Distillation of a pruned policy from the dense one, its masks fixed, and DAgger rounds on the
student's own states.

Needs no reward: the student matches the teacher's action distribution on states the teacher
visited, and on those states perturbed inside the ε-ball (so it also learns the teacher's
behaviour around them). Masks stay applied because the policy always computes with ``W ⊙ M``.

``adversarial_fraction`` of each batch is perturbed by PGD against the *student* (maximising
its divergence from the teacher's action at the true state) and trained to match the teacher at
the true state: SA-PPO's smoothness regulariser in distillation form. It makes the pruned policy
keep (or gain) robustness, not only clean behaviour.

``smoothness_weight`` (κ) adds SA-PPO's smoothness regulariser on the student alone
(:func:`~compressor.finetune.common.smoothness_penalty`): ``κ · max_{ŝ ∈ B(s)} D(π(s) ‖ π(ŝ))``
with ``π(s)`` held fixed. Unlike the adversarial rows above it needs no teacher at ``ŝ``: it
flattens the student's own response inside the ball, which is what the certificate measures.
Only the trunk is trained; ``preserve_certificate`` projects it onto ``|w| ≤ |w_dense|``
(:func:`~compressor.finetune.common.projection`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from compressor.core.config import FinetuneConfig
from compressor.core.pgd import pgd_in_ball
from compressor.core.threat import ThreatModel, sample_ball
from compressor.finetune.common import (
    FinetuneStats,
    StepCounter,
    StepHook,
    mean_divergence,
    probe_states,
    projection,
    smoothness_term,
)
from compressor.finetune.select import CheckpointSelector
from compressor.policy.model import Policy


@dataclass(frozen=True)
class _Batches:
    """Draws distillation batches from ``x_all`` and makes their loss: each batch's first
    ``n_noise`` rows perturbed by uniform noise (target: the teacher at the noisy state), the
    next ``n_adv`` by PGD on the student (target: the teacher at the true state), the rest
    clean; plus SA-PPO's smoothness term when ``smoothness`` is set."""

    student: Policy
    teacher: Policy
    x_all: torch.Tensor
    threat: ThreatModel | None
    scale: torch.Tensor
    cfg: FinetuneConfig
    generator: torch.Generator
    n_noise: int
    n_adv: int
    smoothness: Callable[[torch.Tensor], torch.Tensor] | None

    def loss(self) -> torch.Tensor:
        """The loss of one fresh batch (draws from the generator)."""
        g = self.generator
        x = self.x_all[torch.randint(0, len(self.x_all), (self.cfg.batch_size,), generator=g)]
        with torch.no_grad():
            target = self.teacher(x)
        seen = x
        if self.threat is not None and self.n_noise + self.n_adv > 0:
            seen, target = self._perturb(x, target, self.threat)
        loss = self.student.divergence(target, self.student(seen)).mean()
        if self.smoothness is not None:
            loss = loss + self.smoothness(x)
        return loss

    def _perturb(
        self, x: torch.Tensor, target: torch.Tensor, threat: ThreatModel
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch the student sees and its targets, with the noisy and adversarial rows."""
        g, n_noise = self.generator, self.n_noise
        noise = sample_ball((n_noise, x.shape[1]), threat.eps, threat.norm, g) * self.scale
        seen = torch.cat([x[:n_noise] + noise, x[n_noise:]])
        with torch.no_grad():
            target = torch.cat([self.teacher(seen[:n_noise]), target[n_noise:]])
        if self.n_adv:
            lo, hi = n_noise, n_noise + self.n_adv
            adv, tgt = self._adversarial(x[lo:hi], target[lo:hi], threat)
            seen = torch.cat([seen[:lo], adv, seen[hi:]])
            target = torch.cat([target[:lo], tgt, target[hi:]])
        return seen, target

    def _adversarial(
        self, x: torch.Tensor, target: torch.Tensor, threat: ThreatModel
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The adversarial rows and their targets (``cfg.adversarial_target``): ``true``, the
        point maximising the student's divergence from the teacher's action at the true state,
        matched to that action; ``perturbed``, the point where student and teacher differ
        most, matched to the teacher there."""
        student, teacher, steps = self.student, self.teacher, self.cfg.adversarial_steps
        if self.cfg.adversarial_target == "true":
            adv = pgd_in_ball(
                lambda z: student.divergence(target, student(z)),
                x,
                self.scale,
                threat,
                steps,
                self.generator,
            )
            return adv, target
        adv = pgd_in_ball(
            lambda z: student.divergence(teacher(z), student(z)),
            x,
            self.scale,
            threat,
            steps,
            self.generator,
        )
        with torch.no_grad():
            return adv, teacher(adv)


def _batches(
    student: Policy,
    teacher: Policy,
    states: np.ndarray,
    threat: ThreatModel | None,
    cfg: FinetuneConfig,
    g: torch.Generator,
) -> _Batches:
    """The batch maker of one :func:`distill` run."""
    x_all = torch.as_tensor(states, dtype=torch.float32)
    scale = threat.scale(teacher) if threat is not None else torch.ones(x_all.shape[1])
    return _Batches(
        student,
        teacher,
        x_all,
        threat,
        scale,
        cfg,
        g,
        n_noise=int(cfg.batch_size * cfg.perturbed_fraction) if threat is not None else 0,
        n_adv=int(cfg.batch_size * cfg.adversarial_fraction) if threat is not None else 0,
        smoothness=smoothness_term(student, threat, scale, cfg, g),
    )


def distill(
    student: Policy,
    teacher: Policy,
    states: np.ndarray,
    threat: ThreatModel | None,
    cfg: FinetuneConfig,
    seed: int = 0,
    on_step: StepHook | None = None,
    step_offset: int = 0,
) -> FinetuneStats:
    """Fine-tune ``student`` in place towards ``teacher`` on ``states`` (raw observations).

    :param student: the pruned policy (its masks are kept).
    :param teacher: the dense policy (unchanged).
    :param states: raw observations visited by the teacher, shape (n, obs_dim).
    :param threat: the ε-ball used to perturb part of each batch (None: no perturbation).
    :param cfg: the settings.
    :param seed: seed of batch sampling and perturbations.
    :param on_step: called with the global step index before every optimiser step (micro-
        pruning cuts the masks there). :param step_offset: global index of this call's step 0.
    """
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    batches = _batches(student, teacher, states, threat, cfg, g)
    project = projection(student, teacher, cfg.preserve_certificate)
    # only the trunk is trained: log_std (Σ) stays the dense one, as the certificate assumes
    params = [p for layer in student.layers for p in layer.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    # cosine decay to zero: the last steps settle the weights instead of jittering around
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1))
    tick = StepCounter(on_step, step_offset)
    probe = probe_states(batches.x_all, g)
    loss_start = mean_divergence(student, teacher, probe)
    student.train()
    for _ in range(cfg.steps):
        tick()
        loss = batches.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        project()
    student.eval()
    loss_end = mean_divergence(student, teacher, probe)
    return FinetuneStats(loss_start, loss_end, cfg.steps, time.perf_counter() - t0)


def dagger_total_steps(cfg: FinetuneConfig) -> int:
    """Optimiser steps :func:`distill_with_dagger` runs (``cfg.steps`` rounded down to whole
    phases)."""
    phases = cfg.dagger_rounds + 1
    return phases * max(1, cfg.steps // phases)


def distill_with_dagger(
    student: Policy,
    teacher: Policy,
    states: np.ndarray,
    threat: ThreatModel | None,
    cfg: FinetuneConfig,
    collect: Callable[[Policy], np.ndarray],
    seed: int = 0,
    on_step: StepHook | None = None,
    selector: CheckpointSelector | None = None,
) -> FinetuneStats:
    """:func:`distill`, in ``cfg.dagger_rounds + 1`` phases that split ``cfg.steps``; after
    each phase but the last, ``collect(student)`` returns states the student visits, which
    join the training set.

    With a ``selector``, the end of every phase is a checkpoint evaluated on the selection
    seeds (:mod:`compressor.finetune.select`); without micro-pruning's hook (whose cuts follow
    a fixed step count) the rounds stop once ``cfg.dagger_patience`` rounds in a row did not
    improve the best return, or once the level is clearly lost. The caller restores the best.

    :param student: the pruned policy (changed in place). :param teacher: the dense policy.
    :param states: raw observations the teacher visited (the first phase's data).
    :param threat: as in :func:`distill`. :param cfg: the settings.
    :param collect: rolls out a policy and returns the raw observations it visited.
    :param seed: phase ``k`` distils with seed ``seed + k``.
    :param on_step: as in :func:`distill`, with step indices counted across the phases.
    :param selector: evaluates the checkpoints (None: no selection, every round runs).
    """
    phases = cfg.dagger_rounds + 1
    per = replace(cfg, steps=max(1, cfg.steps // phases))
    data = states
    first: FinetuneStats | None = None
    t0 = time.perf_counter()
    stale, ran = 0, 0
    for k in range(phases):
        stats = distill(
            student,
            teacher,
            data,
            threat,
            per,
            seed=seed + k,
            on_step=on_step,
            step_offset=k * per.steps,
        )
        first, ran = first or stats, k + 1
        if selector is not None:
            improved = selector.offer(student, f"phase {k}")
            stale = 0 if improved or k == 0 else stale + 1
            if on_step is None and k < phases - 1 and _stop(selector, cfg, stale):
                break
        if k < phases - 1:
            data = np.concatenate([data, collect(student)])
    return FinetuneStats(
        first.loss_start if first else 0.0,
        stats.loss_end,
        cfg.steps if ran == phases else ran * per.steps,
        time.perf_counter() - t0,
        dagger_rounds_run=ran - 1 if selector is not None else None,
    )


def _stop(selector: CheckpointSelector, cfg: FinetuneConfig, stale: int) -> bool:
    """Whether the DAgger rounds end here (and why, in ``selector.stopped``): a level is only
    called lost once a DAgger round failed to improve it (the first phase alone is too short
    to judge a hard level by)."""
    if stale >= 1 and selector.clearly_lost():
        selector.stopped = "lost"
    elif cfg.dagger_patience > 0 and stale >= cfg.dagger_patience:
        selector.stopped = "no gain"
    return bool(selector.stopped)
