"""Global certificate: soundness against PGD and sampling, monotonicity under pruning, formulas."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compressor.certify.empirical import empirical_search, empirical_tv, output_shift
from compressor.certify.global_bound import certify_global, input_scale, shift_for_tv, tv_from_shift
from compressor.core.errors import CompressorError
from compressor.core.threat import ThreatModel, sample_ball
from compressor.policy.model import Policy, PolicySpec
from conftest import make_policy

HEADS = ["gaussian", "categorical", "squashed_gaussian", "deterministic"]


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny networks gain nothing from intra-op threads, and on a shared 2-core machine the
    # oversubscribed thread pool slowed these tests more than tenfold
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_states(policy: Policy, n: int, seed: int, spread: float = 2.0) -> torch.Tensor:
    """Raw observations around the normalisation mean; spread > 10 exercises the clip."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, policy.spec.obs_dim, generator=g) * spread
    return policy.obs_mean + z * policy.obs_scale()


def sampled_shift(policy: Policy, x0: torch.Tensor, threat: ThreatModel, k: int) -> torch.Tensor:
    """Per state, the largest shift among k uniform samples of the ball (a gradient-free probe)."""
    g = torch.Generator().manual_seed(1)
    scale = threat.scale(policy)
    with torch.no_grad():
        clean = policy(x0)
        best = torch.zeros(len(x0))
        for _ in range(k):
            x = x0 + sample_ball(tuple(x0.shape), threat.eps, threat.norm, g) * scale
            best = torch.maximum(best, output_shift(policy, clean, policy(x)))
    return best


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    depth=st.integers(1, 3),
    width=st.integers(3, 32),
    activation=st.sampled_from(["tanh", "relu", "elu"]),
    head=st.sampled_from(HEADS),
    obs_norm=st.booleans(),
    space=st.sampled_from(["normalized", "raw"]),
    norm=st.sampled_from(["inf", "2"]),
    eps=st.sampled_from([0.01, 0.1, 0.5]),
    spread=st.sampled_from([1.0, 30.0]),
)
def test_global_bound_is_never_exceeded(
    seed, depth, width, activation, head, obs_norm, space, norm, eps, spread
):
    policy = make_policy(head, (width,) * depth, activation, 5, 3, obs_norm, seed)
    threat = ThreatModel(eps, norm, space)
    cert = certify_global(policy, threat)
    x0 = random_states(policy, 16, seed, spread)
    emp = empirical_search(policy, x0, threat, steps=20, restarts=1)
    found = np.maximum(emp.shift, sampled_shift(policy, x0, threat, 8).numpy())
    # compare the unsaturated shift; float32 forward passes earn a tiny tolerance
    assert found.max() <= cert.shift_bound * (1 + 1e-4) + 1e-5
    if cert.tv_bound is not None:
        assert emp.tv.max() <= cert.tv_bound + 1e-5
    assert math.isclose(cert.shift_bound, cert.lipschitz * eps)


@pytest.mark.parametrize("norm", ["inf", "2"])
@pytest.mark.parametrize("space", ["normalized", "raw"])
def test_bound_is_attained_by_a_linear_policy(norm, space):
    # one output, no hidden layer: the bound is exact, so an under-estimate would fail soundness
    policy = make_policy("gaussian", (), "tanh", 6, 1, True, seed=3)
    threat = ThreatModel(0.05, norm, space)
    cert = certify_global(policy, threat)
    emp = empirical_search(policy, random_states(policy, 4, 0, 0.5), threat, steps=40)
    assert emp.shift.min() == pytest.approx(cert.shift_bound, rel=1e-3)


@pytest.mark.parametrize("obs_norm", [True, False])
def test_input_scale_matches_policy_normalize(obs_norm):
    policy = make_policy("gaussian", (8,), "tanh", 5, 2, obs_norm, seed=1)
    x0 = random_states(policy, 1, 0, 0.5)  # far from the clip
    delta = torch.full((1, 5), 0.01)
    for space in ("normalized", "raw"):
        threat = ThreatModel(0.01, "inf", space)
        moved = policy.normalize(x0 + delta * threat.scale(policy)) - policy.normalize(x0)
        expect = (delta[0].double() * input_scale(policy, threat)).float()
        assert torch.allclose(moved[0], expect, atol=1e-5)


def masked_copy(policy: Policy, masks: list[torch.Tensor]) -> Policy:
    p = policy.clone()
    p.set_masks(masks)
    return p


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    depth=st.integers(1, 3),
    width=st.integers(2, 24),
    head=st.sampled_from(HEADS),
    d1=st.floats(0.2, 1.0),
    d2=st.floats(0.2, 1.0),
)
def test_pruning_never_loosens_monotone_bounds(seed, depth, width, head, d1, d2):
    dense = make_policy(head, (width,) * depth, "relu", 4, 3, True, seed)
    g = torch.Generator().manual_seed(seed)
    m1 = [(torch.rand(w.shape, generator=g) < d1).float() for w in dense.effective_weights()]
    m2 = [m * (torch.rand(m.shape, generator=g) < d2).float() for m in m1]  # nested: M2 ≤ M1
    chain = [dense, masked_copy(dense, m1), masked_copy(dense, m2)]
    for norm in ("inf", "2"):
        for space in ("normalized", "raw"):
            threat = ThreatModel(0.1, norm, space)
            certs = [certify_global(p, threat) for p in chain]
            for a, b in zip(certs, certs[1:]):
                assert b.lipschitz <= a.lipschitz * (1 + 1e-9) + 1e-15
                assert (b.certified_radius or 0) >= (a.certified_radius or 0) * (1 - 1e-9)
                for key in ("linf_row_sum_product", "frobenius_product"):
                    assert b.comparison[key]["monotone"]
                    assert b.comparison[key]["value"] <= a.comparison[key]["value"] * (1 + 1e-12)


def test_spectral_product_can_grow_under_pruning():
    spec = PolicySpec(obs_dim=2, act_dim=2, hidden=[], head="categorical")
    policy = Policy(spec)
    with torch.no_grad():
        policy.layers[0].weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, 1.0]]))
    pruned = masked_copy(policy, [torch.tensor([[1.0, 1.0], [0.0, 1.0]])])
    threat = ThreatModel(0.1)
    before, after = certify_global(policy, threat), certify_global(pruned, threat)
    assert before.comparison["spectral_product"]["value"] == pytest.approx(math.sqrt(2))
    assert after.comparison["spectral_product"]["value"] == pytest.approx((1 + math.sqrt(5)) / 2)
    assert before.comparison["spectral_product"]["monotone"] is False
    assert after.lipschitz < before.lipschitz  # the absolute-product bound did tighten


@pytest.mark.parametrize("d", [0.0, 0.3, 1.0, 2.5, 6.0])
def test_gaussian_tv_formula_matches_numeric_integral(d):
    sigma = 0.7
    x = np.linspace(-30, 30, 600_001)
    p = np.exp(-0.5 * (x / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    q = np.exp(-0.5 * ((x - d) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    numeric = 0.5 * float(np.sum(np.abs(p - q)) * (x[1] - x[0]))
    assert float(tv_from_shift("gaussian", d / sigma)) == pytest.approx(numeric, abs=1e-6)


def test_gaussian_tv_matches_monte_carlo_in_3d_and_policy():
    g = torch.Generator().manual_seed(0)
    mu_a, mu_b = torch.tensor([0.0, 0.2, -0.1]), torch.tensor([0.3, -0.1, 0.2])
    sigma = torch.tensor([0.5, 0.8, 0.3])
    s = mu_a + sigma * torch.randn(400_000, 3, generator=g, dtype=torch.float64)
    log_ratio = (-0.5 * ((s - mu_b) / sigma) ** 2 + 0.5 * ((s - mu_a) / sigma) ** 2).sum(-1)
    mc = float((1 - torch.exp(log_ratio)).clamp_min(0).mean())  # TV = E_p[(1 - q/p)+]
    delta = float(torch.linalg.vector_norm((mu_a - mu_b) / sigma))
    assert float(tv_from_shift("gaussian", delta)) == pytest.approx(mc, abs=5e-3)
    policy = make_policy("gaussian", (4,), "tanh", 2, 3, False)
    with torch.no_grad():
        policy.log_std.copy_(sigma.log())
    tv = policy.total_variation(mu_a[None], mu_b[None]).detach()
    assert float(tv) == pytest.approx(float(tv_from_shift("gaussian", delta)), abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    z=st.lists(st.floats(-8, 8), min_size=2, max_size=6),
    seed=st.integers(0, 1000),
    scale=st.floats(0.01, 5.0),
)
def test_categorical_tv_is_below_tanh_of_quarter_oscillation(z, seed, scale):
    a = torch.tensor(z, dtype=torch.float64)
    b = (
        a
        + torch.randn(len(z), generator=torch.Generator().manual_seed(seed), dtype=a.dtype) * scale
    )
    tv = 0.5 * float((torch.softmax(a, 0) - torch.softmax(b, 0)).abs().sum())
    osc = float((b - a).max() - (b - a).min())
    assert tv <= float(tv_from_shift("categorical", osc)) + 1e-12 <= min(1.0, osc / 4) + 1e-12


def test_categorical_tanh_bound_is_attained():
    c = 1.7
    a = torch.tensor([0.0, c / 2], dtype=torch.float64)
    b = a + torch.tensor([c, 0.0], dtype=torch.float64)
    tv = 0.5 * float((torch.softmax(a, 0) - torch.softmax(b, 0)).abs().sum())
    assert tv == pytest.approx(float(tv_from_shift("categorical", c)), abs=1e-12)


@pytest.mark.parametrize("head", ["gaussian", "categorical"])
def test_certified_radius_gives_tau(head):
    policy = make_policy(head, (8, 8), "elu", 4, 3, True, seed=2)
    cert = certify_global(policy, ThreatModel(0.05), tau=0.1)
    at_radius = certify_global(policy, ThreatModel(cert.certified_radius), tau=0.1)
    assert at_radius.tv_bound == pytest.approx(0.1, rel=1e-9)
    assert shift_for_tv(head, 1.0) == math.inf


def test_certificate_fields_and_json():
    policy = make_policy("deterministic", (8,), "tanh", 4, 2, True)
    cert = certify_global(policy, ThreatModel(0.1, "2", "raw"))
    d = json.loads(json.dumps(cert.to_dict()))
    assert d["method"] == "abs_product" and d["space"] == "raw" and d["norm"] == "2"
    assert d["tv_bound"] is None and d["certified_radius"] is None
    assert d["shift_name"] == "action_deviation_l2"
    assert {k: v["monotone"] for k, v in d["comparison"].items()} == {
        "linf_row_sum_product": True,
        "frobenius_product": True,
        "spectral_product": False,
    }
    blind = make_policy("gaussian", (4,), "relu", 3, 1, True)
    blind.set_masks([torch.zeros_like(m) for m in blind.masks()])
    d = certify_global(blind, ThreatModel(0.1)).to_dict()
    assert d["lipschitz"] == 0.0 and d["radius_unbounded"] and d["certified_radius"] is None


def test_empirical_tv_shape_and_range():
    policy = make_policy("categorical", (8,), "relu", 4, 3, True)
    tv = empirical_tv(policy, random_states(policy, 7, 0), ThreatModel(0.3), steps=5)
    assert tv.shape == (7,) and (tv >= 0).all() and (tv <= 1).all()


def test_bad_input_is_a_compressor_error():
    policy = make_policy("gaussian", (8,), "relu", 4, 2, True)
    with pytest.raises(CompressorError):
        certify_global(policy, ThreatModel(0.1), tau=0.0)
    with pytest.raises(CompressorError):
        empirical_tv(policy, np.zeros((3, 5)), ThreatModel(0.1))


def _state_sigma_policy(seed: int, scale: float) -> Policy:
    """A SAC-like head: σ from its own layer, actions in [-scale, scale]."""
    base = make_policy("squashed_gaussian", (8, 8), "relu", 4, 2, True, seed=seed)
    spec = dataclasses.replace(
        base.spec,
        state_dependent_std=True,
        action_low=[-scale] * 2,
        action_high=[scale] * 2,
    )
    p = Policy(spec)
    p.load_state_dict(base.state_dict(), strict=False)
    return p.eval()


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_state_dependent_sigma_certifies_the_head_output(norm: str) -> None:
    """SAC/TQC have no Σ shared by all states: no global TV, and the bound is on the head's
    output (pre-squash), which PGD and sampling never exceed."""
    policy = _state_sigma_policy(3, 1.0)
    threat = ThreatModel(0.1, norm)
    cert = certify_global(policy, threat)
    assert cert.tv_bound is None and cert.certified_radius is None
    assert cert.to_dict()["shift_name"] == "action_deviation_l2"
    x0 = random_states(policy, 32, 3, 1.0)
    g, scale = torch.Generator().manual_seed(0), threat.scale(policy)
    with torch.no_grad():
        clean, worst = policy(x0), 0.0
        for _ in range(16):
            x = x0 + sample_ball(tuple(x0.shape), threat.eps, threat.norm, g) * scale
            worst = max(worst, float((policy(x) - clean).norm(dim=-1).max()))
    assert 0.0 < worst <= cert.shift_bound * (1 + 1e-4) + 1e-6


def test_q_greedy_certificate_is_named_for_q_values() -> None:
    policy = make_policy("q_greedy", (8,), "relu", 4, 3, True)
    d = certify_global(policy, ThreatModel(0.1)).to_dict()
    assert d["shift_name"] == "q_value_change_l2" and d["tv_bound"] is None
