"""The deployed-action certificate: sound against PGD for every head, both norms, raw and
normalised ε; the radius bisection; argmax heads' certified states cannot flip."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_certify import random_states

from compressor.certify.deployed import (
    _certified_at,
    certify_deployed,
    empirical_deviation,
    measurement_slack,
    resolve_tolerance,
)
from compressor.certify.global_bound import certified_head, certify_global, output_scale
from compressor.core.errors import CompressorError
from compressor.core.threat import ThreatModel, sample_ball
from compressor.policy.model import Policy
from conftest import make_policy

VARIANTS = [
    "gaussian",
    "categorical",
    "q_greedy",
    "squashed_gaussian",
    "squashed_gaussian_state_std",
    "deterministic",
    "deterministic_squash",
]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def variant_policy(
    variant: str, hidden: tuple[int, ...], activation: str, obs_norm: bool, seed: int
) -> Policy:
    """Every head the deployed map distinguishes, with random weights (and action bounds of
    different widths, so the range fraction is exercised)."""
    head = variant.split("_state")[0].replace("deterministic_squash", "deterministic")
    base = make_policy(
        "categorical" if head == "q_greedy" else head, hidden, activation, 5, 3, obs_norm, seed
    )
    if variant == "gaussian" or variant == "squashed_gaussian" or variant == "categorical":
        return base
    spec = dataclasses.replace(base.spec, head=head)
    if head == "q_greedy":
        spec = dataclasses.replace(spec, action_low=None, action_high=None)
    else:
        spec = dataclasses.replace(spec, action_low=[-1.0, -2.0, 0.0], action_high=[1.0, 0.5, 3.0])
    if variant == "squashed_gaussian_state_std":
        spec = dataclasses.replace(spec, state_dependent_std=True, log_std_bounds=[-20.0, 2.0])
    if variant == "deterministic_squash":
        spec = dataclasses.replace(spec, squash=True)
    p = Policy(spec)
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("action_")}
    p.load_state_dict(state, strict=False)
    return p


def sampled_deviation(policy: Policy, x0: torch.Tensor, threat: ThreatModel, k: int = 16):
    """Per state and dimension, the largest deployed deviation among k uniform ball samples."""
    g = torch.Generator().manual_seed(3)
    scale = threat.scale(policy)
    with torch.no_grad():
        a0 = policy.act(x0)
        outs = [
            policy.act(x0 + sample_ball(tuple(x0.shape), threat.eps, threat.norm, g) * scale)
            for _ in range(k)
        ]
    if policy.spec.head in ("categorical", "q_greedy"):
        return torch.stack([(o != a0) for o in outs]).any(0).numpy()
    return torch.stack([(o - a0).abs() for o in outs]).amax(0).double().numpy()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    depth=st.integers(1, 2),
    width=st.integers(3, 24),
    activation=st.sampled_from(["tanh", "relu", "elu"]),
    variant=st.sampled_from(VARIANTS),
    obs_norm=st.booleans(),
    space=st.sampled_from(["normalized", "raw"]),
    norm=st.sampled_from(["inf", "2"]),
    eps=st.sampled_from([0.01, 0.1, 0.5]),
    method=st.sampled_from(["crown", "ibp"]),
)
# a saturated tanh: deviations of 1e-7, where float32 actions round by as much
@example(4, 1, 4, "elu", "squashed_gaussian_state_std", True, "normalized", "inf", 0.1, "crown")
def test_deployed_bound_is_sound(
    seed, depth, width, activation, variant, obs_norm, space, norm, eps, method
):
    policy = variant_policy(variant, (width,) * depth, activation, obs_norm, seed)
    threat = ThreatModel(eps, norm, space)
    x0 = random_states(policy, 10, seed, 1.0 if seed % 2 else 30.0)
    cert = certify_deployed(policy, x0, threat, method=method, empirical_states=10, seed=seed)
    assert cert.sound is True
    sampled = sampled_deviation(policy, x0, threat)
    if cert.argmax_certified is None:
        slack = measurement_slack(policy)[None, :]  # float32 ulps of the actions
        assert (sampled <= cert.deviation + slack).all()
        assert (cert.empirical <= cert.deviation + slack).all()
        assert cert.deviation.shape == (10, 3)
        # the deviation can never exceed the action range
        assert (cert.deviation <= cert.action_range[None, :] * (1 + 1e-4) + 1e-6).all()
    else:
        # argmax certified: neither PGD nor sampling flips the action
        assert not sampled[cert.argmax_certified].any()
        assert not (cert.empirical[cert.argmax_certified, 0] > 0).any()
    # the radius: certified at its value, not at the next bisection step above it (unless capped)
    tol = torch.as_tensor(cert.tolerance, dtype=torch.float64)
    r = torch.as_tensor(cert.radius)
    pos = r > 0
    if pos.any():
        ok, _ = _certified_at(policy, x0[pos], threat, method, tol, r[pos])
        assert ok.all()
        # and PGD at the radius stays within tolerance (or cannot flip)
        for i in np.flatnonzero(pos.numpy())[:3]:
            t_i = ThreatModel(float(r[i]), norm, space)
            emp = empirical_deviation(policy, x0[i : i + 1], t_i, steps=20)
            if cert.argmax_certified is None:
                assert (emp[0] <= cert.tolerance + measurement_slack(policy)).all()
            else:
                assert emp[0, 0] <= 0
    if method == "ibp":
        # IBP's bound grows with ε, so a state certified at ε has a radius ≥ ε up to one
        # bisection step (CROWN's relaxations need not be monotone in ε)
        step = cert.radius_cap / 2**14
        assert (cert.radius[cert.certified] >= eps - step - 1e-12).all()


def test_radius_matches_certified_fraction():
    policy = variant_policy("deterministic_squash", (16, 16), "tanh", True, 4)
    threat = ThreatModel(0.05)
    x0 = random_states(policy, 40, 1)
    cert = certify_deployed(policy, x0, threat, method="ibp", tolerance=0.05, empirical_states=5)
    s = cert.summary()
    # certified at ε implies a radius ≥ ε (nested balls); the converse within bisection steps
    assert (cert.radius[cert.certified] >= threat.eps - 1e-12).all()
    assert 0.0 <= s["frac_certified_at_eps"] <= 1.0
    assert set(s["deviation"]) == {"median", "p95", "max"}
    assert len(s["deviation"]["median"]) == 3
    # a looser tolerance certifies at least as many states, with radii at least as large
    loose = certify_deployed(policy, x0, threat, method="ibp", tolerance=0.5, empirical_states=0)
    assert (loose.radius >= cert.radius - 1e-12).all()
    assert loose.summary()["frac_certified_at_eps"] >= s["frac_certified_at_eps"]


def test_tolerance_in_action_units_and_errors():
    policy = variant_policy("deterministic", (8,), "relu", False, 0)
    assert np.allclose(resolve_tolerance(policy, 0.1, "range"), [0.2, 0.25, 0.3])
    assert np.allclose(resolve_tolerance(policy, 0.1, "action"), [0.1, 0.1, 0.1])
    with pytest.raises(CompressorError):
        resolve_tolerance(policy, 0.1, "furlongs")
    with pytest.raises(CompressorError):
        resolve_tolerance(policy, -1.0, "range")


def test_state_dependent_sigma_is_certified_like_a_deterministic_head():
    """No Σ shared by all states: the global bound is on the head output, without a TV."""
    policy = variant_policy("squashed_gaussian_state_std", (8,), "tanh", True, 0)
    assert certified_head(policy) == "deterministic"
    assert torch.equal(output_scale(policy), torch.ones(3, dtype=torch.float64))
    assert certify_global(policy, ThreatModel(0.1)).tv_bound is None


def test_certify_policy_leads_with_the_deployed_block():
    from compressor.api import certify_policy

    rep = certify_policy("profiles/cartpole.pt", profile="cartpole", states=40)
    d = rep.to_dict()
    keys = [k for k in d if k != "env_id"]
    assert keys[:2] == ["deployed_crown", "deployed_ibp"]
    dep = d["deployed_crown"]
    assert dep["action_map"] == "argmax" and dep["n_states"] == 40 and dep["sound"] is True
    # argmax heads, IBP (monotone in ε): a state certified at ε has a radius ≥ ε (one step)
    cert = rep.deployed["ibp"]
    assert cert.argmax_certified is not None
    step = cert.radius_cap / 2**14
    assert (cert.radius[cert.argmax_certified] >= cert.eps - step).all()
    assert not (cert.radius[~cert.argmax_certified] >= cert.eps).any()
    assert d["global"]["scope"] == "worst case over all states"
