"""Tiny seeded observation noise, so that no estimate hinges on one numerical path.

A deterministic policy on a chaotic system (a walker that may or may not fall) can turn a 1e-7
difference in one action (another batch size, another runtime) into a whole different episode.
An evaluation on fixed seeds then measures one numerical path, and a verdict on it can be an
accident. So every evaluation episode ``i`` sees its observations through uniform noise of
``fraction · ε`` per dimension (in the threat model's units: the policy's normalised units by
default), drawn from a generator seeded by ``(salt, seeds[i])``: the same noise sequence for the
same episode seed whatever the policy, the runtime, the batch or the number of parallel envs.
A fall that a float difference could trigger then shows up in the estimate, as a spread over
episodes, instead of being hidden or fabricated by one path.

The noise is applied before an attack; the attacked observation is then projected back into
the ε-ball around the *true* observation, so the threat model holds exactly.

The rollout engine hands a perturbation only the running episodes' observations (one row per
running sub-env, in sub-env order); :class:`EpisodeNoise` tracks which episode each row is
from its ``on_transition`` reports, which name the episode of every row after each step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from compressor.core.threat import ThreatModel, project

#: mixes into every episode's noise seed, apart from any other use of the episode seeds
SALT = 0x0B5_0153


@dataclass(frozen=True)
class ObservationNoise:
    """Uniform observation noise of ``fraction · ε`` per dimension (ℓ∞), in ``threat``'s units.

    :param fraction: the noise's half-width as a share of ε (0: no noise).
    :param threat: ε, norm and space; the space fixes the units of the noise.
    :param scale: raw-observation size of one ε unit, per dimension
        (:meth:`ThreatModel.scale` of the policy).
    """

    fraction: float
    threat: ThreatModel
    scale: tuple[float, ...]

    @property
    def half_width(self) -> float:
        """Half-width of the noise in ε units."""
        return self.fraction * self.threat.eps

    def session(self, seeds: list[int], num_envs: int, limit: int | None) -> EpisodeNoise:
        """The noise for one rollout of ``seeds`` on ``num_envs`` sub-envs.

        :param limit: the episodes' step limit (the env's time limit or the rollout's
            ``max_steps``, the smaller), used to foresee which episodes end.
        """
        return EpisodeNoise(self, seeds, num_envs, limit)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description."""
        return {
            "fraction_of_eps": self.fraction,
            "half_width": self.half_width,
            "space": self.threat.space,
            "distribution": "uniform per dimension",
            "seeded_by": "episode seed",
        }


class EpisodeNoise:
    """One rollout's noise: ``perturb`` for the rollout's ``perturb`` hook, ``on_transition``
    for its transition hook (it learns there which episode each row is).

    :param noise: the noise settings. :param seeds: the rollout's episode seeds.
    :param num_envs: its sub-envs. :param limit: the episodes' step limit (None: none).
    """

    def __init__(
        self, noise: ObservationNoise, seeds: list[int], num_envs: int, limit: int | None
    ) -> None:
        self.noise = noise
        self.seeds = [int(s) for s in seeds]
        self.limit = limit
        n = min(num_envs, len(seeds))
        self.slots = np.arange(n)  # the episode each sub-env runs (-1: idle), as foreseen
        self.next_episode = n
        self.lengths = np.zeros(len(seeds), dtype=np.int64)
        self.gens: dict[int, np.random.Generator] = {}
        self.scale = torch.tensor(noise.scale, dtype=torch.float32)
        #: steps at which the foreseen rows disagreed with the rollout's report (0 expected)
        self.resyncs = 0

    def _gen(self, episode: int) -> np.random.Generator:
        if episode not in self.gens:
            self.gens[episode] = np.random.default_rng([SALT, self.seeds[episode]])
        return self.gens[episode]

    def rows(self, count: int) -> np.ndarray:
        """The episodes of the next ``count`` rows (the running sub-envs, in order)."""
        ep = self.slots[self.slots >= 0]
        if len(ep) != count:  # foresight failed (an env ended for its own reasons): resync later
            self.resyncs += 1
            ep = np.resize(ep if len(ep) else np.arange(1), count)
        return ep

    def draw(self, count: int, dim: int) -> torch.Tensor:
        """Noise rows (raw units) for the next step's ``count`` running episodes."""
        u = np.stack([self._gen(int(e)).uniform(-1.0, 1.0, dim) for e in self.rows(count)])
        return torch.as_tensor(u, dtype=torch.float32) * self.noise.half_width * self.scale

    def perturb(self, obs: torch.Tensor) -> torch.Tensor:
        """``obs`` with this step's noise added (the ``perturb`` hook, without an attack)."""
        return obs + self.draw(obs.shape[0], obs.shape[1])

    def around(
        self, attack: Callable[[torch.Tensor], torch.Tensor]
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """``attack`` applied to the noisy observation, projected back into the ε-ball around
        the true one (the threat model's bound holds exactly)."""
        t = self.noise.threat

        def perturb(obs: torch.Tensor) -> torch.Tensor:
            adv = attack(self.perturb(obs))
            delta = project((adv - obs) / self.scale, t.eps, t.norm)
            return obs + delta * self.scale

        return perturb

    def on_transition(
        self,
        ep: np.ndarray,
        obs: np.ndarray,
        act: np.ndarray,
        rew: np.ndarray,
        next_obs: np.ndarray,
        term: np.ndarray,
    ) -> None:
        """The rollout's report of one step: which episode each row was and which terminated."""
        running = np.flatnonzero(self.slots >= 0)
        if len(running) != len(ep) or np.any(self.slots[running] != ep):
            self.resyncs += 1
            self.slots[:] = -1
            self.slots[: len(ep)] = ep
            running = np.arange(len(ep))
        self.lengths[ep] += 1
        ended = np.asarray(term, dtype=bool)
        if self.limit is not None:
            ended = ended | (self.lengths[ep] >= self.limit)
        for slot in running[ended]:  # the rollout refills ended sub-envs in sub-env order
            if self.next_episode < len(self.seeds):
                self.slots[slot] = self.next_episode
                self.next_episode += 1
            else:
                self.slots[slot] = -1


def episode_limit(env_id: str, env_kwargs: dict[str, Any], max_steps: int | None) -> int | None:
    """The step limit of ``env_id``'s episodes: its registered time limit (or the
    ``max_episode_steps`` kwarg), capped by ``max_steps``; None when there is none."""
    import gymnasium as gym

    limit = env_kwargs.get("max_episode_steps")
    if limit is None:
        try:
            limit = gym.spec(env_id).max_episode_steps
        except Exception:  # an unregistered id: gym.make fails later with a clear error
            limit = None
    if max_steps is not None:
        limit = max_steps if limit is None else min(int(limit), max_steps)
    return None if limit is None else int(limit)
