"""The hand-written PGD gradient (core/mlp_grad.py, core/objectives.py) against autograd: same
gradients, same PGD iterates, and a fall-back for every network it does not recognise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.core.mlp_grad import OutputObjective
from compressor.core.objectives import divergence_objective, policy_objective, value_objective
from compressor.core.pgd import max_divergence_measured, max_divergence_point, pgd, pgd_in_ball
from compressor.core.threat import ThreatModel, ball_norm
from compressor.policy.model import Policy
from compressor.policy.value import ValueNet
from conftest import make_policy

HEADS = ["gaussian", "categorical", "squashed_gaussian", "deterministic"]


def _pruned(policy: Policy, seed: int) -> Policy:
    g = torch.Generator().manual_seed(seed)
    policy.set_masks([(torch.rand(w.shape, generator=g) > 0.4).float() for w in policy.masks()])
    return policy


def _states(policy: Policy, n: int, seed: int) -> torch.Tensor:
    # around the normalisation's mean, some rows far enough out to hit the clip
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, policy.spec.obs_dim, generator=g) * 3
    z[: n // 4] *= 6
    return (policy.obs_mean + z * policy.obs_scale()).to(torch.float32)  # attacks see float32


# float32: the hand-written backward and autograd's multiply in different orders, and which
# order a CPU's kernels take differs (AVX2, AVX-512; Intel, AMD): gradients agree to ~1e-6
# relative, and ten PGD steps carry that into the iterates
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-6}
POINT_TOL = {"rtol": 1e-4, "atol": 2e-4}


def _autograd_grad(objective, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(objective(x).sum(), x)
    return g


@pytest.mark.parametrize("activation", ["tanh", "relu", "elu"])
@pytest.mark.parametrize("head", HEADS)
def test_divergence_gradient_equals_autograd(activation: str, head: str) -> None:
    pol = _pruned(make_policy(head, (12, 9), activation, obs_dim=5, act_dim=3, seed=3), 1)
    x = _states(pol, 40, 0)
    with torch.no_grad():
        clean = pol(x)
    obj = divergence_objective(pol, clean, x)
    assert isinstance(obj, OutputObjective) and obj.head_grad is not None
    x1 = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    val, grad = obj.value_and_grad(x1)
    ref_val = pol.divergence(clean, pol(x1))
    ref_grad = _autograd_grad(lambda z: pol.divergence(clean, pol(z)), x1)
    assert grad is not None and grad.abs().sum() > 0
    torch.testing.assert_close(val, ref_val, **GRAD_TOL)
    torch.testing.assert_close(grad, ref_grad, **GRAD_TOL)


@pytest.mark.parametrize("activation", ["tanh", "relu", "elu"])
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("norm", ["inf", "2"])
@pytest.mark.parametrize("space", ["normalized", "raw"])
def test_pgd_fast_path_matches_autograd_path(
    activation: str, head: str, norm: str, space: str
) -> None:
    pol = _pruned(make_policy(head, (16, 8), activation, obs_dim=6, act_dim=3, seed=5), 2)
    threat = ThreatModel(0.4, norm, space)
    scale = threat.scale(pol)
    x = _states(pol, 48, 1)
    with pol.frozen():
        fast = max_divergence_point(pol, x, scale, threat, 10, torch.Generator().manual_seed(7))
        with torch.no_grad():
            clean = pol(x)
        slow = pgd_in_ball(
            lambda z: pol.divergence(clean, pol(z)),
            x,
            scale,
            threat,
            10,
            torch.Generator().manual_seed(7),
        )
        v_fast, v_slow = pol.divergence(clean, pol(fast)), pol.divergence(clean, pol(slow))
    # where the objective is nearly flat (saturated logits, rows pinned by the clip) the ascent
    # direction is rounding noise and the two paths may part; they must reach the same value
    # everywhere and the same iterates nearly everywhere
    top = float(v_slow.max())
    torch.testing.assert_close(v_fast, v_slow, rtol=1e-3, atol=1e-3 * top)
    same = torch.isclose(fast, slow, rtol=1e-4, atol=2e-4).all(1)
    assert float(same.float().mean()) >= 0.9
    assert float(ball_norm((fast - x) / scale, norm).max()) <= 0.4 * (1 + 1e-5)


def test_generic_head_and_deterministic_start_match_autograd() -> None:
    pol = make_policy("gaussian", (10, 10), "elu", obs_dim=4, act_dim=2, seed=8)
    x = _states(pol, 32, 3)
    w = torch.tensor([1.0, -2.0])

    def head(out: torch.Tensor) -> torch.Tensor:
        return torch.tanh(out) @ w

    obj = policy_objective(pol, head, x)
    assert isinstance(obj, OutputObjective) and obj.head_grad is None
    scale = pol.obs_scale()
    fast = pgd(obj, x, scale, 0.3, norm="2", steps=6)
    slow = pgd(lambda z: head(pol(z)), x, scale, 0.3, norm="2", steps=6)
    torch.testing.assert_close(fast, slow, **POINT_TOL)


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_critic_objective_matches_autograd(norm: str) -> None:
    pol = make_policy("gaussian", (8, 8), "tanh", obs_dim=5, act_dim=2, seed=9)
    torch.manual_seed(0)
    critic = ValueNet(5, [12, 7], "relu")
    x = _states(pol, 30, 4)
    obj = value_objective(pol, critic, x)
    assert isinstance(obj, OutputObjective)
    val, grad = obj.value_and_grad(x)
    plain = lambda z: -critic(pol.normalize(z))  # noqa: E731
    torch.testing.assert_close(val, plain(x))
    torch.testing.assert_close(grad, _autograd_grad(plain, x), **GRAD_TOL)
    scale = pol.obs_scale()
    fast = pgd(obj, x, scale, 0.2, norm=norm, steps=10)
    slow = pgd(plain, x, scale, 0.2, norm=norm, steps=10)
    torch.testing.assert_close(fast, slow, **POINT_TOL)


def test_changed_weights_are_seen() -> None:
    pol = make_policy("gaussian", (8,), "tanh", obs_dim=3, act_dim=2, seed=1)
    x = _states(pol, 16, 5)
    clean = pol(x).detach()
    divergence_objective(pol, clean, x)  # remembered for these weights
    with torch.no_grad():
        pol.layers[0].weight.mul_(-2.0)
        pol.obs_mean.add_(1.0)
    obj = divergence_objective(pol, clean, x)
    val, grad = obj.value_and_grad(x)
    torch.testing.assert_close(val, pol.divergence(clean, pol(x)))
    ref = _autograd_grad(lambda z: pol.divergence(clean, pol(z)), x)
    torch.testing.assert_close(grad, ref, **GRAD_TOL)


class _Doubled(Policy):
    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(obs)


class _OtherDivergence(Policy):
    def divergence(self, out_a: torch.Tensor, out_b: torch.Tensor) -> torch.Tensor:
        return (out_a - out_b).abs().sum(-1)


def _as(cls: type[Policy], pol: Policy) -> Policy:
    other = cls(pol.spec)
    other.load_state_dict(pol.state_dict())
    return other


def test_unrecognised_networks_fall_back_to_autograd() -> None:
    base = make_policy("gaussian", (8, 8), "tanh", obs_dim=4, act_dim=2, seed=2)
    x = _states(base, 16, 6)
    clean = base(x).detach()
    # a subclass with its own forward, an activation not written out, a changed divergence
    doubled = _as(_Doubled, base)
    assert not isinstance(divergence_objective(doubled, clean, x), OutputObjective)
    softplus = make_policy("gaussian", (8, 8), "tanh", obs_dim=4, act_dim=2, seed=2)
    softplus.act_fn = nn.Softplus()
    assert not isinstance(policy_objective(softplus, lambda o: o.sum(-1), x), OutputObjective)
    other = _as(_OtherDivergence, base)
    obj = divergence_objective(other, clean, x)
    assert isinstance(obj, OutputObjective) and obj.head_grad is None  # autograd on the head
    for pol in (doubled, softplus, other):
        threat, scale = ThreatModel(0.3), pol.obs_scale()
        fast = max_divergence_point(pol, x, scale, threat, 5, torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = pol(x)
        slow = pgd_in_ball(
            lambda z, p=pol, r=ref: p.divergence(r, p(z)),
            x,
            scale,
            threat,
            5,
            torch.Generator().manual_seed(1),
        )
        torch.testing.assert_close(fast, slow, **POINT_TOL)


def test_attack_point_feeds_a_training_loss() -> None:
    # PGD runs under inference mode on the fast path; what it returns must still be an
    # ordinary tensor that a loss on the policy's weights can use (SA-PPO's regulariser)
    pol = make_policy("gaussian", (8, 8), "tanh", obs_dim=4, act_dim=2, seed=6)
    x = _states(pol, 16, 7)
    with torch.no_grad():
        ref = pol(x)
    adv = max_divergence_point(pol, x, pol.obs_scale(), ThreatModel(0.3), 4, None, ref=ref)
    assert not adv.is_inference()
    pol.divergence(ref, pol(adv)).mean().backward()
    assert pol.layers[0].weight.grad is not None and pol.layers[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("head", [*HEADS, "q_greedy"])
def test_measured_divergence_point_is_the_point_with_its_outputs(head: str) -> None:
    # the same point as max_divergence_point (same draws), and the outputs the ascent kept
    # are the policy's at the clean and at the returned observations, to float rounding
    policy = make_policy(head, (24, 24), "tanh", 5, 3, True, seed=4)
    x = _states(policy, 12, 1)
    threat = ThreatModel(0.2)
    scale = threat.scale(policy)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plain = max_divergence_point(policy, x, scale, threat, 7, g1)
    adv, clean, out = max_divergence_measured(policy, x, scale, threat, 7, g2)
    assert torch.equal(plain, adv)
    assert out is not None
    with torch.no_grad():
        torch.testing.assert_close(clean, policy(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, policy(adv), rtol=1e-5, atol=1e-6)
