"""The report's ``frontier_analysis`` block (schema v3): the schema describes exactly what
:func:`compressor.report.frontier.frontier_analysis` emits, and report.md / report.html show it
in the one frontier table, with the sweet spot marked apart from the deployed level.

The report is built by :func:`compressor.report.build.build_report` from a tiny CartPole-shaped
policy, its pruned copies and synthetic evaluation results: no environment is run.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from test_report import _unexplained

from compressor.attacks.base import AttackContext
from compressor.certify.global_bound import certify_global
from compressor.core.config import load_profile, load_target
from compressor.core.stats import summarize_returns
from compressor.core.threat import ThreatModel
from compressor.deploy.export import ExportResult
from compressor.evaluate import EvalResult, SuiteResult
from compressor.policy.loading import LoadedPolicy
from compressor.prune.criteria import prune
from compressor.report.build import (
    SCHEMA_VERSION,
    build_report,
    load_report,
    schema,
    validate,
    write_report,
)
from compressor.report.render import render_html, render_markdown
from compressor.run.results import ChosenPolicy, DenseMeasurement, RunSetup
from compressor.search.budget import Budget
from compressor.search.candidate import Candidate
from compressor.search.sparsity import SearchResult
from conftest import make_policy

THREAT = ThreatModel(0.1)
HEADING = "Frontier"
# (clean, robust) per sparsity; dense is (500, 300), random 20, budget 0.05: floors 476 / 276.
# 0.3 has the best mean score (the sweet spot), 0.6 is the sparsest that passes (the choice).
RETURNS = {0.3: (498.0, 330.0), 0.6: (490.0, 290.0), 0.9: (300.0, 100.0)}


def _suite(clean: float, robust: float) -> SuiteResult:
    def ev(name: str, v: float, tv: float | None) -> EvalResult:
        return EvalResult(name, summarize_returns(np.array([v - 4.0, v, v + 4.0])), tv, 30, 0.5)

    return SuiteResult(ev("clean", clean, None), {"mad": ev("mad", robust, 0.2)}, THREAT)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory whose report.json carries a real ``frontier_analysis`` block."""
    run_dir = tmp_path_factory.mktemp("frontier")
    dense = make_policy("categorical", hidden=(16, 16), env_id="CartPole-v1")
    dense_cert = certify_global(dense, THREAT)
    dense_suite = _suite(500.0, 300.0)
    rule = Budget(0.05, 500.0, 300.0, 20.0, dense_cert.lipschitz)
    cands = []
    for s, (clean, robust) in RETURNS.items():
        pol = prune(dense, s)
        cert, suite = certify_global(pol, THREAT), _suite(clean, robust)
        n = pol.num_parameters(nonzero_only=True)
        cands.append(
            Candidate(
                s, pol.sparsity(), suite, cert, None, n, rule.check(suite, cert), 1.0, None, pol
            )
        )
    chosen = cands[1]
    assert chosen.passed and cands[0].passed and not cands[2].passed
    n = chosen.params_nonzero
    export = ExportResult(run_dir / "policy.onnx", 17, 8, 2048, "0" * 64, n, n, 0, 0.0)
    base = load_profile("cartpole")
    reference = dataclasses.replace(
        base.reference, best_return=520.0, source="synthetic test reference"
    )
    setup = RunSetup(
        loaded=LoadedPolicy(dense, None, [], run_dir / "dense.pt", "native", "f" * 64),
        profile=dataclasses.replace(base, reference=reference),
        threat=THREAT,
        target=load_target("cpu-x86"),
        budget=0.05,
        run_dir=run_dir,
        resumed=False,
        command=("compress", "run", "dense.pt"),
    )
    states = np.zeros((4, dense.spec.obs_dim), dtype=np.float32)
    measured = DenseMeasurement(
        suite=dense_suite,
        random_return=20.0,
        states=states,
        state_steps=0,
        cert_states=states,
        certificates={THREAT.norm: dense_cert},
        local={},
        rule=rule,
        attack_ctx=AttackContext(dense, THREAT),
    )
    picked = ChosenPolicy(
        candidate=chosen,
        suite=chosen.suite,
        final_only=SuiteResult(chosen.suite.clean, {}, THREAT),
        certificates={THREAT.norm: chosen.certificate},
        export=export,
    )
    report = build_report(setup, measured, SearchResult(cands, chosen), picked, {"total": 1.0})
    write_report(report, run_dir)
    return run_dir


def _section(md: str) -> str:
    return md.split(f"## {HEADING}\n", 1)[1].split("\n## ", 1)[0]


def test_schema_describes_the_block_and_rejects_a_malformed_one(run: Path) -> None:
    r = load_report(run)
    assert r["schema_version"] == SCHEMA_VERSION >= 3
    assert validate(r) == []
    fa = r["frontier_analysis"]
    # every field frontier.py emits is described and required, no more, no fewer
    s = schema()["properties"]["frontier_analysis"]
    assert set(s["required"]) == set(s["properties"]) == set(fa)
    point = s["properties"]["dense"]
    assert point == s["properties"]["points"]["items"] | {"description": point["description"]}
    assert set(point["required"]) == set(point["properties"]) == set(fa["dense"])
    assert set(point["properties"]["regret"]["required"]) == set(fa["dense"]["regret"])
    # malformed: a string where a number goes, a missing field, an unknown label
    bad = json.loads(json.dumps(r))
    bad["frontier_analysis"]["points"][0]["regret"]["attack_gap"] = "large"
    bad["frontier_analysis"]["best_known_return"] = "1200"
    del bad["frontier_analysis"]["sweet_spot"]
    bad["frontier_analysis"]["dense"]["label"] = "teacher"
    problems = validate(bad)
    for field in ("attack_gap", "best_known_return", "sweet_spot", "dense/label"):
        assert any(field in p for p in problems), (field, problems)
    # optional: a version-2 report without the block is still valid
    old = json.loads(json.dumps(r))
    del old["frontier_analysis"]
    old["schema_version"] = 2
    assert validate(old) == []


def _rows(sec: str) -> dict[str, str]:
    """The frontier table's rows by their first cell's sparsity (marks stripped)."""
    rows = [row for row in sec.splitlines() if row.startswith("| ")]
    return {row.split("|")[1].strip().split(" (")[0]: row for row in rows}


def test_markdown_and_html_show_the_section_with_the_sweet_spot(run: Path) -> None:
    r = load_report(run)
    fa = r["frontier_analysis"]
    sweet, choice = fa["sweet_spot"]["sparsity"], fa["budget_choice"]["sparsity"]
    by_target = {p["sparsity"]: p for p in fa["points"]}
    assert sweet != choice and by_target[sweet]["score"] > by_target[choice]["score"]
    md = (run / "report.md").read_text()
    # one frontier table (the frontier, regret and frontier-analysis tables of older reports)
    assert md.count(f"## {HEADING}\n") == 1 and "## Frontier and regret decomposition" not in md
    sec = _section(md)
    assert f"J(π*) = 520.0 ({fa['best_known_source']})" in sec
    assert "synthetic test reference" in sec
    rows = _rows(sec)
    assert set(rows) == {"sparsity", "dense", *(_pct(p["sparsity"]) for p in fa["points"])}
    assert f"| {_pct(sweet)} (sweet spot) |" in rows[_pct(sweet)]
    assert f"| {_pct(choice)} (deployed) |" in rows[_pct(choice)]
    for p in fa["points"]:
        assert f"{p['regret']['attack_gap']:,.1f}" in rows[_pct(p["sparsity"])]
    assert sum("sweet spot" in row for row in rows.values()) == 1
    # the sweet spot is secondary: the banner deploys the budget's choice, and says so
    assert f"deploy policy.onnx, sparsity {_pct(choice)}" in md
    assert "Not the recommendation, for comparison: the sweet spot" in md
    assert f"is {_pct(sweet)}" in md
    assert _unexplained(md, r) == []  # every number in the section comes from the JSON
    html = (run / "report.html").read_text()
    assert html.count(f"<h2>{HEADING}</h2>") == 1 and "Frontier and regret" not in html
    assert f"{_pct(sweet)} (sweet spot)" in html and f"{_pct(choice)} (deployed)" in html


def test_dense_sweet_spot_old_reports_and_other_unknown_blocks(run: Path) -> None:
    r = load_report(run)
    # the dense row can be the sweet spot: the sentence says so, the dense row carries the mark
    d = r["derived"]
    d["sweet_spot"] = {**d["sweet_spot"], "sparsity": 0.0, "label": "dense"}
    md = render_markdown(r, {})
    assert "the dense policy: no pruned level scored higher" in md
    assert re.search(r"^\| dense \(sweet spot\) \|", _section(md), re.M)
    # a report without the block still has its one frontier table; unknown blocks stay generic
    del r["frontier_analysis"]
    r["calibration"] = {"temperature": 1.5}
    md, html = render_markdown(r, {}), render_html(r, {})
    assert md.count(f"## {HEADING}\n") == 1 and "Score:" not in _section(md)
    assert "## Calibration" in md and "<h2>Calibration</h2>" in html


def _dense_with_spread(returns: list[float]) -> dict[str, object]:
    stats = summarize_returns(np.array(returns))
    ret = {"mean": stats.mean, "ci_low": stats.ci_low, "ci_high": stats.ci_high, "n": stats.n}
    return {
        "strongest_attack": "mad",
        "evaluation": {"clean": {"return": ret}, "attacks": {"mad": {"return": ret}}},
    }


def test_resolution_says_when_the_episodes_cannot_resolve_the_budget() -> None:
    from compressor.report.build import resolution
    from compressor.report.render import noise_warning

    rng = np.random.default_rng(0)
    budget = {"budget": 0.05, "scale": 1000.0}  # allowed loss 50
    steady = resolution(budget, _dense_with_spread(list(1000 + rng.normal(0, 5, 16))))
    noisy = resolution(budget, _dense_with_spread(list(1000 + rng.normal(0, 400, 16))))
    assert steady is not None and noisy is not None
    assert steady["resolved"] and steady["episodes_needed"] == 16
    assert noise_warning(steady) == ""
    assert not noisy["resolved"]
    # CI half-widths shrink as 1/sqrt(n): the suggested count brings the difference's CI to 50
    want = 16 * (noisy["difference_ci_halfwidth"] / 50) ** 2
    assert noisy["episodes_needed"] == int(np.ceil(want)) > 16
    assert f"about {noisy['episodes_needed']} episodes" in noise_warning(noisy)
