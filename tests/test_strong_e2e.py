"""End to end on strong RL Zoo policies (issue 20): `compress run` on the Zoo's PPO Hopper with
checkpoint selection compresses it to ≥ 80% within budget 0.05, with the fine-tuning method and
its cost in the report (skips without ../shared), and the shipped TQC HalfCheetah import to
≥ 80% structured. Slow (minutes each on 2 cores)."""

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


@pytest.mark.slow
def test_zoo_tqc_halfcheetah_compresses_to_80_percent_structured(tmp_path: Path) -> None:
    """The shipped TQC HalfCheetah (an RL Zoo import, ≈ 12 000): structured pruning to at least
    80% within budget 0.05, the PGD rows matched to the teacher where they differ most."""
    src = Path(__file__).resolve().parents[1] / "profiles" / "halfcheetah.pt"
    res = run_pipeline(src, budget=0.05, out_root=tmp_path, name="zoo-halfcheetah")
    rep = res.report
    assert rep["profile"]["finetune"]["adversarial_target"] == "perturbed"
    chosen = rep["chosen"]
    assert chosen is not None, "nothing passed the budget"
    assert chosen["sparsity"] >= 0.8 and rep["profile"]["prune"]["method"] == "structured"
    assert chosen["clean_return"] >= rep["budget"]["clean_floor"]
    assert chosen["robust_return"] >= rep["budget"]["robust_floor"]
