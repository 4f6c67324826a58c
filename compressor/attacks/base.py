"""What every observation attack is: a map from true raw observations to perturbed ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from compressor.policy import Policy
from compressor.threat import ThreatModel


class Attack(Protocol):
    """A policy-aware observation attack inside ``threat``'s ε-ball.

    ``perturb`` receives a batch of true raw observations and returns what the victim sees.
    """

    name: str
    threat: ThreatModel

    def perturb(self, obs: torch.Tensor) -> torch.Tensor: ...


@dataclass
class AttackContext:
    """What an attack may use: the victim, the threat model and a seeded RNG.

    :param policy: the victim policy (its weights are read, never changed).
    :param threat: ε, norm and space.
    :param seed: seed of the attack's own randomness (random start, uniform noise).
    """

    policy: Policy
    threat: ThreatModel
    seed: int = 0

    def generator(self) -> torch.Generator:
        """A fresh generator seeded with ``seed``."""
        return torch.Generator().manual_seed(self.seed)
