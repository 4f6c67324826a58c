"""The report: JSON schema, Markdown numbers traced to the JSON, a self-contained HTML file,
failing runs, ``compress report`` re-rendering and ``compress compare``.

Two real tiny CartPole runs (one that meets the budget, one that cannot) are made once for the
module and shared by every test.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from markupsafe import escape as html_escape

from compressor.report.build import SCHEMA_VERSION, complete, load_report, schema, validate
from compressor.run.pipeline import run_pipeline
from conftest import REPO

CARTPOLE = REPO / "profiles" / "cartpole.pt"
PROFILE = """
name = "{name}"
[env]
id = "CartPole-v1"
[threat]
eps = 0.1
[evaluation]
episodes = 3
num_envs = 3
[attacks]
screen = {attacks}
final = {attacks}
[certificate]
states = 200
empirical_states = 20
[finetune]
steps = {steps}
state_episodes = 2
dagger_rounds = 1
dagger_episodes = 2
[search]
grid = {grid}
refine = 0
"""


def _run(tmp: Path, name: str, grid: str, steps: int, attacks: str) -> Path:
    prof = tmp / f"{name}.toml"
    prof.write_text(PROFILE.format(name=name, grid=grid, steps=steps, attacks=attacks))
    res = run_pipeline(
        CARTPOLE,
        budget=0.05,
        profile=str(prof),
        out_root=tmp / "runs",
        name=name,
        command=["compress", "run", str(CARTPOLE), "--profile", str(prof)],
    )
    return res.run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("report")
    return {
        # 30% of a 64x64 CartPole policy keeps its 500 return; 97% cannot
        "pass": _run(tmp, "pass", "[0.3, 0.97]", 150, '["random", "mad"]'),
        "fail": _run(tmp, "fail", "[0.98, 0.99]", 20, '["random"]'),
    }


def compress(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "compressor.cli", *args], capture_output=True, text=True, timeout=300
    )


def _leaves(obj: Any, nums: list[float], strs: list[str]) -> None:
    if isinstance(obj, dict):
        strs.extend(str(k) for k in obj)
        for v in obj.values():
            _leaves(v, nums, strs)
    elif isinstance(obj, list):
        for v in obj:
            _leaves(v, nums, strs)
    elif isinstance(obj, bool) or obj is None:
        return
    elif isinstance(obj, (int, float)):
        nums.append(float(obj))
    else:
        strs.append(str(obj))


NUMBER = re.compile(r"(?<![\w.\-])-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?%?")


def _unexplained(md: str, report: dict[str, Any]) -> list[str]:
    """Numbers in the Markdown that no JSON value, rounded as shown, accounts for."""
    nums: list[float] = []
    strs: list[str] = []
    _leaves(report, nums, strs)
    text = re.sub(r"`[^`]*`", " ", md)  # code spans: hashes, paths, the command line
    text = re.sub(r"\(plots/\w+\.png\)", " ", text)
    text = text.replace("95% CI", " ")  # the CI level is a label of the statistic
    bad = []
    for tok in NUMBER.findall(text):
        if any(tok in s for s in strs):
            continue
        is_pct = tok.endswith("%")
        t = tok.rstrip("%").replace(",", "")
        val = float(t)
        if "e" in t:
            tol = 5e-4 * abs(val)
        else:
            decimals = len(t.split(".")[1]) if "." in t else 0
            tol = 0.5 * 10**-decimals + 1e-12
        cands = [100 * v for v in nums] if is_pct else nums
        if not any(abs(v - val) <= tol * (1 + 1e-9) for v in cands):
            bad.append(tok)
    return bad


@pytest.mark.parametrize("which", ["pass", "fail"])
def test_json_validates_against_the_shipped_schema(runs: dict[str, Path], which: str) -> None:
    r = load_report(runs[which])
    assert r["schema_version"] == SCHEMA_VERSION
    assert validate(r) == []
    # the schema really checks: a wrong type and a missing required field are caught
    bad = json.loads(json.dumps(r))
    bad["budget"]["clean_floor"] = "high"
    del bad["frontier"]
    problems = validate(bad)
    assert any("clean_floor" in p for p in problems) and any("frontier" in p for p in problems)
    assert schema()["properties"]["schema_version"]["minimum"] == 1


def test_a_version_1_report_is_completed_from_the_run_directory(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "v1"
    shutil.copytree(runs["pass"], run)
    v2 = load_report(run)
    v1 = json.loads(json.dumps(v2))
    for k in ("derived",):
        del v1[k]
    for f in v1["frontier"]:
        del f["robust_ci"], f["attack_ci"]
    del v1["chosen"]["layers"], v1["reproducibility"]["outputs_sha256"]
    v1["schema_version"] = 1
    assert validate(v1) == []  # append-only: a version-1 report is still valid
    up = complete(v1, run)
    assert up["frontier"] == v2["frontier"]
    assert up["chosen"]["layers"] == v2["chosen"]["layers"]
    assert up["derived"] == v2["derived"]
    assert up["schema_version"] == SCHEMA_VERSION and validate(up) == []


@pytest.mark.parametrize("which", ["pass", "fail"])
def test_every_number_in_the_markdown_comes_from_the_json(
    runs: dict[str, Path], which: str
) -> None:
    md = (runs[which] / "report.md").read_text()
    r = load_report(runs[which])
    assert len(NUMBER.findall(md)) > 50
    assert _unexplained(md, r) == []
    # and the check is not vacuous: an invented number is caught
    assert _unexplained(md + "\nclean return 123.4\n", r) == ["123.4"]
    for f in r["frontier"]:
        assert f"{f['clean_return']:,.1f}" in md


def test_markdown_shows_every_section_and_its_plots(runs: dict[str, Path]) -> None:
    run = runs["pass"]
    md = (run / "report.md").read_text()
    for heading in (
        "## Dense vs deployed",
        "## Frontier",
        "## Final check",
        "## Certificates",
        "## Attacks",
        "## Regret decomposition",
        "## Per-layer sparsity",
        "## Size and latency on the target",
        "## How the verdict is decided",
        "## Reproducibility",
    ):
        assert md.count(f"{heading}\n") == 1, heading
    # the three frontier tables of older reports are one now
    assert "## Frontier and regret decomposition" not in md and "## Frontier table" not in md
    pngs = re.findall(r"\]\((plots/\w+\.png)\)", md)
    assert {"plots/frontier.png", "plots/certificate.png", "plots/attacks.png"} <= set(pngs)
    for p in pngs:
        assert (run / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = load_report(run)
    assert [la["index"] for la in r["chosen"]["layers"]] == [1, 2, 3]
    nz = sum(la["nonzero"] for la in r["chosen"]["layers"])
    assert nz == r["chosen"]["params_nonzero"] - sum(r["source"]["layer_sizes"][1:])  # + biases
    assert r["derived"]["sweet_spot"]["sparsity"] in [f["sparsity"] for f in r["frontier"]]
    rg = r["derived"]["regret"]["chosen"]
    assert rg["clean_regret"] + rg["pruning_loss"] + rg["attack_gap"] == pytest.approx(rg["total"])
    outs = r["reproducibility"]["outputs_sha256"]
    assert outs["policy.onnx"] == r["chosen"]["onnx"]["sha256"]


@pytest.mark.parametrize("which", ["pass", "fail"])
def test_html_is_one_self_contained_file(runs: dict[str, Path], which: str) -> None:
    html = (runs[which] / "report.html").read_text()
    assert html.lstrip().startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert not re.search(r"https?://", html)
    assert "<link" not in html and "@import" not in html and "url(" not in html
    srcs = re.findall(r"""\bsrc\s*=\s*["']?([^"'\s>]+)""", html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<script" not in html
    r = load_report(runs[which])
    assert ("PASS" in html) == r["verdict"]["passed"]


def test_a_failed_budget_still_gives_a_report_that_says_why(runs: dict[str, Path]) -> None:
    run = runs["fail"]
    r = load_report(run)
    assert not r["verdict"]["passed"] and r["chosen"] is None
    assert not (run / "policy.onnx").exists()
    md, html = (run / "report.md").read_text(), (run / "report.html").read_text()
    assert "FAIL: no sparsity met budget 0.05" in md and 'class="banner fail"' in html
    for f in r["frontier"]:
        assert not f["passed"]
        for reason in f["reasons"]:
            assert reason in md and str(html_escape(reason)) in html
    assert (run / "plots" / "frontier.png").is_file()


def test_compress_report_rerenders_identical_files(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "copy"
    shutil.copytree(runs["pass"], run)
    names = ["report.json", "report.md", "report.html"] + [
        f"plots/{p.name}" for p in (run / "plots").iterdir()
    ]
    before = {n: (run / n).read_bytes() for n in names}
    for n in ("report.md", "report.html", "plots/frontier.png"):
        (run / n).unlink()
    r = compress("report", str(run))
    assert r.returncode == 0, r.stderr
    assert "schema:" not in r.stderr
    for n in names:
        assert (run / n).read_bytes() == before[n], n
    bad = compress("report", str(tmp_path / "nothing"))
    assert bad.returncode == 3 and "not found" in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "empty").mkdir()
    bad = compress("report", str(tmp_path / "empty"))
    assert bad.returncode == 3 and "no report.json" in bad.stderr and "Traceback" not in bad.stderr


def test_compress_compare_puts_two_runs_side_by_side(runs: dict[str, Path]) -> None:
    r = compress("compare", str(runs["pass"]), str(runs["fail"]), "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["metric"]: row for row in json.loads(r.stdout)["rows"]}
    assert rows["verdict"]["a"] == "pass" and rows["verdict"]["b"] == "fail"
    a, b = load_report(runs["pass"]), load_report(runs["fail"])
    dense = rows["dense clean return"]
    assert dense["a"] == a["dense"]["clean_return"] and dense["delta"] == 0.0
    assert rows["chosen sparsity"]["a"] == a["chosen"]["sparsity"]
    assert rows["chosen sparsity"]["b"] is None and rows["chosen sparsity"]["delta"] is None
    assert rows["candidates evaluated"]["delta"] == len(b["frontier"]) - len(a["frontier"])
    text = compress("compare", str(runs["pass"]), str(runs["fail"]))
    assert text.returncode == 0 and "chosen sparsity" in text.stdout
