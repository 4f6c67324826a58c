"""PPO fine-tuning: masks and normalisation fixed through every step, the return repaired, a
critic learned when the file has none, the same weights from the same seed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from compressor.certify.global_bound import certify_global
from compressor.core.config import FinetuneConfig, load_profile
from compressor.core.errors import CompressorError
from compressor.core.threat import ThreatModel
from compressor.finetune import FinetuneInputs, finetune_candidate, finetune_total_steps
from compressor.finetune.common import smoothness_penalty
from compressor.finetune.ppo import learn_critic, ppo_finetune, ppo_total_steps
from compressor.policy.loading import LoadedPolicy, load_policy
from compressor.policy.model import Policy
from compressor.policy.value import ValueNet
from compressor.prune.criteria import prune
from compressor.rl.ppo import RolloutStream, gae_batch, init_critic
from compressor.rl.rollout import rollout
from conftest import REPO, make_policy

CARTPOLE = "CartPole-v1"
PENDULUM = "Pendulum-v1"


def _cfg(**kw: Any) -> FinetuneConfig:
    """4 envs × 128 steps per rollout, 16 optimiser steps per rollout. The shipped CartPole
    critic was trained with ``--no-norm-reward``."""
    base: dict[str, Any] = dict(
        method="ppo",
        ppo_steps=2048,
        ppo_num_envs=4,
        ppo_num_steps=128,
        ppo_minibatches=4,
        ppo_epochs=4,
        ppo_norm_reward=False,
        ppo_critic_steps=2048,
    )
    return FinetuneConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def cartpole() -> LoadedPolicy:
    """The shipped CartPole policy (64-64 tanh, return 500) and its critic."""
    return load_policy(REPO / "profiles" / "cartpole.pt")


def _return(policy: Policy, env_id: str = CARTPOLE) -> float:
    """Deterministic return over 10 fixed episodes."""
    return float(rollout(policy.eval(), env_id, {}, list(range(10)), num_envs=10).returns.mean())


def _pruned_stay_zero(policy: Policy, masks: list[torch.Tensor]) -> bool:
    return all(bool((layer.weight[m == 0] == 0).all()) for layer, m in zip(policy.layers, masks))


def test_masks_and_normalisation_hold_through_every_step(cartpole: LoadedPolicy) -> None:
    dense = cartpole.policy
    student = prune(dense, 0.7)  # magnitude: still returns 500 before fine-tuning
    masks = [m.clone() for m in student.masks()]
    mean, var = dense.obs_mean.clone(), dense.obs_var.clone()
    seen: list[int] = []

    def hook(step: int) -> None:  # before every optimiser step, so after the previous one
        assert _pruned_stay_zero(student, masks)
        assert torch.equal(student.obs_mean, mean) and torch.equal(student.obs_var, var)
        seen.append(step)

    cfg = _cfg(smoothness_weight=0.1)  # SA-PPO's regulariser in the loss
    stats = ppo_finetune(
        student, dense, cartpole.critic, CARTPOLE, {}, ThreatModel(0.1), cfg, 0, hook
    )

    assert seen == list(range(ppo_total_steps(cfg))) and stats.steps == len(seen) == 64
    assert _pruned_stay_zero(student, masks)
    assert all(torch.equal(a, b) for a, b in zip(student.masks(), masks))
    assert torch.equal(student.obs_mean, mean) and torch.equal(student.obs_var, var)
    assert any(bool((layer.bias != 0).any()) for layer in student.layers)  # biases not pruned
    assert (stats.method, stats.critic, stats.ppo_env_steps) == ("ppo", "loaded", 2048)
    assert stats.critic_env_steps == 0
    assert _return(student) >= 475  # the pruned policy (500 before) does not collapse


def test_ppo_repairs_a_damaged_pruned_policy(cartpole: LoadedPolicy) -> None:
    # 80 % random pruning damages the policy (return 98); distillation plays no part here
    student = prune(cartpole.policy, 0.8, "random", seed=0)
    before = _return(student)
    stats = ppo_finetune(student, cartpole.policy, cartpole.critic, CARTPOLE, {}, None, _cfg(), 0)
    after = _return(student)
    print(f"damaged CartPole: {before:.1f} -> {after:.1f} after {stats.ppo_env_steps} steps")
    assert before < 150
    assert after > before + 150  # measured: 98.0 -> 411.1


def test_the_smoothness_regulariser_flattens_the_policy(cartpole: LoadedPolicy) -> None:
    """SA-PPO's regulariser in the PPO loss lowers the policy's worst divergence in the ball."""
    dense, th = cartpole.policy, ThreatModel(0.1)
    states = rollout(dense, CARTPOLE, {}, [100, 101], record_states=True).states
    x = torch.as_tensor(states)

    def worst_divergence(pol: Policy) -> float:
        g = torch.Generator().manual_seed(0)
        return float(smoothness_penalty(pol, x, th, th.scale(dense), 10, g).detach())

    measured = []
    for kappa in (0.0, 10.0):
        student = prune(dense, 0.3)
        cfg = _cfg(ppo_steps=512, smoothness_weight=kappa)
        ppo_finetune(student, dense, cartpole.critic, CARTPOLE, {}, th, cfg, 0)
        measured.append(worst_divergence(student))
    assert measured[1] < 0.9 * measured[0]  # measured: 0.031 -> 0.024


def test_cuts_made_mid_way_stay_zero_and_the_projection_holds() -> None:
    """A hook cutting more weights mid-way (micro-pruning) on a Gaussian Pendulum policy;
    ``preserve_certificate`` keeps ``|w| ≤ |w_dense|`` and ``σ ≥ σ_dense``, which PPO without
    it breaks (it trains ``log_std``, as ``compress train`` does)."""
    dense = make_policy("gaussian", hidden=(16, 16), obs_dim=3, act_dim=1, env_id=PENDULUM)
    th = ThreatModel(0.1)
    for preserve in (True, False):
        student = prune(dense, 0.5)
        masks = [m.clone() for m in student.masks()]

        def hook(step: int, student: Policy = student, masks: list = masks) -> None:
            if step == 8:
                student.set_masks(prune(student, 0.8).masks())
                masks[:] = [m.clone() for m in student.masks()]
            assert _pruned_stay_zero(student, masks)

        cfg = _cfg(ppo_steps=1024, ppo_critic_steps=512, ppo_lr=3e-3, preserve_certificate=preserve)
        stats = ppo_finetune(student, dense, None, PENDULUM, {}, None, cfg, seed=1, on_step=hook)
        assert stats.steps == 32 and _pruned_stay_zero(student, masks)
        assert abs(student.sparsity() - 0.8) < 0.02
        within = all(
            bool((w.abs() <= w_dense.abs()).all())
            for w, w_dense in zip(student.effective_weights(), dense.effective_weights())
        )
        assert within == preserve
        assert bool((student.log_std >= dense.log_std).all()) == preserve
        no_looser = certify_global(student, th).lipschitz <= certify_global(dense, th).lipschitz
        assert no_looser or not preserve


def test_without_a_critic_one_is_learned_first(cartpole: LoadedPolicy) -> None:
    dense = cartpole.policy
    cfg = _cfg(ppo_critic_steps=4096)
    torch.manual_seed(0)
    stream = RolloutStream(CARTPOLE, {}, 4, 0, 0.99, True)
    try:
        learned = learn_critic(dense, stream, cfg, np.random.default_rng(0))
        assert stream.step == 4096
        fresh = ValueNet(4, [64, 64])
        fresh.net.load_state_dict(init_critic(4, [64, 64], torch.nn.Tanh).state_dict())

        def value(obs: torch.Tensor) -> torch.Tensor:
            return learned(dense.normalize(obs))

        # held-out Monte-Carlo returns, in the stream's (scaled) reward units
        ro = stream.collect(dense, value, 400)
        b = gae_batch(ro, value, 0.99, 1.0)
        x = ro.obs[:100].reshape(-1, 4)
        target = b.ret.reshape(400, 4)[:100].reshape(-1)
    finally:
        stream.close()
    with torch.no_grad():
        err_learned = float(((value(x) - target) ** 2).mean())
        err_fresh = float(((fresh(dense.normalize(x)) - target) ** 2).mean())
    assert err_learned < 0.1 * err_fresh

    student = prune(dense, 0.8, "random", seed=0)
    before = _return(student)
    stats = ppo_finetune(student, dense, None, CARTPOLE, {}, None, _cfg(), 0)
    assert (stats.critic, stats.critic_env_steps, stats.ppo_env_steps) == ("learned", 2048, 2048)
    assert _return(student) > before + 100  # measured: 98.0 -> 340.5


def test_same_seed_same_weights(cartpole: LoadedPolicy) -> None:
    student = prune(cartpole.policy, 0.8, "random", seed=0)
    th, cfg = ThreatModel(0.1), _cfg(ppo_steps=512, smoothness_weight=0.1)
    rng_state = torch.get_rng_state()
    runs = []
    for seed in (3, 3, 4):
        pol = student.clone()
        ppo_finetune(pol, cartpole.policy, cartpole.critic, CARTPOLE, {}, th, cfg, seed)
        runs.append(pol.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG is left alone


def test_finetune_candidate_runs_both_methods_in_turn(cartpole: LoadedPolicy) -> None:
    dense = cartpole.policy
    states = rollout(dense, CARTPOLE, {}, [100], record_states=True, max_steps=200).states
    assert states is not None
    cfg = _cfg(method="distill+ppo", steps=40, dagger_rounds=1, ppo_steps=512)
    student = prune(dense, 0.7)
    seen: list[int] = []
    inputs = FinetuneInputs(
        dense, states, ThreatModel(0.1), lambda pol: states[:50], cartpole.critic, CARTPOLE, {}
    )
    stats = finetune_candidate(student, inputs, cfg, on_step=seen.append)
    assert seen == list(range(finetune_total_steps(cfg))) == list(range(40 + 16))
    assert (stats.method, stats.steps, stats.ppo_env_steps) == ("distill+ppo", 56, 512)
    assert stats.to_dict()["critic"] == "loaded"


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"method": "reinforce"}, re.escape("not one of: distill, ppo, distill+ppo")),
        ({"ppo_minibatches": 3}, "divisible"),
        ({"ppo_steps": 100}, "at least"),
    ],
)
def test_bad_settings_are_user_errors(changes: dict[str, Any], words: str, tmp_path: Path) -> None:
    with pytest.raises(CompressorError, match=words):
        _cfg(**changes)
    key, val = next(iter(changes.items()))
    toml = tmp_path / "p.toml"
    toml.write_text(f'[env]\nid = "CartPole-v1"\n[finetune]\n{key} = {val!r}\n'.replace("'", '"'))
    with pytest.raises(CompressorError, match=words):
        load_profile(str(toml))


def test_a_deterministic_head_is_refused() -> None:
    dense = make_policy("deterministic", obs_dim=3, act_dim=1, env_id=PENDULUM)
    with pytest.raises(CompressorError, match="distill"):
        ppo_finetune(dense.clone(), dense, None, PENDULUM, {}, None, _cfg(), 0)


def test_compress_run_fine_tunes_with_ppo_from_the_files_critic(tmp_path: Path) -> None:
    """`[finetune] method = "distill+ppo"` through the whole pipeline: the chosen candidate's
    fine-tuning record says PPO ran from the file's critic, and the mask held."""
    from compressor.policy.native import load_native
    from compressor.run.pipeline import run_pipeline

    prof = tmp_path / "ppo.toml"
    prof.write_text(
        """
name = "ppo-cartpole"
[env]
id = "CartPole-v1"
kwargs = {max_episode_steps = 100}
[threat]
eps = 0.1
[evaluation]
episodes = 3
num_envs = 3
[attacks]
screen = ["random"]
final = ["random"]
[certificate]
states = 100
empirical_states = 10
[finetune]
method = "distill+ppo"
steps = 50
state_episodes = 2
dagger_rounds = 1
dagger_episodes = 2
ppo_steps = 1024
ppo_num_envs = 4
ppo_num_steps = 128
ppo_minibatches = 4
ppo_epochs = 2
ppo_norm_reward = false
[search]
grid = [0.3]
refine = 0
"""
    )
    res = run_pipeline(REPO / "profiles" / "cartpole.pt", profile=str(prof), out_root=tmp_path)
    cand = res.report["frontier"][0]
    journal = (res.run_dir / "journal.jsonl").read_text().splitlines()
    import json

    ft = json.loads(journal[0])["finetune"]
    assert ft["method"] == "distill+ppo" and ft["critic"] == "loaded"
    assert ft["ppo_env_steps"] == 1024
    pol = load_native(res.run_dir / "candidates" / "sparsity-0.3000.pt")
    assert pol.sparsity() == pytest.approx(cand["sparsity"])
    assert abs(cand["sparsity"] - 0.3) < 0.01
