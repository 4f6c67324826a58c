"""A compact PPO trainer (CleanRL-style: one file, read top to bottom) for reference policies.

Trains a Gaussian (continuous actions) or categorical (discrete actions) MLP policy with a
separate value network, running observation normalisation (saved into the policy, as SB3's
VecNormalize would be) and reward scaling, then saves the native format with the critic beside
it (the critic attack uses it).
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

from compressor import atomic
from compressor.envs import env_dims
from compressor.errors import CompressorError
from compressor.policy import Policy, PolicySpec, policy_to_dict


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


def train_ppo(
    cfg: PPOConfig,
    progress: Callable[[int, float], None] | None = None,
    init: tuple[Policy, dict[str, torch.Tensor]] | None = None,
) -> tuple[Policy, nn.Sequential, dict[str, Any]]:
    """Train a policy with PPO.

    :param cfg: the configuration.
    :param progress: called with (global step, mean recent training return) after each update.
    :param init: a policy of the same architecture and its critic's state dict to start from
        (warm start: weights, log-std and normalisation statistics are copied).
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
    critic = _mlp([spec.obs_dim, *spec.hidden, 1], act_cls, 1.0)
    obs_rms = RunningMeanStd((spec.obs_dim,))
    if init is not None:
        policy.load_state_dict(init[0].state_dict())
        critic.load_state_dict(init[1])
        obs_rms.mean = init[0].obs_mean.double().numpy().copy()
        obs_rms.var = init[0].obs_var.double().numpy().copy()
        obs_rms.count = 1e4  # trust the start's statistics about as much as 10k new samples
    params = list(policy.parameters()) + list(critic.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, eps=1e-5)

    if gym.spec(cfg.env_id).vector_entry_point is not None:
        # envs that batch their own sub-envs (learned adversaries); they auto-reset in-step
        envs = gym.make_vec(
            cfg.env_id,
            num_envs=cfg.num_envs,
            vectorization_mode="vector_entry_point",
            **cfg.env_kwargs,
        )
    else:
        envs = gym.make_vec(
            cfg.env_id,
            num_envs=cfg.num_envs,
            vectorization_mode="sync",
            vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
            **cfg.env_kwargs,
        )
    ret_rms, disc_ret = RunningMeanStd(), np.zeros(cfg.num_envs)
    n, T = cfg.num_envs, cfg.num_steps
    batch = n * T
    updates = max(1, cfg.total_steps // batch)
    buf_obs = torch.zeros(T, n, spec.obs_dim)
    buf_act = torch.zeros((T, n) if discrete else (T, n, spec.act_dim))
    buf_logp, buf_rew, buf_done, buf_val = (torch.zeros(T, n) for _ in range(4))
    ep_ret, recent = np.zeros(n), cast(list[float], [])
    raw_obs, _ = envs.reset(seed=cfg.seed)
    done = torch.zeros(n)
    t0, step = time.perf_counter(), 0

    def set_norm() -> None:
        policy.obs_mean.copy_(torch.as_tensor(obs_rms.mean, dtype=torch.float32))
        policy.obs_var.copy_(torch.as_tensor(obs_rms.var, dtype=torch.float32))

    def dist(obs_t: torch.Tensor) -> torch.distributions.Distribution:
        out = policy(obs_t)
        if discrete:
            return torch.distributions.Categorical(logits=out)
        return torch.distributions.Normal(out, policy.log_std.exp().expand_as(out))

    def value(obs_t: torch.Tensor) -> torch.Tensor:
        return critic(policy.normalize(obs_t)).squeeze(-1)

    for update in range(updates):
        if cfg.anneal_lr:
            opt.param_groups[0]["lr"] = cfg.lr * (1.0 - update / updates)
        # ---- collect T steps from n envs (normalisation stats updated from raw obs) --------
        for t in range(T):
            obs_rms.update(raw_obs)
            set_norm()
            obs_t = torch.as_tensor(raw_obs, dtype=torch.float32)
            with torch.no_grad():
                d = dist(obs_t)
                a = d.sample()
                logp = d.log_prob(a) if discrete else d.log_prob(a).sum(-1)
                buf_val[t] = value(obs_t)
            buf_obs[t], buf_act[t], buf_logp[t], buf_done[t] = obs_t, a, logp, done
            env_a = a.numpy() if discrete else np.clip(a.numpy(), dims["low"], dims["high"])
            raw_obs, rew, term, trunc, _ = envs.step(env_a)
            step += n
            ep_ret += rew
            d_np = np.logical_or(term, trunc)
            if cfg.norm_reward:  # scale rewards by the std of the discounted return
                disc_ret = disc_ret * cfg.gamma * (1 - d_np) + rew
                ret_rms.update(disc_ret)
                rew = np.clip(rew / np.sqrt(ret_rms.var + 1e-8), -10, 10)
            buf_rew[t] = torch.as_tensor(rew, dtype=torch.float32)
            done = torch.as_tensor(d_np, dtype=torch.float32)
            for i in np.flatnonzero(d_np):
                recent = (recent + [float(ep_ret[i])])[-20:]
                ep_ret[i] = 0.0
        # ---- GAE ------------------------------------------------------------------------
        with torch.no_grad():
            next_val = value(torch.as_tensor(raw_obs, dtype=torch.float32))
            adv = torch.zeros(T, n)
            last = torch.zeros(n)
            for t in reversed(range(T)):
                nonterm = 1.0 - (done if t == T - 1 else buf_done[t + 1])
                nv = next_val if t == T - 1 else buf_val[t + 1]
                delta = buf_rew[t] + cfg.gamma * nv * nonterm - buf_val[t]
                last = delta + cfg.gamma * cfg.gae_lambda * nonterm * last
                adv[t] = last
            ret = adv + buf_val
        b_obs, b_act = buf_obs.reshape(batch, -1), buf_act.reshape(batch, *buf_act.shape[2:])
        b_logp, b_adv, b_ret = buf_logp.reshape(-1), adv.reshape(-1), ret.reshape(-1)
        # ---- clipped-surrogate updates ------------------------------------------------------
        mb = batch // cfg.minibatches
        for _ in range(cfg.epochs):
            perm = torch.as_tensor(rng.permutation(batch))
            for start in range(0, batch, mb):
                idx = perm[start : start + mb]
                d = dist(b_obs[idx])
                logp = d.log_prob(b_act[idx]) if discrete else d.log_prob(b_act[idx]).sum(-1)
                ratio = (logp - b_logp[idx]).exp()
                a_mb = b_adv[idx]
                a_mb = (a_mb - a_mb.mean()) / (a_mb.std() + 1e-8)
                pg = torch.max(
                    -a_mb * ratio, -a_mb * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)
                )
                v_loss = 0.5 * ((value(b_obs[idx]) - b_ret[idx]) ** 2).mean()
                ent = d.entropy() if discrete else d.entropy().sum(-1)
                loss = pg.mean() - cfg.ent_coef * ent.mean() + cfg.vf_coef * v_loss
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
        if progress is not None:
            progress(step, float(np.mean(recent)) if recent else float("nan"))
    envs.close()
    set_norm()
    stats = {
        "env_steps": step,
        "updates": updates,
        "wall_s": round(time.perf_counter() - t0, 1),
        "final_train_return": float(np.mean(recent)) if recent else None,
    }
    return policy, critic, stats


def save_trained(
    policy: Policy, critic: nn.Sequential, cfg: PPOConfig, stats: dict[str, Any], path: str | Path
) -> None:
    """Save the policy in the native format, with the critic and the training provenance."""
    policy.spec.source = {
        "format": "compressor-ppo",
        "trainer": "compressor.train.train_ppo",
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
