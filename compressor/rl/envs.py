"""Environment construction and the checks that a policy fits its environment."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from compressor.core.errors import CompressorError


def make_vector_env(env_id: str, env_kwargs: dict[str, Any], num_envs: int) -> gym.vector.VectorEnv:
    """A synchronous vector env with auto-reset disabled (episodes are reset explicitly, seeded).

    :param env_id: gymnasium id, e.g. ``Hopper-v5``.
    :param env_kwargs: keyword arguments for each sub-env.
    :param num_envs: number of sub-envs.
    """
    try:
        return gym.make_vec(
            env_id,
            num_envs=num_envs,
            vectorization_mode="sync",
            vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.DISABLED},
            **env_kwargs,
        )
    except gym.error.Error as exc:
        raise CompressorError(f"cannot create environment {env_id!r}: {exc}") from None
    except TypeError as exc:
        raise CompressorError(f"bad env kwargs for {env_id!r}: {exc}") from None


def env_dims(env_id: str, env_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Observation size, action size/count, head kind and action bounds of an environment."""
    try:
        env = gym.make(env_id, **(env_kwargs or {}))
    except gym.error.Error as exc:
        raise CompressorError(f"unknown or unavailable environment {env_id!r}: {exc}") from None
    except Exception as exc:  # env_kwargs (from a file) rejected by the env's own constructor,
        # which may raise anything (TypeError, AssertionError, ValueError, ...)
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CompressorError(f"bad env kwargs for {env_id!r}: {detail}") from None
    try:
        obs_space, act_space = env.observation_space, env.action_space
        if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
            raise CompressorError(f"{env_id}: only flat Box observations are supported")
        out: dict[str, Any] = {"obs_dim": int(obs_space.shape[0])}
        if isinstance(act_space, gym.spaces.Discrete):
            out.update(act_dim=int(act_space.n), discrete=True, low=None, high=None)
        elif isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1:
            out.update(
                act_dim=int(act_space.shape[0]),
                discrete=False,
                low=np.asarray(act_space.low, dtype=np.float64).tolist(),
                high=np.asarray(act_space.high, dtype=np.float64).tolist(),
            )
        else:
            raise CompressorError(f"{env_id}: unsupported action space {act_space}")
        return out
    finally:
        env.close()


def check_policy_fits_env(
    obs_dim: int, act_dim: int, discrete: bool, env_id: str, env_kwargs: dict[str, Any]
) -> None:
    """Raise a clear error if a policy's input/output sizes do not match the environment."""
    dims = env_dims(env_id, env_kwargs)
    if dims["obs_dim"] != obs_dim:
        raise CompressorError(
            f"policy expects {obs_dim} observations but {env_id} gives {dims['obs_dim']}; "
            "pass the env the policy was trained on with --env"
        )
    if dims["discrete"] != discrete or dims["act_dim"] != act_dim:
        kind = "discrete" if dims["discrete"] else "continuous"
        raise CompressorError(
            f"policy outputs {act_dim} {'logits' if discrete else 'actions'} but {env_id} has "
            f"{dims['act_dim']} {kind} actions"
        )
