"""Falls are counted from the rollout's terminations (and a return threshold), and the seeded
observation noise follows the episode, whatever sub-env runs it, within the threat model."""

from __future__ import annotations

import numpy as np
import torch

from compressor.core.threat import ThreatModel
from compressor.evaluate import EvalResult, evaluate, evaluate_attack
from compressor.policy.native import load_native
from compressor.rl.noise import EpisodeNoise, ObservationNoise, episode_limit
from compressor.rl.rollout import rollout
from compressor.search.sequential import PairedRule
from conftest import REPO

CARTPOLE = REPO / "profiles" / "cartpole.pt"


class Push:
    """Always the same action: CartPole's pole falls within a few dozen steps."""

    def __init__(self, action: int = 0) -> None:
        self.action = action

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.full((obs.shape[0],), self.action, dtype=torch.int64)

    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.act(obs)


class Still(Push):
    """Zero torque (a continuous action)."""

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.zeros((obs.shape[0], 1))


def test_falls_are_counted_on_a_policy_that_falls() -> None:
    seeds = [0, 1, 2, 3, 4]
    fell, _ = evaluate(Push(), "CartPole-v1", {}, seeds, num_envs=2)
    assert fell.terminated == [True] * 5 and fell.seeds == seeds
    assert all(n < 100 for n in fell.lengths or []) and fell.stats.n == 5
    assert fell.falls(None) == [True] * 5
    assert fell.cvar10 == min(fell.stats.returns)
    good, _ = evaluate(load_native(CARTPOLE), "CartPole-v1", {}, seeds, num_envs=2)
    assert good.terminated == [False] * 5 and good.lengths == [500] * 5
    assert good.falls(None) == [False] * 5
    # a return threshold counts episodes that end low without terminating; truncated episodes
    # are not terminations (the rollout's max_steps cut them)
    short, _ = evaluate(load_native(CARTPOLE), "CartPole-v1", {}, seeds, max_steps=50)
    assert short.terminated == [False] * 5
    assert short.falls(below=100.0) == [True] * 5
    assert PairedRule(1.0, None, None, fall_on_termination=False).falls(fell).sum() == 0
    # Pendulum never terminates: its episodes end at the time limit, never as falls
    pend, _ = evaluate(Still(), "Pendulum-v1", {}, [0, 1])
    assert pend.terminated == [False, False] and pend.lengths == [200, 200]
    # per-episode records survive the JSON round trip and merging
    back = EvalResult.from_dict(fell.to_dict())
    assert back.terminated == fell.terminated and back.lengths == fell.lengths
    both = fell.merged(good)
    assert both.seeds == seeds + seeds and both.stats.n == 10
    assert sum(both.falls(None)) == 5


def _recorded(
    num_envs: int, seeds: list[int], noise: ObservationNoise, policy: object = None
) -> tuple:
    """Per episode, the noise rows the policy saw, and the rollout's own episode report."""
    session = EpisodeNoise(noise, seeds, num_envs, episode_limit("CartPole-v1", {}, 60))
    drawn: dict[int, list[np.ndarray]] = {}
    assigned: list[np.ndarray] = []
    reported: list[np.ndarray] = []

    def perturb(obs: torch.Tensor) -> torch.Tensor:
        rows = session.rows(obs.shape[0]).copy()
        out = session.perturb(obs)
        assigned.append(rows)
        for e, d in zip(rows, (out - obs).numpy()):
            drawn.setdefault(int(e), []).append(d)
        return out

    def hook(ep, o, a, r, o2, term) -> None:  # noqa: ANN001
        reported.append(ep.copy())
        session.on_transition(ep, o, a, r, o2, term)

    # a deterministic policy of the true pole angle, so the noise can change the episodes
    rollout(
        load_native(CARTPOLE),
        "CartPole-v1",
        {},
        seeds,
        num_envs=num_envs,
        perturb=perturb,
        on_transition=hook,
        max_steps=60,
    )
    return session, drawn, assigned, reported


def test_noise_follows_the_episode_not_the_sub_env() -> None:
    pol = load_native(CARTPOLE)
    threat = ThreatModel(0.1)
    noise = ObservationNoise(0.01, threat, tuple(threat.scale(pol).tolist()))
    seeds = [3, 1, 4, 1, 5, 9, 2]
    runs = {n: _recorded(n, seeds, noise) for n in (1, 3, 7)}
    for n, (session, drawn, assigned, reported) in runs.items():
        assert session.resyncs == 0, n  # it always knew which episode each row was
        assert [a.tolist() for a in assigned] == [r.tolist() for r in reported]
        half = noise.half_width * np.array(noise.scale)
        for rows in drawn.values():
            assert np.all(np.abs(np.array(rows)) <= half + 1e-6)
    one = runs[1][1]
    for n in (3, 7):
        for e, rows in runs[n][1].items():
            k = min(len(rows), len(one[e]))
            np.testing.assert_allclose(np.array(rows[:k]), np.array(one[e][:k]), atol=1e-7)
    # two episodes with the same seed see the same noise (seeded by the seed, not the index)
    np.testing.assert_allclose(one[1][0], one[3][0])
    # episodes that end at different steps (falls), their sub-envs refilled: still tracked
    for n in (2, 3):
        session, _, assigned, reported = _recorded(n, seeds, noise, Push())
        assert session.resyncs == 0 and len(assigned) > 7
        assert [a.tolist() for a in assigned] == [r.tolist() for r in reported]


def test_noise_keeps_an_attack_inside_the_ball() -> None:
    pol = load_native(CARTPOLE)
    threat = ThreatModel(0.1)
    noise = ObservationNoise(0.5, threat, tuple(threat.scale(pol).tolist()))  # exaggerated
    session = noise.session([0, 1], 2, 500)
    obs = torch.zeros(2, pol.spec.obs_dim)
    outside = session.around(lambda o: o + 10 * threat.eps * torch.tensor(noise.scale))
    delta = (outside(obs) - obs) / torch.tensor(noise.scale)
    assert torch.all(delta.abs() <= threat.eps + 1e-6) and torch.all(delta.abs() > 0)
    # and an attacked evaluation with noise runs and records its episodes
    res = evaluate_attack(pol, "CartPole-v1", {}, [0, 1], "random", threat, num_envs=2, noise=noise)
    assert res.seeds == [0, 1] and res.terminated is not None and res.mean_tv is not None
