"""Fine-tuning a pruned policy with its masks fixed: distillation from the dense policy.

Needs no reward: the student matches the teacher's action distribution on states the teacher
visited, and on those states perturbed inside the ε-ball (so it also learns the teacher's
behaviour around them). Masks stay applied because the policy always computes with ``W ⊙ M``.

``adversarial_fraction`` of each batch is perturbed by PGD against the *student* (maximising
its divergence from the teacher's action at the true state) and trained to match the teacher at
the true state: SA-PPO's smoothness regulariser in distillation form. It makes the pruned policy
keep (or gain) robustness, not only clean behaviour.

``smoothness_weight`` (κ) adds SA-PPO's smoothness regulariser on the student alone:
``κ · max_{ŝ ∈ B(s)} D(π(s) ‖ π(ŝ))`` with ``π(s)`` held fixed, the max found by the project's
one PGD. Unlike the adversarial rows above it needs no teacher at ``ŝ``: it flattens the
student's own response inside the ball, which is what the certificate measures.

``preserve_certificate`` projects every weight back into ``|w| ≤ |w_dense|`` after each step:
the absolute-product certificate is monotone in ``|W|``, so the fine-tuned policy's global
certificate can never be looser than the dense one's (design.md, "Certificates").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from compressor.attacks.pgd import pgd
from compressor.policy import Policy
from compressor.threat import ThreatModel, sample_ball


@dataclass
class FinetuneConfig:
    """:param steps: optimiser steps. :param batch_size: states per step. :param lr: Adam
    learning rate. :param perturbed_fraction: share of each batch perturbed in the ε-ball.
    :param adversarial_fraction: share of each batch attacked by PGD on the student.
    :param adversarial_steps: PGD steps of that attack.
    :param smoothness_weight: weight κ of SA-PPO's smoothness regulariser (0: off).
    :param preserve_certificate: project ``|w| ≤ |w_dense|`` after every step.
    :param dagger_rounds: rounds of rolling out the student and adding the states it visits
        (labelled by the teacher) before training again: imitation's cure for drifting into
        states the teacher never showed."""

    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    perturbed_fraction: float = 0.25
    adversarial_fraction: float = 0.25
    adversarial_steps: int = 3
    smoothness_weight: float = 0.0
    preserve_certificate: bool = False
    dagger_rounds: int = 1


@dataclass
class FinetuneStats:
    """:param loss_start: distillation loss before. :param loss_end: after. :param steps:
    optimiser steps. :param wall_s: seconds."""

    loss_start: float
    loss_end: float
    steps: int
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def distill(
    student: Policy,
    teacher: Policy,
    states: np.ndarray,
    threat: ThreatModel | None,
    cfg: FinetuneConfig,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
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
    x_all = torch.as_tensor(states, dtype=torch.float32)
    scale = threat.scale(teacher) if threat is not None else torch.ones(x_all.shape[1])
    bounds = [w.detach().abs().clone() for w in teacher.effective_weights()]
    # only the trunk is trained: log_std (Σ) stays the dense one, as the certificate assumes
    params = [p for layer in student.layers for p in layer.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    # cosine decay to zero: the last steps settle the weights instead of jittering around
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1))

    n_noise = int(cfg.batch_size * cfg.perturbed_fraction) if threat is not None else 0
    n_adv = int(cfg.batch_size * cfg.adversarial_fraction) if threat is not None else 0

    def loss_on(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(x)
        return student.divergence(target, student(x)).mean()

    def batch_loss() -> torch.Tensor:
        x = x_all[torch.randint(0, len(x_all), (cfg.batch_size,), generator=g)]
        with torch.no_grad():
            target = teacher(x)
        seen = x
        if threat is not None and n_noise + n_adv > 0:
            # rows [0, n_noise): uniform noise, teacher's action at the noisy state is the target
            noise = sample_ball((n_noise, x.shape[1]), threat.eps, threat.norm, g) * scale
            seen = torch.cat([x[:n_noise] + noise, x[n_noise:]])
            with torch.no_grad():
                target = torch.cat([teacher(seen[:n_noise]), target[n_noise:]])
            if n_adv:
                # rows [n_noise, n_noise + n_adv): PGD on the student, target at the true state
                lo, hi = n_noise, n_noise + n_adv
                tgt = target[lo:hi]
                adv = pgd(
                    lambda z: student.divergence(tgt, student(z)),
                    x[lo:hi],
                    scale,
                    threat.eps,
                    norm=threat.norm,
                    steps=cfg.adversarial_steps,
                    random_start=True,
                    generator=g,
                )
                seen = torch.cat([seen[:lo], adv, seen[hi:]])
        loss = student.divergence(target, student(seen)).mean()
        if cfg.smoothness_weight > 0 and threat is not None:
            loss = loss + cfg.smoothness_weight * smoothness(x)
        return loss

    def smoothness(x: torch.Tensor) -> torch.Tensor:
        # SA-PPO: the student's own output at the true state is the fixed reference
        with torch.no_grad():
            ref = student(x)
        assert threat is not None
        x_adv = pgd(
            lambda z: student.divergence(ref, student(z)),
            x,
            scale,
            threat.eps,
            norm=threat.norm,
            steps=cfg.adversarial_steps,
            random_start=True,
            generator=g,
        )
        return student.divergence(ref, student(x_adv)).mean()

    with torch.no_grad():
        probe = x_all[torch.randint(0, len(x_all), (min(4096, len(x_all)),), generator=g)]
        loss_start = float(loss_on(probe))
    student.train()
    for t in range(cfg.steps):
        if on_step is not None:
            on_step(step_offset + t)
        loss = batch_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():  # Adam's momentum would move pruned raw weights: keep them zero
            for layer, m in zip(student.layers, student.masks()):
                layer.weight.mul_(m)
        if cfg.preserve_certificate:
            with torch.no_grad():
                for layer, b in zip(student.layers, bounds):
                    layer.weight.copy_(torch.maximum(torch.minimum(layer.weight, b), -b))
    student.eval()
    with torch.no_grad():
        loss_end = float(loss_on(probe))
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
    on_step: Callable[[int], None] | None = None,
) -> FinetuneStats:
    """:func:`distill`, in ``cfg.dagger_rounds + 1`` phases that split ``cfg.steps``; after
    each phase but the last, ``collect(student)`` returns states the student visits, which
    join the training set.

    :param collect: rolls out a policy and returns the raw observations it visited.
    :param on_step: as in :func:`distill`, with step indices counted across the phases.
    """
    phases = cfg.dagger_rounds + 1
    per = replace(cfg, steps=max(1, cfg.steps // phases))
    data = states
    first: FinetuneStats | None = None
    t0 = time.perf_counter()
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
        first = first or stats
        if k < phases - 1:
            data = np.concatenate([data, collect(student)])
    return FinetuneStats(
        first.loss_start if first else 0.0, stats.loss_end, cfg.steps, time.perf_counter() - t0
    )
