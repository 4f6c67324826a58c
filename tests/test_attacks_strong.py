"""The strong attacks (critic, Robust Sarsa, MAD+RS, SA-RL, PA-AD): they stay in the ε-ball at
every step, beat uniform noise at their own objective on a trained policy, and the learned ones
get stronger as they train. Tiny budgets and short episodes; the full-size evidence is in the
README (`compress attack ... --attack all`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from compressor.attacks import ATTACKS, AttackBudget, AttackContext, make_attack
from compressor.attacks.learned import pa_ad_perturb
from compressor.attacks.rs import robust_q, soft_action
from compressor.core.errors import CompressorError
from compressor.core.threat import ThreatModel, ball_norm
from compressor.evaluate import evaluate, evaluate_attack
from compressor.policy.loading import load_policy
from compressor.policy.value import ValueNet
from compressor.rl.rollout import rollout
from conftest import REPO, make_policy

TINY = AttackBudget(
    pgd_steps=5,
    rs_episodes=2,
    rs_epochs=3,
    rs_reg=[0.0],
    rs_scan_episodes=1,
    learned_steps=512,
    learned_num_envs=4,
)


@pytest.fixture(scope="module")
def cartpole() -> tuple:
    """The shipped CartPole policy (categorical, trained) and its value function."""
    loaded = load_policy(REPO / "profiles" / "cartpole.pt")
    assert loaded.critic is not None
    return loaded.policy.eval(), loaded.critic


def _pendulum() -> tuple:
    """A small Gaussian policy and value net for Pendulum-v1 (continuous actions)."""
    pol = make_policy("gaussian", obs_dim=3, act_dim=1, seed=3, env_id="Pendulum-v1")
    critic = ValueNet(3, [16])
    return pol, critic


@pytest.mark.parametrize("norm", ["inf", "2"])
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_every_attack_stays_in_ball_at_every_step(cartpole: tuple, env_id: str, norm: str) -> None:
    pol, critic = cartpole if env_id == "CartPole-v1" else _pendulum()
    th = ThreatModel(0.3, norm)
    scale = th.scale(pol)
    ctx = AttackContext(pol, th, critic=critic, env_id=env_id, budget=TINY)
    for name in ATTACKS:
        attack = make_attack(name, dataclasses.replace(ctx))
        worst: list[float] = []

        def check(obs: torch.Tensor, attack=attack, worst=worst) -> torch.Tensor:
            adv = attack.perturb(obs)
            worst.append(float(ball_norm((adv - obs) / scale, norm).max()))
            return adv

        rollout(pol, env_id, {}, [0, 1], num_envs=2, perturb=check, max_steps=40)
        assert worst and max(worst) <= 0.3 * (1 + 1e-5), name


def test_gradient_attacks_beat_noise_at_their_objective(cartpole: tuple) -> None:
    pol, critic = cartpole
    th = ThreatModel(0.2)
    _, res = evaluate(pol, "CartPole-v1", {}, [0], record_states=True)
    assert res.states is not None
    obs = torch.as_tensor(res.states[::2][:256])
    ctx = AttackContext(pol, th, critic=critic, env_id="CartPole-v1", budget=TINY)
    noise = make_attack("random", ctx).perturb(obs)
    adv = {n: make_attack(n, dataclasses.replace(ctx)).perturb(obs) for n in ATTACKS}
    z = pol.normalize(obs)
    q, info = robust_q(ctx)  # the Q that rs and mad_rs attacked with (shared by the suite)
    d = torch.randn(len(obs), pol.spec.act_dim, generator=torch.Generator().manual_seed(0))
    d = d / d.norm(dim=-1, keepdim=True)
    realised = pa_ad_perturb(pol, obs, d, th.scale(pol), th, steps=5)
    with torch.no_grad():
        clean_out = pol(obs)

        def value(x: torch.Tensor) -> float:
            return float(critic(pol.normalize(x)).mean())

        def q_of(x: torch.Tensor) -> torch.Tensor:
            return q(z, soft_action(pol, pol(x)))

        def mad_rs_objective(x: torch.Tensor) -> float:
            r = TINY.mad_rs_ratio
            div = pol.divergence(clean_out, pol(x))
            return float(((1 - r) * -q_of(x) / info["q_std"] + r * div).mean())

        def along(x: torch.Tensor) -> float:
            base = torch.log_softmax(clean_out, -1)
            return float(((torch.log_softmax(pol(x), -1) - base) * d).sum(-1).mean())

        assert value(adv["critic"]) < value(noise)
        assert float(q_of(adv["rs"]).mean()) < float(q_of(noise).mean())
        assert mad_rs_objective(adv["mad_rs"]) > mad_rs_objective(noise)
        assert float(pol.divergence(clean_out, pol(adv["mad"])).mean()) > float(
            pol.divergence(clean_out, pol(noise)).mean()
        )
        # PA-AD's actor moves the action along the director's direction more than noise does
        assert along(realised) > along(noise) + 1e-3


def test_learned_attacks_get_stronger_with_training(cartpole: tuple, tmp_path) -> None:
    pol, _ = cartpole
    th = ThreatModel(2.0)  # large enough that a learned adversary can steer the victim
    budget = dataclasses.replace(TINY, learned_steps=8192)
    ctx = AttackContext(pol, th, seed=0, env_id="CartPole-v1", budget=budget, save_dir=tmp_path)
    seeds = [0, 1]
    clean, _ = evaluate(pol, "CartPole-v1", {}, seeds)
    sa_rl = evaluate_attack(pol, "CartPole-v1", {}, seeds, "sa_rl", th, context=ctx)
    # the untrained adversary's mean action is ~0, i.e. no perturbation: the clean return
    assert sa_rl.stats.mean < 0.5 * clean.stats.mean
    assert sa_rl.training is not None and sa_rl.training["env_steps"] == 8192
    assert (tmp_path / "sa_rl.pt").is_file()
    torch.load(tmp_path / "sa_rl.pt", weights_only=True)  # native, no pickled code

    pa_budget = dataclasses.replace(TINY, learned_steps=2048, pgd_steps=3)
    pa = make_attack("pa_ad", dataclasses.replace(ctx, budget=pa_budget))
    first, last = pa.info["victim_train_return_first"], pa.info["victim_train_return_last"]
    assert last < first


def test_warm_start_continues_from_saved_adversary(cartpole: tuple, tmp_path) -> None:
    pol, _ = cartpole
    th = ThreatModel(0.5)
    ctx = AttackContext(pol, th, env_id="CartPole-v1", budget=TINY, save_dir=tmp_path / "dense")
    first = make_attack("sa_rl", ctx)
    warm = AttackContext(pol, th, env_id="CartPole-v1", budget=TINY, warm_start=tmp_path / "dense")
    second = make_attack("sa_rl", warm)
    assert second.info["warm_start"] == str(tmp_path / "dense" / "sa_rl.pt")
    assert first.info["warm_start"] is None


def test_critic_attack_without_value_function_is_a_user_error() -> None:
    pol = make_policy()
    with pytest.raises(CompressorError, match="value function"):
        make_attack("critic", AttackContext(pol, ThreatModel(0.1)))


def test_compress_attack_runs_trained_attacks_and_saves_them(tmp_path) -> None:
    import json
    import subprocess
    import sys

    prof = (REPO / "profiles" / "cartpole.toml").read_text()
    prof = prof.replace('policy = "cartpole.pt"', 'policy = ""')
    prof = prof.replace("rs_episodes = 20", "rs_episodes = 2").replace(
        "rs_epochs = 30", "rs_epochs = 2"
    )
    prof = prof.replace("rs_reg = [0.0, 0.1, 1.0]", "rs_reg = [0.0]")
    prof = prof.replace("learned_steps = 100000", "learned_steps = 512")
    prof = prof.replace("learned_num_envs = 8", "learned_num_envs = 4")
    (tmp_path / "tiny.toml").write_text(prof)
    save = tmp_path / "adv"
    out = subprocess.run(
        [sys.executable, "-m", "compressor.cli", "attack", str(REPO / "profiles" / "cartpole.pt")]
        + [
            "--attack",
            "critic,rs,sa_rl",
            "--episodes",
            "1",
            "--profile",
            str(tmp_path / "tiny.toml"),
        ]
        + ["--save", str(save), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data["attacks"]) == {"critic", "rs", "sa_rl"}
    assert data["attacks"]["sa_rl"]["training"]["env_steps"] == 512
    assert data["attacks"]["rs"]["training"]["reg"] == 0.0
    assert (save / "sa_rl.pt").is_file() and (save / "rs_q.pt").is_file()
