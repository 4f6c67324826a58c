"""Fine-tuning ablation: which part of the fine-tuning makes a pruned strong policy hold.

At one sparsity of one policy, with the policy's profile, the same pruned policy is fine-tuned
by each arm and then evaluated on the verdict's seeds (0..N-1, with the verdict's tiny
observation noise), which no arm saw::

    none          pruned, no fine-tuning
    distill       distillation + DAgger on clean student states, the last checkpoint kept
    +select       the same, the checkpoint with the best return on seeds ≥ 10000 kept, DAgger
                  stopped once a round does not help
    +perturbed    +select, DAgger also on states of the student under uniform ε noise

and, with the profile's fine-tuning otherwise unchanged, which rows perturb each batch (a
quarter of it, ``[finetune] perturbed_fraction`` / ``adversarial_fraction``)::

    rows:clean      none: every row at a state the policies visited
    rows:noise      uniform noise in the ε-ball, matched to the teacher at the noisy point
    rows:pgd-true     PGD on the student, matched to the teacher at the true state
    rows:pgd-teacher  PGD where student and teacher differ most, matched to the teacher there

    python benchmarks/finetune_ablation.py profiles/halfcheetah.pt --sparsity 0.8
    python benchmarks/finetune_ablation.py profiles/halfcheetah.pt --sparsity 0.8 \
        --arms rows:clean rows:noise rows:pgd-true rows:pgd-teacher --attacks mad

Prints a markdown table (clean mean ± std, min, falls, fine-tuning seconds, kept checkpoint)
and appends one JSON line per arm to ``--results``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ARMS = ["none", "distill", "+select", "+perturbed"]
#: arm -> (perturbed_fraction, adversarial_fraction, adversarial_target)
ROWS = {
    "rows:clean": (0.0, 0.0, "true"),
    "rows:noise": (0.25, 0.0, "true"),
    "rows:pgd-true": (0.0, 0.25, "true"),
    "rows:pgd-teacher": (0.0, 0.25, "perturbed"),
}


def _arm_profile(prof: Any, arm: str, select_episodes: int) -> Any:
    """The profile of one arm (only ``[finetune]`` changes)."""
    f = prof.finetune
    if arm in ROWS:
        noise, adv, target = ROWS[arm]
        f = dataclasses.replace(
            f, perturbed_fraction=noise, adversarial_fraction=adv, adversarial_target=target
        )
    elif arm == "distill":
        f = dataclasses.replace(f, select_episodes=0, dagger_perturbed_episodes=0)
    elif arm == "+select":
        f = dataclasses.replace(f, select_episodes=select_episodes, dagger_perturbed_episodes=0)
    elif arm == "+perturbed":
        f = dataclasses.replace(
            f,
            select_episodes=select_episodes,
            dagger_perturbed_episodes=max(f.dagger_perturbed_episodes, 4),
        )
    return dataclasses.replace(prof, finetune=f)


def run_arm(
    src: str,
    arm: str,
    sparsity: float,
    episodes: int,
    profile: str | None,
    select_episodes: int,
    attacks: list[str] | None = None,
) -> dict[str, Any]:
    """Prune, fine-tune by ``arm``, evaluate on the verdict's seeds (clean, and under
    ``attacks``); the row."""
    from compressor.api import load
    from compressor.evaluate import evaluate_suite
    from compressor.prune.criteria import prune
    from compressor.rl.noise import ObservationNoise
    from compressor.run.settings import resolve_settings
    from compressor.search.candidate import dense_states, prune_candidate, student_state_collector

    loaded = load(src)
    dense = loaded.policy
    settings = resolve_settings(dense, profile)
    prof, threat = _arm_profile(settings.profile, arm, select_episodes), settings.threat
    t0 = time.perf_counter()
    ft = None
    if arm == "none":
        pol = prune(dense, sparsity, prof.prune.method, prof.prune.scope)
    else:
        states, _ = dense_states(dense, prof)
        collect = student_state_collector(prof, threat)
        pol, stats = prune_candidate(
            dense, sparsity, prof, states, threat, collect, critic=loaded.critic
        )
        ft = stats.to_dict()
    tune_s = time.perf_counter() - t0
    seeds = list(range(prof.evaluation.seed, prof.evaluation.seed + episodes))
    out: dict[str, Any] = {}
    attacked: dict[str, dict[str, float]] = {}
    for who, p in (("dense", dense), ("student", pol)):
        noise = ObservationNoise(prof.evaluation.obs_noise, threat, tuple(threat.scale(p).tolist()))
        suite = evaluate_suite(
            p,
            prof.env.id,
            prof.env.kwargs,
            seeds,
            list(attacks or []),
            threat,
            attack_seed=prof.attacks.seed,
            num_envs=prof.evaluation.num_envs,
            noise=noise,
        )
        out[who] = np.asarray(suite.clean.stats.returns, dtype=float)
        attacked[who] = {k: float(v.stats.mean) for k, v in suite.attacks.items()}
    fall_line = 0.5 * float(np.median(out["dense"]))
    r = out["student"]
    sel = (ft or {}).get("selection") or {}
    return {
        "policy": src,
        "env": prof.env.id,
        "arm": arm,
        "sparsity": round(pol.sparsity(), 4),
        "prune_method": prof.prune.method,
        "dense_mean": float(out["dense"].mean()),
        "mean": float(r.mean()),
        "std": float(r.std(ddof=1)) if len(r) > 1 else 0.0,
        "min": float(r.min()),
        "falls": int((r < fall_line).sum()),
        "episodes": episodes,
        "finetune_s": round(tune_s, 1),
        "kept": sel.get("chosen"),
        "dagger_rounds_run": (ft or {}).get("dagger_rounds_run"),
        "attacked_dense": attacked["dense"],
        "attacked": attacked["student"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the rows."""
    head = (
        "| policy | sparsity | arm | clean (dense) | clean mean ± std | min | falls "
        "| attacked (dense) | kept checkpoint | fine-tuning |\n"
        "|---|---:|---|---:|---:|---:|---:|---|---|---:|\n"
    )

    def attacked(r: dict[str, Any]) -> str:
        dense = r.get("attacked_dense") or {}
        got = r.get("attacked") or {}
        return ", ".join(f"{k} {v:.1f} ({dense.get(k, float('nan')):.1f})" for k, v in got.items())

    lines = [
        f"| {r['env']} ({Path(r['policy']).name}) | {r['sparsity']:.1%} {r['prune_method']} "
        f"| {r['arm']} | {r['dense_mean']:.1f} | {r['mean']:.1f} ± {r['std']:.1f} "
        f"| {r['min']:.1f} | {r['falls']}/{r['episodes']} | {attacked(r) or '—'} "
        f"| {r['kept'] or '—'} | {r['finetune_s']:.0f} s |"
        for r in rows
    ]
    return head + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("policy")
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS + list(ROWS))
    ap.add_argument("--attacks", nargs="*", default=[], help="also evaluate under these")
    ap.add_argument("--episodes", type=int, default=16, help="evaluation episodes (seeds 0..)")
    ap.add_argument("--select-episodes", type=int, default=4)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--results", type=Path, default=Path("runs/finetune_ablation.jsonl"))
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not args.table_only:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        for arm in args.arms:
            row = run_arm(
                args.policy,
                arm,
                args.sparsity,
                args.episodes,
                args.profile,
                args.select_episodes,
                args.attacks,
            )
            with open(args.results, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(table([row]).splitlines()[-1], flush=True)
    rows = [json.loads(x) for x in args.results.read_text().splitlines() if x.strip()]
    print(table(rows))


if __name__ == "__main__":
    main()
