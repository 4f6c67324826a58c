"""Attacked-evaluation throughput: env steps per second under MAD, as a ratio to raw simulator
steps with random actions, same env count, same run (so machine load affects both alike).

    python benchmarks/attack_throughput.py [--policy profiles/hopper.pt] [--num-envs 64]

Raw: the same synchronous vector env stepped with uniform random actions (no policy, resets as
episodes end). Attacked: ``compressor.evaluate.evaluate_attack`` with MAD (10 PGD steps of
ε/10 from a random start, the literature's attack) at the profile's ε, through the one rollout
engine. Goal: ratio ≥ 0.25.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from compressor.envs import make_vector_env
from compressor.evaluate import evaluate_attack
from compressor.loading import load_policy
from compressor.threat import ThreatModel

REPO = Path(__file__).resolve().parents[1]


def raw_steps_per_s(env_id: str, num_envs: int, steps: int, seed: int = 0) -> float:
    """Env steps per second of the vector env under uniform random actions."""
    envs = make_vector_env(env_id, {}, num_envs)
    envs.action_space.seed(seed)
    envs.reset(seed=seed)
    t0, done = time.perf_counter(), 0
    try:
        while done < steps:
            _, _, term, trunc, _ = envs.step(envs.action_space.sample())
            done += num_envs
            ended = term | trunc
            if ended.any():
                envs.reset(options={"reset_mask": ended})
    finally:
        envs.close()
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=str(REPO / "profiles" / "hopper.pt"))
    ap.add_argument("--env", default="Hopper-v5")
    ap.add_argument("--eps", type=float, default=0.075)
    ap.add_argument("--num-envs", type=int, default=64)
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--raw-steps", type=int, default=50_000)
    args = ap.parse_args()
    torch.set_num_threads(1)

    policy = load_policy(args.policy).policy.eval()
    threat = ThreatModel(args.eps)
    raw_before = raw_steps_per_s(args.env, args.num_envs, args.raw_steps // 2)
    res = evaluate_attack(
        policy,
        args.env,
        {},
        list(range(args.episodes)),
        "mad",
        threat,
        num_envs=args.num_envs,
    )
    raw_after = raw_steps_per_s(args.env, args.num_envs, args.raw_steps // 2, seed=1)
    raw = float(np.mean([raw_before, raw_after]))  # bracket the attacked run: same load
    attacked = res.steps / res.wall_s
    print(f"env {args.env}, {args.num_envs} envs, policy {Path(args.policy).name}, ε {args.eps}")
    print(f"raw simulator, random actions: {raw:10.0f} steps/s")
    print(f"evaluation under MAD:          {attacked:10.0f} steps/s ({res.steps} steps)")
    print(f"ratio: {attacked / raw:.3f} (goal ≥ 0.25)")


if __name__ == "__main__":
    main()
