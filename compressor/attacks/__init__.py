"""Observation attacks. ``make_attack(name, ctx)`` builds one by name."""

from __future__ import annotations

from collections.abc import Callable

from compressor.attacks.base import Attack, AttackContext
from compressor.attacks.mad import MADAttack
from compressor.attacks.random import RandomAttack
from compressor.errors import CompressorError

ATTACKS: dict[str, Callable[[AttackContext], Attack]] = {
    "random": RandomAttack,
    "mad": MADAttack,
}


def make_attack(name: str, ctx: AttackContext) -> Attack:
    """Build the attack called ``name`` for ``ctx``'s policy and threat model."""
    try:
        factory = ATTACKS[name]
    except KeyError:
        raise CompressorError(f"unknown attack {name!r}; available: {', '.join(ATTACKS)}") from None
    return factory(ctx)


__all__ = ["ATTACKS", "Attack", "AttackContext", "make_attack"]
