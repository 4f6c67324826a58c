"""End to end on a strong RL Zoo policy (issue 20): `compress run` on the Zoo's PPO Hopper with
checkpoint selection compresses it to ≥ 80% within budget 0.05, with the fine-tuning method and
its cost in the report. Slow (minutes on 2 cores); skips without ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest

from compressor.run.pipeline import run_pipeline
from conftest import shared_policies


@pytest.mark.slow
def test_zoo_ppo_hopper_compresses_to_80_percent(tmp_path: Path) -> None:
    src = shared_policies() / "sb3-ppo-Hopper-v3" / "model.zip"
    res = run_pipeline(src, budget=0.05, profile="hopper", out_root=tmp_path, name="zoo-hopper")
    chosen = res.report["chosen"]
    assert chosen is not None, "nothing passed the budget"
    assert chosen["sparsity"] >= 0.8
    ft = chosen["finetune"]
    assert ft["method"] == "distill" and ft["selection"]["chosen"] is not None
    assert ft["selection"]["env_steps"] > 0 and ft["wall_s"] > 0
