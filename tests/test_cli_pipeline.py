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

from compressor.policy import load_native
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
        (["run", CARTPOLE, "--budget", "1.5"], 3, "budget"),
        (["evaluate", CARTPOLE, "--env", "NoSuchEnv-v0"], 3, "NoSuchEnv"),
        (["evaluate", CARTPOLE, "--env", "Hopper-v5"], 3, "observations"),
        (["run", CARTPOLE, "--profile", "nope"], 3, "unknown profile"),
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
    from compressor.policy import save_policy

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
    assert r.returncode in (0, 4), r.stderr
    report = json.loads(r.stdout)
    run_dir = Path(report["run_dir"])
    assert (run_dir / "report.json").is_file() and (run_dir / "report.md").is_file()
    assert (run_dir / "report.html").is_file()
    assert report["schema_version"] >= 1  # append-only schema (compressor/schema/)
    assert len(report["frontier"]) >= 2
    for f in report["frontier"]:
        assert f["passed"] == (not f["reasons"])
    # the journal has one line per evaluated candidate
    assert len((run_dir / "journal.jsonl").read_text().splitlines()) == len(report["frontier"])
    md = (run_dir / "report.md").read_text()
    if r.returncode == 0:
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
    else:
        assert not report["verdict"]["passed"] and "FAIL" in md
        assert not (run_dir / "policy.onnx").exists()
    # every return in the frontier table of the markdown comes from the JSON
    for f in report["frontier"]:
        assert f"{f['clean_return']:,.1f}" in md
    assert re.search(r"ε = 0\.1 in \*\*normalized\*\*", md)


@pytest.mark.slow
def test_full_hopper_run(tmp_path: Path) -> None:
    r = compress("run", "hopper", "--budget", "0.05", "--out", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["chosen"]["sparsity"] >= 0.5
    for name in ("policy.onnx", "policy.pt", "report.json", "report.md"):
        assert (Path(report["run_dir"]) / name).is_file()
