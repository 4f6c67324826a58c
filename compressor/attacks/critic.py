"""Critic attack: PGD finds the observation in the ε-ball that the victim's own value function
rates worst, ``ŝ = argmin_{ŝ ∈ B(s)} V(ŝ)``, and feeds it to the policy (SA-PPO's critic attack).

Needs a value function (SB3 zips and ``compress train`` policies ship one). ``V``'s gradient is
not zero at ``s``, so PGD starts from the true observation.
"""

from __future__ import annotations

from typing import Any

import torch

from compressor.attacks.base import AttackContext
from compressor.core.errors import CompressorError
from compressor.core.objectives import value_objective
from compressor.core.pgd import pgd


class CriticAttack:
    """PGD on ``-V(normalize(ŝ))``: ``pgd_steps`` steps of ``ε / pgd_steps``."""

    name = "critic"

    def __init__(self, ctx: AttackContext) -> None:
        if ctx.critic is None:
            raise CompressorError(
                "the critic attack needs the policy's value function, and this file has none "
                "(SB3 zips and `compress train` policies ship one)"
            )
        self.threat = ctx.threat
        self.policy = ctx.policy
        self.critic = ctx.critic
        self.steps = ctx.budget.pgd_steps
        self.info: dict[str, Any] = {}
        self._scale = ctx.threat.scale(ctx.policy)

    def perturb(self, obs: torch.Tensor) -> torch.Tensor:
        """:param obs: true raw observations (batch, dim)."""

        objective = value_objective(self.policy, self.critic, obs)  # -V(normalize(ŝ))
        return pgd(
            objective, obs, self._scale, self.threat.eps, norm=self.threat.norm, steps=self.steps
        )
