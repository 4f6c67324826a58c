"""The rollout engine and evaluation: seeded episodes, attacks seen only by the policy."""

from __future__ import annotations

from unittest import mock

import numpy as np
import torch

from compressor.core.stats import summarize_returns
from compressor.core.threat import ThreatModel
from compressor.evaluate import _TVMeter, evaluate, evaluate_attack, random_action_return
from compressor.policy.native import load_native
from compressor.rl.rollout import rollout
from conftest import REPO, make_policy


def test_returns_do_not_depend_on_env_count() -> None:
    pol = load_native(REPO / "profiles" / "cartpole.pt")
    seeds = [3, 1, 4, 1, 5]
    a = rollout(pol, "CartPole-v1", {}, seeds, num_envs=5, max_steps=60)
    b = rollout(pol, "CartPole-v1", {}, seeds, num_envs=2, max_steps=60)
    np.testing.assert_array_equal(a.returns, b.returns)
    np.testing.assert_array_equal(a.lengths, b.lengths)


def test_episode_seed_fixes_the_episode() -> None:
    pol = make_policy("categorical", obs_dim=4, act_dim=2, env_id="CartPole-v1", seed=3)
    r = rollout(pol, "CartPole-v1", {}, [7, 8, 7], num_envs=3)
    assert r.returns[0] == r.returns[2]
    assert r.steps == int(r.lengths.sum())


def test_record_states_are_true_observations() -> None:
    pol = make_policy("categorical", obs_dim=4, act_dim=2, env_id="CartPole-v1", seed=1)

    def shift(obs: torch.Tensor) -> torch.Tensor:
        return obs + 100.0  # the policy sees garbage; recorded states must stay true

    r = rollout(pol, "CartPole-v1", {}, [0], perturb=shift, record_states=True, max_steps=20)
    assert r.states is not None and len(r.states) == r.steps
    assert np.abs(r.states).max() < 50


def test_max_steps_truncates() -> None:
    pol = load_native(REPO / "profiles" / "cartpole.pt")
    r = rollout(pol, "CartPole-v1", {}, [0, 1], max_steps=37)
    assert list(r.lengths) == [37, 37]
    assert list(r.returns) == [37.0, 37.0]


def test_trained_cartpole_reaches_500_and_beats_random_actions() -> None:
    pol = load_native(REPO / "profiles" / "cartpole.pt")
    res, _ = evaluate(pol, "CartPole-v1", {}, [0, 1])
    assert res.stats.mean == 500.0
    assert random_action_return("CartPole-v1", {}, [0, 1, 2]) < 60


def test_bootstrap_ci_brackets_mean() -> None:
    s = summarize_returns(np.array([1.0, 2.0, 3.0, 10.0]))
    assert s.ci_low <= s.mean <= s.ci_high
    assert s.ci_low >= 1.0 and s.ci_high <= 10.0
    assert summarize_returns(np.array([5.0])).ci_low == 5.0


def test_tv_meter_reads_the_attacks_outputs_with_the_same_episodes() -> None:
    # the meter's TV from MAD's own outputs equals the one from two more forward passes (to
    # float rounding), and the episodes are the same
    pol = load_native(REPO / "profiles" / "cartpole.pt")
    th = ThreatModel(0.2)
    shared = evaluate_attack(pol, "CartPole-v1", {}, [0, 1, 2], "mad", th, num_envs=2)

    class OwnForwards(_TVMeter):
        def __init__(self, policy, perturb, measured=None):
            super().__init__(policy, perturb, None)

    with mock.patch("compressor.evaluate._TVMeter", OwnForwards):
        own = evaluate_attack(pol, "CartPole-v1", {}, [0, 1, 2], "mad", th, num_envs=2)
    np.testing.assert_array_equal(shared.stats.returns, own.stats.returns)
    assert shared.steps == own.steps and shared.mean_tv is not None and own.mean_tv is not None
    assert shared.mean_tv > 0.0
    np.testing.assert_allclose(shared.mean_tv, own.mean_tv, rtol=1e-5)


def test_attacked_evaluation_reports_tv() -> None:
    pol = load_native(REPO / "profiles" / "cartpole.pt")
    th = ThreatModel(0.2)
    rnd = evaluate_attack(pol, "CartPole-v1", {}, [0], "random", th, num_envs=1)
    mad = evaluate_attack(pol, "CartPole-v1", {}, [0], "mad", th, num_envs=1)
    assert rnd.mean_tv is not None and mad.mean_tv is not None
    assert mad.mean_tv > 1.5 * rnd.mean_tv


def test_frozen_policy_gives_the_same_numbers_and_gradients() -> None:
    """Rollouts freeze the policy (W ⊙ M computed once): outputs and input gradients are
    bit-identical, no gradient reaches the weights, and training works again afterwards."""
    from compressor.prune.criteria import prune

    pol = prune(make_policy(obs_dim=5, act_dim=2), 0.5)
    x = torch.randn(7, 5, requires_grad=True)
    out = pol(x)
    (g_plain,) = torch.autograd.grad(out.square().sum(), x)
    with pol.frozen(), pol.frozen():  # re-entrant
        out_f = pol(x)
        (g_frozen,) = torch.autograd.grad(out_f.square().sum(), x, retain_graph=True)
        out_f.sum().backward()
        assert all(layer.weight.grad is None for layer in pol.layers)
    assert torch.equal(out, out_f) and torch.equal(g_plain, g_frozen)
    pol(x).sum().backward()
    assert all(layer.weight.grad is not None for layer in pol.layers)
