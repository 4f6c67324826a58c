"""Attacks stay in the ε-ball and the gradient attack beats uniform noise."""

from __future__ import annotations

import pytest
import torch

from compressor.attacks import AttackContext, make_attack
from compressor.core.errors import CompressorError
from compressor.core.pgd import pgd
from compressor.core.threat import ThreatModel, ball_norm
from compressor.evaluate import evaluate_attack
from compressor.policy.native import load_native
from conftest import REPO, make_policy


@pytest.mark.parametrize("norm", ["inf", "2"])
@pytest.mark.parametrize("space", ["normalized", "raw"])
@pytest.mark.parametrize("name", ["random", "mad"])
def test_attack_stays_in_ball(norm: str, space: str, name: str) -> None:
    pol = make_policy("gaussian", obs_dim=5, act_dim=2, seed=2)
    th = ThreatModel(0.3, norm, space)
    att = make_attack(name, AttackContext(pol, th, seed=1))
    obs = torch.randn(64, 5) * 3
    for _ in range(3):
        adv = att.perturb(obs)
        delta = (adv - obs) / th.scale(pol)
        assert float(ball_norm(delta, norm).max()) <= 0.3 * (1 + 1e-5)


def test_pgd_returns_best_iterate_inside_ball() -> None:
    x0 = torch.zeros(8, 3)
    scale = torch.tensor([1.0, 2.0, 0.5])
    target = torch.tensor([5.0, -5.0, 5.0])
    x = pgd(lambda x: -((x - target) ** 2).sum(-1), x0, scale, 0.4, steps=20, step_size=0.1)
    # the optimum on the box is the corner towards the target
    torch.testing.assert_close(x[0], torch.tensor([0.4, -0.8, 0.2]))


@pytest.mark.parametrize("head", ["gaussian", "categorical"])
def test_mad_reaches_more_divergence_than_random(head: str) -> None:
    pol = make_policy(head, obs_dim=6, act_dim=3, seed=4, hidden=(32, 32))
    th = ThreatModel(0.2)
    obs = torch.randn(256, 6)
    clean = pol(obs).detach()
    divs = {}
    for name in ("random", "mad"):
        adv = make_attack(name, AttackContext(pol, th, seed=0)).perturb(obs)
        divs[name] = float(pol.divergence(clean, pol(adv)).mean())
    assert divs["mad"] > 2 * divs["random"]


def test_mad_lowers_hopper_return_more_than_random() -> None:
    pol = load_native(REPO / "profiles" / "hopper.pt")
    th = ThreatModel(0.075)
    seeds = [0, 1, 2, 3]
    rnd = evaluate_attack(pol, "Hopper-v5", {}, seeds, "random", th)
    mad = evaluate_attack(pol, "Hopper-v5", {}, seeds, "mad", th)
    assert mad.stats.mean < rnd.stats.mean


def test_unknown_attack_is_a_user_error() -> None:
    pol = make_policy()
    with pytest.raises(CompressorError, match="unknown attack"):
        make_attack("nope", AttackContext(pol, ThreatModel(0.1)))


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), 1e6])
def test_bad_eps_is_rejected(eps: float) -> None:
    with pytest.raises(CompressorError):
        ThreatModel(eps)
