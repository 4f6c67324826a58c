"""``compress run`` end to end on every head a file can bring, report pages included.

Heads without an action distribution (TD3/DDPG's deterministic tanh, DQN's greedy Q) and SAC's
state-dependent σ have no TV: the run must still certify, decide, export and render, and name
the certified quantity in its own unit.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from compressor.policy.model import Policy
from compressor.policy.native import save_policy
from conftest import make_policy

TINY = """
name = "tiny-heads"
[env]
id = "{env}"
[threat]
eps = 0.05
[evaluation]
episodes = 2
num_envs = 2
max_episodes = 4
[attacks]
screen = ["random"]
final = ["random", "mad"]
[finetune]
steps = 10
state_episodes = 1
dagger_episodes = 1
[certificate]
states = 20
empirical_states = 5
[search]
grid = [0.5]
refine = 0
"""
#: head -> (env, obs_dim, act_dim, the certificate's quantity)
CASES = {
    "deterministic": ("Pendulum-v1", 3, 1, "action_deviation_l2"),
    "q_greedy": ("CartPole-v1", 4, 2, "q_value_change_l2"),
    "squashed_gaussian": ("Pendulum-v1", 3, 1, "action_deviation_l2"),
}


def _policy(head: str) -> Policy:
    env, obs, act, _ = CASES[head]
    p = make_policy(head, (16, 16), "relu", obs, act, True, seed=1, env_id=env)
    if head == "q_greedy":
        spec = dataclasses.replace(p.spec, action_low=None, action_high=None)
    elif head == "squashed_gaussian":  # SAC's σ: a layer of its own
        spec = dataclasses.replace(
            p.spec, state_dependent_std=True, action_low=[-2.0], action_high=[2.0]
        )
    else:
        spec = dataclasses.replace(p.spec, squash=True, action_low=[-2.0], action_high=[2.0])
    q = Policy(spec)
    q.load_state_dict(p.state_dict(), strict=False)
    return q.eval()


@pytest.mark.parametrize("head", list(CASES))
def test_run_renders_for_every_head(head: str, tmp_path: Path) -> None:
    env, _, _, quantity = CASES[head]
    src = tmp_path / f"{head}.pt"
    save_policy(_policy(head), src)
    prof = tmp_path / "tiny.toml"
    prof.write_text(TINY.format(env=env))
    cmd = [sys.executable, "-m", "compressor.cli", "run", str(src), "--profile", str(prof)]
    cmd += ["--out", str(tmp_path), "--workers", "1", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode in (0, 4), r.stderr[-3000:]  # 4: budget not met is a verdict
    report = json.loads(r.stdout)
    cert = report["dense"]["certificates"]["inf"]
    assert cert["shift_name"] == quantity and cert["tv_bound"] is None
    run = tmp_path / head
    html = (run / "report.html").read_text()
    assert "Traceback" not in html and "certified change at ε" in html
    assert (run / "plots" / "certificate.png").stat().st_size > 0
