"""Where an attacked evaluation's time goes, by sampling profiler.

    pip install py-spy
    py-spy record -f raw -r 250 -o mad.txt -- python benchmarks/profile_attack.py run --envs 16
    python benchmarks/profile_attack.py summarise mad.txt

``run`` evaluates the reference policy under MAD (one episode per seed); ``summarise`` prints
the share of the rollout's samples spent in each part (simulation, PGD, the evaluation's TV
meter and the policy's own forward passes). Run it against another commit's code with
``PYTHONPATH=<worktree>`` to compare.

    python benchmarks/profile_attack.py account --envs 16 --episodes 64

``account`` needs no profiler: it times the same evaluation's parts with ``perf_counter``
around each call (inside the real loop, so with the caches as MuJoCo leaves them), then the
same kernels alone on 16 and 64 visited states with warm caches, and prints both per vector
step.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path
from typing import Any

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


def _timed(counter: collections.Counter[str], name: str, f: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            counter[name] += time.perf_counter() - t0

    return wrapper


def _per_call_ms(f: Any, n: int) -> float:
    for _ in range(max(n // 10, 5)):
        f()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t0) / n * 1e3


def account(policy: str, env_id: str, eps: float, envs: int, episodes: int) -> None:
    """Per vector step of a MAD-attacked evaluation: simulation, the attack (PGD and the rest
    of the attack and TV meter), the action's forward pass and the rest, timed in the loop;
    then the kernels of one step alone (warm caches)."""
    import numpy as np
    import torch

    import compressor.core.pgd as pgd_module
    import compressor.evaluate as evaluate_module
    import compressor.rl.rollout as rollout_module
    from compressor.core.threat import ThreatModel
    from compressor.policy.loading import load_policy
    from compressor.policy.model import Policy

    torch.set_num_threads(1)
    pol = load_policy(policy).policy.eval()
    threat = ThreatModel(eps)
    seeds = list(range(episodes))
    spent: collections.Counter[str] = collections.Counter()
    steps = collections.Counter()
    step = rollout_module._Slots.step
    rollout_module._Slots.step = _timed(spent, "simulation", step)  # type: ignore[method-assign]
    meter = evaluate_module._TVMeter.__call__
    evaluate_module._TVMeter.__call__ = _timed(spent, "attack", meter)  # type: ignore[method-assign]
    inner = pgd_module.pgd_with_output
    pgd_module.pgd_with_output = _timed(spent, "pgd", inner)
    act = Policy.act
    Policy.act = _timed(spent, "act", act)  # type: ignore[method-assign]
    count = rollout_module._Slots.step

    def counted(self: Any, *args: Any) -> Any:
        steps["vector"] += 1
        return count(self, *args)

    rollout_module._Slots.step = counted  # type: ignore[method-assign]
    try:
        evaluate_attack = evaluate_module.evaluate_attack
        evaluate_attack(pol, env_id, {}, seeds[:2], "mad", threat, num_envs=2)
        spent.clear()
        steps.clear()
        t0 = time.perf_counter()
        r = evaluate_attack(pol, env_id, {}, seeds, "mad", threat, num_envs=envs)
        total = time.perf_counter() - t0
    finally:
        rollout_module._Slots.step = step  # type: ignore[method-assign]
        evaluate_module._TVMeter.__call__ = meter  # type: ignore[method-assign]
        pgd_module.pgd_with_output = inner
        Policy.act = act  # type: ignore[method-assign]
    n = steps["vector"]
    rest = total - spent["simulation"] - spent["attack"] - spent["act"]
    print(
        f"{envs} envs, {r.steps} env steps in {n} vector steps ({r.steps / n:.1f} envs running "
        f"on average), {total:.2f} s, {r.steps / total:.0f} steps/s; per vector step:"
    )
    for label, sec in (
        ("simulation (the running sub-envs' steps)", spent["simulation"]),
        ("attack and TV meter", spent["attack"]),
        ("  of which PGD", spent["pgd"]),
        ("action (Policy.act, row by row)", spent["act"]),
        ("the rest of the rollout", rest),
    ):
        print(f"  {sec / n * 1e3:6.3f} ms  {label}")
    states = rollout_module.rollout(pol, env_id, {}, seeds[:4], num_envs=4, record_states=True)
    visited = torch.as_tensor(np.asarray(states.states), dtype=torch.float32)
    print("the same kernels alone, warm caches, per call:")
    with pol.frozen():
        for rows in (16, 64):
            _kernels(pol, visited[:rows], threat)


def _kernels(pol: Any, x: Any, threat: Any) -> None:
    """Time one attacked step's kernels on the visited states ``x``, caches warm."""
    import torch

    from compressor.core.objectives import divergence_objective_and_ref
    from compressor.core.pgd import max_divergence_measured, pgd_with_output

    rows, scale = x.shape[0], threat.scale(pol)
    gen = torch.Generator().manual_seed(0)
    objective, _ = divergence_objective_and_ref(pol, None, x)
    width = pol.spec.hidden[0] if pol.spec.hidden else pol.spec.obs_dim
    h = torch.randn(rows, width)
    calls = {
        "MAD's perturb (objective, reference, PGD-10)": lambda: max_divergence_measured(
            pol, x, scale, threat, 10, gen
        ),
        "  PGD-10 alone": lambda: pgd_with_output(
            objective, x, scale, threat.eps, steps=10, random_start=True, generator=gen
        ),
        "Policy.act (row by row)": lambda: pol.act(x),
        f"torch.tanh on ({rows}, {width}) float32": lambda: torch.tanh(h),
        f"torch.sigmoid on ({rows}, {width}) float32": lambda: torch.sigmoid(h),
    }
    for label, f in calls.items():
        print(f"  {rows:3d} rows: {_per_call_ms(f, 200):7.3f} ms  {label}")


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


def _evaluation_args(p: argparse.ArgumentParser, episodes: int) -> None:
    """The arguments of an attacked evaluation (``run`` and ``account``)."""
    p.add_argument("--policy", default=str(REPO / "profiles" / "hopper.pt"))
    p.add_argument("--env", default="Hopper-v5")
    p.add_argument("--eps", type=float, default=0.075)
    p.add_argument("--envs", type=int, default=16)
    p.add_argument("--episodes", type=int, default=episodes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, episodes in (("run", 32), ("account", 64)):
        _evaluation_args(sub.add_parser(name), episodes)
    s = sub.add_parser("summarise")
    s.add_argument("raw", type=Path)
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.policy, args.env, args.eps, args.envs, args.episodes)
    elif args.cmd == "account":
        account(args.policy, args.env, args.eps, args.envs, args.episodes)
    else:
        summarise(args.raw)


if __name__ == "__main__":
    main()
