"""A compact PPO trainer (CleanRL-style: one file, read top to bottom) for reference policies.

Trains a Gaussian (continuous actions) or categorical (discrete actions) MLP policy with a
separate value network, running observation normalisation (saved into the policy, as SB3's
VecNormalize would be) and reward scaling, then saves the native format with the critic beside
it (the critic attack uses it).

Its pieces (:class:`RolloutStream`, :func:`gae_batch`, :func:`ppo_update`) are also PPO
fine-tuning's (:mod:`compressor.finetune.ppo`), which runs them with frozen normalisation.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from compressor.core import atomic
from compressor.core.errors import CompressorError
from compressor.core.progress import Progress, no_progress
from compressor.policy.model import Policy, PolicySpec
from compressor.policy.native import policy_to_dict
from compressor.rl.envs import env_dims, make_vector_env


@dataclass
class PPOConfig:
    """Every knob of the trainer (defaults follow CleanRL's MuJoCo PPO)."""

    env_id: str = "Hopper-v5"
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    total_steps: int = 1_000_000
    seed: int = 1
    num_envs: int = 8
    num_steps: int = 256
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    activation: str = "tanh"
    lr: float = 3e-4
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    minibatches: int = 32
    epochs: int = 10
    clip_coef: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    obs_clip: float = 10.0
    norm_reward: bool = True
    init_log_std: float = 0.0
    eval_episodes: int = 10
    eval_seed: int = 0
    #: add ``γ·V(final obs)`` to the reward of a step cut by a time limit (not a termination)
    bootstrap_truncation: bool = False
    #: stop training after this many seconds (None: only ``total_steps``)
    time_limit_s: float | None = None


class RunningMeanStd:
    """Parallel-algorithm running mean/variance (as in SB3's VecNormalize)."""

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        self.mean = np.zeros(shape)
        self.var = np.ones(shape)
        self.count = 1e-4

    def update(self, x: np.ndarray) -> None:
        b_mean, b_var, b_count = x.mean(0), x.var(0), x.shape[0]
        delta, tot = b_mean - self.mean, self.count + b_count
        self.mean = self.mean + delta * b_count / tot
        m2 = self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / tot
        self.var, self.count = m2 / tot, tot


def _mlp(sizes: list[int], act: type[nn.Module], out_std: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b)
        last = i == len(sizes) - 2
        nn.init.orthogonal_(lin.weight, out_std if last else math.sqrt(2))
        nn.init.zeros_(lin.bias)
        layers += [lin] if last else [lin, act()]
    return nn.Sequential(*layers)


def init_critic(obs_dim: int, hidden: list[int], act: type[nn.Module]) -> nn.Sequential:
    """A fresh value network on normalised observations: CleanRL's orthogonal init, output
    gain 1 (same key layout as :class:`compressor.policy.loading.ValueNet`'s ``net``)."""
    return _mlp([obs_dim, *hidden, 1], act, 1.0)


def action_dist(policy: Policy, obs: torch.Tensor) -> torch.distributions.Distribution:
    """The policy's action distribution at raw observations ``obs``: categorical on the
    logits, or a Gaussian with the state-independent ``log_std``."""
    out = policy(obs)
    if policy.spec.head == "categorical":
        return torch.distributions.Categorical(logits=out)
    return torch.distributions.Normal(out, policy.log_std.exp().expand_as(out))


def _per_action(policy: Policy, x: torch.Tensor) -> torch.Tensor:
    # a Gaussian's log-prob and entropy factorise over action dimensions
    return x if policy.spec.head == "categorical" else x.sum(-1)


def make_train_envs(
    env_id: str,
    env_kwargs: dict[str, Any],
    num_envs: int,
    wrappers: list[dict[str, Any]] | None = None,
) -> gym.vector.VectorEnv:
    """PPO's vector env: sub-envs reset themselves inside ``step`` (rollouts cross episode
    ends), unlike the evaluation engine's explicitly seeded episodes. ``wrappers``: the
    policy's ``spec.env_wrappers`` (fine-tuning a policy trained behind them)."""
    if gym.spec(env_id).vector_entry_point is not None:
        # envs that batch their own sub-envs (learned adversaries); they auto-reset in-step
        return gym.make_vec(
            env_id, num_envs=num_envs, vectorization_mode="vector_entry_point", **env_kwargs
        )
    same_step = gym.vector.AutoresetMode.SAME_STEP
    return make_vector_env(env_id, env_kwargs, num_envs, wrappers, autoreset=same_step)


@dataclass
class Rollout:
    """``T`` steps of ``n`` envs (tensors shaped ``(T, n, ...)``) and where they stopped.

    :param next_obs: raw observations after the last step, ``(n, obs_dim)``.
    :param next_done: whether the last step ended each env's episode.
    :param returns: returns of the episodes that ended during this rollout.
    """

    obs: torch.Tensor
    act: torch.Tensor
    logp: torch.Tensor
    rew: torch.Tensor
    done: torch.Tensor
    val: torch.Tensor
    next_obs: torch.Tensor
    next_done: torch.Tensor
    returns: list[float]


@dataclass
class Batch:
    """A rollout flattened to ``T·n`` rows, with its GAE advantages and value targets."""

    obs: torch.Tensor
    act: torch.Tensor
    logp: torch.Tensor
    adv: torch.Tensor
    ret: torch.Tensor


def _set_norm(policy: Policy, obs_rms: RunningMeanStd) -> None:
    policy.obs_mean.copy_(torch.as_tensor(obs_rms.mean, dtype=torch.float32))
    policy.obs_var.copy_(torch.as_tensor(obs_rms.var, dtype=torch.float32))


class RolloutStream:
    """Vector envs that PPO steps ``T`` steps at a time, keeping episodes, reward scaling and
    the step count running across rollouts.

    :param env_id: gymnasium id. :param env_kwargs: kwargs for ``gymnasium.make``.
    :param num_envs: sub-envs. :param seed: reset seed of the first episodes.
    :param gamma: discount (the reward scale is the std of the discounted return).
    :param norm_reward: scale rewards as SB3's VecNormalize does (clipped to ±10).
    :param wrappers: the policy's ``spec.env_wrappers`` (see :mod:`compressor.rl.wrappers`).
    """

    def __init__(
        self,
        env_id: str,
        env_kwargs: dict[str, Any],
        num_envs: int,
        seed: int,
        gamma: float,
        norm_reward: bool,
        wrappers: list[dict[str, Any]] | None = None,
        bootstrap_truncation: bool = False,
    ) -> None:
        self.bootstrap_truncation = bootstrap_truncation
        dims = env_dims(env_id, env_kwargs, wrappers)
        self.discrete = bool(dims["discrete"])
        self.obs_dim, self.act_dim = int(dims["obs_dim"]), int(dims["act_dim"])
        self.low, self.high = dims["low"], dims["high"]
        self.n, self.gamma, self.norm_reward = num_envs, gamma, norm_reward
        self.envs = make_train_envs(env_id, env_kwargs, num_envs, wrappers)
        self.ret_rms, self.disc_ret = RunningMeanStd(), np.zeros(num_envs)
        self.ep_ret, self.recent = np.zeros(num_envs), cast(list[float], [])
        self.raw_obs, _ = self.envs.reset(seed=seed)
        self.done = torch.zeros(num_envs)
        self.step = 0

    def collect(
        self,
        policy: Policy,
        value: Callable[[torch.Tensor], torch.Tensor],
        T: int,
        obs_rms: RunningMeanStd | None = None,
    ) -> Rollout:
        """Step every env ``T`` times with actions sampled from ``policy``.

        :param value: raw observations -> state values (recorded for GAE).
        :param obs_rms: running statistics updated from the raw observations and copied into
            the policy before each step (training); None keeps the policy's frozen.
        """
        n = self.n
        obs = torch.zeros(T, n, self.obs_dim)
        act = torch.zeros((T, n) if self.discrete else (T, n, self.act_dim))
        logp_b, rew_b, done_b, val_b = (torch.zeros(T, n) for _ in range(4))
        finished: list[float] = []
        for t in range(T):
            if obs_rms is not None:
                obs_rms.update(self.raw_obs)
                _set_norm(policy, obs_rms)
            obs_t = torch.as_tensor(self.raw_obs, dtype=torch.float32)
            with torch.no_grad():
                d = action_dist(policy, obs_t)
                a = d.sample()
                logp = _per_action(policy, d.log_prob(a))
                val_b[t] = value(obs_t)
            obs[t], act[t], logp_b[t], done_b[t] = obs_t, a, logp, self.done
            env_a = a.numpy() if self.discrete else np.clip(a.numpy(), self.low, self.high)
            self.raw_obs, rew, term, trunc, info = self.envs.step(env_a)
            self.step += n
            self.ep_ret += rew
            d_np = np.logical_or(term, trunc)
            if self.norm_reward:  # scale rewards by the std of the discounted return
                self.disc_ret = self.disc_ret * self.gamma * (1 - d_np) + rew
                self.ret_rms.update(self.disc_ret)
                rew = np.clip(rew / np.sqrt(self.ret_rms.var + 1e-8), -10, 10)
            rew_b[t] = torch.as_tensor(rew, dtype=torch.float32)
            if self.bootstrap_truncation:
                rew_b[t] += self.gamma * self._truncated_values(value, term, trunc, info)
            self.done = torch.as_tensor(d_np, dtype=torch.float32)
            for i in np.flatnonzero(d_np):
                self.recent = (self.recent + [float(self.ep_ret[i])])[-20:]
                finished.append(float(self.ep_ret[i]))
                self.ep_ret[i] = 0.0
        next_obs = torch.as_tensor(self.raw_obs, dtype=torch.float32)
        return Rollout(obs, act, logp_b, rew_b, done_b, val_b, next_obs, self.done, finished)

    def _truncated_values(
        self,
        value: Callable[[torch.Tensor], torch.Tensor],
        term: np.ndarray,
        trunc: np.ndarray,
        info: dict[str, Any],
    ) -> torch.Tensor:
        """``V(final obs)`` where a time limit (not a termination) ended the episode, else 0:
        the episode would have gone on, so its value target must not treat the cut as an end."""
        out = torch.zeros(self.n)
        cut = np.flatnonzero(np.logical_and(trunc, np.logical_not(term)))
        final = info.get("final_obs")
        if len(cut) == 0 or final is None:
            return out
        x = torch.as_tensor(np.stack([final[i] for i in cut]), dtype=torch.float32)
        with torch.no_grad():
            out[torch.as_tensor(cut)] = value(x)
        return out

    def recent_return(self) -> float:
        """Mean return of the last 20 finished episodes (nan before the first)."""
        return float(np.mean(self.recent)) if self.recent else float("nan")

    def close(self) -> None:
        """Close the envs."""
        self.envs.close()


def gae_batch(
    ro: Rollout, value: Callable[[torch.Tensor], torch.Tensor], gamma: float, lam: float
) -> Batch:
    """Generalised advantage estimation over ``ro``, flattened into one batch.

    :param value: raw observations -> state values (bootstraps after the last step).
    """
    T, n = ro.rew.shape
    with torch.no_grad():
        next_val = value(ro.next_obs)
        adv = torch.zeros(T, n)
        last = torch.zeros(n)
        for t in reversed(range(T)):
            nonterm = 1.0 - (ro.next_done if t == T - 1 else ro.done[t + 1])
            nv = next_val if t == T - 1 else ro.val[t + 1]
            delta = ro.rew[t] + gamma * nv * nonterm - ro.val[t]
            last = delta + gamma * lam * nonterm * last
            adv[t] = last
        ret = adv + ro.val
    batch = T * n
    return Batch(
        ro.obs.reshape(batch, -1),
        ro.act.reshape(batch, *ro.act.shape[2:]),
        ro.logp.reshape(-1),
        adv.reshape(-1),
        ret.reshape(-1),
    )


def ppo_update(
    policy: Policy,
    value: Callable[[torch.Tensor], torch.Tensor],
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    b: Batch,
    cfg: PPOConfig,
    rng: np.random.Generator,
    *,
    value_only: bool = False,
    extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    before_step: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
) -> int:
    """``cfg.epochs`` passes of clipped-surrogate minibatch updates over ``b``.

    :param params: the parameters ``opt`` steps (their gradient norm is clipped).
    :param value_only: regress the value function alone (no policy or entropy term).
    :param extra_loss: minibatch raw observations -> a term added to the loss (a regulariser).
    :param before_step: called before each minibatch's loss; :param after_step: after each
        optimiser step.
    :returns: the number of optimiser steps.
    """
    batch = len(b.ret)
    mb = batch // cfg.minibatches
    n_steps = 0
    for _ in range(cfg.epochs):
        perm = torch.as_tensor(rng.permutation(batch))
        for start in range(0, batch, mb):
            idx = perm[start : start + mb]
            if before_step is not None:
                before_step()
            if value_only:
                loss = 0.5 * ((value(b.obs[idx]) - b.ret[idx]) ** 2).mean()
            else:
                d = action_dist(policy, b.obs[idx])
                logp = _per_action(policy, d.log_prob(b.act[idx]))
                ratio = (logp - b.logp[idx]).exp()
                a_mb = b.adv[idx]
                a_mb = (a_mb - a_mb.mean()) / (a_mb.std() + 1e-8)
                pg = torch.max(
                    -a_mb * ratio, -a_mb * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)
                )
                v_loss = 0.5 * ((value(b.obs[idx]) - b.ret[idx]) ** 2).mean()
                ent = _per_action(policy, d.entropy())
                loss = pg.mean() - cfg.ent_coef * ent.mean() + cfg.vf_coef * v_loss
            if extra_loss is not None:
                loss = loss + extra_loss(b.obs[idx])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            n_steps += 1
            if after_step is not None:
                after_step()
    return n_steps


def train_ppo(
    cfg: PPOConfig,
    progress: Progress = no_progress,
    init: tuple[Policy, dict[str, torch.Tensor]] | None = None,
    on_update: Callable[[int, float], None] | None = None,
) -> tuple[Policy, nn.Sequential, dict[str, Any]]:
    """Train a policy with PPO.

    :param cfg: the configuration.
    :param progress: told the env steps done after each update, with the recent return.
    :param init: a policy of the same architecture and its critic's state dict to start from
        (warm start: weights, log-std and normalisation statistics are copied).
    :param on_update: called with (global step, mean recent training return) after each update
        (a learning curve).
    :returns: the policy (with frozen normalisation stats), the critic, and training stats.
    """
    dims = env_dims(cfg.env_id, cfg.env_kwargs)
    discrete = bool(dims["discrete"])
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    spec = PolicySpec(
        obs_dim=dims["obs_dim"],
        act_dim=dims["act_dim"],
        hidden=list(cfg.hidden),
        activation=cfg.activation,
        head="categorical" if discrete else "gaussian",
        obs_norm=True,
        obs_clip=cfg.obs_clip,
        obs_eps=1e-8,
        action_low=dims["low"],
        action_high=dims["high"],
        env_id=cfg.env_id,
        env_kwargs=dict(cfg.env_kwargs),
    )
    policy = Policy(spec)
    act_cls = type(policy.act_fn)
    ref = _mlp([spec.obs_dim, *spec.hidden, spec.act_dim], act_cls, 0.01)
    with torch.no_grad():  # CleanRL's orthogonal init, copied into the policy's layers
        for dst, src in zip(policy.layers, [m for m in ref if isinstance(m, nn.Linear)]):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        if not discrete:
            policy.log_std.fill_(cfg.init_log_std)
    critic = init_critic(spec.obs_dim, spec.hidden, act_cls)
    obs_rms = RunningMeanStd((spec.obs_dim,))
    if init is not None:
        policy.load_state_dict(init[0].state_dict())
        critic.load_state_dict(init[1])
        obs_rms.mean = init[0].obs_mean.double().numpy().copy()
        obs_rms.var = init[0].obs_var.double().numpy().copy()
        obs_rms.count = 1e4  # trust the start's statistics about as much as 10k new samples
    params = list(policy.parameters()) + list(critic.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, eps=1e-5)
    stream = RolloutStream(
        cfg.env_id,
        cfg.env_kwargs,
        cfg.num_envs,
        cfg.seed,
        cfg.gamma,
        cfg.norm_reward,
        bootstrap_truncation=cfg.bootstrap_truncation,
    )
    updates = max(1, cfg.total_steps // (cfg.num_envs * cfg.num_steps))
    t0 = time.perf_counter()

    def value(obs_t: torch.Tensor) -> torch.Tensor:
        return critic(policy.normalize(obs_t)).squeeze(-1)

    stopped, done_updates = "steps", 0
    for update in range(updates):
        if cfg.time_limit_s is not None and time.perf_counter() - t0 >= cfg.time_limit_s:
            stopped = "time"
            break
        if cfg.anneal_lr:
            opt.param_groups[0]["lr"] = cfg.lr * (1.0 - update / updates)
        # normalisation stats are updated from the raw obs while collecting
        ro = stream.collect(policy, value, cfg.num_steps, obs_rms)
        b = gae_batch(ro, value, cfg.gamma, cfg.gae_lambda)
        ppo_update(policy, value, opt, params, b, cfg, rng)
        recent = stream.recent_return()
        progress(stream.step, cfg.total_steps, f"return {recent:.1f}")
        if on_update is not None:
            on_update(stream.step, recent)
        done_updates = update + 1
    stream.close()
    _set_norm(policy, obs_rms)
    stats = {
        "env_steps": stream.step,
        "updates": done_updates,
        "planned_steps": updates * cfg.num_envs * cfg.num_steps,
        "stopped": stopped,
        "wall_s": round(time.perf_counter() - t0, 1),
        "final_train_return": float(np.mean(stream.recent)) if stream.recent else None,
    }
    return policy, critic, stats


def save_trained(
    policy: Policy, critic: nn.Sequential, cfg: PPOConfig, stats: dict[str, Any], path: str | Path
) -> None:
    """Save the policy in the native format, with the critic and the training provenance."""
    policy.spec.source = {
        "format": "compressor-ppo",
        "trainer": "compressor.rl.ppo.train_ppo",
        "config": dataclasses.asdict(cfg),
        "stats": stats,
    }
    payload = policy_to_dict(policy)
    hidden = [m.out_features for m in critic if isinstance(m, nn.Linear)][:-1]
    payload["critic"] = {
        "hidden": hidden,
        "activation": policy.spec.activation,
        "input": "normalized_obs",
        "state_dict": {k: v.detach().clone() for k, v in critic.state_dict().items()},
    }
    atomic.write_with(path, lambda tmp: torch.save(payload, tmp))


def check_config(cfg: PPOConfig) -> None:
    """Raise a clear error for settings PPO cannot run with."""
    if cfg.total_steps < cfg.num_envs * cfg.num_steps:
        raise CompressorError("--steps must be at least num_envs × num_steps")
    if (cfg.num_envs * cfg.num_steps) % cfg.minibatches:
        raise CompressorError("num_envs × num_steps must be divisible by the number of minibatches")
