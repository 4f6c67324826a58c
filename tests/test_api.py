"""The Python API does what the commands do: one function per command, from `compressor`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import compressor
from compressor.core.errors import CompressorError
from conftest import REPO

CARTPOLE = str(REPO / "profiles" / "cartpole.pt")


def test_every_public_name_resolves() -> None:
    for name in compressor.__all__:
        assert getattr(compressor, name) is not None
    with pytest.raises(AttributeError):
        _ = compressor.no_such_name  # type: ignore[attr-defined]


def test_evaluate_policy_equals_the_command() -> None:
    ev = compressor.evaluate_policy(CARTPOLE, episodes=2, seed=3)
    assert ev.env_id == "CartPole-v1" and ev.result.stats.n == 2
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "compressor.cli",
            "evaluate",
            CARTPOLE,
            "--episodes",
            "2",
            "--seed",
            "3",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    from_cli = json.loads(r.stdout)
    from_api = json.loads(json.dumps(ev.to_dict()))
    for d in (from_cli, from_api):
        d.pop("wall_s")  # measured time
    assert from_cli == from_api


def test_attack_and_prune_from_python(tmp_path: Path) -> None:
    att = compressor.attack_policy(CARTPOLE, attacks="random,mad", episodes=2)
    assert list(att.suite.attacks) == ["random", "mad"]
    assert att.threat.eps == 0.1  # the shipped CartPole profile's ε
    out = tmp_path / "p.pt"
    rep = compressor.prune_policy(CARTPOLE, 0.5, output=out, finetune=False)
    assert rep.policy.sparsity() == pytest.approx(0.5, abs=0.01)
    assert compressor.load_policy(out).policy.sparsity() == pytest.approx(rep.policy.sparsity())
    with pytest.raises(CompressorError, match="unknown attack"):
        compressor.attack_policy(CARTPOLE, attacks="nope", episodes=1)
