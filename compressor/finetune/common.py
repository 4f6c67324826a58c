"""What distillation and PPO fine-tuning share: the record of a run (:class:`FinetuneStats`),
the step hook's counter, SA-PPO's smoothness regulariser, and the projection that keeps the
masks (and, with ``preserve_certificate``, the certificate) after every optimiser step.

``preserve_certificate`` projects every weight back into ``|w| ≤ |w_dense|`` after each step:
the absolute-product certificate is monotone in ``|W|``, so the fine-tuned policy's global
certificate can never be looser than the dense one's (design.md, "Certificates"). PPO also
trains the Gaussian ``log_std``; there the projection keeps ``σ ≥ σ_dense`` too (the bound
scales with ``1/σ``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from compressor.core.config import FinetuneConfig
from compressor.core.pgd import max_divergence_point
from compressor.core.threat import ThreatModel
from compressor.policy.model import Policy

#: called with the global optimiser step index before every step of the student (micro-pruning
#: cuts the masks there)
StepHook = Callable[[int], None]

#: states on which the divergence from the dense policy is measured before and after
PROBE_STATES = 4096


@dataclass(frozen=True)
class FinetuneStats:
    """What one fine-tuning run did and what it cost.

    :param loss_start: divergence from the dense policy before (distillation's loss; for
        PPO measured the same way, on the dense policy's states). :param loss_end: after.
    :param steps: optimiser steps of the student. :param wall_s: seconds.
    :param method: the fine-tuning method that ran. :param ppo_env_steps: env steps of PPO.
    :param critic: ``loaded`` (the file's value function) or ``learned`` (a value-only phase
        first), None without PPO. :param critic_env_steps: env steps of that phase.
    :param train_return_start: mean return of the PPO training episodes (sampled actions,
        not the deterministic evaluation) that ended in its first rollout.
    :param train_return_end: the same in its last rollout (None: no episode ended).
    :param dagger_rounds_run: DAgger rounds distillation ran with checkpoint selection on
        (fewer than asked when it stopped them; None: selection off, every round ran).
    :param selection: what checkpoint selection did (:meth:`CheckpointSelector.summary`:
        every checkpoint's return and falls, the one kept, why it stopped, its env steps);
        None when off."""

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
    dagger_rounds_run: int | None = None
    selection: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (without the selection's fields when it was off, as before it)."""
        d = asdict(self)
        for k in ("dagger_rounds_run", "selection"):
            if d[k] is None:
                del d[k]
        return d


class StepCounter:
    """Counts the student's optimiser steps, calling the hook with each one's global index
    before it runs.

    :param on_step: the hook, or None. :param offset: global index of this run's step 0.
    """

    def __init__(self, on_step: StepHook | None, offset: int = 0) -> None:
        self.on_step, self.offset, self.next = on_step, offset, offset

    def __call__(self) -> None:
        """Before one optimiser step."""
        if self.on_step is not None:
            self.on_step(self.next)
        self.next += 1

    @property
    def steps(self) -> int:
        """Steps counted so far."""
        return self.next - self.offset


def probe_states(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Up to :data:`PROBE_STATES` rows of ``x`` drawn with replacement: where the divergence
    from the dense policy is measured before and after.

    :param x: raw observations, shape (n, obs_dim). :param generator: RNG of the draw.
    """
    pick = torch.randint(0, len(x), (min(PROBE_STATES, len(x)),), generator=generator)
    return x[pick]


def mean_divergence(student: Policy, dense: Policy, x: torch.Tensor) -> float:
    """Mean divergence of ``student``'s action distribution from ``dense``'s on ``x``.

    :param student: the fine-tuned policy. :param dense: the reference. :param x: raw states.
    """
    with torch.no_grad():
        return float(student.divergence(dense(x), student(x)).mean())


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


def smoothness_term(
    policy: Policy,
    threat: ThreatModel | None,
    scale: torch.Tensor | None,
    cfg: FinetuneConfig,
    generator: torch.Generator,
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``κ ·`` :func:`smoothness_penalty` as a loss term of a batch of raw observations, or
    None when it is off (no threat, or ``cfg.smoothness_weight`` = 0).

    :param policy: the policy being trained. :param threat: the ε-ball.
    :param scale: raw size of one ε unit (the dense policy's). :param cfg: ``smoothness_weight``
        and ``adversarial_steps`` (PGD steps). :param generator: RNG of the PGD starts.
    """
    if threat is None or scale is None or cfg.smoothness_weight <= 0:
        return None

    def term(x: torch.Tensor) -> torch.Tensor:
        pen = smoothness_penalty(policy, x, threat, scale, cfg.adversarial_steps, generator)
        return cfg.smoothness_weight * pen

    return term


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


def projection(
    student: Policy, dense: Policy, preserve_certificate: bool, log_std: bool = False
) -> Callable[[], None]:
    """The :func:`constrain_` to run after every optimiser step of ``student``.

    :param student: the policy being trained. :param dense: the bounds' source (unchanged).
    :param preserve_certificate: project onto ``|w| ≤ |w_dense|`` (else only re-mask).
    :param log_std: the Gaussian ``log_std`` is trained too: keep it ``≥`` the dense one.
    """
    if not preserve_certificate:
        return lambda: constrain_(student, None)
    bounds = [w.detach().abs().clone() for w in dense.effective_weights()]
    floor = dense.log_std.detach().clone() if log_std else None
    return lambda: constrain_(student, bounds, floor)
