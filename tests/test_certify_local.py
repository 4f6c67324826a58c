"""Local (per-state) certificates: relaxations, soundness against PGD, CROWN vs IBP vs global."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_certify import HEADS, random_states, sampled_shift

from compressor.certify import local
from compressor.certify.empirical import empirical_search
from compressor.certify.global_bound import GAUSSIAN_HEADS, certify_global, output_scale
from compressor.certify.local import _act, _relax, certify_local, output_bounds
from compressor.core.errors import CompressorError
from compressor.core.pgd import pgd
from compressor.core.threat import ThreatModel, sample_ball
from compressor.policy.loading import load_policy
from conftest import make_policy

TOL_REL, TOL_ABS = 1e-4, 1e-5  # float32 policy vs float64 bounds


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny networks gain nothing from intra-op threads, and on a shared 2-core machine the
    # oversubscribed thread pool slowed these tests more than tenfold
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@settings(max_examples=100, deadline=None)
@given(
    activation=st.sampled_from(["tanh", "relu", "elu"]),
    lo=st.floats(-6, 6),
    width=st.sampled_from([0.0, 1e-12, 1e-6, 0.01, 0.5, 2.0, 8.0]),
)
@example(activation="tanh", lo=-3.0, width=8.0)  # straddles 0, chord cuts the curve near hi
@example(activation="tanh", lo=-5.0, width=5.5)  # ... and near lo for the lower line
@example(activation="tanh", lo=-0.3, width=0.5)  # straddles 0, chord valid
def test_relaxation_lines_enclose_the_activation(activation, lo, width):
    l_t = torch.tensor([lo], dtype=torch.float64)
    h_t = l_t + width
    al, bl, au, bu = _relax(activation, l_t, h_t)
    x = torch.linspace(lo, lo + width, 2001, dtype=torch.float64)
    y = _act(activation, x)
    assert (al * x + bl <= y + 1e-12).all()
    assert (au * x + bu >= y - 1e-12).all()


def perturbed_outputs(policy, x0, threat, k=8):
    """Head outputs at uniform samples of each state's ball (k per state), shape (k, N, out)."""
    g = torch.Generator().manual_seed(2)
    scale = threat.scale(policy)
    with torch.no_grad():
        return torch.stack(
            [
                policy(x0 + sample_ball(tuple(x0.shape), threat.eps, threat.norm, g) * scale)
                for _ in range(k)
            ]
        ).double()


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
@example(  # float32 outputs of size ~100 (no clip, spread 30): formerly flaky on ulps
    seed=1829,
    depth=2,
    width=8,
    activation="relu",
    head="squashed_gaussian",
    obs_norm=False,
    space="normalized",
    norm="inf",
    eps=0.01,
    spread=30.0,
)
def test_local_bounds_are_sound_and_below_global(
    seed, depth, width, activation, head, obs_norm, space, norm, eps, spread
):
    policy = make_policy(head, (width,) * depth, activation, 5, 3, obs_norm, seed)
    threat = ThreatModel(eps, norm, space)
    x0 = random_states(policy, 12, seed, spread)
    emp = empirical_search(policy, x0, threat, steps=20, restarts=1)
    found = np.maximum(emp.shift, sampled_shift(policy, x0, threat, 8).numpy())
    glob = certify_global(policy, threat)
    outs = perturbed_outputs(policy, x0, threat)
    # float32 rounding of the policy is relative to the outputs it computes, not to the shift:
    # a state whose certified shift is ~0 (e.g. every ReLU fixed over the ball) can still show a
    # float32 shift of a few ulps of outputs of size 10 (spread 30 drives the clip)
    with torch.no_grad():
        size = policy(x0).double().abs().amax(-1).numpy()
    d_max = float(output_scale(policy).max()) if head in GAUSSIAN_HEADS else 1.0
    ulps = 1e-6 * (1.0 + size) * d_max  # ~8 float32 ulps of the largest output
    for method in ("crown", "ibp"):
        cert = certify_local(policy, x0, threat, method)
        assert (found <= cert.shift_bound * (1 + TOL_REL) + TOL_ABS + ulps).all()
        assert (cert.shift_bound <= glob.shift_bound * (1 + 1e-12)).all()
        if cert.tv_bound is not None:
            # TV is 1-Lipschitz in the shift for every head here, so the same float32 slack
            assert (emp.tv <= cert.tv_bound + TOL_ABS + ulps).all()
        # pure CROWN too: intersecting with IBP must not be what hides a wrong relaxation
        for intersect in (True, False):
            lo, hi = output_bounds(policy, x0, threat, method, intersect=intersect)
            assert (outs >= lo - TOL_ABS - TOL_REL * lo.abs()).all()
            assert (outs <= hi + TOL_ABS + TOL_REL * hi.abs()).all()
        if cert.argmax_certified is not None:
            with torch.no_grad():
                clean = policy(x0).argmax(-1)
            same = (outs.argmax(-1) == clean).all(0).numpy()
            assert same[cert.argmax_certified].all()


@pytest.mark.parametrize("activation", ["tanh", "relu", "elu"])
@pytest.mark.parametrize("norm", ["inf", "2"])
def test_output_bounds_hold_against_per_coordinate_pgd(activation, norm):
    policy = make_policy("gaussian", (24, 24), activation, 6, 3, True, seed=5)
    threat = ThreatModel(0.2, norm)
    x0 = random_states(policy, 32, 0)
    lo, hi = output_bounds(policy, x0, threat, "crown")
    scale = threat.scale(policy)
    for i in range(3):
        for sign, bound in ((1.0, hi[:, i]), (-1.0, -lo[:, i])):

            def objective(x, i=i, sign=sign):
                return sign * policy(x)[:, i]

            x = pgd(objective, x0, scale, threat.eps, norm=norm, steps=30, random_start=True)
            with torch.no_grad():
                reached = sign * policy(x)[:, i].double()
            assert (reached <= bound + TOL_ABS).all()


@pytest.mark.parametrize("activation", ["tanh", "relu", "elu"])
def test_crown_is_tighter_than_ibp(activation):
    policy = make_policy("gaussian", (32, 32, 32), activation, 6, 3, True, seed=11)
    threat = ThreatModel(0.1)
    x0 = random_states(policy, 64, 1)
    ibp_lo, ibp_hi = output_bounds(policy, x0, threat, "ibp")
    pure_lo, pure_hi = output_bounds(policy, x0, threat, "crown", intersect=False)
    lo, hi = output_bounds(policy, x0, threat, "crown")
    # pure CROWN is not always tighter per coordinate, but it is on average (much)
    assert float((pure_hi - pure_lo).mean()) < 0.7 * float((ibp_hi - ibp_lo).mean())
    assert (lo >= ibp_lo - 1e-12).all() and (hi <= ibp_hi + 1e-12).all()
    crown = certify_local(policy, x0, threat, "crown").shift_bound
    ibp = certify_local(policy, x0, threat, "ibp").shift_bound
    assert (crown <= ibp + 1e-12).mean() > 0.9 and np.median(crown) < np.median(ibp)


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_linear_policy_bound_is_attained(norm):
    policy = make_policy("gaussian", (), "tanh", 6, 1, True, seed=3)
    threat = ThreatModel(0.05, norm, "raw")
    x0 = random_states(policy, 4, 0, 0.5)
    emp = empirical_search(policy, x0, threat, steps=40)
    for method in ("crown", "ibp"):
        cert = certify_local(policy, x0, threat, method)
        np.testing.assert_allclose(cert.shift_bound, emp.shift, rtol=1e-3)


def test_categorical_argmax_and_summary():
    policy = make_policy("categorical", (16, 16), "relu", 4, 3, True, seed=4)
    x0 = random_states(policy, 50, 0)
    tiny = certify_local(policy, x0, ThreatModel(1e-4))
    huge = certify_local(policy, x0, ThreatModel(5.0))
    assert tiny.argmax_certified.mean() > 0.9 and huge.argmax_certified.mean() < 0.5
    d = json.loads(json.dumps(tiny.to_dict(per_state=True)))
    assert d["n_states"] == 50 and len(d["shift_bound"]) == 50 and d["method"] == "crown"
    assert d["frac_argmax_certified"] == pytest.approx(tiny.argmax_certified.mean())
    for key in ("tv_mean", "tv_median", "tv_p95", "frac_tv_le_tau", "shift_p95"):
        assert key in d
    assert d["tv_p95"] <= d["tv_max"] <= 1.0


def test_single_action_and_chunking_and_errors():
    one = make_policy("categorical", (8,), "tanh", 4, 1, False)
    cert = certify_local(one, random_states(one, 5, 0), ThreatModel(0.5))
    assert (cert.shift_bound == 0).all() and cert.argmax_certified.all()
    policy = make_policy("deterministic", (8, 8), "elu", 4, 2, True)
    x0 = random_states(policy, 23, 0)
    a = certify_local(policy, x0, ThreatModel(0.1, "2"), chunk_size=5)
    b = certify_local(policy, x0, ThreatModel(0.1, "2"))
    np.testing.assert_allclose(a.shift_bound, b.shift_bound, rtol=1e-12)
    assert a.tv_bound is None and a.to_dict()["n_states"] == 23
    with pytest.raises(CompressorError):
        certify_local(policy, x0, ThreatModel(0.1), method="lirpa")
    with pytest.raises(CompressorError):
        certify_local(policy, x0[:, :3], ThreatModel(0.1))


HOPPER = Path(__file__).resolve().parents[1] / "profiles" / "hopper.pt"


def _fast_cases():
    """(policy, states, threat): Hopper's 256×256 tanh policy (the float32 products' largest
    margins) and a small random one per activation, both norms."""
    hopper = load_policy(HOPPER).policy.eval()
    g = torch.Generator().manual_seed(3)
    x = hopper.obs_mean + torch.randn(24, hopper.spec.obs_dim, generator=g) * hopper.obs_scale()
    cases = [(hopper, x, ThreatModel(0.075)), (hopper, x, ThreatModel(0.3, "2"))]
    for act in ("tanh", "relu", "elu"):
        small = make_policy("gaussian", (40, 40), act, 6, 3, True, seed=7)
        cases.append((small, random_states(small, 24, 2), ThreatModel(0.2)))
    return cases


def test_fast_bounds_contain_samples_and_pgd_and_stay_close_to_float64():
    for policy, x0, threat in _fast_cases():
        lo, hi = output_bounds(policy, x0, threat)
        p_lo, p_hi = output_bounds(policy, x0, threat, precise=True)
        outs = perturbed_outputs(policy, x0, threat, k=16)
        assert (outs >= lo - TOL_ABS - TOL_REL * lo.abs()).all()
        assert (outs <= hi + TOL_ABS + TOL_REL * hi.abs()).all()
        scale = threat.scale(policy)
        for i in range(policy.spec.act_dim):
            for sign, bound in ((1.0, hi[:, i]), (-1.0, -lo[:, i])):

                def objective(x, i=i, sign=sign, policy=policy):
                    return sign * policy(x)[:, i]

                x = pgd(objective, x0, scale, threat.eps, norm=threat.norm, steps=20)
                with torch.no_grad():
                    reached = sign * policy(x)[:, i].double()
                assert (reached <= bound + TOL_ABS + TOL_REL * bound.abs()).all()
        # not vacuous: within a small fraction of the float64 bounds' width
        width = p_hi - p_lo
        assert ((lo - p_lo).abs() <= 1e-3 * width + 1e-9).all()
        assert ((hi - p_hi).abs() <= 1e-3 * width + 1e-9).all()
        assert ((hi - lo) <= 1.002 * width + 1e-9).all()


def test_fast_bounds_where_the_clip_narrows_some_boxes():
    # half the states sit just inside Hopper's clip on one coordinate, so their boxes are
    # narrower there than the chunk's widest: the float32 spread must take each state's radius
    # (sound and as tight as float64's), not the chunk's folded column
    hopper = load_policy(HOPPER).policy.eval()
    g = torch.Generator().manual_seed(5)
    scale = hopper.obs_scale().detach()
    x = hopper.obs_mean + torch.randn(16, hopper.spec.obs_dim, generator=g) * scale
    x[::2, 0] = hopper.obs_mean[0] + 9.99 * scale[0]
    threat = ThreatModel(0.075)
    inp = local._input_set(hopper, x, threat, torch.float64)
    rad = 0.5 * (inp.hi - inp.lo)
    assert (rad[::2, 0] < 0.6 * rad[1::2, 0]).all()
    lo, hi = output_bounds(hopper, x, threat)
    p_lo, p_hi = output_bounds(hopper, x, threat, precise=True)
    outs = perturbed_outputs(hopper, x, threat, k=16)
    assert (outs >= lo - TOL_ABS - TOL_REL * lo.abs()).all()
    assert (outs <= hi + TOL_ABS + TOL_REL * hi.abs()).all()
    width = p_hi - p_lo
    assert (lo <= p_lo + 1e-12).all() and (hi >= p_hi - 1e-12).all()
    assert ((hi - lo) <= 1.002 * width + 1e-9).all()


def _with_gamma(value):
    """Temporarily replace the rounding-error factor γ_n (0: no margin at all)."""
    return mock.patch.object(local, "_gamma", lambda n: value * n * 2.0**-24)


def test_float32_steps_enclose_the_float64_ones_on_the_same_relaxation():
    # same intermediate lines, so the exact bound of that relaxation is one number: the float32
    # products with their margin must enclose it, and without the margin they do not
    policy, x0, threat = _fast_cases()[0]
    weights, biases = local._network(policy, torch.float64)
    inp = local._input_set(policy, x0, threat, torch.float64)
    lo0, hi0 = local._crown(weights[0], biases[0], -1, weights, biases, [], inp)
    relax0 = local._relax("tanh", lo0, hi0)
    a_lo, a_hi = torch.tanh(lo0), torch.tanh(hi0)
    a_c = 0.5 * (a_lo + a_hi)
    ibp = [(lo0, lo0, lo0), (a_c, a_c @ weights[1].T, 0.5 * (a_hi - a_lo) @ weights[1].abs().T)]
    exact1 = local._crown(weights[1], biases[1], 0, weights, biases, [relax0], inp)
    lo1, hi1 = exact1
    relax = [relax0, local._relax("tanh", lo1, hi1)]
    exact2 = local._crown(weights[2], biases[2], 1, weights, biases, relax, inp)

    def encloses(factor):
        with _with_gamma(factor):
            f1 = local._crown(weights[1], biases[1], 0, weights, biases, [relax0], inp, ibp)
            f2 = local._crown(weights[2], biases[2], 1, weights, biases, relax, inp, ibp)
        return [
            bool((f[0] <= e[0] + 1e-12).all() and (f[1] >= e[1] - 1e-12).all())
            for f, e in ((f1, exact1), (f2, exact2))
        ]

    assert encloses(1.0) == [True, True]
    assert encloses(0.0) == [False, False]  # float32 rounding is real: the margin is needed
