"""Learned attacks that hurt: a learned adversary lowers a small victim's return within a few
thousand steps, attacks that end above clean are reported as failed (never the worst attack),
training stops at a time budget, and PA-AD works for every head."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from compressor.attacks import AttackBudget, AttackContext, make_attack
from compressor.attacks.learned import pa_ad_perturb
from compressor.core.config import AttackBudget as ConfigBudget
from compressor.core.config import load_profile, parse_duration
from compressor.core.errors import CompressorError
from compressor.core.stats import summarize_returns
from compressor.core.threat import ThreatModel, ball_norm
from compressor.evaluate import EvalResult, SuiteResult, evaluate, evaluate_attack
from compressor.policy.loading import load_policy
from compressor.policy.model import HEADS, Policy, PolicySpec
from conftest import REPO, make_policy

SMALL = AttackBudget(pgd_steps=3, learned_steps=8192, learned_num_envs=4)


@pytest.fixture(scope="module")
def cartpole() -> Policy:
    return load_policy(REPO / "profiles" / "cartpole.pt").policy.eval()


def test_sa_rl_lowers_the_return_of_a_trained_cartpole(cartpole: Policy) -> None:
    """At ε = 1 (raw units scaled by the threat model) SA-RL, with its long horizon and the
    value bootstrapped at CartPole's 500-step time limit, drives the victim below clean and its
    training curve goes down."""
    th = ThreatModel(1.0)
    ctx = AttackContext(cartpole, th, seed=0, env_id="CartPole-v1", budget=SMALL)
    seeds = [0, 1, 2]
    clean, _ = evaluate(cartpole, "CartPole-v1", {}, seeds)
    res = evaluate_attack(cartpole, "CartPole-v1", {}, seeds, "sa_rl", th, context=ctx)
    assert res.training is not None
    assert res.training["victim_train_return_last"] < res.training["victim_train_return_first"]
    assert res.stats.mean < 0.8 * clean.stats.mean


def _result(name: str, returns: list[float]) -> EvalResult:
    return EvalResult(name, summarize_returns(np.array(returns)), None, 10, 0.1)


def test_attack_above_clean_is_failed_and_never_the_worst() -> None:
    suite = SuiteResult(
        _result("clean", [100.0, 110.0]),
        {
            "mad": _result("mad", [90.0, 95.0]),
            "sa_rl": _result("sa_rl", [130.0, 140.0]),  # helped the victim
            "critic": _result("critic", [120.0, 125.0]),
            "random": _result("random", [101.0, 112.0]),  # noise may land above clean
        },
    )
    assert suite.failed("sa_rl") == "return above clean"
    assert suite.failed("critic") == "return above clean"
    assert suite.failed("mad") is None and suite.failed("random") is None
    assert suite.strongest_attack == "mad" and suite.robust_return == 92.5
    d = suite.to_dict()
    assert d["attacks"]["sa_rl"]["failed"] == "return above clean"
    assert "failed" not in d["attacks"]["mad"]
    # a learned attack that lowers the return is counted, and can be the worst
    low = SuiteResult(suite.clean, {"mad": suite.attacks["mad"], "sa_rl": _result("sa_rl", [5.0])})
    assert low.failed("sa_rl") is None and low.strongest_attack == "sa_rl"
    # every attack failed: nothing counted, the robust return is the clean one
    none = SuiteResult(suite.clean, {"sa_rl": suite.attacks["sa_rl"]})
    assert none.strongest_attack is None and none.robust_return == suite.clean.stats.mean


def test_failed_attack_shown_as_failed_in_report_table() -> None:
    from compressor.report.tables import attack_runs

    row = {"policy": "dense", "attack": "sa_rl", "episodes": 2, "return": 135.0, "ci": "1 – 2"}
    row |= {"mean_tv": None, "eval_wall_s": 1.0, "training": "", "failed": "return above clean"}
    table = attack_runs({"attack_runs": [row]})
    assert table is not None
    text = str(table)
    assert "failed: return above clean" in text and "135" not in text


def test_parse_duration() -> None:
    assert parse_duration("10m") == 600.0
    assert parse_duration(90) == 90.0 and parse_duration("90") == 90.0
    assert parse_duration("1.5h") == 5400.0 and parse_duration("30s") == 30.0
    for bad in ("ten minutes", "-5", "0", "m"):
        with pytest.raises(CompressorError):
            parse_duration(bad)


def test_time_budget_stops_training_and_says_how_far(cartpole: Policy) -> None:
    budget = dataclasses.replace(SMALL, learned_steps=100_000, learned_time=0.5)
    ctx = AttackContext(cartpole, ThreatModel(0.5), env_id="CartPole-v1", budget=budget)
    t0 = time.perf_counter()
    attack = make_attack("sa_rl", ctx)
    assert time.perf_counter() - t0 < 20
    info = attack.info
    assert info["stopped"] == "time" and info["time_limit_s"] == 0.5
    assert 0 < info["env_steps"] < info["planned_steps"] == 100_000 - 100_000 % 1024
    assert info["wall_s"] < 10


def test_time_budget_profile_key(tmp_path) -> None:
    text = (REPO / "profiles" / "cartpole.toml").read_text()
    assert "[attacks]" in text
    good = tmp_path / "good.toml"
    good.write_text(text.replace("[attacks]", '[attacks]\nlearned_time = "2m"'))
    prof = load_profile(str(good))
    assert ConfigBudget.from_section(prof.attacks).learned_time_s == 120.0
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("[attacks]", '[attacks]\nlearned_time = "soon"'))
    with pytest.raises(CompressorError):
        load_profile(str(bad))


def _head_policy(head: str) -> Policy:
    if head != "squashed_gaussian":
        act_dim = 2
        return make_policy(head, obs_dim=4, act_dim=act_dim, seed=1)
    spec = PolicySpec(  # SAC/TQC: a state-dependent log σ layer, no log_std parameter
        obs_dim=4,
        act_dim=2,
        hidden=[16, 16],
        head=head,
        action_low=[-1.0, -1.0],
        action_high=[1.0, 1.0],
        state_dependent_std=True,
        log_std_bounds=[-20.0, 2.0],
    )
    return Policy(spec)


@pytest.mark.parametrize("head", HEADS)
def test_pa_ad_actor_works_for_every_head(head: str) -> None:
    pol = _head_policy(head)
    th = ThreatModel(0.1)
    obs = torch.randn(8, 4)
    d = torch.randn(8, pol.spec.act_dim)
    adv = pa_ad_perturb(pol, obs, d, th.scale(pol), th, steps=3)
    assert adv.shape == obs.shape and torch.isfinite(adv).all()
    assert (ball_norm((adv - obs) / th.scale(pol), th.norm) <= th.eps + 1e-5).all()
