"""A killed run resumes to the same report; a changed config is refused; runs are deterministic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import REPO

CARTPOLE = str(REPO / "profiles" / "cartpole.pt")
PROFILE = """
name = "tiny-cartpole"
[env]
id = "CartPole-v1"
[threat]
eps = 0.1
[evaluation]
episodes = 3
num_envs = 3
[finetune]
steps = 150
state_episodes = 2
dagger_episodes = 2
[certificate]
states = 200
empirical_states = 20
[search]
grid = [0.5, 0.7, 0.9]
refine = 1
"""
# timings (and hashes of files that record timings, such as the journal) legitimately differ
VOLATILE = {"wall_s", "seconds", "timings_s", "run_dir", "command", "path", "eval_wall_s"}
VOLATILE |= {"training", "outputs_sha256", "performance"}  # measured time and memory


def _cmd(profile: Path, out: Path, budget: str = "0.05") -> list[str]:
    return [
        sys.executable,
        "-m",
        "compressor.cli",
        "run",
        CARTPOLE,
        "--budget",
        budget,
        "--profile",
        str(profile),
        "--out",
        str(out),
        "--name",
        "r",
        "--json",
    ]


def _stable(obj: Any) -> Any:
    """The report without timings and paths, which legitimately differ between runs."""
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def test_killed_run_resumes_to_the_same_report(tmp_path: Path) -> None:
    prof = tmp_path / "tiny.toml"
    prof.write_text(PROFILE)
    full = subprocess.run(_cmd(prof, tmp_path / "a"), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr  # bisection finds a passing level (25%)
    reference = json.loads(full.stdout)

    out = tmp_path / "b"
    journal = out / "r" / "journal.jsonl"
    proc = subprocess.Popen(_cmd(prof, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if journal.is_file() and journal.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert journal.is_file() and journal.read_text().count("\n") >= 1
    assert not (out / "r" / "report.json").exists()  # it really was cut off before the end

    resumed = subprocess.run(_cmd(prof, out), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == full.returncode, resumed.stderr
    assert "resuming" in resumed.stderr
    assert _stable(json.loads(resumed.stdout)) == _stable(reference)

    # the same command and seeds give bit-identical report numbers (determinism)
    again = subprocess.run(_cmd(prof, tmp_path / "c"), capture_output=True, text=True, timeout=600)
    assert _stable(json.loads(again.stdout)) == _stable(reference)

    # a changed configuration is refused, not mixed into the old directory
    changed = subprocess.run(_cmd(prof, out, budget="0.1"), capture_output=True, text=True)
    assert changed.returncode == 3
    assert "another configuration" in changed.stderr and "budget" in changed.stderr
