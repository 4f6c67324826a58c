"""Uniform noise in the ε-ball: a floor that any real attack must beat, not an attack itself."""

from __future__ import annotations

from typing import Any

import torch

from compressor.attacks.base import AttackContext
from compressor.core.threat import sample_ball


class RandomAttack:
    """Adds a uniform sample from the ε-ball to every observation."""

    name = "random"

    def __init__(self, ctx: AttackContext) -> None:
        self.threat = ctx.threat
        self.info: dict[str, Any] = {}
        self._scale = ctx.threat.scale(ctx.policy)
        self._gen = ctx.generator()

    def perturb(self, obs: torch.Tensor) -> torch.Tensor:
        """:param obs: true raw observations (batch, dim)."""
        delta = sample_ball(tuple(obs.shape), self.threat.eps, self.threat.norm, self._gen)
        return obs + delta * self._scale
