"""The final check: the chosen level is judged as its exported ONNX model on the whole final
suite, paired with the dense ONNX model; a level that fails there makes the run fall back to
the next passing one, and the verdict says so; the final numbers are those of the ONNX file
that is written."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import compressor.run.stages as stages
from compressor.core.stats import summarize_returns
from compressor.core.threat import ThreatModel
from compressor.deploy.onnx_actor import OnnxActor
from compressor.evaluate import EvalResult, evaluate_suite
from compressor.policy.native import load_native
from compressor.rl.noise import ObservationNoise
from compressor.run.pipeline import run_pipeline
from compressor.search.budget import Budget
from compressor.search.candidate import Candidate
from compressor.search.sequential import Decision
from compressor.search.sparsity import SearchResult
from conftest import REPO

CARTPOLE = REPO / "profiles" / "cartpole.pt"
PROFILE = """
name = "final-check"
[env]
id = "CartPole-v1"
[threat]
eps = 0.1
[evaluation]
episodes = 3
num_envs = 3
max_episodes = 6
batch = 3
[attacks]
screen = ["random"]
final = ["random", "mad"]
[certificate]
states = 200
empirical_states = 20
[finetune]
steps = 150
state_episodes = 2
dagger_rounds = 1
dagger_episodes = 2
[search]
grid = [0.2, 0.3]
refine = 0
"""
#: the final attack made much stronger than the screening one, on the sparser level only
STRONGER = 400.0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    tmp = tmp_path_factory.mktemp("final")
    prof = tmp / "p.toml"
    prof.write_text(PROFILE)
    real = stages._onnx_evaluator

    def rigged(setup, path, surrogate, ctx, ex):  # noqa: ANN001, ANN202
        more = real(setup, path, surrogate, ctx, ex)
        if "sparsity-0.3000" not in Path(path).name:
            return more

        def run_more(names: list[str], seeds: list[int]) -> dict[str, EvalResult]:
            out = more(names, seeds)
            if "mad" in out:  # what a final attack far stronger than the screening one does
                e = out["mad"]
                worse = summarize_returns(np.array(e.stats.returns) - STRONGER)
                out["mad"] = dataclasses.replace(e, stats=worse)
            return out

        return run_more

    mp = pytest.MonkeyPatch()
    mp.setattr(stages, "_onnx_evaluator", rigged)
    try:
        res = run_pipeline(CARTPOLE, profile=str(prof), out_root=tmp / "runs", name="fb")
    finally:
        mp.undo()
    return res.run_dir, res


def test_a_level_that_fails_the_final_suite_falls_back_and_says_so(run) -> None:  # noqa: ANN001
    run_dir, res = run
    r = json.loads((run_dir / "report.json").read_text())
    front = {round(f["sparsity"], 1): f for f in r["frontier"]}
    assert front[0.3]["passed"] and front[0.2]["passed"]  # both passed the screening attack
    attempts = r["final_check"]["attempts"]
    assert [round(a["sparsity"], 1) for a in attempts] == [0.3, 0.2]
    assert [a["status"] for a in attempts] == ["fail", "pass"]
    failed = attempts[0]["decision"]
    assert any(t["condition"] == "mad" and t["status"] == "fail" for t in failed["tests"])
    assert r["verdict"]["passed"] and r["verdict"]["status"] == "pass"
    assert r["chosen"]["sparsity"] == pytest.approx(attempts[1]["sparsity"])
    story = r["verdict"]["final_check"]
    assert story.startswith("30.0% fail on the final suite (mad vs dense")
    assert "fell back to 20.0%, which passed the final suite" in story
    md = (run_dir / "report.md").read_text()
    assert "fell back to 20.0%, which passed" in md and "deploy policy.onnx, sparsity 20.0%" in md
    # the chosen policy was judged on every final attack, as the dense floor was
    assert set(r["chosen"]["evaluation"]["attacks"]) == {"random", "mad"}
    assert set(r["final_check"]["dense"]["evaluation"]["attacks"]) == {"random", "mad"}


def test_the_final_numbers_come_from_the_onnx_file_that_is_written(run) -> None:  # noqa: ANN001
    run_dir, _ = run
    r = json.loads((run_dir / "report.json").read_text())
    onnx = run_dir / "policy.onnx"
    digest = hashlib.sha256(onnx.read_bytes()).hexdigest()
    assert digest == r["chosen"]["onnx"]["sha256"] == r["final_check"]["attempts"][1]["onnx_sha256"]
    assert "onnxruntime, batch 1" in r["chosen"]["measured_on"]
    # the file, evaluated again as the target runs it, gives the report's numbers exactly
    pol = load_native(run_dir / "policy.pt")
    threat = ThreatModel(0.1)
    noise = ObservationNoise(0.01, threat, tuple(threat.scale(pol).tolist()))
    ev = r["chosen"]["evaluation"]
    seeds = ev["clean"]["episodes"]["seeds"]
    suite = evaluate_suite(
        OnnxActor(onnx, batch_size=r["target"]["batch_size"]),
        "CartPole-v1",
        {},
        seeds,
        ["random", "mad"],
        threat,
        num_envs=3,
        surrogate=pol,
        noise=noise,
    )
    assert suite.clean.stats.returns == ev["clean"]["return"]["returns"]
    for name, e in suite.attacks.items():
        assert e.stats.returns == ev["attacks"][name]["return"]["returns"], name
        assert e.terminated == ev["attacks"][name]["episodes"]["terminated"]


def _cand(s: float, clean: float, robust: float) -> Candidate:
    from compressor.certify.global_bound import certify_global
    from compressor.evaluate import SuiteResult
    from conftest import make_policy

    def ev(name: str, v: float) -> EvalResult:
        return EvalResult(name, summarize_returns(np.array([v, v])), None, 1, 0.0)

    pol = make_policy()
    cert = certify_global(pol, ThreatModel(0.1))
    suite = SuiteResult(ev("clean", clean), {"mad": ev("mad", robust)})
    return Candidate(s, s, suite, cert, None, 1, [], 0.0, None, pol, Decision("pass"))


def test_choose_orders_the_passing_levels() -> None:
    rule = Budget(0.05, 1000.0, 600.0, 0.0, 1.0)
    a, b, c = _cand(0.5, 1000.0, 700.0), _cand(0.7, 990.0, 560.0), _cand(0.9, 960.0, 600.0)
    failed = dataclasses.replace(_cand(0.95, 500.0, 100.0), reasons=["too weak"])
    result = SearchResult([a, b, c, failed], c)
    by_sparsity = stages._final_order(result, rule, "max-sparsity")
    assert [x.sparsity for x in by_sparsity] == [0.9, 0.7, 0.5]
    by_score = stages._final_order(result, rule, "sweet-spot")
    assert [x.sparsity for x in by_score] == [0.5, 0.9, 0.7]


def _strip_v4(obj: object) -> object:
    """A report as version 3 wrote it: without any field version 4 added."""
    v4 = {"tail", "decision", "status", "episodes", "measured_on", "cvar10", "deploy", "pruning"}
    v4 |= {"margin", "reference_attack", "fall_below", "fall_on_termination", "decisions"}
    if isinstance(obj, dict):
        return {k: _strip_v4(v) for k, v in obj.items() if k not in v4}
    if isinstance(obj, list):
        return [_strip_v4(v) for v in obj]
    return obj


def test_the_schema_checks_version_4_and_older_reports_still_render(run) -> None:  # noqa: ANN001
    from compressor.report.build import validate
    from compressor.report.render import render_html, render_markdown

    run_dir, _ = run
    r = json.loads((run_dir / "report.json").read_text())
    assert r["schema_version"] == 4 and validate(r) == []
    bad = json.loads(json.dumps(r))
    bad["verdict"]["status"] = "probably"
    bad["final_check"]["attempts"][0]["decision"]["tests"][0]["falls"] = "two"
    problems = validate(bad)
    assert any("verdict/status" in p for p in problems) and any("falls" in p for p in problems)
    old = _strip_v4({k: v for k, v in r.items() if k not in ("evaluation_method", "final_check")})
    old["schema_version"] = 3  # type: ignore[index]
    old["derived"]["resolution"] = None  # type: ignore[index]
    assert validate(old) == []  # type: ignore[arg-type]
    md = render_markdown(old, {})  # type: ignore[arg-type]
    assert "PASS: deploy policy.onnx, sparsity 20.0%" in md and "## Final check" not in md
    assert "clean return" in md and "n/a" in md  # falls of an old report: not recorded
    assert "<!DOCTYPE html>" in render_html(old, {})  # type: ignore[arg-type]
