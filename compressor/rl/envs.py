"""Environment construction and the checks that a policy fits its environment.

Every environment the tool builds for a policy goes through here, with the wrappers the policy
records (``PolicySpec.env_wrappers``, see :mod:`compressor.rl.wrappers`), so the observation is
always the one the policy was trained on.
"""

from __future__ import annotations

import importlib
from typing import Any

import gymnasium as gym
import numpy as np

from compressor.core.errors import CompressorError
from compressor.rl.wrappers import apply_wrappers, wrapper_fns


def ensure_registered(env_id: str) -> None:
    """Make ``module:name`` ids buildable everywhere: gymnasium imports ``module`` and looks
    ``name`` up in its registry; when the module registers nothing under that name but defines a
    callable ``name`` (an env factory), it is registered with that entry point here, in this
    process (every env construction calls this, so workers do too). Only ids the user passed
    reach this: a policy file naming a module is refused at load time.

    :param env_id: a gymnasium id, or ``module:EnvId`` / ``module:factory``.
    """
    if ":" not in env_id:
        return
    module_name, _, name = env_id.partition(":")
    if name in gym.registry:
        return
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ModuleNotFoundError, or the module's own import failing
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CompressorError(
            f"cannot import {module_name!r} for env {env_id!r}: {detail}"
        ) from None
    if name not in gym.registry and callable(getattr(module, name, None)):
        gym.register(id=name, entry_point=env_id)


def make_vector_env(
    env_id: str,
    env_kwargs: dict[str, Any],
    num_envs: int,
    wrappers: list[dict[str, Any]] | None = None,
    autoreset: gym.vector.AutoresetMode = gym.vector.AutoresetMode.DISABLED,
) -> gym.vector.VectorEnv:
    """A synchronous vector env, auto-reset disabled by default (episodes are reset explicitly,
    seeded), each sub-env in ``wrappers``.

    :param env_id: gymnasium id, e.g. ``Hopper-v5``.
    :param env_kwargs: keyword arguments for each sub-env.
    :param num_envs: number of sub-envs.
    :param wrappers: the policy's ``spec.env_wrappers``.
    :param autoreset: gymnasium's auto-reset mode (training loops use ``SAME_STEP``).
    """
    fns = wrapper_fns(wrappers)
    ensure_registered(env_id)
    try:
        return gym.make_vec(
            env_id,
            num_envs=num_envs,
            vectorization_mode="sync",
            vector_kwargs={"autoreset_mode": autoreset},
            wrappers=fns or None,  # type: ignore[arg-type]  # ours are Env -> Wrapper
            **env_kwargs,
        )
    except gym.error.Error as exc:
        raise CompressorError(f"cannot create environment {env_id!r}: {exc}") from None
    except TypeError as exc:
        raise CompressorError(f"bad env kwargs for {env_id!r}: {exc}") from None


def make_env(
    env_id: str,
    env_kwargs: dict[str, Any] | None = None,
    wrappers: list[dict[str, Any]] | None = None,
) -> gym.Env:
    """One env, in ``wrappers``, with construction failures as one-line errors.

    :param env_id: gymnasium id.
    :param env_kwargs: keyword arguments for ``gymnasium.make``.
    :param wrappers: the policy's ``spec.env_wrappers``.
    """
    ensure_registered(env_id)
    try:
        env = gym.make(env_id, **(env_kwargs or {}))
    except gym.error.Error as exc:
        raise CompressorError(f"unknown or unavailable environment {env_id!r}: {exc}") from None
    except Exception as exc:  # env_kwargs (from a file) rejected by the env's own constructor,
        # which may raise anything (TypeError, AssertionError, ValueError, ...)
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CompressorError(f"bad env kwargs for {env_id!r}: {detail}") from None
    try:
        return apply_wrappers(env, wrappers)
    except Exception:
        env.close()
        raise


def env_dims(
    env_id: str,
    env_kwargs: dict[str, Any] | None = None,
    wrappers: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Observation size, action size/count, head kind and action bounds of an environment.

    :param env_id: gymnasium id.
    :param env_kwargs: keyword arguments for ``gymnasium.make``.
    :param wrappers: the policy's ``spec.env_wrappers`` (they may change the observation).
    """
    env = make_env(env_id, env_kwargs, wrappers)
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
    obs_dim: int,
    act_dim: int,
    discrete: bool,
    env_id: str,
    env_kwargs: dict[str, Any],
    wrappers: list[dict[str, Any]] | None = None,
) -> None:
    """Raise a clear error if a policy's input/output sizes do not match the environment.

    :param obs_dim: the policy's observation size.
    :param act_dim: its action size or count.
    :param discrete: whether it acts with an index (categorical, q_greedy).
    :param env_id: gymnasium id.
    :param env_kwargs: keyword arguments for ``gymnasium.make``.
    :param wrappers: the policy's ``spec.env_wrappers``.
    """
    dims = env_dims(env_id, env_kwargs, wrappers)
    if dims["obs_dim"] != obs_dim:
        named = [str(w.get("name")) for w in wrappers or []]
        seen = f"{env_id} in {' + '.join(named)}" if named else env_id
        raise CompressorError(
            f"policy expects {obs_dim} observations but {seen} gives {dims['obs_dim']}; "
            "pass the env the policy was trained on with --env"
        )
    if dims["discrete"] != discrete or dims["act_dim"] != act_dim:
        kind = "discrete" if dims["discrete"] else "continuous"
        raise CompressorError(
            f"policy outputs {act_dim} {'logits' if discrete else 'actions'} but {env_id} has "
            f"{dims['act_dim']} {kind} actions"
        )
