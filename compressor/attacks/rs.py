"""Robust Sarsa (RS) and MAD+RS: attacks through a learned action-value function of the victim.

RS (Zhang et al. 2020, SA-PPO's strongest attack on PPO) learns ``Q^π(s, a)`` of the *fixed*
victim from its own rollouts (on-policy Sarsa, here with TD(λ) targets so that values travel
far in few epochs), with a smoothness regulariser ``max_{â ∈ B(a)} (Q(s, â) - Q(s, a))²`` that
keeps ``Q`` from being exploitable by tiny action changes, then PGD finds the observation that
makes the victim choose the worst action by that ``Q``: ``min_{ŝ ∈ B(s)} Q(s, μ(ŝ))``.
The regulariser's strength matters and no single value is best, so a few are scanned and the
one whose attack reaches the lowest return (on scan episodes apart from the evaluation's) kept.

MAD+RS mixes both objectives (SA-PPO's ``sarsa_action_ratio``): ``(1 - r)·(-Q/σ_Q) + r·Δ``
with ``Δ`` MAD's Mahalanobis shift (KL for categorical heads) and ``σ_Q`` the spread of ``Q``
over the training data, so neither term's units swamp the other.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.attacks.base import AttackContext
from compressor.core import atomic
from compressor.core.errors import CompressorError
from compressor.core.objectives import policy_objective
from compressor.core.pgd import pgd, pgd_in_ball
from compressor.policy.model import DISCRETE_HEADS, Policy
from compressor.rl.rollout import rollout

#: Scan episodes start here, apart from any profile's evaluation and state seeds.
SCAN_SEED = 50_000
#: Radius of the regulariser's action ball, as a fraction of the action half-range.
ACTION_EPS = 0.1
GAMMA, LAMBDA = 0.99, 0.9


class QNet(nn.Module):
    """``Q(s, a)`` on the victim's normalised observation and its action encoding.

    :param obs_dim: observation size. :param act_dim: action size (one-hot size if discrete).
    :param hidden: hidden widths.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (128, 128)) -> None:
        super().__init__()
        sizes = [obs_dim + act_dim, *hidden, 1]
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            mods.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                mods.append(nn.ReLU())
        self.net = nn.Sequential(*mods)

    def forward(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """:param z: normalised observations. :param a: encoded actions. :returns: (batch,)."""
        return self.net(torch.cat([z, a], -1)).squeeze(-1)


def encode_action(policy: Policy, act: torch.Tensor) -> torch.Tensor:
    """Env actions -> Q's action input: one-hot for discrete heads, scaled to [-1, 1] else."""
    if policy.spec.head in DISCRETE_HEADS:
        return nn.functional.one_hot(act.long(), policy.spec.act_dim).float()
    return (act - _mid(policy)) / _half(policy)


def soft_action(policy: Policy, out: torch.Tensor) -> torch.Tensor:
    """The victim's (differentiable) action encoding from its head output.

    Discrete heads: the softmax of the logits or Q-values (the one-hot's convex hull).
    Continuous: the deterministic action, clipped in value but not in gradient, so PGD still
    sees which way a saturated action would move.
    """
    if policy.spec.head in DISCRETE_HEADS:
        return torch.softmax(out, -1)
    act = policy.postprocess(out)
    if policy.spec.head != "squashed_gaussian":
        act = out + (act - out).detach()
    return (act - _mid(policy)) / _half(policy)


def _half(policy: Policy) -> torch.Tensor:
    half = (policy.action_high - policy.action_low) / 2
    return torch.where(torch.isfinite(half), half, torch.ones_like(half))


def _mid(policy: Policy) -> torch.Tensor:
    mid = (policy.action_high + policy.action_low) / 2
    return torch.where(torch.isfinite(mid), mid, torch.zeros_like(mid))


# ---- data: the victim's own transitions ------------------------------------------------------
def collect_transitions(ctx: AttackContext, episodes: int) -> dict[str, torch.Tensor]:
    """Transitions of ``episodes`` stochastic episodes of the victim, in episode order.

    :returns: ``obs, act, rew, next_obs, term, last`` (``last``: final step of its episode).
    """

    env_id, env_kwargs = ctx.env()
    rows: list[tuple[np.ndarray, ...]] = []

    def hook(*arrays: np.ndarray) -> None:
        rows.append(tuple(np.asarray(a) for a in arrays))

    seeds = list(range(SCAN_SEED + 1000, SCAN_SEED + 1000 + episodes))
    rollout(
        ctx.policy,
        env_id,
        env_kwargs,
        seeds,
        num_envs=min(episodes, 16),
        deterministic=False,
        generator=ctx.generator(),
        on_transition=hook,
    )
    ep, obs, act, rew, nxt, term = (np.concatenate([r[i] for r in rows]) for i in range(6))
    order = np.lexsort((np.arange(len(ep)), ep))  # by episode, then time
    ep = ep[order]
    last = np.append(ep[1:] != ep[:-1], True)

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(x[order], dtype=torch.float32)

    return {
        "obs": t(obs),
        "act": t(act),
        "rew": t(rew),
        "next_obs": t(nxt),
        "term": t(term.astype(np.float32)),
        "last": torch.as_tensor(last),
    }


# ---- learning Q^π ------------------------------------------------------------------------------
def train_q(
    policy: Policy,
    data: dict[str, torch.Tensor],
    reg: float,
    epochs: int,
    seed: int,
    init: QNet | None = None,
) -> tuple[QNet, dict[str, Any]]:
    """Sarsa with TD(λ) targets and SA-PPO's action-smoothness regulariser.

    Each epoch recomputes the λ-returns backward through every episode with the current ``Q``
    (bootstrapping on a fresh action of the victim at truncated ends, on zero at terminal
    ones), then fits ``Q`` to them in minibatches. Rewards are scaled so that ``Q`` is O(1).

    :param policy: the victim. :param data: from :func:`collect_transitions`.
    :param reg: regulariser strength. :param epochs: passes over the data.
    :param seed: RNG seed. :param init: a ``Q`` to start from (warm start).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    z, nz = policy.normalize(data["obs"]).detach(), policy.normalize(data["next_obs"]).detach()
    a = encode_action(policy, data["act"])
    r_scale = (1 - GAMMA) / max(float(data["rew"].abs().mean()), 1e-8)
    rew = (data["rew"] * r_scale).numpy().astype(np.float64)
    term, last = data["term"].numpy(), data["last"].numpy()
    with torch.no_grad():
        next_a = encode_action(policy, policy.sample(data["next_obs"], gen))
    q = QNet(z.shape[1], a.shape[1])
    if init is not None:
        q.load_state_dict(init.state_dict())
    opt = torch.optim.Adam(q.parameters(), lr=1e-3)
    n, bs = len(z), 256
    ones = torch.ones(a.shape[1])
    steps = 0
    for _ in range(epochs):
        with torch.no_grad():
            q_next = q(nz, next_a).numpy()  # Q at the next state and the victim's next action
        g, out = 0.0, np.empty(n, dtype=np.float32)
        for i in range(n - 1, -1, -1):
            if last[i]:  # episode end: bootstrap on Q (truncation) or on 0 (termination)
                g = rew[i] + GAMMA * (1 - term[i]) * q_next[i]
            else:
                g = rew[i] + GAMMA * ((1 - LAMBDA) * q_next[i] + LAMBDA * g)
            out[i] = g
        targets = torch.from_numpy(out)
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, bs):
            idx = perm[start : start + bs]
            zb, ab = z[idx], a[idx]
            loss = ((q(zb, ab) - targets[idx]) ** 2).mean()
            if reg > 0:
                ref = q(zb, ab).detach()

                def gap(x: torch.Tensor, zb: torch.Tensor = zb, ref: torch.Tensor = ref) -> Any:
                    return (q(zb, x) - ref) ** 2

                a_hat = pgd(
                    gap,
                    ab,
                    ones,
                    ACTION_EPS,
                    steps=3,
                    random_start=True,
                    generator=gen,
                )
                loss = loss + reg * ((q(zb, a_hat) - q(zb, ab)) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    with torch.no_grad():
        q_std = float(q(z, a).std())
    return q, {"grad_steps": steps, "q_std": q_std}


# ---- the attacks -------------------------------------------------------------------------------
def _q_path(d: Path | None) -> Path | None:
    return None if d is None else d / "rs_q.pt"


def _load_q(path: Path | None, obs_dim: int, act_dim: int) -> QNet | None:
    if path is None or not path.is_file():
        return None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    q = QNet(obs_dim, act_dim)
    try:
        q.load_state_dict(obj["state_dict"])
    except (RuntimeError, KeyError, TypeError) as exc:
        msg = f"{path}: not a Robust Sarsa Q-function of this policy ({exc})"
        raise CompressorError(msg) from None
    return q


def robust_q(ctx: AttackContext) -> tuple[QNet, dict[str, Any]]:
    """Train (or reuse from ``ctx.trained``) the strongest RS ``Q`` of the regulariser scan."""
    if ctx.trained.robust_q is not None:
        cached, cached_info = ctx.trained.robust_q
        assert isinstance(cached, QNet)
        return cached, cached_info

    b, t0 = ctx.budget, time.perf_counter()
    data = collect_transitions(ctx, b.rs_episodes)
    a_dim = ctx.policy.spec.act_dim
    init = _load_q(_q_path(ctx.warm_start), ctx.policy.spec.obs_dim, a_dim)
    env_id, env_kwargs = ctx.env()
    scan_seeds = list(range(SCAN_SEED, SCAN_SEED + b.rs_scan_episodes))
    best: tuple[float, QNet, dict[str, Any], float] | None = None
    scan: dict[str, float] = {}
    for reg in b.rs_reg:
        q, stats = train_q(ctx.policy, data, reg, b.rs_epochs, ctx.seed, init)
        if len(b.rs_reg) == 1:
            best = (math.nan, q, stats, reg)
            break
        trial = AttackContext(ctx.policy, ctx.threat, ctx.seed, budget=ctx.budget)
        trial.trained.robust_q = (q, stats)
        attack = RobustSarsaAttack(trial)
        scanned = rollout(ctx.policy, env_id, env_kwargs, scan_seeds, perturb=attack.perturb)
        mean = float(np.mean(scanned.returns))
        scan[str(reg)] = round(mean, 2)
        if best is None or mean < best[0]:
            best = (mean, q, stats, reg)
    assert best is not None
    _, q, stats, reg = best
    info = {
        "transitions": len(data["obs"]),
        "episodes": b.rs_episodes,
        "epochs": b.rs_epochs,
        "grad_steps_per_reg": stats["grad_steps"],
        "reg_scan": scan,
        "reg": reg,
        "q_std": stats["q_std"],
        "warm_start": init is not None,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if ctx.save_dir is not None:
        path = _q_path(ctx.save_dir)
        assert path is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"kind": "robust-sarsa-q", "reg": reg, "state_dict": q.state_dict()}
        atomic.write_with(path, lambda tmp: torch.save(payload, tmp))
        info["saved"] = str(path)
    ctx.trained.robust_q = (q, info)
    return q, info


class RobustSarsaAttack:
    """PGD on ``-Q(s, μ(ŝ))`` with RS's learned ``Q`` (trained when the attack is built)."""

    name = "rs"

    def __init__(self, ctx: AttackContext) -> None:
        self.threat, self.policy = ctx.threat, ctx.policy
        self.q, self.info = robust_q(ctx)
        self.steps = ctx.budget.pgd_steps
        self._scale = ctx.threat.scale(ctx.policy)

    def perturb(self, obs: torch.Tensor) -> torch.Tensor:
        """:param obs: true raw observations (batch, dim)."""
        z = self.policy.normalize(obs).detach()

        def head(out: torch.Tensor) -> torch.Tensor:
            return -self.q(z, soft_action(self.policy, out))

        objective = policy_objective(self.policy, head, obs)
        return pgd(
            objective, obs, self._scale, self.threat.eps, norm=self.threat.norm, steps=self.steps
        )


class MadRsAttack:
    """PGD on ``(1 - r)·(-Q(s, μ(ŝ))/σ_Q) + r·Δ(π(s), π(ŝ))`` from a random start."""

    name = "mad_rs"

    def __init__(self, ctx: AttackContext) -> None:
        self.threat, self.policy = ctx.threat, ctx.policy
        self.q, rs_info = robust_q(ctx)
        self.ratio = ctx.budget.mad_rs_ratio
        self.q_std = max(float(rs_info.get("q_std", 1.0)), 1e-6)
        self.info: dict[str, Any] = {"ratio": self.ratio, "q": rs_info}
        self.steps = ctx.budget.pgd_steps
        self._scale = ctx.threat.scale(ctx.policy)
        self._gen = ctx.generator()

    def perturb(self, obs: torch.Tensor) -> torch.Tensor:
        """:param obs: true raw observations (batch, dim)."""
        z = self.policy.normalize(obs).detach()
        with torch.no_grad():
            clean = self.policy(obs)

        def head(out: torch.Tensor) -> torch.Tensor:
            q_term = -self.q(z, soft_action(self.policy, out)) / self.q_std
            div = self.policy.divergence(clean, out)
            if self.policy.spec.head != "categorical":
                div = div.clamp_min(1e-12).sqrt()  # Mahalanobis shift, in std units
            return (1 - self.ratio) * q_term + self.ratio * div

        objective = policy_objective(self.policy, head, obs)
        return pgd_in_ball(objective, obs, self._scale, self.threat, self.steps, self._gen)
