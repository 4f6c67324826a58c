"""What a command runs with: the profile (by name, file, or the shipped one for the policy's
environment), with the environment and the threat model resolved once, the same way for
``compress run`` and for every single-stage command.

Explicit options win over the profile, the profile over what the policy file records. The
resolved profile is a new value (``dataclasses.replace``); a loaded profile is never changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from compressor.attacks import NEEDS_CRITIC
from compressor.core.config import Profile, load_profile, profile_for_env
from compressor.core.errors import CompressorError
from compressor.core.threat import ThreatModel
from compressor.policy.model import Policy


@dataclass(frozen=True)
class Settings:
    """A resolved profile (its ``[env]`` id and kwargs filled in) and the threat model.

    :param profile: the profile. :param threat: ε, norm and space of the attacks and bounds.
    """

    profile: Profile
    threat: ThreatModel

    @property
    def env_id(self) -> str:
        """The gymnasium id every environment of the command is built from."""
        return self.profile.env.id

    @property
    def env_kwargs(self) -> dict[str, Any]:
        """A fresh copy of the kwargs for ``gymnasium.make``."""
        return dict(self.profile.env.kwargs)


def _profile(
    policy: Policy, profile: str | Profile | None, env_id: str | None, note: Callable[[str], None]
) -> Profile:
    if isinstance(profile, Profile):
        return profile
    if profile:
        return load_profile(profile)
    env = env_id or policy.spec.env_id
    found = profile_for_env(env) if env else None
    if found is None:
        note(
            f"no shipped profile for {env or 'this policy'}: using default settings "
            f"(ε = {Profile().threat.eps}); pass --profile to choose"
        )
        return Profile(name="default")
    return found


def resolve_settings(
    policy: Policy,
    profile: str | Profile | None = None,
    *,
    env_id: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    eps: float | None = None,
    norm: str | None = None,
    space: str | None = None,
    note: Callable[[str], None] | None = None,
) -> Settings:
    """The settings of a command on ``policy``.

    :param policy: the loaded policy (its spec records its environment).
    :param profile: a profile, its name or TOML path; None: the shipped one for the policy's
        environment, else defaults (said through ``note``).
    :param env_id: an explicit environment id (``--env``), over the profile's and the policy's.
    :param env_kwargs: explicit ``gymnasium.make`` kwargs (``--env-kwargs``), likewise.
    :param eps: explicit ε, over the profile's. :param norm: explicit norm. :param space: ε units.
    :param note: receives one-line notes for the user.
    :raises CompressorError: no environment can be found.
    """
    prof = _profile(policy, profile, env_id, note or (lambda _m: None))
    env = env_id or prof.env.id or policy.spec.env_id
    if not env:
        raise CompressorError("the policy names no environment: pass --env ENV_ID")
    if env_kwargs is not None:
        kwargs = dict(env_kwargs)
    else:
        kwargs = dict(prof.env.kwargs or policy.spec.env_kwargs)
    prof = dataclasses.replace(prof, env=dataclasses.replace(prof.env, id=env, kwargs=kwargs))
    threat = ThreatModel(
        eps if eps is not None else prof.threat.eps,
        norm or prof.threat.norm,
        space or prof.threat.space,
    )
    return Settings(prof, threat)


def without_critic_attacks(profile: Profile) -> Profile:
    """The profile with the attacks that need a value function removed from both lists (for a
    policy file that ships none)."""
    keep = [a for a in profile.attacks.screen if a not in NEEDS_CRITIC]
    final = [a for a in profile.attacks.final if a not in NEEDS_CRITIC]
    attacks = dataclasses.replace(profile.attacks, screen=keep, final=final)
    return dataclasses.replace(profile, attacks=attacks)
