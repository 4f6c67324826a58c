"""Environment wrappers a policy was trained behind, re-created in the project.

A policy records them in ``PolicySpec.env_wrappers`` (a list of ``{"name": ..., **kwargs}``
tables); :func:`wrapper_fns` turns that list into the callables
``compressor.rl.envs.make_vector_env`` applies to every sub-env, so evaluation, attacks,
fine-tuning and the learned adversaries all see the observation the policy was trained on.

Only wrappers whose semantics are re-implemented here can be named: a policy file never chooses
code to import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from compressor.core.errors import CompressorError

WrapperFn = Callable[[gym.Env], gym.Env]


class TimeFeatureWrapper(gym.Wrapper):  # type: ignore[type-arg]
    """Append the remaining fraction of the episode to a flat Box observation.

    The RL Zoo trains its MuJoCo PPO/TQC policies behind ``sb3_contrib``'s wrapper of this name;
    this is the same observation: after ``t`` steps of an episode whose time limit is ``T`` the
    last entry is ``1 - t / T`` (1 at reset, falling to 0 at the limit), in the observation's
    dtype, with bounds [0, 1]. ``T`` is the env's registered ``max_episode_steps`` when it has
    one, else ``max_steps``. In ``test_mode`` the entry is constantly 1.

    >>> env = TimeFeatureWrapper(gym.make("Pendulum-v1"))
    >>> obs, _ = env.reset(seed=0)
    >>> obs.shape, float(obs[-1])
    ((4,), 1.0)

    :param env: the env to wrap (flat Box observations).
    :param max_steps: episode length when the env has no registered time limit.
    :param test_mode: keep the time entry at 1.
    """

    def __init__(self, env: gym.Env, max_steps: int = 1000, test_mode: bool = False) -> None:
        super().__init__(env)
        space = env.observation_space
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            raise CompressorError("TimeFeatureWrapper needs a flat Box observation space")
        dtype = space.dtype
        low = np.concatenate([space.low, [0.0]]).astype(dtype)
        high = np.concatenate([space.high, [1.0]]).astype(dtype)
        self.observation_space = gym.spaces.Box(low, high, dtype=dtype)  # type: ignore[arg-type]
        limit = env.spec.max_episode_steps if env.spec is not None else None
        self.horizon = int(limit if limit is not None else max_steps)
        self.test_mode = bool(test_mode)
        self.elapsed = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        self.elapsed = 0
        obs, info = self.env.reset(seed=seed, options=options)
        return self._with_time(obs), info

    def step(self, action: Any) -> tuple[np.ndarray, Any, bool, bool, dict[str, Any]]:
        self.elapsed += 1
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._with_time(obs), reward, terminated, truncated, info

    def _with_time(self, obs: Any) -> np.ndarray:
        remaining = 1.0 if self.test_mode else 1.0 - self.elapsed / self.horizon
        dtype = self.observation_space.dtype
        return np.concatenate([np.asarray(obs), np.asarray([remaining], dtype=dtype)])


def _time_feature(kwargs: dict[str, Any]) -> WrapperFn:
    max_steps, test_mode = kwargs.pop("max_steps", 1000), kwargs.pop("test_mode", False)
    if type(max_steps) is not int or max_steps <= 0 or not isinstance(test_mode, bool):
        raise CompressorError(
            "TimeFeatureWrapper takes max_steps (a positive integer) and test_mode (true/false)"
        )
    return lambda env: TimeFeatureWrapper(env, max_steps=max_steps, test_mode=test_mode)


#: Wrapper name (as recorded in a spec) -> maker of the wrapper from its keyword arguments.
WRAPPERS: dict[str, Callable[[dict[str, Any]], WrapperFn]] = {
    "TimeFeatureWrapper": _time_feature,
}
#: Keyword arguments each wrapper records in a spec when the source left them at their default.
DEFAULTS: dict[str, dict[str, Any]] = {
    "TimeFeatureWrapper": {"max_steps": 1000, "test_mode": False}
}
#: How other tools name these wrappers (RL Zoo ``config.yml`` ``env_wrapper`` entries).
ALIASES = {
    "sb3_contrib.common.wrappers.TimeFeatureWrapper": "TimeFeatureWrapper",
    "sb3_contrib.common.wrappers.time_feature.TimeFeatureWrapper": "TimeFeatureWrapper",
    "utils.wrappers.TimeFeatureWrapper": "TimeFeatureWrapper",  # the Zoo before sb3-contrib
    "rl_zoo3.wrappers.TimeFeatureWrapper": "TimeFeatureWrapper",
}


def wrapper_fns(wrappers: list[dict[str, Any]] | None) -> list[WrapperFn]:
    """The callables that apply ``wrappers`` (``PolicySpec.env_wrappers``) to an env, in order.

    :param wrappers: ``[{"name": "TimeFeatureWrapper", "max_steps": 1000}, ...]`` or None.
    :raises CompressorError: an unknown wrapper name or malformed arguments.
    """
    fns: list[WrapperFn] = []
    for entry in wrappers or []:
        kwargs = dict(entry)
        name = kwargs.pop("name", None)
        if not isinstance(name, str) or name not in WRAPPERS:
            shown = name if isinstance(name, str) else "(no name)"
            raise CompressorError(
                f"env wrapper {shown!r} is not supported (supported: {', '.join(WRAPPERS)})"
            )
        fns.append(WRAPPERS[name](kwargs))
        if kwargs:
            raise CompressorError(f"env wrapper {name} got unknown arguments {sorted(kwargs)}")
    return fns


def apply_wrappers(env: gym.Env, wrappers: list[dict[str, Any]] | None) -> gym.Env:
    """``env`` wrapped in ``wrappers`` (``PolicySpec.env_wrappers``), in order.

    :param env: the env.
    :param wrappers: the spec's wrapper list, or None.
    """
    for fn in wrapper_fns(wrappers):
        env = fn(env)
    return env


def describe_wrappers(wrappers: list[dict[str, Any]] | None) -> list[str]:
    """One sentence per wrapper saying what it adds to the observation (reports, ONNX metadata:
    what the robot must feed the exported graph).

    :param wrappers: the spec's wrapper list, or None.
    """
    out = []
    for entry in wrappers or []:
        if entry.get("name") == "TimeFeatureWrapper":
            if entry.get("test_mode"):
                out.append(
                    "The last observation entry is TimeFeatureWrapper's time feature, "
                    "constantly 1 (test mode)."
                )
            else:
                out.append(
                    "The last observation entry is TimeFeatureWrapper's remaining time "
                    "1 - t/T (t steps since reset, T the episode limit: the env's "
                    f"max_episode_steps, else {entry.get('max_steps', 1000)}): 1 at reset."
                )
        else:
            out.append(f"Observations pass through {entry.get('name')}.")
    return out
