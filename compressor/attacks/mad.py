"""MAD: maximal action difference. PGD maximises the victim's own divergence between its action
at the true and at the perturbed observation (SA-PPO's policy-aware attack), per head
(:meth:`compressor.policy.model.Policy.attack_objective`):

- gaussian (and squashed with a parameter σ): ``‖Σ^{-1/2}(μ(ŝ) - μ(s))‖²``;
- categorical: ``KL(π(s) ‖ π(ŝ))``;
- squashed_gaussian with a state-dependent σ (SAC, TQC) and tanh-squashed deterministic actors
  (TD3, DDPG): ``‖a(ŝ) - a(s)‖²``, the deployed action after the tanh-rescale, in action units
  (what the robot executes; σ never reaches it);
- deterministic actors that clip: the same distance before the clip;
- q_greedy (DQN, QR-DQN): the margin ``max_{j≠a*} Q_j(ŝ) - Q_{a*}(ŝ)``, ``a* = argmax Q(s)``:
  positive exactly when the greedy action flips.

The gradient of the divergences is zero at ŝ = s, so PGD starts from a random point of the ball.
"""

from __future__ import annotations

from typing import Any

import torch

from compressor.attacks.base import AttackContext
from compressor.core.pgd import max_divergence_measured


class MADAttack:
    """PGD on the policy's own divergence: ``steps`` steps of ``ε / steps`` (10 of ε/10)."""

    name = "mad"

    def __init__(self, ctx: AttackContext, steps: int | None = None) -> None:
        self.threat = ctx.threat
        self.info: dict[str, Any] = {}
        self.policy = ctx.policy
        self.steps = steps if steps is not None else ctx.budget.pgd_steps
        self._scale = ctx.threat.scale(ctx.policy)
        self._gen = ctx.generator()

    def perturb(self, obs: torch.Tensor) -> torch.Tensor:
        """:param obs: true raw observations (batch, dim)."""
        return self.perturb_measured(obs)[0]

    def perturb_measured(
        self, obs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`perturb` (the same point, the same random draws) with the policy's output at
        ``obs`` and at the returned point, as the ascent computed them (the second is None
        where the ascent runs through autograd): an evaluation's TV meter reads them instead
        of running two more forward passes."""
        return max_divergence_measured(
            self.policy, obs, self._scale, self.threat, self.steps, self._gen
        )
