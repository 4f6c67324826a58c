"""PPO fine-tuning of a pruned policy with its masks fixed (the env's reward, not the teacher's).

Distillation can only bring the pruned policy back towards the dense one; PPO optimises the
return itself, so it can also repair what imitation cannot. It continues ``compress train``'s
PPO (:mod:`compressor.rl.ppo`: the same rollouts, GAE and clipped-surrogate update) on the
student, with three differences:

- the masks stay fixed: the policy computes with ``W ⊙ M``, and after every optimiser step the
  pruned weights are zeroed again (:func:`~compressor.finetune.common.constrain_`), so they are
  exactly zero even when Adam's momentum would move them (weights micro-pruning cuts mid-way);
  biases are not pruned;
- the observation normalisation is frozen (it is a buffer, never updated here), so the exported
  policy normalises exactly as the dense one does and ε means the same thing for both;
- SA-PPO's smoothness regulariser (``cfg.smoothness_weight``, the one in
  :func:`~compressor.finetune.common.smoothness_penalty`) is added to the loss, when a threat
  is given.

The value function starts from (a copy of) the critic saved with the dense policy. A file
without one gets a fresh critic, fitted first by a value-only phase on the dense policy's
rollouts (whose states the student will visit at first; Monte-Carlo targets, scaled rewards),
so PPO's first advantages are not noise. The Gaussian ``log_std`` is trained, as
``compress train`` does (``preserve_certificate`` keeps it at or above the dense one).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from compressor.core.config import FinetuneConfig
from compressor.core.errors import CompressorError
from compressor.core.threat import ThreatModel
from compressor.finetune.common import (
    PROBE_STATES,
    FinetuneStats,
    StepCounter,
    StepHook,
    mean_divergence,
    probe_states,
    projection,
    smoothness_term,
)
from compressor.policy.model import Policy
from compressor.policy.value import ValueNet
from compressor.rl.ppo import PPOConfig, RolloutStream, gae_batch, init_critic, ppo_update

#: heads PPO can fine-tune (a state-independent Gaussian or a categorical distribution)
PPO_HEADS = ("gaussian", "categorical")


def ppo_config(cfg: FinetuneConfig) -> PPOConfig:
    """The PPO update's knobs from ``cfg`` (those it has no field for keep ``compress train``'s
    defaults; the env and step-count fields of the result are unused)."""
    return PPOConfig(
        lr=cfg.ppo_lr,
        gamma=cfg.ppo_gamma,
        gae_lambda=cfg.ppo_gae_lambda,
        minibatches=cfg.ppo_minibatches,
        epochs=cfg.ppo_epochs,
        clip_coef=cfg.ppo_clip_coef,
        ent_coef=cfg.ppo_ent_coef,
        norm_reward=cfg.ppo_norm_reward,
    )


def _updates(env_steps: int, cfg: FinetuneConfig) -> int:
    return max(1, env_steps // (cfg.ppo_num_envs * cfg.ppo_num_steps))


def ppo_total_steps(cfg: FinetuneConfig) -> int:
    """Optimiser steps :func:`ppo_finetune` runs on the student (the ``on_step`` calls)."""
    return _updates(cfg.ppo_steps, cfg) * cfg.ppo_epochs * cfg.ppo_minibatches


def ppo_finetune(
    policy: Policy,
    dense: Policy,
    critic: ValueNet | None,
    env_id: str,
    env_kwargs: dict[str, Any],
    threat: ThreatModel | None,
    cfg: FinetuneConfig,
    seed: int = 0,
    on_step: StepHook | None = None,
    *,
    states: np.ndarray | None = None,
    step_offset: int = 0,
) -> FinetuneStats:
    """Continue PPO on the pruned ``policy`` in place, its masks and normalisation fixed.

    :param policy: the pruned policy (its masks are kept; ``obs_mean``/``obs_var`` untouched).
    :param dense: the dense policy (unchanged): the projection bounds of
        ``cfg.preserve_certificate``, the critic phase's actor, and the divergence reference.
    :param critic: the value function loaded with the dense policy (copied, not changed), or
        None: a critic is learned first for ``cfg.ppo_critic_steps`` env steps.
    :param env_id: gymnasium id. :param env_kwargs: its kwargs.
    :param threat: the ε-ball of the smoothness regulariser (None: no regulariser).
    :param cfg: the settings (``ppo_*``, ``smoothness_weight``, ``adversarial_steps`` as PGD
        steps, ``preserve_certificate``).
    :param seed: seed of the envs, action sampling, minibatches and PGD starts; the caller's
        global torch RNG is left as it was.
    :param on_step: called with the global step index before every optimiser step of the
        student (micro-pruning cuts there). :param step_offset: global index of step 0.
    :param states: raw observations on which the divergence from ``dense`` is measured before
        and after (``loss_start``/``loss_end``); default: those of the first rollout.
    :raises CompressorError: a head PPO cannot train (deterministic or squashed Gaussian).
    """
    _check_head(policy)
    t0 = time.perf_counter()
    tick = StepCounter(on_step, step_offset)
    with torch.random.fork_rng(devices=[]):  # seeded sampling without touching the caller's RNG
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        g = torch.Generator().manual_seed(seed)
        # the reward scale a loaded critic was trained in; a learned one is best off scaled
        norm_reward = cfg.ppo_norm_reward if critic is not None else True
        wrap = dense.spec.env_wrappers  # the observation wrappers it was trained behind
        stream = RolloutStream(
            env_id, env_kwargs, cfg.ppo_num_envs, seed, cfg.ppo_gamma, norm_reward, wrap
        )
        try:
            vnet, source = _starting_critic(dense, critic, stream, cfg, rng)
            critic_steps = stream.step
            x = torch.as_tensor(states, dtype=torch.float32) if states is not None else None
            probe = probe_states(x, g) if x is not None else None
            run = _train_student(policy, dense, vnet, stream, threat, cfg, rng, g, tick, probe)
            ppo_steps = stream.step - critic_steps
        finally:
            stream.close()
    return FinetuneStats(
        loss_start=run.loss_start,
        loss_end=run.loss_end,
        steps=tick.steps,
        wall_s=time.perf_counter() - t0,
        method="ppo",
        ppo_env_steps=ppo_steps,
        critic=source,
        critic_env_steps=critic_steps,
        train_return_start=_mean(run.returns_start),
        train_return_end=_mean(run.returns_end),
    )


def _check_head(policy: Policy) -> None:
    """Raise :class:`CompressorError` unless PPO can fine-tune ``policy``'s head.

    :param policy: the policy to fine-tune.
    """
    if policy.spec.head not in PPO_HEADS:
        raise CompressorError(
            f"PPO fine-tuning needs a {' or '.join(PPO_HEADS)} head, this policy's is "
            f'{policy.spec.head!r}: use finetune.method = "distill"'
        )


def _starting_critic(
    dense: Policy,
    critic: ValueNet | None,
    stream: RolloutStream,
    cfg: FinetuneConfig,
    rng: np.random.Generator,
) -> tuple[ValueNet, str]:
    """A copy of the file's critic (``loaded``), or one :func:`learn_critic` fits (``learned``)."""
    if critic is not None:
        return copy.deepcopy(critic), "loaded"
    return learn_critic(dense, stream, cfg, rng), "learned"


@dataclass(frozen=True)
class _Trained:
    """What :func:`_train_student` measured: the divergence from the dense policy before and
    after, and the returns of the training episodes ended in the first and last rollouts."""

    loss_start: float
    loss_end: float
    returns_start: list[float]
    returns_end: list[float]


def _train_student(
    policy: Policy,
    dense: Policy,
    vnet: ValueNet,
    stream: RolloutStream,
    threat: ThreatModel | None,
    cfg: FinetuneConfig,
    rng: np.random.Generator,
    g: torch.Generator,
    tick: StepCounter,
    probe: torch.Tensor | None,
) -> _Trained:
    """The PPO phase: ``cfg.ppo_steps`` env steps of rollouts and clipped-surrogate updates of
    ``policy`` and ``vnet`` together, the learning rate annealed linearly to 0, the projection
    after every optimiser step (``probe``: None measures on the first rollout's states)."""

    def value(obs: torch.Tensor) -> torch.Tensor:
        return vnet(policy.normalize(obs))  # the student's stats are the dense one's

    params = list(policy.parameters()) + list(vnet.parameters())
    opt = torch.optim.Adam(params, lr=cfg.ppo_lr, eps=1e-5)
    gaussian = policy.spec.head == "gaussian"
    project = projection(policy, dense, cfg.preserve_certificate, log_std=gaussian)
    scale = threat.scale(dense) if threat is not None else None
    regulariser = smoothness_term(policy, threat, scale, cfg, g)
    pcfg, updates = ppo_config(cfg), _updates(cfg.ppo_steps, cfg)
    loss_start = float("nan")
    returns_start: list[float] = []
    policy.train()
    for u in range(updates):
        opt.param_groups[0]["lr"] = cfg.ppo_lr * (1.0 - u / updates)
        ro = stream.collect(policy, value, cfg.ppo_num_steps)
        if u == 0:
            returns_start = ro.returns
            if probe is None:
                probe = ro.obs.reshape(-1, ro.obs.shape[-1])[:PROBE_STATES]
            loss_start = mean_divergence(policy, dense, probe)
        b = gae_batch(ro, value, cfg.ppo_gamma, cfg.ppo_gae_lambda)
        ppo_update(
            policy,
            value,
            opt,
            params,
            b,
            pcfg,
            rng,
            extra_loss=regulariser,
            before_step=tick,
            after_step=project,
        )
    policy.eval()
    assert probe is not None
    return _Trained(loss_start, mean_divergence(policy, dense, probe), returns_start, ro.returns)


def learn_critic(
    dense: Policy, stream: RolloutStream, cfg: FinetuneConfig, rng: np.random.Generator
) -> ValueNet:
    """A fresh critic (``compress train``'s architecture and init) fitted by
    ``cfg.ppo_critic_steps`` env steps of value-only PPO updates on ``dense``'s rollouts.

    :param dense: the policy whose value is learned (unchanged).
    :param stream: the envs; PPO continues on them, so the reward scale learned here carries on.
    :param cfg: the settings. :param rng: minibatch shuffling.
    """
    spec = dense.spec
    vnet = ValueNet(spec.obs_dim, spec.hidden, spec.activation)
    vnet.net.load_state_dict(
        init_critic(spec.obs_dim, spec.hidden, type(dense.act_fn)).state_dict()
    )

    def value(obs: torch.Tensor) -> torch.Tensor:
        return vnet(dense.normalize(obs))

    params = list(vnet.parameters())
    opt = torch.optim.Adam(params, lr=cfg.ppo_lr, eps=1e-5)
    pcfg = ppo_config(cfg)
    for k in range(_updates(cfg.ppo_critic_steps, cfg)):
        ro = stream.collect(dense, value, cfg.ppo_num_steps)
        # λ = 1: Monte-Carlo returns, bootstrapped only at the rollout's end, so the targets do
        # not lean on the critic that is still wrong
        b = gae_batch(ro, value, cfg.ppo_gamma, 1.0)
        if k == 0:  # a fresh net predicts ≈ 0, however far from it the returns lie
            with torch.no_grad():
                cast(nn.Linear, vnet.net[-1]).bias.add_(b.ret.mean())
                b = gae_batch(ro, value, cfg.ppo_gamma, 1.0)
        ppo_update(dense, value, opt, params, b, pcfg, rng, value_only=True)
    return vnet


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None
