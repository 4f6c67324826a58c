"""The rollout engine steps its sub-envs one by one: every episode is exactly the one a single
``gymnasium`` env gives from the same seed, and idle slots are never simulated."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from compressor.rl import rollout as rollout_mod
from compressor.rl.rollout import rollout
from conftest import make_policy


class _Elementwise:
    """An actor whose action in a row depends on that row alone, bit for bit (a matmul's
    rounding can depend on the batch size, which would blur what this test compares)."""

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.tanh(1.5 * obs[:, :1] - obs[:, 2:3])

    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.act(obs)


def _single_env_episode(policy, env_id: str, seed: int, max_steps: int) -> tuple[float, int]:
    env = gym.make(env_id)
    obs, _ = env.reset(seed=seed)
    total, n = 0.0, 0
    try:
        while True:
            with torch.no_grad():
                act = policy.act(torch.as_tensor(obs[None], dtype=torch.float32))[0].numpy()
            obs, rew, term, trunc, _ = env.step(act)
            total, n = total + float(rew), n + 1
            if term or trunc or n >= max_steps:
                return total, n
    finally:
        env.close()


def test_episodes_equal_single_env_episodes() -> None:
    pol = _Elementwise()
    seeds = [5, 9, 2, 7, 11]
    res = rollout(pol, "Pendulum-v1", {}, seeds, num_envs=2, max_steps=40)
    for i, seed in enumerate(seeds):
        ret, length = _single_env_episode(pol, "Pendulum-v1", seed, 40)
        assert res.lengths[i] == length
        assert res.returns[i] == ret  # the same floating-point sums, in the same order


def test_idle_slots_are_not_stepped(monkeypatch) -> None:
    counts: list[int] = []
    real_step = rollout_mod._Slots.step

    def counting(self, actions: np.ndarray, running: np.ndarray):
        counts.append(len(running))
        return real_step(self, actions, running)

    monkeypatch.setattr(rollout_mod._Slots, "step", counting)
    pol = make_policy("categorical", obs_dim=4, act_dim=2, env_id="CartPole-v1", seed=3)
    res = rollout(pol, "CartPole-v1", {}, [1, 2, 3, 4], num_envs=4, max_steps=60)
    assert len(set(res.lengths.tolist())) > 1  # some slots idle while others still run
    assert sum(counts) == res.steps == int(res.lengths.sum())
    assert len(counts) == int(res.lengths.max())
