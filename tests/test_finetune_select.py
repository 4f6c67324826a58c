"""Checkpoint selection by evaluated return (compressor/finetune/select.py): the best
checkpoint at the final mask is kept, DAgger rounds stop when they stop helping, a clearly lost
level stops, and the selection seeds stay apart from the verdict's."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from compressor.core.config import DECISION_SEED_END, FinetuneConfig, load_profile
from compressor.core.errors import CompressorError
from compressor.core.threat import ThreatModel
from compressor.finetune import FinetuneInputs, finetune_candidate
from compressor.finetune.distill import distill_with_dagger
from compressor.finetune.select import CheckpointSelector
from compressor.policy.model import Policy
from compressor.policy.native import load_native
from compressor.prune.criteria import prune
from compressor.search.candidate import (
    dense_states,
    prune_candidate,
    selection_evaluator,
    selection_seeds,
    student_state_collector,
)
from conftest import make_policy


def _score(pol: Policy) -> float:
    """A deterministic stand-in for a return: the first layer's mean bias."""
    return float(pol.layers[0].bias.detach().mean())


def _fake_eval(pol: Policy) -> tuple[np.ndarray, int]:
    return np.full(4, _score(pol)), 40


def test_selector_restores_the_best_checkpoint_at_the_final_mask() -> None:
    pol = prune(make_policy(hidden=(8,)), 0.5)
    ref = make_policy(hidden=(8,))
    with torch.no_grad():
        ref.layers[0].bias.fill_(1.0)
    sel = CheckpointSelector.for_dense(_fake_eval, ref)
    for v, label in [(0.2, "a"), (0.9, "b"), (0.4, "c")]:
        with torch.no_grad():
            pol.layers[0].bias.fill_(v)
        sel.offer(pol, label)
    assert sel.best(pol.sparsity()).label == "b"
    chosen = sel.restore_best(pol)
    assert chosen is not None and chosen.label == "b"
    assert _score(pol) == pytest.approx(0.9)
    assert sel.env_steps == 4 * 40  # the dense reference and three checkpoints
    # a checkpoint at another mask is never restored into this one
    denser = make_policy(hidden=(8,))
    assert sel.restore_best(denser) is None
    summary = sel.summary(chosen)
    assert [c["label"] for c in summary["checkpoints"]] == ["a", "b", "c"]
    assert summary["reference_mean"] == pytest.approx(1.0)


def test_selection_keeps_the_best_worst_condition_not_the_best_clean_return() -> None:
    """With attacked returns the score is the worse of the conditions' differences from the
    dense policy: a checkpoint level with the teacher on clean but 300 below it under MAD
    loses to one 50 below on clean and 20 below under MAD."""
    ref = {"clean": np.full(4, 1000.0), "mad": np.full(4, 800.0)}
    offers = iter(
        [
            {"clean": np.full(4, 1000.0), "mad": np.full(4, 500.0)},  # score -300
            {"clean": np.full(4, 950.0), "mad": np.full(4, 780.0)},  # score -50
            {"clean": np.full(4, 1010.0), "mad": np.full(4, 600.0)},  # score -200
        ]
    )
    sel = CheckpointSelector(lambda p: (next(offers), 3), ref)
    pol = prune(make_policy(hidden=(8,)), 0.5)
    kept = [sel.offer(pol, label) for label in ("a", "b", "c")]
    assert kept == [True, True, False]
    best = sel.best(pol.sparsity())
    assert best is not None and best.label == "b" and best.score == pytest.approx(-50.0)
    summary = sel.summary(best)
    assert summary["reference_attacked"] == {"mad": 800.0}
    assert summary["checkpoints"][0]["attacked"] == {"mad": 500.0}
    assert [c["score"] for c in summary["checkpoints"]] == [-300.0, -50.0, -200.0]
    # clean only (an array), the score is the clean difference: the best clean return wins
    clean = iter([np.full(4, 1000.0), np.full(4, 950.0), np.full(4, 1010.0)])
    sel2 = CheckpointSelector(lambda p: (next(clean), 3), ref["clean"])
    for label in ("a", "b", "c"):
        sel2.offer(pol, label)
    got = sel2.best(pol.sparsity())
    assert got is not None and got.label == "c" and "attacked" not in got.to_dict()


def test_select_attacks_must_be_cheap_distinct_attacks() -> None:
    assert FinetuneConfig(select_attacks=["mad", "random"]).select_attacks == ["mad", "random"]
    for bad in (["sa_rl"], ["critic"], ["mad", "mad"], ["nope"]):
        with pytest.raises(CompressorError, match="select_attacks"):
            FinetuneConfig(select_attacks=bad)


def test_falls_and_clearly_lost() -> None:
    ref = np.array([100.0, 100.0, 100.0, 100.0])
    returns = iter([np.array([100.0, 10.0, 100.0, 20.0]), np.array([30.0, 20.0, 10.0, 40.0])])
    sel = CheckpointSelector(lambda p: (next(returns), 1), ref, lost_fraction=0.5)
    pol = make_policy(hidden=(8,))
    sel.offer(pol, "x")
    assert sel.history[0].falls == 2 and not sel.clearly_lost()  # mean 57.5 > 50
    sel2 = CheckpointSelector(lambda p: (next(returns), 1), ref, lost_fraction=0.5)
    sel2.offer(pol, "y")
    assert sel2.clearly_lost()  # mean 25 < 100 - 50
    assert not CheckpointSelector(lambda p: (ref, 1), ref).clearly_lost()  # 0: never lost


def _dagger_case(
    on_step: object = None, reference: float = 5.0
) -> tuple[object, CheckpointSelector]:
    teacher = make_policy(hidden=(16,))
    student = prune(teacher, 0.5)
    states = np.random.default_rng(0).normal(size=(256, 4)).astype(np.float32)
    cfg = FinetuneConfig(steps=40, batch_size=32, dagger_rounds=4, dagger_patience=1)
    calls = iter([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])  # every round worse than the one before

    def evaluate(p: Policy) -> tuple[np.ndarray, int]:
        return np.full(2, next(calls)), 2

    sel = CheckpointSelector(evaluate, np.full(2, reference), lost_fraction=0.5)
    collected: list[int] = []

    def collect(p: Policy) -> np.ndarray:
        collected.append(1)
        return states[:32]

    stats = distill_with_dagger(
        student, teacher, states, None, cfg, collect, on_step=on_step, selector=sel
    )
    return stats, sel


def test_dagger_stops_when_a_round_does_not_help() -> None:
    stats, sel = _dagger_case()
    # phase 0 is the first checkpoint; phase 1 (after one DAgger round) is worse: stop there
    assert [c.label for c in sel.history] == ["phase 0", "phase 1"]
    assert stats.dagger_rounds_run == 1 and stats.steps == 2 * (40 // 5)
    assert sel.stopped == "no gain"


def test_a_lost_level_stops_only_after_a_round_that_did_not_help() -> None:
    # every checkpoint is far below the dense 100: the first phase alone does not stop it
    stats, sel = _dagger_case(reference=100.0)
    assert [c.label for c in sel.history] == ["phase 0", "phase 1"]
    assert sel.stopped == "lost"


def test_micro_pruning_runs_every_round() -> None:
    seen: list[int] = []
    stats, sel = _dagger_case(on_step=seen.append)
    assert len(sel.history) == 5 and stats.dagger_rounds_run == 4
    assert seen == list(range(40))


def test_selection_seeds_are_apart_from_the_verdicts() -> None:
    prof = load_profile("cartpole")
    f = prof.finetune
    seeds = selection_seeds(prof, 6)
    dagger = range(f.state_seed + f.state_episodes, f.state_seed + f.state_episodes + 10)
    assert min(seeds) >= DECISION_SEED_END and not set(seeds) & set(dagger)
    assert min(seeds) >= f.state_seed + f.state_episodes + f.dagger_episodes


def test_selection_on_real_cartpole_episodes(tmp_path: object) -> None:
    """On real rollouts: the kept policy's selection return is the best of its checkpoints
    (re-evaluated: the evaluation is deterministic), and the stats say what ran."""
    prof = load_profile("cartpole")
    ft = dataclasses.replace(
        prof.finetune, steps=60, select_episodes=3, dagger_rounds=2, dagger_episodes=2
    )
    prof = dataclasses.replace(
        prof,
        finetune=dataclasses.replace(ft, state_episodes=2),
        evaluation=dataclasses.replace(prof.evaluation, num_envs=3),
    )
    dense = load_native("profiles/cartpole.pt")
    threat = ThreatModel(prof.threat.eps, prof.threat.norm, prof.threat.space)
    states, _ = dense_states(dense, prof)
    collect = student_state_collector(prof, threat)
    pol, stats = prune_candidate(dense, 0.8, prof, states, threat, collect)
    sel = stats.selection
    assert sel is not None and sel["episodes"] == 3
    labels = [c["label"] for c in sel["checkpoints"]]
    assert labels[0] == "pruned" and sel["chosen"] in labels
    best = max(c["mean"] for c in sel["checkpoints"])
    evaluate = selection_evaluator(prof, 3, threat)
    assert evaluate is not None
    assert float(np.mean(evaluate(pol)[0]["clean"])) == pytest.approx(best, abs=1e-3)
    assert sel["env_steps"] > 0


def test_finetune_candidate_without_an_evaluator_has_no_selection() -> None:
    teacher = make_policy(hidden=(16,))
    student = prune(teacher, 0.5)
    states = np.random.default_rng(0).normal(size=(128, 4)).astype(np.float32)
    cfg = FinetuneConfig(steps=10, batch_size=16, dagger_rounds=0, select_episodes=4)
    inputs = FinetuneInputs(teacher, states, None, lambda p: states, None, "", {})
    assert finetune_candidate(student, inputs, cfg).selection is None


def test_selection_evaluator_adds_the_attacked_returns_on_the_same_seeds() -> None:
    """``select_attacks``: the evaluator returns MAD's returns beside the clean ones, on the
    selection seeds with the verdict's noise, equal to the attack's own evaluation there."""
    from compressor.evaluate import evaluate_attack
    from compressor.rl.noise import ObservationNoise

    prof = load_profile("cartpole")
    prof = dataclasses.replace(prof, evaluation=dataclasses.replace(prof.evaluation, num_envs=3))
    threat = ThreatModel(prof.threat.eps, prof.threat.norm, prof.threat.space)
    dense = load_native("profiles/cartpole.pt")
    evaluate = selection_evaluator(prof, 3, threat, ["mad"])
    assert evaluate is not None
    got, steps = evaluate(dense)
    assert isinstance(got, dict) and list(got) == ["clean", "mad"]
    noise = ObservationNoise(prof.evaluation.obs_noise, threat, tuple(threat.scale(dense).tolist()))
    mad = evaluate_attack(
        dense, prof.env.id, prof.env.kwargs, selection_seeds(prof, 3), "mad", threat,
        attack_seed=prof.attacks.seed, num_envs=3, noise=noise,
    )  # fmt: skip
    np.testing.assert_allclose(got["mad"], mad.stats.returns)
    assert steps == int(got["clean"].sum() + got["mad"].sum())  # CartPole: reward 1 per step
    with pytest.raises(CompressorError, match="threat"):
        selection_evaluator(prof, 3, None, ["mad"])
