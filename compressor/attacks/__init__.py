"""Observation attacks. ``make_attack(name, ctx)`` builds one by name."""

from __future__ import annotations

from collections.abc import Callable

from compressor.attacks.base import Attack, AttackBudget, AttackContext
from compressor.attacks.critic import CriticAttack
from compressor.attacks.learned import PAADAttack, SARLAttack
from compressor.attacks.mad import MADAttack
from compressor.attacks.random import RandomAttack
from compressor.attacks.rs import MadRsAttack, RobustSarsaAttack
from compressor.core.errors import CompressorError

ATTACKS: dict[str, Callable[[AttackContext], Attack]] = {
    "random": RandomAttack,
    "mad": MADAttack,
    "critic": CriticAttack,
    "rs": RobustSarsaAttack,
    "mad_rs": MadRsAttack,
    "sa_rl": SARLAttack,
    "pa_ad": PAADAttack,
}
#: Attacks that train something first (Robust Sarsa's Q, a PPO adversary): meant for the
#: profile's ``final`` list (dense and chosen policy), not for screening every candidate.
TRAINED = ("rs", "mad_rs", "sa_rl", "pa_ad")
#: Attacks that need the victim's value function.
NEEDS_CRITIC = ("critic",)


def make_attack(name: str, ctx: AttackContext) -> Attack:
    """Build the attack called ``name`` for ``ctx``'s policy and threat model."""
    try:
        factory = ATTACKS[name]
    except KeyError:
        raise CompressorError(f"unknown attack {name!r}; available: {', '.join(ATTACKS)}") from None
    return factory(ctx)


__all__ = [
    "ATTACKS",
    "NEEDS_CRITIC",
    "TRAINED",
    "Attack",
    "AttackBudget",
    "AttackContext",
    "make_attack",
]
