"""The budget rule, the sparsity search, and strict profile/target loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compressor.certify.global_bound import certify_global
from compressor.core.config import list_shipped, load_profile, load_target, profile_for_env
from compressor.core.errors import CompressorError
from compressor.core.stats import summarize_returns
from compressor.core.threat import ThreatModel
from compressor.evaluate import EvalResult, SuiteResult
from compressor.search.budget import Budget
from compressor.search.candidate import Candidate
from compressor.search.sparsity import search_sparsity
from conftest import make_policy

CERT = certify_global(make_policy(), ThreatModel(0.1))


def _suite(clean: float, robust: float) -> SuiteResult:
    def ev(name: str, v: float) -> EvalResult:
        return EvalResult(name, summarize_returns(np.array([v, v])), None, 10, 0.0)

    return SuiteResult(ev("clean", clean), {"mad": ev("mad", robust)})


def _budget(**kw: float) -> Budget:
    args = dict(
        budget=0.05,
        dense_clean=1000.0,
        dense_robust=600.0,
        random_return=0.0,
        dense_lipschitz=CERT.lipschitz,
    )
    args.update(kw)
    return Budget(**args)  # type: ignore[arg-type]


def test_budget_floors_follow_design_rule() -> None:
    b = _budget(random_return=-200.0)
    assert b.scale == 1200.0
    assert b.clean_floor == 1000.0 - 0.05 * 1200.0
    assert b.robust_floor == 600.0 - 0.05 * 1200.0
    assert b.check(_suite(1000, 600), CERT) == []
    assert any("clean" in r for r in b.check(_suite(900, 600), CERT))
    assert any("robust" in r for r in b.check(_suite(1000, 500), CERT))


def test_budget_works_for_negative_returns() -> None:
    b = _budget(dense_clean=-100.0, dense_robust=-300.0, random_return=-500.0)
    assert b.scale == 400.0
    assert b.check(_suite(-110.0, -310.0), CERT) == []
    assert b.check(_suite(-130.0, -300.0), CERT) != []


def test_budget_rejects_looser_certificate() -> None:
    b = _budget(dense_lipschitz=CERT.lipschitz * 0.5)
    assert any("certificate" in r for r in b.check(_suite(1000, 600), CERT))


def _fake_search(outcomes: dict[float, tuple[float, float]], grid: list[float], refine: int):
    b = _budget()
    calls: list[float] = []

    def evaluate_at(s: float) -> Candidate:
        calls.append(s)
        # interpolate a return curve that drops with sparsity
        xs = sorted(outcomes)
        clean = float(np.interp(s, xs, [outcomes[x][0] for x in xs]))
        robust = float(np.interp(s, xs, [outcomes[x][1] for x in xs]))
        suite = _suite(clean, robust)
        return Candidate(s, s, suite, CERT, None, 0, b.check(suite, CERT), 0.0)

    return search_sparsity(lambda ls: [evaluate_at(s) for s in ls], grid, refine, b), calls


def test_search_picks_highest_passing_and_refines() -> None:
    curve = {0.0: (1000, 600), 0.6: (990, 590), 0.8: (800, 400), 0.9: (100, 50)}
    res, calls = _fake_search(curve, [0.5, 0.7, 0.9], refine=3)
    assert res.chosen is not None and res.chosen.passed
    assert all(c.passed for c in res.candidates if c.sparsity <= res.chosen.sparsity)
    assert res.chosen.sparsity > 0.5  # refinement went past the last passing grid level
    assert 0.7 in calls and len(calls) > 3
    for c in res.candidates:  # nothing chosen above a failing level's verdict
        if c.sparsity > res.chosen.sparsity:
            assert not c.passed or c.sparsity == res.chosen.sparsity


def test_search_stops_after_decisive_failure_and_may_choose_nothing() -> None:
    curve = {0.0: (500, 300), 1.0: (0, 0)}
    res, calls = _fake_search(curve, [0.3, 0.5, 0.7, 0.9], refine=0)
    assert res.chosen is None
    assert calls == [0.3]  # 0.3 already lost more than half the scale


def test_wider_search_visits_the_same_levels_in_fewer_rounds() -> None:
    """Speculative rounds (an executor's workers) never change what the search visits."""
    rng = np.random.default_rng(1)
    b = _budget()
    for _ in range(150):
        grid = sorted({float(x) for x in np.round(rng.uniform(0.1, 0.95, rng.integers(1, 7)), 2)})
        noise = {float(s): rng.normal(0, 80, 2) for s in np.round(np.arange(0, 1.0001, 1e-4), 4)}
        outcomes = []
        for width in (1, 2, 3, 5):
            rounds: list[list[float]] = []

            def many(
                levels: list[float],
                rounds: list[list[float]] = rounds,
                width: int = width,
                noise: dict[float, np.ndarray] = noise,
            ) -> list[Candidate]:
                rounds.append(levels)
                assert 1 <= len(levels) <= width
                out = []
                for s in levels:
                    n = noise[round(s, 4)]
                    suite = _suite(1000 - 900 * s**3 + n[0], 600 - 500 * s**3 + n[1])
                    out.append(Candidate(s, s, suite, CERT, None, 0, b.check(suite, CERT), 0.0))
                return out

            res = search_sparsity(many, grid, 3, b, width=width)
            flat = [s for r in rounds for s in r]
            assert len(flat) == len(set(flat))  # never recomputed
            chosen = res.chosen.sparsity if res.chosen else None
            outcomes.append(([c.sparsity for c in res.candidates], chosen, len(rounds)))
        visited, chosen, rounds1 = outcomes[0]
        for v, ch, n in outcomes[1:]:
            assert (v, ch) == (visited, chosen)
            assert n <= rounds1


def test_shipped_profiles_and_targets_load() -> None:
    assert {"hopper", "cartpole"} <= set(list_shipped("profiles"))
    assert {"cpu-x86", "cpu-arm64", "cuda"} <= set(list_shipped("targets"))
    assert load_profile("hopper").threat.eps == 0.075
    assert load_target("cpu-arm64").opset == 13
    prof = profile_for_env("Hopper-v3")
    assert prof is not None and prof.env.id == "Hopper-v5"


@pytest.mark.parametrize(
    "text, match",
    [
        ("[threat]\nepz = 0.1\n", "unknown key 'epz'"),
        ("[threat]\neps = 'big'\n", "wrong type"),
        ("[evaluation]\nepisodes = 0\n", "at least 1"),
        ("[evaluation]\nbatch = 0\n", "at least 1"),
        ("[evaluation]\nalpha = 0.6\n", "alpha"),
        ("[evaluation]\nobs_noise = 2.0\n", "obs_noise"),
        ("[evaluation]\nseed = 9990\n", "reserved for decisions"),  # 9990 + 64 > 10 000
        ("[finetune]\nstate_seed = 5\n", "reserved for evaluations and decisions"),
        ("[search]\nchoose = 'biggest'\n", "search.choose"),
        ("[search]\ngrid = [0.5, 1.5]\n", "grid"),
        ("not toml = = =\n", "invalid TOML"),
        ("colour = 'red'\n", "unknown key 'colour'"),
    ],
)
def test_profile_errors_name_the_problem(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "p.toml"
    p.write_text(text)
    with pytest.raises(CompressorError, match=match):
        load_profile(str(p))


def test_unknown_profile_and_target_names(tmp_path: Path) -> None:
    with pytest.raises(CompressorError, match="shipped"):
        load_profile("no-such-profile")
    with pytest.raises(CompressorError, match="not found"):
        load_target(str(tmp_path / "missing.toml"))
    t = tmp_path / "t.toml"
    t.write_text("opset = 99\n")
    with pytest.raises(CompressorError, match="opset"):
        load_target(str(t))


@pytest.mark.parametrize("name", list_shipped("profiles"))
def test_every_shipped_profile_has_its_reference_policy(name: str) -> None:
    """Each shipped profile's reference policy is there, is for its env, fits the env's
    spaces (with the wrappers it records, e.g. the RL Zoo's time feature), and carries a
    critic: the value function the critic attack and PPO fine-tuning use, or (SAC/TQC imports)
    its Q-networks."""
    from compressor.core.config import profile_policy_path
    from compressor.policy.loading import load_policy
    from compressor.rl.envs import check_policy_fits_env

    prof = load_profile(name)
    path = profile_policy_path(prof)
    if not prof.policy:  # a profile for the user's own file (hopper-sac): its env exists, and
        # profiles/README.md says what it is for
        import gymnasium as gym

        gym.spec(prof.env.id)
        readme = (Path(__file__).resolve().parents[1] / "profiles" / "README.md").read_text()
        assert f"`{name}.toml`" in readme.split("## Profiles without a policy")[-1]
        return
    assert path is not None and path.is_file(), f"{name}: no reference policy"
    loaded = load_policy(path)
    spec = loaded.policy.spec
    assert spec.env_id == prof.env.id
    check_policy_fits_env(
        spec.obs_dim,
        spec.act_dim,
        spec.head == "categorical",
        prof.env.id,
        prof.env.kwargs,
        spec.env_wrappers,
    )
    assert loaded.critic is not None or loaded.q_nets
    assert prof.reference.best_return is not None and prof.reference.source
