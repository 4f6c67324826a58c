"""End to end through the CLI: exit codes, --json output, and `compress run` on a real env."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from compressor.policy.native import load_native
from conftest import REPO, make_policy

CARTPOLE = str(REPO / "profiles" / "cartpole.pt")


def compress(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "compressor.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_inspect_json_describes_the_policy() -> None:
    r = compress("inspect", CARTPOLE, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["head"] == "categorical" and d["env_id"] == "CartPole-v1"
    assert d["layer_sizes"] == [4, 64, 64, 2]
    assert d["layer_sparsity"] == [0.0, 0.0, 0.0]


def test_inspect_shows_how_a_global_threshold_spread_its_cuts(tmp_path: Path) -> None:
    """``layer_sparsity``: per layer, the fraction of zero weights (a global threshold need
    not cut each layer alike; per-layer scope does)."""
    from compressor.policy.native import save_policy
    from compressor.prune.criteria import prune

    dense = load_native(CARTPOLE)
    for scope in ("global", "layer"):
        pol = prune(dense, 0.5, scope=scope)
        save_policy(pol, tmp_path / f"{scope}.pt")
        d = json.loads(compress("inspect", str(tmp_path / f"{scope}.pt"), "--json").stdout)
        sizes = [w.numel() for w in pol.effective_weights()]
        spread = d["layer_sparsity"]
        assert len(spread) == 3
        # the layers' zeros add up to the whole policy's sparsity
        total = sum(f * n for f, n in zip(spread, sizes)) / sum(sizes)
        assert total == pytest.approx(d["sparsity"], abs=1e-3)
        if scope == "layer":
            assert spread == pytest.approx([0.5, 0.5, 0.5], abs=0.01)


def test_evaluate_json() -> None:
    r = compress("evaluate", CARTPOLE, "--episodes", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["return"]["mean"] == 500.0


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["inspect", "/nonexistent/policy.pt"], 3, "not found"),
        (["attack", CARTPOLE, "--eps", "-0.1"], 3, "ε must be positive"),
        (["attack", CARTPOLE, "--attack", "nope"], 3, "unknown attack"),
        (["run", CARTPOLE, "--budget", "1.5"], 2, "budget"),  # a usage error
        (["evaluate", CARTPOLE, "--env", "NoSuchEnv-v0"], 3, "NoSuchEnv"),
        (["evaluate", CARTPOLE, "--env", "Hopper-v5"], 3, "observations"),
        (["run", CARTPOLE, "--profile", "nope"], 3, "unknown profile"),
        (["run", CARTPOLE, "--executor", "dask"], 3, "unknown executor"),
        (["run", CARTPOLE, "--workers", "0"], 3, "--workers"),
        (["evaluate"], 2, ""),
        (["no-such-command"], 2, ""),
    ],
)
def test_bad_input_gives_one_line_and_exit_code(args: list[str], code: int, message: str) -> None:
    r = compress(*args)
    assert r.returncode == code, (r.stdout, r.stderr)
    if code == 3:
        assert "Traceback" not in r.stderr
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error")]
        assert len(lines) == 1 and message in lines[0], r.stderr


def test_corrupted_weights_are_rejected(tmp_path: Path) -> None:
    pol = make_policy()
    with torch.no_grad():
        pol.layers[0].weight[0, 0] = float("nan")
    from compressor.policy.native import save_policy

    save_policy(pol, tmp_path / "nan.pt")
    r = compress("inspect", str(tmp_path / "nan.pt"))
    assert r.returncode == 3 and "NaN" in r.stderr
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes((REPO / "profiles" / "cartpole.pt").read_bytes()[:500])
    r = compress("inspect", str(trunc))
    assert r.returncode == 3 and "Traceback" not in r.stderr


TINY_PROFILE = """
name = "tiny-cartpole"
[env]
id = "CartPole-v1"
[threat]
eps = 0.1
[evaluation]
episodes = 3
num_envs = 3
[attacks]
screen = ["random", "mad"]
final = ["random", "mad"]
[finetune]
steps = 150
state_episodes = 2
[search]
grid = [0.5, 0.9]
refine = 1
"""


def test_run_writes_checked_onnx_and_report(tmp_path: Path) -> None:
    prof = tmp_path / "tiny.toml"
    prof.write_text(TINY_PROFILE)
    r = compress(
        "run",
        CARTPOLE,
        "--budget",
        "0.05",
        "--profile",
        str(prof),
        "--out",
        str(tmp_path / "runs"),
        "--name",
        "t",
        "--json",
    )
    assert r.returncode == 0, r.stderr  # bisection finds a passing level (25%)
    report = json.loads(r.stdout)
    run_dir = Path(report["run_dir"])
    assert (run_dir / "report.json").is_file() and (run_dir / "report.md").is_file()
    assert (run_dir / "report.html").is_file()
    assert report["schema_version"] >= 1  # append-only schema (compressor/schema/)
    assert len(report["frontier"]) >= 2
    for f in report["frontier"]:
        assert f["passed"] == (not f["reasons"])
    # every visited candidate has its journal line (workers may also have finished levels the
    # search then did not need: they are journalled too, for a resumed run, not reported)
    lines = (run_dir / "journal.jsonl").read_text().splitlines()
    journalled = [json.loads(line)["target_sparsity"] for line in lines]
    assert len(journalled) == len(set(journalled))
    assert {f["target_sparsity"] for f in report["frontier"]} <= set(journalled)
    md = (run_dir / "report.md").read_text()
    chosen = report["chosen"]
    assert report["verdict"]["passed"]
    assert chosen["clean_return"] >= report["budget"]["clean_floor"]
    assert chosen["robust_return"] >= report["budget"]["robust_floor"]
    lip = chosen["certificates"]["inf"]["lipschitz"]
    assert lip <= report["budget"]["dense_lipschitz"] * (1 + 1e-9)
    pol = load_native(run_dir / "policy.pt")
    assert pol.sparsity() == pytest.approx(chosen["sparsity"])
    model = onnx.load(str(run_dir / "policy.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["eps"] == "0.1" and meta["eps_space"] == "normalized"
    assert chosen["onnx"]["parity_max_abs_err"] <= 1e-5
    assert f"{100 * chosen['sparsity']:.1f}%" in md
    # every return in the frontier table of the markdown comes from the JSON
    for f in report["frontier"]:
        assert f"{f['clean_return']:,.1f}" in md
    assert re.search(r"ε = 0\.1 in \*\*normalized\*\*", md)


def test_a_run_that_misses_the_budget_exits_4_and_exports_nothing(tmp_path: Path) -> None:
    prof = tmp_path / "hard.toml"
    # 95% of CartPole's weights cannot go without losing the pole: the only level fails
    prof.write_text(
        TINY_PROFILE.replace("grid = [0.5, 0.9]\nrefine = 1", "grid = [0.95]\nrefine = 0")
    )
    out = tmp_path / "runs"
    r = compress("run", CARTPOLE, "--profile", str(prof), "--out", str(out), "--name", "h")
    assert r.returncode == 4, r.stderr
    assert "FAIL" in r.stdout
    run_dir = out / "h"
    report = json.loads((run_dir / "report.json").read_text())
    assert not report["verdict"]["passed"] and report["chosen"] is None
    assert [f["target_sparsity"] for f in report["frontier"]] == [0.95]
    assert report["frontier"][0]["reasons"]
    assert "FAIL" in (run_dir / "report.md").read_text()
    assert not (run_dir / "policy.onnx").exists() and not (run_dir / "policy.pt").exists()


@pytest.mark.slow
def test_full_hopper_run(tmp_path: Path) -> None:
    r = compress("run", "hopper", "--budget", "0.05", "--out", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["chosen"]["sparsity"] >= 0.5
    for name in ("policy.onnx", "policy.pt", "report.json", "report.md"):
        assert (Path(report["run_dir"]) / name).is_file()


def test_batch_run_over_a_folder_keeps_going_and_summarises(tmp_path: Path) -> None:
    prof = tmp_path / "tiny.toml"
    one_level = TINY_PROFILE.replace("grid = [0.5, 0.9]\nrefine = 1", "grid = [0.5]\nrefine = 0")
    assert one_level != TINY_PROFILE
    prof.write_text(one_level)
    pols = tmp_path / "policies"
    for sub in ("a", "b"):
        (pols / sub).mkdir(parents=True)
        (pols / sub / "policy.pt").write_bytes(Path(CARTPOLE).read_bytes())
    (pols / "c").mkdir()
    (pols / "c" / "broken.pt").write_bytes(b"\x00not a policy" * 10)
    out = tmp_path / "runs"
    r = compress("run", str(pols), "--profile", str(prof), "--out", str(out), "--workers", "1")
    assert r.returncode == 3, r.stderr  # one policy was bad; the others still ran
    summary = json.loads((out / "batch-summary.json").read_text())["runs"]
    by_name = {row["run_name"]: row for row in summary}
    assert set(by_name) == {"a-policy", "b-policy", "broken"}
    assert by_name["broken"]["status"] == "error" and "broken.pt" in by_name["broken"]["error"]
    for name in ("a-policy", "b-policy"):
        row = by_name[name]
        assert row["status"] in ("pass", "fail", "undecided") and row["env_id"] == "CartPole-v1"
        report = json.loads((out / name / "report.json").read_text())
        assert row["dense_clean"] == report["dense"]["clean_return"]
        assert row["chosen_sparsity"] == report["verdict"]["chosen_sparsity"]
    # the same file twice gives the same numbers in both run directories
    assert by_name["a-policy"]["chosen_clean"] == by_name["b-policy"]["chosen_clean"]
    assert "batch summary" in r.stdout and "a-policy" in r.stdout


def test_batch_names_and_errors(tmp_path: Path) -> None:
    from compressor.core.errors import CompressorError
    from compressor.run.batch import run_names

    paths = [Path("x/sb3-hopper/model.zip"), Path("y/sb3-walker/model.zip"), Path("z/own.pt")]
    assert run_names(paths) == ["sb3-hopper-model", "sb3-walker-model", "own"]
    (tmp_path / "empty").mkdir()
    r = compress("run", str(tmp_path / "empty"))
    assert r.returncode == 3 and "no policy files" in r.stderr
    r = compress("run", CARTPOLE, CARTPOLE, "--name", "x")
    assert r.returncode == 3 and "--name" in r.stderr
    with pytest.raises(CompressorError):
        run_names([Path("a/p.pt"), Path("a/p.pt")])


def test_error_messages_keep_their_brackets(tmp_path: Path) -> None:
    """Messages are printed literally: a TOML section name is not taken for console markup."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[threat]\nepz = 0.1\n")
    r = compress("run", CARTPOLE, "--profile", str(bad))
    assert r.returncode == 3
    assert "[threat]: unknown key 'epz'" in r.stderr
