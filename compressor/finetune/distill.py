"""Fine-tuning a pruned policy with its masks fixed: distillation from the dense policy, or
PPO (:mod:`compressor.finetune.ppo`), or both in turn; :func:`finetune_candidate` dispatches.

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
certificate can never be looser than the dense one's (design.md, "Certificates"). PPO also
trains the Gaussian ``log_std``; there the projection keeps ``σ ≥ σ_dense`` too (the bound
scales with ``1/σ``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from compressor.core.config import FinetuneConfig, check_finetune_settings
from compressor.core.pgd import max_divergence_point, pgd_in_ball
from compressor.core.threat import ThreatModel, sample_ball
from compressor.policy.model import Policy

if TYPE_CHECKING:
    from compressor.policy.value import ValueNet


@dataclass
class FinetuneStats:
    """:param loss_start: divergence from the dense policy before (distillation's loss; for
    PPO measured the same way, on the dense policy's states). :param loss_end: after.
    :param steps: optimiser steps of the student. :param wall_s: seconds.
    :param method: the fine-tuning method. :param ppo_env_steps: env steps of PPO.
    :param critic: ``loaded`` (the file's value function) or ``learned`` (a value-only phase
        first), None without PPO. :param critic_env_steps: env steps of that phase.
    :param train_return_start: mean return of the PPO training episodes (sampled actions,
        not the deterministic evaluation) that ended in its first rollout.
    :param train_return_end: the same in its last rollout (None: no episode ended)."""

    loss_start: float
    loss_end: float
    steps: int
    wall_s: float
    method: str = "distill"
    ppo_env_steps: int = 0
    critic: str | None = None
    critic_env_steps: int = 0
    train_return_start: float | None = None
    train_return_end: float | None = None

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
                adv = pgd_in_ball(
                    lambda z: student.divergence(tgt, student(z)),
                    x[lo:hi],
                    scale,
                    threat,
                    cfg.adversarial_steps,
                    g,
                )
                seen = torch.cat([seen[:lo], adv, seen[hi:]])
        loss = student.divergence(target, student(seen)).mean()
        if cfg.smoothness_weight > 0 and threat is not None:
            reg = smoothness_penalty(student, x, threat, scale, cfg.adversarial_steps, g)
            loss = loss + cfg.smoothness_weight * reg
        return loss

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
        constrain_(student, bounds if cfg.preserve_certificate else None)
    student.eval()
    with torch.no_grad():
        loss_end = float(loss_on(probe))
    return FinetuneStats(loss_start, loss_end, cfg.steps, time.perf_counter() - t0)


def smoothness_penalty(
    policy: Policy,
    x: torch.Tensor,
    threat: ThreatModel,
    scale: torch.Tensor,
    steps: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """SA-PPO's smoothness regulariser ``mean_s max_{ŝ ∈ B(s)} D(π(s) ‖ π(ŝ))``, the max found
    by the project's PGD (random start), with ``π(s)`` and the Gaussian ``σ`` held fixed (as
    SA-PPO's ``detach_stdev``: the policy may not widen ``σ`` to look smooth).

    :param policy: the policy being trained. :param x: raw observations, shape (batch, obs).
    :param threat: the ε-ball. :param scale: raw size of one ε unit per dimension.
    :param steps: PGD steps. :param generator: RNG of the random start.
    """
    with torch.no_grad():
        ref = policy(x)
    x_adv = max_divergence_point(policy, x, scale, threat, steps, generator, ref=ref)
    log_std: torch.Tensor | None = getattr(policy, "log_std", None)
    if log_std is None or not log_std.requires_grad:
        return policy.divergence(ref, policy(x_adv)).mean()
    log_std.requires_grad_(False)  # a leaf that needs no grad enters the graph as a constant
    try:
        return policy.divergence(ref, policy(x_adv)).mean()
    finally:
        log_std.requires_grad_(True)


def constrain_(
    student: Policy,
    bounds: list[torch.Tensor] | None,
    log_std_floor: torch.Tensor | None = None,
) -> None:
    """After an optimiser step: zero the pruned weights again (Adam's momentum would move them;
    micro-pruning may just have cut them), and with ``bounds`` project ``|w| ≤ bound`` and
    ``log_std ≥ log_std_floor`` (the certificate is monotone in ``|W|`` and in ``1/σ``).

    :param student: the policy, changed in place.
    :param bounds: ``|w_dense|`` per layer, or None (no projection).
    :param log_std_floor: the dense ``log_std`` (Gaussian heads whose ``σ`` is trained).
    """
    with torch.no_grad():
        for layer, m in zip(student.layers, student.masks()):
            layer.weight.mul_(m)
        if bounds is None:
            return
        for layer, b in zip(student.layers, bounds):
            layer.weight.copy_(torch.maximum(torch.minimum(layer.weight, b), -b))
        if log_std_floor is not None:
            student.log_std.copy_(torch.maximum(student.log_std, log_std_floor))


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


def finetune_total_steps(cfg: FinetuneConfig) -> int:
    """Optimiser steps :func:`finetune_candidate` runs on the student, i.e. how many times it
    calls ``on_step`` (micro-pruning places its cuts on this count)."""
    from compressor.finetune.ppo import ppo_total_steps

    distill_steps = dagger_total_steps(cfg) if "distill" in cfg.method else 0
    return distill_steps + (ppo_total_steps(cfg) if "ppo" in cfg.method else 0)


def finetune_candidate(
    policy: Policy,
    dense: Policy,
    states: np.ndarray,
    threat: ThreatModel | None,
    cfg: FinetuneConfig,
    collect: Callable[[Policy], np.ndarray],
    critic: ValueNet | None,
    env_id: str,
    env_kwargs: dict[str, Any],
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> FinetuneStats:
    """Fine-tune a pruned candidate in place with ``cfg.method`` (masks fixed throughout).

    ``distill``: :func:`distill_with_dagger`; ``ppo``:
    :func:`compressor.finetune.ppo.ppo_finetune`; ``distill+ppo``: the first, then the second
    from where it stopped.

    :param policy: the pruned policy (changed in place). :param dense: the dense policy.
    :param states: raw observations the dense policy visited (distillation's data; PPO
        measures its divergence from the dense policy on them).
    :param threat: the ε-ball of the perturbed rows and of the smoothness regulariser.
    :param cfg: the settings. :param collect: DAgger's state collector (see
        :func:`distill_with_dagger`). :param critic: the value function loaded with the dense
        policy, or None (PPO then learns one first). :param env_id: gymnasium id.
    :param env_kwargs: its kwargs. :param seed: seed of everything random.
    :param on_step: called with the global optimiser step index before every step of the
        student, counted across both stages (:func:`finetune_total_steps` in all).
    """
    check_finetune_settings(
        cfg.method, cfg.ppo_steps, cfg.ppo_num_envs, cfg.ppo_num_steps, cfg.ppo_minibatches
    )
    if cfg.method == "distill":
        return distill_with_dagger(
            policy, dense, states, threat, cfg, collect, seed=seed, on_step=on_step
        )
    from compressor.finetune.ppo import ppo_finetune

    first: FinetuneStats | None = None
    if cfg.method == "distill+ppo":
        first = distill_with_dagger(
            policy, dense, states, threat, cfg, collect, seed=seed, on_step=on_step
        )
    stats = ppo_finetune(
        policy,
        dense,
        critic,
        env_id,
        env_kwargs,
        threat,
        cfg,
        seed,
        on_step,
        states=states,
        step_offset=dagger_total_steps(cfg) if first else 0,
    )
    if first is None:
        return stats
    return replace(
        stats,
        method=cfg.method,
        loss_start=first.loss_start,
        steps=dagger_total_steps(cfg) + stats.steps,
        wall_s=first.wall_s + stats.wall_s,
    )
