"""Learned adversaries: attacks that are themselves RL agents, trained with the project's PPO.

SA-RL "optimal" attack (Zhang et al. 2021): in the SA-MDP with the victim fixed, finding the
worst perturbation is an MDP whose action is the perturbation; a PPO agent plays it, observing
the true state, acting ``a ∈ R^d`` mapped into the ball as ``δ = ε·tanh(a)`` (projected for
ℓ2), rewarded with the victim's negative reward.

PA-AD (Sun et al. 2022): the agent (the *director*) acts in the victim's much smaller action
space instead, choosing a unit direction ``d``; a PGD *actor* realises it, finding
``ŝ ∈ B(s)`` that moves the victim's action (mean, in std units; log-probabilities for
categorical heads) furthest along ``d``.

Both wrap the victim's environment (:class:`ObservationAdversaryEnv`, and its batched
:class:`ObservationAdversaryVecEnv`, registered with gymnasium) so
:func:`compressor.rl.ppo.train_ppo` trains them unchanged. Their weights are saved
(``<save_dir>/<name>.pt``, native policy format plus the critic) and a later run can start
from them (the dense policy's adversary, when attacking a pruned candidate).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from compressor.attacks.base import AttackContext
from compressor.core import atomic
from compressor.core.errors import CompressorError
from compressor.core.pgd import pgd
from compressor.core.threat import ThreatModel, project
from compressor.policy.model import Policy
from compressor.policy.native import policy_from_dict, policy_to_dict
from compressor.rl.envs import make_env, make_vector_env

ADVERSARY_ENV = "compressor/ObservationAdversary-v0"
#: Bound of the agent's pre-tanh action (tanh(4) ≈ 0.9993: the ball's surface is reachable).
BOUND = 4.0
MODES = ("sa_rl", "pa_ad")


def sa_rl_perturb(
    obs: torch.Tensor, action: torch.Tensor, scale: torch.Tensor, threat: ThreatModel
) -> torch.Tensor:
    """SA-RL's map from the agent's action to the observation the victim sees."""
    delta = project(torch.tanh(action) * threat.eps, threat.eps, threat.norm)
    return obs + delta * scale


def pa_ad_perturb(
    victim: Policy,
    obs: torch.Tensor,
    action: torch.Tensor,
    scale: torch.Tensor,
    threat: ThreatModel,
    steps: int,
) -> torch.Tensor:
    """PA-AD's actor: PGD towards the director's direction in the victim's action space."""
    d = action / action.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    with torch.no_grad():
        clean = _action_repr(victim, obs)

    def objective(x: torch.Tensor) -> torch.Tensor:
        return ((_action_repr(victim, x) - clean) * d).sum(-1)

    return pgd(objective, obs, scale, threat.eps, norm=threat.norm, steps=steps)


def _action_repr(victim: Policy, obs: torch.Tensor) -> torch.Tensor:
    """The victim's action at raw ``obs`` in the space PA-AD's director steers: Gaussian
    means in σ units (σ state-dependent or not), log-probabilities for categorical logits,
    the trunk's output (Q-values, deterministic actions) otherwise."""
    if victim.std_kind is not None:
        mean, log_std = victim.distribution_params(obs)
        return mean / log_std.exp()
    out = victim(obs)
    if victim.spec.head == "categorical":
        return torch.log_softmax(out, -1)
    return out


class ObservationAdversaryEnv(gym.Env):  # type: ignore[type-arg]
    """The victim's environment seen by an adversary: observe ``s``, choose the perturbation
    (SA-RL) or a direction (PA-AD), get ``-r`` of the victim acting on ``ŝ``.

    :param victim: the fixed victim policy.
    :param env_id: its environment. :param env_kwargs: kwargs for ``gymnasium.make``.
    :param threat: the ε-ball. :param mode: ``"sa_rl"`` or ``"pa_ad"``.
    :param pgd_steps: PGD steps of PA-AD's actor.
    """

    def __init__(
        self,
        victim: Policy,
        env_id: str,
        env_kwargs: dict[str, Any],
        threat: ThreatModel,
        mode: str = "sa_rl",
        pgd_steps: int = 10,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.env = make_env(env_id, env_kwargs, victim.spec.env_wrappers)
        self.victim, self.threat, self.mode, self.pgd_steps = victim, threat, mode, pgd_steps
        self.scale = threat.scale(victim)
        self.observation_space = self.env.observation_space
        dim = victim.spec.obs_dim if mode == "sa_rl" else victim.spec.act_dim
        self.action_space = gym.spaces.Box(-BOUND, BOUND, (dim,), np.float32)
        self._obs: np.ndarray = np.zeros(victim.spec.obs_dim)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        self._obs = obs
        return obs, info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        x = torch.as_tensor(self._obs, dtype=torch.float32)[None]
        a = torch.as_tensor(action, dtype=torch.float32).reshape(1, -1)
        seen = perturb_with(self.victim, self.mode, x, a, self.scale, self.threat, self.pgd_steps)
        with torch.no_grad():
            victim_action = self.victim.act(seen)[0].numpy()
        obs, rew, term, trunc, info = self.env.step(victim_action)
        self._obs = obs
        return obs, -float(rew), bool(term), bool(trunc), info

    def close(self) -> None:
        self.env.close()


def perturb_with(
    victim: Policy,
    mode: str,
    obs: torch.Tensor,
    action: torch.Tensor,
    scale: torch.Tensor,
    threat: ThreatModel,
    pgd_steps: int,
) -> torch.Tensor:
    """The observation the victim sees when the adversary (``mode``) plays ``action``."""
    if mode == "sa_rl":
        return sa_rl_perturb(obs, action, scale, threat)
    return pa_ad_perturb(victim, obs, action, scale, threat, pgd_steps)


class ObservationAdversaryVecEnv(gym.vector.VectorEnv):  # type: ignore[type-arg]
    """``num_envs`` adversary envs stepped together: the victim (and PA-AD's PGD actor) runs
    once per step on the whole batch, not once per sub-env. Auto-resets in the same step, as
    :func:`compressor.rl.ppo.train_ppo` expects. Arguments as :class:`ObservationAdversaryEnv`.
    """

    def __init__(
        self,
        num_envs: int,
        victim: Policy,
        env_id: str,
        env_kwargs: dict[str, Any],
        threat: ThreatModel,
        mode: str = "sa_rl",
        pgd_steps: int = 10,
    ) -> None:
        same_step = gym.vector.AutoresetMode.SAME_STEP
        wrappers = victim.spec.env_wrappers
        self.envs = make_vector_env(env_id, env_kwargs, num_envs, wrappers, autoreset=same_step)
        self.victim, self.threat, self.mode, self.pgd_steps = victim, threat, mode, pgd_steps
        self.scale = threat.scale(victim)
        self.num_envs = num_envs
        dim = victim.spec.obs_dim if mode == "sa_rl" else victim.spec.act_dim
        self.single_observation_space = self.envs.single_observation_space
        self.observation_space = self.envs.observation_space
        self.single_action_space = gym.spaces.Box(-BOUND, BOUND, (dim,), np.float32)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self.metadata = {"autoreset_mode": same_step}
        self._obs: np.ndarray = np.zeros((num_envs, victim.spec.obs_dim))

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        obs, info = self.envs.reset(seed=seed, options=options)
        self._obs = obs
        return obs, info

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        x = torch.as_tensor(self._obs, dtype=torch.float32)
        a = torch.as_tensor(actions, dtype=torch.float32).reshape(self.num_envs, -1)
        seen = perturb_with(self.victim, self.mode, x, a, self.scale, self.threat, self.pgd_steps)
        with torch.no_grad():
            victim_actions = self.victim.act(seen).numpy()
        obs, rew, term, trunc, info = self.envs.step(victim_actions)
        self._obs = obs
        return obs, -rew, term, trunc, info

    def close_extras(self, **kwargs: Any) -> None:
        self.envs.close()


if ADVERSARY_ENV not in gym.registry:
    gym.register(
        ADVERSARY_ENV,
        entry_point="compressor.attacks.learned:ObservationAdversaryEnv",
        vector_entry_point="compressor.attacks.learned:ObservationAdversaryVecEnv",
        disable_env_checker=True,
    )


# ---- training, saving, warm start --------------------------------------------------------------
def _load_adversary(path: Path) -> tuple[Policy, dict[str, torch.Tensor]]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    critic = obj.get("critic") if isinstance(obj, dict) else None
    if not isinstance(critic, dict) or not isinstance(critic.get("state_dict"), dict):
        raise CompressorError(f"{path}: not a saved adversary (no critic entry)")
    return policy_from_dict(obj, str(path)), critic["state_dict"]


def train_adversary(ctx: AttackContext, mode: str) -> tuple[Policy, dict[str, Any]]:
    """Train (or reuse from ``ctx.trained``) the ``mode`` adversary of ``ctx.policy``.

    :returns: the adversary policy and what training it cost (steps, seconds, return curve).
    """
    if mode in ctx.trained.adversaries:
        cached, cached_info = ctx.trained.adversaries[mode]
        assert isinstance(cached, Policy)
        return cached, cached_info
    from compressor.rl.ppo import PPOConfig, train_ppo

    env_id, env_kwargs = ctx.env()
    b = ctx.budget
    n_envs = b.learned_num_envs
    num_steps = 256 if b.learned_steps >= n_envs * 256 * 4 else 64
    if b.learned_steps < n_envs * num_steps:
        raise CompressorError(
            f"learned_steps = {b.learned_steps} is below one PPO batch ({n_envs * num_steps})"
        )
    cfg = PPOConfig(
        env_id=ADVERSARY_ENV,
        env_kwargs={
            "victim": ctx.policy,
            "env_id": env_id,
            "env_kwargs": env_kwargs,
            "threat": ctx.threat,
            "mode": mode,
            "pgd_steps": b.pgd_steps,
        },
        total_steps=b.learned_steps,
        seed=ctx.seed + 1,
        num_envs=n_envs,
        num_steps=num_steps,
        minibatches=8 if num_steps == 64 else 32,
        eval_episodes=0,
        # a return-minimising adversary over long episodes needs a long horizon, and a value
        # target that does not treat the time limit as the end of the world
        gamma=b.learned_gamma,
        bootstrap_truncation=True,
        time_limit_s=b.learned_time_s,
    )
    init_path = None if ctx.warm_start is None else ctx.warm_start / f"{mode}.pt"
    init = _load_adversary(init_path) if init_path is not None and init_path.is_file() else None
    curve: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    adversary, critic, stats = train_ppo(
        cfg, init=init, on_update=lambda s, r: curve.append((s, r))
    )
    # the agent's return is -(victim's return): report the victim's, as every table does
    victim_curve = [(s, round(-r, 1)) for s, r in curve if r == r]
    info: dict[str, Any] = {
        "env_steps": stats["env_steps"],
        "planned_steps": stats["planned_steps"],
        "stopped": stats["stopped"],
        "time_limit_s": b.learned_time_s,
        "updates": stats["updates"],
        "wall_s": round(time.perf_counter() - t0, 1),
        "warm_start": str(init_path) if init is not None else None,
        "victim_train_return_first": victim_curve[0][1] if victim_curve else None,
        "victim_train_return_last": victim_curve[-1][1] if victim_curve else None,
        "curve": victim_curve[:: max(1, len(victim_curve) // 10)],
    }
    adversary.spec.env_id, adversary.spec.env_kwargs = env_id, {}
    adversary.spec.source = {"format": "compressor-adversary", "mode": mode}
    if ctx.save_dir is not None:
        path = ctx.save_dir / f"{mode}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = policy_to_dict(adversary)
        payload["critic"] = {
            "hidden": list(adversary.spec.hidden),
            "activation": adversary.spec.activation,
            "input": "normalized_obs",
            "state_dict": {k: v.detach().clone() for k, v in critic.state_dict().items()},
        }
        payload["adversary"] = {"mode": mode, "eps": ctx.threat.eps, "norm": ctx.threat.norm}
        atomic.write_with(path, lambda tmp: torch.save(payload, tmp))
        info["saved"] = str(path)
    ctx.trained.adversaries[mode] = (adversary, info)
    return adversary, info


class _LearnedAttack:
    """Plays a trained adversary deterministically (its mean action) at every step."""

    name = ""
    mode = ""

    def __init__(self, ctx: AttackContext) -> None:
        self.threat, self.policy = ctx.threat, ctx.policy
        self.adversary, self.info = train_adversary(ctx, self.mode)
        self.steps = ctx.budget.pgd_steps
        self._scale = ctx.threat.scale(ctx.policy)

    def perturb(self, obs: torch.Tensor) -> torch.Tensor:
        """:param obs: true raw observations (batch, dim)."""
        with torch.no_grad():
            action = self.adversary.act(obs)
        return perturb_with(
            self.policy, self.mode, obs, action, self._scale, self.threat, self.steps
        ).detach()


class SARLAttack(_LearnedAttack):
    """SA-RL's "optimal" attack: a PPO agent whose action is the perturbation."""

    name = "sa_rl"
    mode = "sa_rl"


class PAADAttack(_LearnedAttack):
    """PA-AD: a PPO director choosing an action-space direction, a PGD actor realising it."""

    name = "pa_ad"
    mode = "pa_ad"
