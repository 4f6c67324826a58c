"""What every observation attack is: a map from true raw observations to perturbed ones."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from compressor.core.config import AttackBudget
from compressor.core.threat import ThreatModel
from compressor.policy.model import Policy

#: A state-value function on the policy's *normalised* observation (``ValueNet``).
Critic = Callable[[torch.Tensor], torch.Tensor]


class Attack(Protocol):
    """A policy-aware observation attack inside ``threat``'s ε-ball.

    ``perturb`` receives a batch of true raw observations and returns what the victim sees.
    ``info`` says what building the attack cost (training steps, seconds, choices made); it is
    empty for attacks that need no training.
    """

    name: str
    threat: ThreatModel
    info: dict[str, Any]

    def perturb(self, obs: torch.Tensor) -> torch.Tensor: ...


@dataclass
class TrainedCache:
    """What the attacks of one suite train and share: MAD+RS reuses Robust Sarsa's ``Q``, and a
    learned adversary is trained once per mode. Each entry is ``(network, info)``.

    :param robust_q: RS's strongest ``Q^π`` and what training it cost.
    :param adversaries: learned adversaries by mode (``sa_rl``, ``pa_ad``).
    """

    robust_q: tuple[nn.Module, dict[str, Any]] | None = None
    adversaries: dict[str, tuple[nn.Module, dict[str, Any]]] = field(default_factory=dict)


@dataclass(frozen=True)
class AttackContext:
    """What an attack may use: the victim, the threat model, a seeded RNG, and for the attacks
    that need them, the environment, the victim's value function and a training budget.

    :param policy: the victim policy (its weights are read, never changed).
    :param threat: ε, norm and space.
    :param seed: seed of the attack's own randomness (random start, training).
    :param critic: the victim's value function on normalised observations (critic attack).
    :param env_id: the victim's environment (Robust Sarsa and learned adversaries train in it).
    :param env_kwargs: kwargs for ``gymnasium.make``.
    :param budget: training budgets.
    :param save_dir: where learned adversaries and Q-functions save their weights (or None).
    :param warm_start: folder of another policy's saved adversaries to start training from
        (the dense policy's, when attacking a pruned candidate).
    :param trained: what the attacks of one suite train and share (a fresh cache per policy).
    """

    policy: Policy
    threat: ThreatModel
    seed: int = 0
    critic: Critic | None = None
    env_id: str = ""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    budget: AttackBudget = field(default_factory=AttackBudget)
    save_dir: Path | None = None
    warm_start: Path | None = None
    trained: TrainedCache = field(default_factory=TrainedCache)

    def for_policy(self, policy: Policy, **changes: Any) -> AttackContext:
        """The same context for another victim, with a fresh cache (nothing trained on one
        policy is reused for another, except through ``warm_start``)."""
        return dataclasses.replace(self, policy=policy, trained=TrainedCache(), **changes)

    def generator(self) -> torch.Generator:
        """A fresh generator seeded with ``seed``."""
        return torch.Generator().manual_seed(self.seed)

    def env(self) -> tuple[str, dict[str, Any]]:
        """The environment to train in: ``env_id`` or the one the policy records."""
        env_id = self.env_id or self.policy.spec.env_id
        if not env_id:
            from compressor.core.errors import CompressorError

            raise CompressorError("this attack trains in the environment; pass --env ENV_ID")
        return env_id, dict(self.env_kwargs or self.policy.spec.env_kwargs)
