"""Pruning methods (magnitude, micro, structured, random), fine-tuning with fixed masks, the
search's choice and the frontier's regret decomposition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compressor.certify.global_bound import certify_global
from compressor.core.config import FinetuneConfig, load_profile
from compressor.core.errors import CompressorError
from compressor.core.pgd import pgd
from compressor.core.stats import summarize_returns
from compressor.core.threat import ThreatModel
from compressor.deploy.export import export_onnx
from compressor.evaluate import EvalResult, SuiteResult
from compressor.finetune.distill import distill
from compressor.policy.model import Policy
from compressor.policy.native import load_native, save_policy
from compressor.prune.criteria import PRUNE_METHODS, neuron_scores, prune
from compressor.prune.schedule import MicroSchedule, cubic_sparsity, micro_prune, prune_and_finetune
from compressor.report.frontier import best_known, frontier_analysis, regret_terms
from compressor.search.budget import Budget
from compressor.search.candidate import Candidate
from compressor.search.sparsity import search_sparsity
from conftest import make_policy

THREAT = ThreatModel(0.1)


def _states(n: int = 256, dim: int = 4) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)


def _removed_neurons(pol: Policy) -> list[torch.Tensor]:
    """Per hidden layer, which neurons have neither incoming nor outgoing weights left."""
    ms = pol.masks()
    return [(ms[i].sum(1) == 0) & (ms[i + 1].sum(0) == 0) for i in range(len(ms) - 1)]


@pytest.mark.parametrize("method", PRUNE_METHODS)
def test_masks_survive_every_step_and_serialisation(method: str, tmp_path: Path) -> None:
    dense = make_policy("gaussian", hidden=(24, 24), act_dim=3, seed=1)
    steps = 40
    checked = [0]

    def tune(pol: Policy, hook: object) -> object:
        def check(t: int) -> None:
            if hook is not None:
                hook(t)  # type: ignore[operator]
            # before every step (after any cut): pruned weights are zero, raw and effective
            for layer, m in zip(pol.layers, pol.masks()):
                assert bool((layer.weight[m == 0] == 0).all())
            checked[0] += 1

        return distill(pol, dense, _states(), THREAT, FinetuneConfig(steps=steps), on_step=check)

    student, _ = prune_and_finetune(
        dense,
        0.6,
        method,
        tune,
        steps,
        schedule=MicroSchedule(4, 0.5),  # type: ignore[arg-type]
    )
    assert checked[0] == steps
    for layer, m in zip(student.layers, student.masks()):
        assert bool((layer.weight[m == 0] == 0).all())  # and after the last step
    assert student.sparsity() >= 0.6 - 0.01
    save_policy(student, tmp_path / "p.pt")
    back = load_native(tmp_path / "p.pt")
    for a, b in zip(back.masks(), student.masks()):
        assert torch.equal(a, b)
    x = torch.as_tensor(_states(8))
    assert torch.allclose(back(x), student(x))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_structured_pruning_removes_whole_neurons(scope: str) -> None:
    pol = make_policy(hidden=(32, 16), obs_dim=6, act_dim=3, seed=2)
    pruned = prune(pol, 0.5, "structured", scope)
    assert 0.5 <= pruned.sparsity() < 0.5 + 0.05  # overshoots by less than one neuron
    ms = pruned.masks()
    for i, dead in enumerate(_removed_neurons(pruned)):
        assert int(dead.sum()) > 0
        cut_rows = ms[i].sum(1) == 0
        cut_cols = ms[i + 1].sum(0) == 0
        # a neuron is cut both ways or not at all: no half-removed neuron leaks act(bias)
        assert torch.equal(cut_rows, dead) and torch.equal(cut_cols, dead)
    # structured: every mask is exactly (kept outputs) × (kept inputs), nothing in between
    keep = [torch.ones(ms[0].shape[1])] + [(~d).float() for d in _removed_neurons(pruned)]
    keep.append(torch.ones(ms[-1].shape[0]))
    for i, m in enumerate(ms):
        assert torch.equal(m, torch.outer(keep[i + 1], keep[i]))
    # inputs and outputs are never removed
    assert bool((ms[0].sum(0) > 0).all()) and bool((ms[-1].sum(1) > 0).all())
    if scope == "layer":  # the same share of each hidden layer
        fr = [float(d.float().mean()) for d in _removed_neurons(pruned)]
        assert abs(fr[0] - fr[1]) <= 1 / 16 + 1e-9


def test_structured_pruning_cuts_lowest_scoring_neurons() -> None:
    pol = make_policy(hidden=(32,), obs_dim=6, act_dim=3, seed=3)
    sc = neuron_scores(pol)[0]
    dead = _removed_neurons(prune(pol, 0.4, "structured"))[0]
    assert float(sc[dead].max()) <= float(sc[~dead].min())


def test_structured_export_compacts_with_parity(tmp_path: Path) -> None:
    dense = make_policy("gaussian", hidden=(32, 32), act_dim=3, seed=4)
    student = prune(dense, 0.6, "structured")
    # fine-tune so that biases (never pruned) move, including the removed neurons' ones
    distill(student, dense, _states(), THREAT, FinetuneConfig(steps=30))
    n_dead = sum(int(d.sum()) for d in _removed_neurons(student))
    res = export_onnx(student, tmp_path / "p.onnx")
    assert res.removed_neurons == n_dead
    assert res.parity_max_abs_err < 1e-4
    sess = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    x = _states(64)
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    want = student.act(torch.as_tensor(x)).detach().numpy()
    assert np.abs(got - want).max() < 1e-4
    assert res.params_exported < dense.num_parameters()  # rows physically removed


def test_cubic_schedule_ends_exactly_at_target() -> None:
    for target in (0.5, 0.8, 0.93):
        levels = [cubic_sparsity(k, 10, target) for k in range(11)]
        assert levels[0] == 0.0 and levels[-1] == target
        assert all(b >= a for a, b in zip(levels, levels[1:]))
        # cubic: the early steps cut more than the late ones
        assert levels[1] - levels[0] > levels[-1] - levels[-2]
    sched = MicroSchedule(5, 0.5)
    cuts = sched.cut_steps(100)
    assert cuts[0] == 0 and cuts[-1] == 50 and len(cuts) == 5
    with pytest.raises(CompressorError):
        MicroSchedule(0)


@pytest.mark.parametrize("target", [0.55, 0.9])
def test_micro_pruning_hits_its_target_exactly(target: float) -> None:
    dense = make_policy("categorical", hidden=(32, 32), act_dim=3, seed=5)
    seen: list[float] = []

    def tune(pol: Policy, hook: object) -> object:
        def step(t: int) -> None:
            hook(t)  # type: ignore[operator]
            seen.append(pol.sparsity())

        return distill(pol, dense, _states(), None, FinetuneConfig(steps=60), on_step=step)

    student, _ = micro_prune(dense, target, tune, 60, MicroSchedule(8, 0.5))  # type: ignore[arg-type]
    n = sum(m.numel() for m in student.masks())
    assert student.sparsity() == pytest.approx(round(target * n) / n, abs=1e-12)
    assert all(b >= a for a, b in zip(seen, seen[1:]))  # sparsity only grows
    assert len(set(seen)) > 4  # many small cuts, not one
    assert seen[30] == student.sparsity()  # done halfway; the rest fine-tunes the final mask
    assert dense.sparsity() == 0.0


def test_micro_is_not_a_one_shot_method() -> None:
    with pytest.raises(CompressorError, match="micro"):
        prune(make_policy(), 0.5, "micro")


def test_smoothness_regulariser_flattens_the_student() -> None:
    teacher = make_policy("gaussian", hidden=(32, 32), act_dim=2, seed=6)
    x = torch.as_tensor(_states(128))
    scale = THREAT.scale(teacher)

    def worst(pol: Policy) -> float:
        with torch.no_grad():
            ref = pol(x)
        g = torch.Generator().manual_seed(0)
        adv = pgd(
            lambda z: pol.divergence(ref, pol(z)),
            x,
            scale,
            THREAT.eps,
            steps=10,
            random_start=True,
            generator=g,
        )
        with torch.no_grad():
            return float(pol.divergence(ref, pol(adv)).mean())

    out = {}
    for k in (0.0, 5.0):
        student = prune(teacher, 0.5)
        cfg = FinetuneConfig(
            steps=150, adversarial_fraction=0.0, perturbed_fraction=0.0, smoothness_weight=k
        )
        distill(student, teacher, _states(), THREAT, cfg, seed=1)
        out[k] = worst(student)
    assert out[5.0] < out[0.0]


def test_profile_prune_method_is_checked(tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    p.write_text(
        '[prune]\nmethod = "structured"\nmicro_steps = 8\n[finetune]\nsmoothness_weight = 0.5\n'
    )
    prof = load_profile(str(p))
    assert prof.prune.method == "structured" and prof.finetune.smoothness_weight == 0.5
    p.write_text('[prune]\nmethod = "lottery"\n')
    with pytest.raises(CompressorError, match="lottery"):
        load_profile(str(p))


# ---- search and frontier -----------------------------------------------------------------
CERT = certify_global(make_policy(), ThreatModel(0.1))


def _suite(clean: float, robust: float) -> SuiteResult:
    def ev(name: str, v: float) -> EvalResult:
        return EvalResult(name, summarize_returns(np.array([v, v])), None, 10, 0.0)

    return SuiteResult(ev("clean", clean), {"mad": ev("mad", robust)})


def _rule() -> Budget:
    return Budget(0.05, 1000.0, 600.0, 0.0, CERT.lipschitz)


def test_search_never_picks_a_failing_candidate_and_never_recomputes() -> None:
    rng = np.random.default_rng(0)
    rule = _rule()
    for _ in range(200):
        # returns that drift down with sparsity but jump around: pass/fail is not monotone
        grid = sorted(set(np.round(rng.uniform(0.1, 0.95, size=rng.integers(1, 6)), 2)))
        noise: dict[float, np.ndarray] = {}
        calls: list[float] = []

        def evaluate_at(
            s: float, calls: list[float] = calls, noise: dict[float, np.ndarray] = noise
        ) -> Candidate:
            calls.append(s)
            noise.setdefault(s, rng.normal(0, 60, size=2))
            clean = 1000 - 300 * s**3 + noise[s][0]
            robust = 600 - 300 * s**3 + noise[s][1]
            suite = _suite(clean, robust)
            return Candidate(s, s, suite, CERT, None, 0, rule.check(suite, CERT), 0.0)

        res = search_sparsity(
            lambda ls: [evaluate_at(s) for s in ls], list(map(float, grid)), 3, rule
        )
        assert len(calls) == len(set(calls))  # every level evaluated once
        assert [c.sparsity for c in res.candidates] == sorted(set(calls))
        passing = [c for c in res.candidates if c.passed]
        if res.chosen is None:
            assert not passing
        else:
            assert res.chosen.passed and rule.check(res.chosen.suite, CERT) == []
            assert res.chosen.sparsity == max(c.sparsity for c in passing)


def test_regret_terms_sum_to_the_total() -> None:
    t = regret_terms(best_return=3600.0, dense_clean=3300.0, clean=3250.0, robust=1200.0)
    assert (t.clean_regret, t.pruning_loss, t.attack_gap) == (300.0, 50.0, 2050.0)
    assert t.total == 3600.0 - 1200.0
    rule = _rule()
    cands = []
    for s, (c, r) in {0.5: (1010.0, 640.0), 0.8: (980.0, 590.0), 0.9: (700.0, 200.0)}.items():
        suite = _suite(c, r)
        cands.append(Candidate(s, s, suite, CERT, None, 0, rule.check(suite, CERT), 0.0))
    fa = frontier_analysis(rule, 1000.0, 600.0, "mad", 0.2, cands, cands[1], 1200.0, "paper")
    assert fa["best_known_return"] == 1200.0
    for p in [fa["dense"], *fa["points"]]:
        g = p["regret"]
        assert g["clean_regret"] + g["pruning_loss"] + g["attack_gap"] == pytest.approx(g["total"])
        assert g["total"] == pytest.approx(1200.0 - p["robust_return"])
        assert g["clean_regret"] == pytest.approx(200.0)  # J(π*) − J(dense) for every row
    assert fa["dense"]["regret"]["pruning_loss"] == 0.0
    # sweet spot: highest mean of normalised clean and robust scores (0.5 here), beside the
    # budget's choice (the highest passing sparsity, 0.8)
    assert fa["sweet_spot"]["sparsity"] == 0.5
    assert fa["budget_choice"]["sparsity"] == 0.8
    assert [p["passed"] for p in fa["points"]] == [True, True, False]
    # a measured return above the reference replaces it, and says so
    value, source = best_known(900.0, [1000.0, 1010.0], "paper")
    assert value == 1010.0 and "beats" in source


def test_prune_method_override_is_checked_before_any_work(tmp_path: Path) -> None:
    from compressor.run.pipeline import run_pipeline

    repo = Path(__file__).resolve().parents[1]
    with pytest.raises(CompressorError, match="--prune-method"):
        run_pipeline(repo / "profiles" / "cartpole.pt", prune_method="nope", out_root=tmp_path)
    assert not any(tmp_path.iterdir())  # no run directory was created


def test_shipped_acrobot_reference_policy_matches_its_profile() -> None:
    from compressor.core.config import profile_policy_path

    prof = load_profile("acrobot")
    path = profile_policy_path(prof)
    assert path is not None and path.is_file()
    pol = load_native(path)
    assert pol.spec.env_id == prof.env.id == "Acrobot-v1"
    assert (pol.spec.head, pol.spec.obs_dim, pol.spec.act_dim) == ("categorical", 6, 3)
    assert prof.reference.best_return is not None and prof.reference.source
