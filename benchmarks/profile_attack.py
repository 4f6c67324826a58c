"""Where an attacked evaluation's time goes, by sampling profiler.

    pip install py-spy
    py-spy record -f raw -r 250 -o mad.txt -- python benchmarks/profile_attack.py run --envs 16
    python benchmarks/profile_attack.py summarise mad.txt

``run`` evaluates the reference policy under MAD (one episode per seed); ``summarise`` prints
the share of the rollout's samples spent in each part (simulation, PGD, the evaluation's TV
meter and the policy's own forward passes). Run it against another commit's code with
``PYTHONPATH=<worktree>`` to compare.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: (label, function name as py-spy prints it): the parts of one attacked env step.
PARTS = [
    ("rollout (everything below)", "rollout"),
    ("simulation (sub-env steps)", "HopperEnv.step"),
    ("attack (PGD and its set-up)", "MADAttack.perturb"),
    ("  of which PGD iterations", "pgd"),
    ("  of which autograd's backward", "_engine_run_backward"),
    ("policy forward passes (all callers)", "Policy.forward"),
    ("TV meter (attack and two forwards)", "_TVMeter.__call__"),
]


def run(policy: str, env_id: str, eps: float, envs: int, episodes: int) -> None:
    """One MAD-attacked evaluation (the thing being profiled)."""
    import torch

    from compressor.core.threat import ThreatModel
    from compressor.evaluate import evaluate_attack
    from compressor.policy.loading import load_policy

    torch.set_num_threads(1)
    pol = load_policy(policy).policy.eval()
    seeds = list(range(episodes))
    r = evaluate_attack(pol, env_id, {}, seeds, "mad", ThreatModel(eps), num_envs=envs)
    print(f"{r.steps} steps in {r.wall_s:.1f} s: {r.steps / r.wall_s:.0f} steps/s")


def summarise(raw: Path) -> None:
    """Share of the rollout's samples in each of :data:`PARTS` (py-spy ``-f raw`` output)."""
    inside: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        names = {frame.split(" (")[0] for frame in stack.split(";")}
        for _, fn in PARTS:
            if fn in names:
                inside[fn] += int(count)
    total = inside["rollout"] or 1
    for label, fn in PARTS:
        print(f"{inside[fn] / total:6.1%}  {label}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--policy", default=str(REPO / "profiles" / "hopper.pt"))
    r.add_argument("--env", default="Hopper-v5")
    r.add_argument("--eps", type=float, default=0.075)
    r.add_argument("--envs", type=int, default=16)
    r.add_argument("--episodes", type=int, default=32)
    s = sub.add_parser("summarise")
    s.add_argument("raw", type=Path)
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.policy, args.env, args.eps, args.envs, args.episodes)
    else:
        summarise(args.raw)


if __name__ == "__main__":
    main()
