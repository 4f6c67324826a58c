"""The one batched rollout engine, used by evaluation, attacks, fine-tuning and certification.

Episodes are defined by explicit seeds: episode ``i`` always starts from ``reset(seed=seeds[i])``,
whichever sub-env runs it, so results do not depend on the number of parallel envs and every
candidate policy is evaluated on the same episodes (common random numbers).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch

from compressor.core.progress import Progress
from compressor.rl.envs import env_dims, make_vector_env

#: Maps a batch of raw observations to the observations the policy sees (an attack).
ObsTransform = Callable[[torch.Tensor], torch.Tensor]
#: ``(episode, obs, action, reward, next_obs, terminated)`` of the running episodes, one step.
TransitionHook = Callable[
    [np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], None
]


class Actor(Protocol):
    """Anything that acts: a :class:`~compressor.policy.model.Policy`, or :class:`RandomActor`."""

    def act(self, obs: torch.Tensor) -> torch.Tensor: ...

    def sample(
        self, obs: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor: ...


class RandomActor:
    """Uniformly random actions: the reference floor of the budget's return scale.

    :param env_id: gymnasium id (its action space is read once).
    :param env_kwargs: kwargs for ``gymnasium.make``.
    :param seed: seed of the action RNG.
    """

    def __init__(self, env_id: str, env_kwargs: dict, seed: int = 0) -> None:
        dims = env_dims(env_id, env_kwargs)
        self.discrete = bool(dims["discrete"])
        self.n = int(dims["act_dim"])
        self.low = torch.tensor(dims["low"] or [0.0], dtype=torch.float32)
        self.high = torch.tensor(dims["high"] or [0.0], dtype=torch.float32)
        self.gen = torch.Generator().manual_seed(seed)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Random actions, one per row of ``obs``."""
        if self.discrete:
            return torch.randint(0, self.n, (obs.shape[0],), generator=self.gen)
        u = torch.rand((obs.shape[0], self.n), generator=self.gen)
        return self.low + u * (self.high - self.low)

    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Same as :meth:`act`."""
        return self.act(obs)


@dataclass
class RolloutResult:
    """Per-episode outcomes in seed order, plus optionally the states the policy visited.

    :param returns: undiscounted return of each episode.
    :param lengths: number of steps of each episode.
    :param seeds: the reset seed of each episode.
    :param states: visited (true, unperturbed) raw observations, or None.
    :param steps: total env steps.
    :param wall_s: wall-clock seconds.
    """

    returns: np.ndarray
    lengths: np.ndarray
    seeds: list[int]
    states: np.ndarray | None
    steps: int
    wall_s: float


class _Slots:
    """The vector env's sub-envs, stepped one by one: only the slots that run an episode are
    simulated (the idle ones at the end of an evaluation cost nothing) and no info dicts are
    merged. Each sub-env sees exactly the calls the vector env would make (its ``step`` with
    its row of the actions, ``reset(seed=..., options=...)`` as its masked reset passes them).

    :param envs: a synchronous vector env (``make_vector_env``).
    :param seeds: the reset seed of each slot's first episode.
    """

    def __init__(self, envs: gym.vector.VectorEnv, seeds: list[int]) -> None:
        self.envs: list[gym.Env] = list(getattr(envs, "envs"))  # noqa: B009 (SyncVectorEnv's)
        space = envs.single_observation_space
        self.obs = np.zeros((len(self.envs), *space.shape), dtype=space.dtype)  # type: ignore[misc]
        for slot, seed in enumerate(seeds):
            self.obs[slot], _ = self.envs[slot].reset(seed=seed, options=None)

    def reset(self, slot: int, seed: int) -> None:
        """Start a new episode in ``slot`` (its observation replaces the slot's row)."""
        self.obs[slot], _ = self.envs[slot].reset(seed=seed, options={})

    def step(
        self, actions: np.ndarray, running: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Step the ``running`` slots; returns (observations, rewards, terminated, truncated)
        for every slot (idle rows: the last observation, reward 0, not ended)."""
        n = len(self.envs)
        rew, term, trunc = np.zeros(n), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        nxt = self.obs.copy()
        for i in running:
            nxt[i], rew[i], term[i], trunc[i], _ = self.envs[i].step(actions[i])
        self.obs = nxt
        return nxt, rew, term, trunc


def actor_wrappers(policy: Actor) -> list[dict[str, Any]] | None:
    """The env wrappers ``policy`` was trained behind: a torch policy's ``spec.env_wrappers``,
    an ONNX actor's from its graph's metadata (``env_wrappers``); a RandomActor has none (it
    reads no observation)."""
    spec = getattr(policy, "spec", None)
    found = getattr(spec, "env_wrappers", None) if spec is not None else None
    if found is None:
        found = getattr(policy, "env_wrappers", None)
    return list(found) if found else None


def rollout(
    policy: Actor,
    env_id: str,
    env_kwargs: dict,
    seeds: list[int],
    *,
    num_envs: int = 16,
    deterministic: bool = True,
    perturb: ObsTransform | None = None,
    record_states: bool = False,
    max_steps: int | None = None,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
    on_transition: TransitionHook | None = None,
) -> RolloutResult:
    """Run one episode per seed with ``policy``, batching the policy across a vector env.

    :param policy: the policy (put in eval mode by the caller if it matters).
    :param env_id: gymnasium id.
    :param env_kwargs: kwargs for ``gymnasium.make``.
    :param seeds: one reset seed per episode.
    :param num_envs: parallel sub-envs (capped at ``len(seeds)``).
    :param deterministic: deterministic actions (mean / argmax) instead of sampling.
    :param perturb: observation attack applied before the policy sees the observation; the
        environment's dynamics and rewards use the true state (SA-MDP).
    :param record_states: keep the true observations visited, for distillation / certificates.
    :param max_steps: truncate each episode after this many steps (None: the env's own limit).
    :param generator: RNG for stochastic actions.
    :param progress: told the number of finished episodes (of ``len(seeds)``) after each one.
    :param on_transition: called after every vector step with the transitions of the running
        episodes (Robust Sarsa learns ``Q^π`` from them).
    """
    n_eps = len(seeds)
    if n_eps == 0:
        raise ValueError("rollout needs at least one seed")
    n = min(num_envs, n_eps)
    wrappers = actor_wrappers(policy)
    envs = make_vector_env(env_id, env_kwargs, n, wrappers)
    t0 = time.perf_counter()
    returns = np.zeros(n_eps)
    lengths = np.zeros(n_eps, dtype=np.int64)
    states: list[np.ndarray] = []
    slot_episode = np.arange(n)  # which episode each slot is running (-1: idle)
    next_episode = n
    done_count = 0
    steps = 0
    # the policy's weights are only read here (and by attacks on it): compute W ⊙ M once
    freeze = getattr(policy, "frozen", None)
    read_only = contextlib.ExitStack()
    try:
        if callable(freeze):
            read_only.enter_context(freeze())
        slots = _Slots(envs, [int(s) for s in seeds[:n]])
        while done_count < n_eps:
            active = slot_episode >= 0
            obs = slots.obs
            obs_t = torch.as_tensor(obs, dtype=torch.float32)
            if record_states:
                states.append(obs[active].astype(np.float32))
            # the clean policy sees the env's own dtype: float64 observations are normalised
            # in float64, as SB3 does (Policy.normalize); attacks work on float32 as before
            seen = torch.as_tensor(obs) if obs.dtype == np.float64 else obs_t
            if perturb is not None and bool(active.all()):
                seen = perturb(obs_t)
            elif perturb is not None:  # only the running episodes' observations are attacked
                seen = obs_t.clone()
                seen[active] = perturb(obs_t[active])
            with torch.no_grad():
                act = policy.act(seen) if deterministic else policy.sample(seen, generator)
            a_np = act.numpy()
            next_obs, rew, term, trunc = slots.step(a_np, np.flatnonzero(active))
            steps += int(active.sum())
            ep = slot_episode[active]
            returns[ep] += rew[active]
            lengths[ep] += 1
            if max_steps is not None:
                trunc = trunc | (lengths[np.maximum(slot_episode, 0)] >= max_steps)
            finished = (term | trunc) & active
            if on_transition is not None:
                on_transition(
                    ep, obs[active], a_np[active], rew[active], next_obs[active], term[active]
                )
            for slot in np.flatnonzero(finished):
                done_count += 1
                if progress is not None:
                    progress(done_count, n_eps)
                if next_episode < n_eps:
                    slot_episode[slot] = next_episode
                    slots.reset(int(slot), int(seeds[next_episode]))
                    next_episode += 1
                else:
                    slot_episode[slot] = -1  # idle: never stepped again
    finally:
        read_only.close()
        envs.close()
    return RolloutResult(
        returns=returns,
        lengths=lengths,
        seeds=[int(s) for s in seeds],
        states=np.concatenate(states) if record_states and states else None,
        steps=steps,
        wall_s=time.perf_counter() - t0,
    )
