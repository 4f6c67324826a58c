"""Where the time goes: throughput ratios, executor speedups, per-stage shares and peak memory,
all measured in one run of this script (ratios, so a shared machine's load hits both sides).

    python benchmarks/suite.py                       # everything (about 20 min on 2 cores)
    python benchmarks/suite.py --skip-runs           # without the two `compress run` jobs
    python benchmarks/suite.py --only throughput --baseline fc1a109   # before/after, one run
    python benchmarks/suite.py --only throughput rates --baseline 75b8e1c   # sections 1 and 2
    python benchmarks/suite.py --json suite.json     # also write the numbers as JSON

1. Throughput, same env count: clean evaluation / raw simulator and MAD-attacked evaluation /
   raw simulator (goals: MAD ≥ 0.5 at 16 envs, ≥ 0.7 at 64). Raw: the rollout engine's vector
   env stepped with random actions, measured before and after the evaluations and averaged.
   With ``--baseline REV`` the same measurement also runs on the code of commit REV (a
   temporary git worktree, in a subprocess, right before the current code's), so the old and
   the new path's ratios come from the same run.
2. Rates: fine-tuning (distillation) steps per second and CROWN (and IBP) bounds per second on
   the reference policy, one thread (bounds: best of 3, by wall clock and by CPU time; with
   ``--baseline REV`` also on REV's code, right before).
3. Scaling: wall time of evaluation, MAD-attacked evaluation, CROWN certification and
   distillation as the network grows (64², 256², 1024² hidden, random weights on the env's
   shapes) and, for the two that simulate, as the env count grows (1, 16, 64).
4. Executors: the same batch of MAD-attacked evaluation jobs (``evaluate_suite``'s job, one per
   block of seeds) on ``local`` with 1 and 2 workers and on a private local Ray instance with 1
   and 2 CPUs; speedup = time(1) / time(2). Pools are warmed up first (start-up is excluded and
   printed apart); every executor must return the same numbers.
5. ``compress run`` on the reference policy (default ``hopper``) with ``--workers 1`` and with
   ``--workers 2``: end-to-end speedup, the share of each stage (from report.json's
   ``performance`` block), peak memory (the report's bound and the largest process's maximum
   resident set, from the OS), goal under 2 GiB; both runs must choose the same sparsity.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compressor.attacks import AttackContext, make_attack
from compressor.certify.local import output_bounds
from compressor.core.config import FinetuneConfig
from compressor.core.executor import Executor, make_executor
from compressor.core.threat import ThreatModel
from compressor.evaluate import _suite_job, evaluate, evaluate_attack
from compressor.finetune.distill import distill
from compressor.policy.loading import load_policy
from compressor.policy.model import Policy
from compressor.prune.criteria import prune
from compressor.report.performance import raw_steps_per_s
from compressor.rl.envs import make_vector_env
from compressor.rl.rollout import rollout

REPO = Path(__file__).resolve().parents[1]


def _cpu(f: Callable[[], Any]) -> tuple[Any, float]:
    """``f()`` and the CPU seconds this process spent in it (other jobs' load left out)."""
    c0 = time.process_time()
    out = f()
    return out, time.process_time() - c0


def _creation_cpu(env_id: str, num_envs: int) -> float:
    """CPU seconds of making and closing the vector env (inside every timed call below, outside
    their own wall-clock timers): subtracted from the CPU times."""
    return min(_cpu(lambda: make_vector_env(env_id, {}, num_envs).close())[1] for _ in range(2))


def throughput(policy_path: str, env_id: str, eps: float, num_envs: int, episodes: int) -> dict:
    """Clean and MAD evaluation throughput over raw simulator throughput, same env count, by
    wall clock (the goal's measure) and by this process's CPU time (steadier on a shared
    machine: another job's load slows the wall clock of whatever runs at that moment)."""
    torch.set_num_threads(1)
    policy = load_policy(policy_path).policy.eval()
    seeds = list(range(episodes))
    raw_steps = 20 * num_envs * 50
    make = _creation_cpu(env_id, num_envs)
    before, c_before = _cpu(lambda: raw_steps_per_s(env_id, num_envs, raw_steps))
    (clean, _), c_clean = _cpu(lambda: evaluate(policy, env_id, {}, seeds, num_envs=num_envs))
    mad, c_mad = _cpu(
        lambda: evaluate_attack(
            policy, env_id, {}, seeds, "mad", ThreatModel(eps), num_envs=num_envs
        )
    )
    after, c_after = _cpu(lambda: raw_steps_per_s(env_id, num_envs, raw_steps, seed=1))
    raw = (before + after) / 2
    raw_cpu = 2 * raw_steps / (c_before + c_after - 2 * make)
    clean_cpu, mad_cpu = clean.steps / (c_clean - make), mad.steps / (c_mad - make)
    return {
        "num_envs": num_envs,
        "raw_steps_per_s": round(raw, 1),
        "clean_steps_per_s": round(clean.steps / clean.wall_s, 1),
        "mad_steps_per_s": round(mad.steps / mad.wall_s, 1),
        "clean_over_raw": round(clean.steps / clean.wall_s / raw, 3),
        "mad_over_raw": round(mad.steps / mad.wall_s / raw, 3),
        "cpu": {
            "raw_steps_per_s": round(raw_cpu, 1),
            "clean_steps_per_s": round(clean_cpu, 1),
            "mad_steps_per_s": round(mad_cpu, 1),
            "clean_over_raw": round(clean_cpu / raw_cpu, 3),
            "mad_over_raw": round(mad_cpu / raw_cpu, 3),
        },
    }


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """A temporary, detached git worktree of this repository at ``rev``."""
    tmp = Path(tempfile.mkdtemp(prefix="suite-baseline-"))
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tmp), rev],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        yield tmp
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tmp)],
            capture_output=True,
        )  # fmt: skip


def on_baseline(tree: Path, function: str, *args: str | float | int) -> dict:
    """``function(*args)`` of this very module (:func:`throughput` or :func:`rates`), run on
    the ``compressor`` package of ``tree`` (a subprocess with that tree first on its path; the
    tree must have this layout: a365a3e or later)."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import suite; "
        "f = getattr(suite, sys.argv[2]); a = json.loads(sys.argv[3]); "
        "print(json.dumps(f(*a)))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "benchmarks"), function, json.dumps(args)],
        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True,
    )  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"baseline {function} failed: {r.stderr.strip()[-600:]}")
    out: dict = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def throughput_line(label: str, t: dict) -> str:
    """One throughput line in the form the issue asks for, and the same by CPU time."""
    goal = {16: " (goal ≥ 0.5)", 64: " (goal ≥ 0.7)"}.get(t["num_envs"], "")
    c = t["cpu"]
    return (
        f"{t['num_envs']:3d} envs: raw {t['raw_steps_per_s']:7.0f}/s  clean "
        f"{t['clean_steps_per_s']:7.0f}/s  MAD {t['mad_steps_per_s']:7.0f}/s  clean/raw "
        f"{t['clean_over_raw']:.2f}  MAD/raw {t['mad_over_raw']:.2f}{goal}  [{label}]\n"
        f"     by CPU time: raw {c['raw_steps_per_s']:7.0f}/s  clean "
        f"{c['clean_steps_per_s']:7.0f}/s  MAD {c['mad_steps_per_s']:7.0f}/s  clean/raw "
        f"{c['clean_over_raw']:.2f}  MAD/raw {c['mad_over_raw']:.2f}"
    )


def _states(policy: Policy, env_id: str, n: int) -> np.ndarray:
    """``n`` states the policy visits (short episodes from seeds 1000...)."""
    res = rollout(policy, env_id, {}, list(range(1000, 1016)), record_states=True, max_steps=200)
    assert res.states is not None
    reps = -(-n // len(res.states))
    return np.concatenate([res.states] * reps)[:n]


def _distill_rate(teacher: Policy, states: np.ndarray, threat: ThreatModel, steps: int) -> float:
    student = prune(teacher, 0.9)
    cfg = dataclasses.replace(FinetuneConfig(), steps=steps)
    warm = dataclasses.replace(cfg, steps=3)  # first-use costs (allocator, Adam state) apart
    distill(student.clone(), teacher, states, threat, warm, seed=1)
    st = distill(student, teacher, states, threat, cfg, seed=0)
    return st.steps / st.wall_s


def _bounds_rate(policy: Policy, states: np.ndarray, threat: ThreatModel, method: str) -> float:
    return _bounds_rates(policy, states, threat, method)[0]


def _bounds_rates(
    policy: Policy, states: np.ndarray, threat: ThreatModel, method: str, repeat: int = 1
) -> tuple[float, float]:
    """States per second of wall clock and of this process's CPU time (best of ``repeat``)."""
    torch.set_num_threads(1)
    output_bounds(policy, states[:64], threat, method=method)  # first-use costs apart
    wall = cpu = math.inf
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        output_bounds(policy, states, threat, method=method)
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return len(states) / wall, len(states) / cpu


def _fast_vs_precise(policy: Policy, states: np.ndarray, threat: ThreatModel) -> dict:
    """CROWN's default bounds against its all-float64 ones (``precise=True``), where this
    tree's ``output_bounds`` has the switch: the largest width ratio and outward move."""
    if "precise" not in inspect.signature(output_bounds).parameters:
        return {}
    lo, hi = output_bounds(policy, states, threat)
    p_lo, p_hi = output_bounds(policy, states, threat, precise=True)
    width = p_hi - p_lo
    return {
        "crown_width_over_float64_max": round(float(((hi - lo) / width).max()), 6),
        "crown_outward_over_width_max": float(torch.maximum(p_lo - lo, hi - p_hi).div(width).max()),
    }


def rates(policy_path: str, env_id: str, eps: float, ft_steps: int, n_states: int) -> dict:
    """Fine-tuning steps per second and CROWN / IBP bounds per second on the reference policy
    (bounds: best of 3, by wall clock and by CPU time)."""
    torch.set_num_threads(1)
    policy = load_policy(policy_path).policy.eval()
    threat = ThreatModel(eps)
    states = _states(policy, env_id, n_states)
    crown = _bounds_rates(policy, states, threat, "crown", repeat=3)
    ibp = _bounds_rates(policy, states, threat, "ibp", repeat=3)
    return {
        **_fast_vs_precise(policy, states, threat),
        "finetune_steps": ft_steps,
        "finetune_steps_per_s": round(_distill_rate(policy, states, threat, ft_steps), 1),
        "bound_states": n_states,
        "crown_states_per_s": round(crown[0], 1),
        "ibp_states_per_s": round(ibp[0], 1),
        "cpu": {"crown_states_per_s": round(crown[1], 1), "ibp_states_per_s": round(ibp[1], 1)},
    }


def random_policy(like: Policy, width: int, seed: int) -> Policy:
    """A two-hidden-layer policy of ``width`` with ``like``'s shapes, normalisation and σ, and
    PyTorch's default random weights."""
    torch.manual_seed(seed)
    spec = dataclasses.replace(like.spec, hidden=[width, width], source={})
    p = Policy(spec)
    with torch.no_grad():
        p.obs_mean.copy_(like.obs_mean)
        p.obs_var.copy_(like.obs_var)
        if hasattr(like, "log_std"):
            p.log_std.copy_(like.log_std)
    return p.eval()


def _per_kstep(policy: Policy, env_id: str, threat: ThreatModel, envs: int, attack: bool) -> float:
    """Seconds per 1000 env steps of clean or MAD-attacked rollouts: one episode per env
    (at least 4), each cut at 50 steps."""
    seeds = list(range(max(4, envs)))
    perturb = make_attack("mad", AttackContext(policy, threat, 0)).perturb if attack else None
    res = rollout(policy, env_id, {}, seeds, num_envs=envs, perturb=perturb, max_steps=50)
    return 1000 * res.wall_s / res.steps


def scaling(
    policy_path: str, env_id: str, eps: float, widths: list[int], envs: list[int]
) -> list[dict]:
    """Per-size rows: s per 1000 env steps of evaluation and attack at each env count, s per
    1000 states of CROWN, s per distillation step (batch 256)."""
    like = load_policy(policy_path).policy.eval()
    threat = ThreatModel(eps)
    states = _states(like, env_id, 256)
    rows = []
    for width in widths:
        p = random_policy(like, width, seed=width)
        row: dict[str, Any] = {"width": width, "parameters": p.num_parameters()}
        for n in envs:
            row[f"eval_s_per_kstep_{n}"] = round(_per_kstep(p, env_id, threat, n, False), 4)
            row[f"mad_s_per_kstep_{n}"] = round(_per_kstep(p, env_id, threat, n, True), 4)
        row["crown_s_per_kstate"] = round(1000 / _bounds_rate(p, states[:64], threat, "crown"), 4)
        row["distill_s_per_step"] = round(1 / _distill_rate(p, states, threat, 20), 5)
        rows.append(row)
    return rows


def growth_notes(rows: list[dict]) -> list[str]:
    """Each stage's growth exponent in the parameter count between consecutive sizes (1 =
    linear); a note where it exceeds 1.1."""
    notes = []
    keys = [k for k in rows[0] if k.endswith(("kstep_1", "kstep_64", "kstate", "per_step"))]
    for a, b in zip(rows[:-1], rows[1:]):
        dp = math.log(b["parameters"] / a["parameters"])
        for k in keys:
            e = math.log(b[k] / a[k]) / dp
            if e > 1.1:
                notes.append(f"{k}: {a['width']}² → {b['width']}² grows as parameters^{e:.2f}")
    return notes


def _timed_map(ex: Executor, jobs: list[tuple[Any, ...]]) -> tuple[float, float, list[Any]]:
    """(start-up seconds, seconds for the jobs, results); start-up = a first tiny map."""
    t0 = time.perf_counter()
    ex.map(abs, [(-1,)] * ex.workers)  # start the pool / Ray and its workers
    t1 = time.perf_counter()
    out = ex.map(_suite_job, jobs)
    return t1 - t0, time.perf_counter() - t1, out


def executor_speedups(
    policy_path: str, env_id: str, eps: float, num_envs: int, jobs_n: int, per_job: int
) -> dict:
    """Time the same evaluation jobs on local 1/2 workers and Ray 1/2 CPUs."""
    policy = load_policy(policy_path).policy.eval()
    threat = ThreatModel(eps)
    jobs = [
        (policy, env_id, {}, list(range(k * per_job, (k + 1) * per_job)), "mad", threat, 0,
         num_envs, None)
        for k in range(jobs_n)
    ]  # fmt: skip
    out: dict[str, Any] = {"jobs": jobs_n, "episodes_per_job": per_job}
    reference = None
    kinds = [("local", "local")]
    try:
        import ray  # noqa: F401

        kinds.append(("ray", "local"))
    except ImportError:
        out["ray"] = "not installed (pip install '.[ray]')"
    for kind, address in kinds:
        times = {}
        for workers in (1, 2):
            ex = make_executor(kind, workers, address)
            try:
                startup, secs, res = _timed_map(ex, jobs)
            finally:
                ex.close()
            numbers = [(r.stats.mean, r.steps, r.mean_tv) for r in res]
            reference = reference or numbers
            if numbers != reference:
                raise SystemExit(f"{kind} with {workers} workers gave other numbers: {numbers}")
            times[workers] = secs
            out[f"{kind}_{workers}_s"] = round(secs, 2)
            out[f"{kind}_{workers}_startup_s"] = round(startup, 2)
        out[f"{kind}_speedup_2_over_1"] = round(times[1] / times[2], 3)
    return out


def compress_runs(source: str, out_dir: Path) -> dict:
    """`compress run SOURCE` with 1 and 2 workers: times, stage shares, memory."""
    out: dict[str, Any] = {"source": source}
    chosen = {}
    for workers in (1, 2):
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        r = subprocess.run(
            [sys.executable, "-m", "compressor.cli", "run", source, "--out", str(out_dir),
             "--name", f"workers-{workers}", "--workers", str(workers), "--json"],
            capture_output=True, text=True,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        if r.returncode not in (0, 4):
            raise SystemExit(f"compress run failed: {r.stderr.strip().splitlines()[-1]}")
        rep = json.loads(r.stdout)
        perf = rep["performance"]
        maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        chosen[workers] = rep["verdict"]["chosen_sparsity"]
        out[f"workers_{workers}"] = {
            "wall_s": round(wall, 1),
            "chosen_sparsity": chosen[workers],
            "stages": {s["stage"]: s["share"] for s in perf["stages"]},
            "peak_memory_mib": perf["peak_memory_mib"],
            # the largest single process of this run (the OS's count; 0 if not above earlier runs)
            "largest_process_mib": round(max(maxrss, before) / 1024, 1),
        }
    out["end_to_end_speedup_2_over_1"] = round(
        out["workers_1"]["wall_s"] / out["workers_2"]["wall_s"], 3
    )
    out["same_choice"] = chosen[1] == chosen[2]
    return out


def print_throughput(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Section 1 (with ``--baseline``: the old code's lines right before the new's)."""
    print(f"== throughput ({args.env}, {Path(args.policy).name}, ε {args.eps}) ==")
    policy = str(Path(args.policy).resolve())
    with contextlib.ExitStack() as stack:
        tree = stack.enter_context(worktree(args.baseline)) if args.baseline else None
        for _ in range(args.repeat):
            for n in args.num_envs:
                if tree is not None:
                    old = on_baseline(
                        tree, "throughput", policy, args.env, args.eps, n, args.episodes
                    )
                    results.setdefault("throughput_baseline", []).append(old)
                    print(throughput_line(f"old path, {args.baseline}", old), flush=True)
                t = throughput(policy, args.env, args.eps, n, args.episodes)
                results["throughput"].append(t)
                print(throughput_line("new path" if tree is not None else "this tree", t))
                if tree is not None:
                    t["new_over_old"] = {
                        k: round(t[f"{k}_steps_per_s"] / old[f"{k}_steps_per_s"], 3)
                        for k in ("clean", "mad")
                    }
                    print(
                        f"     new/old: MAD-attacked evaluation {t['new_over_old']['mad']:.2f}×, "
                        f"clean evaluation {t['new_over_old']['clean']:.2f}× (wall clock)",
                        flush=True,
                    )


def print_rates(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Section 2."""
    print(f"== rates ({Path(args.policy).name}, one thread) ==")
    policy = str(Path(args.policy).resolve())
    a = (policy, args.env, args.eps, args.finetune_steps, args.bound_states)
    with contextlib.ExitStack() as stack:
        tree = stack.enter_context(worktree(args.baseline)) if args.baseline else None
        if tree is not None:
            old = on_baseline(tree, "rates", *a)
            results["rates_baseline"] = old
            print(rates_lines(f"old path, {args.baseline}", old), flush=True)
        r = rates(*a)
    results["rates"] = r
    print(rates_lines("new path" if tree is not None else "this tree", r), flush=True)
    if tree is not None:
        wall = r["crown_states_per_s"] / old["crown_states_per_s"]
        cpu = r["cpu"]["crown_states_per_s"] / old["cpu"]["crown_states_per_s"]
        print(f"     new/old: CROWN {wall:.2f}× (wall clock), {cpu:.2f}× (CPU time)")


def rates_lines(label: str, r: dict) -> str:
    """The fine-tuning rate and the bounds' rates (wall clock, then CPU time)."""
    cpu = r.get("cpu", {})
    crown_cpu = cpu.get("crown_states_per_s", float("nan"))
    return (
        f"fine-tuning (distillation, batch 256, 25% PGD-3 rows, 90% sparse student): "
        f"{r['finetune_steps_per_s']:.1f} steps/s over {r['finetune_steps']} steps  [{label}]\n"
        f"local bounds on {r['bound_states']} visited states: CROWN "
        f"{r['crown_states_per_s']:.0f} states/s (10,000 in "
        f"{10_000 / r['crown_states_per_s']:.2f} s; goal < 1 s), IBP "
        f"{r['ibp_states_per_s']:.0f} states/s\n"
        f"     by CPU time: CROWN {crown_cpu:.0f} states/s (10,000 in {10_000 / crown_cpu:.2f} s), "
        f"IBP {cpu.get('ibp_states_per_s', float('nan')):.0f} states/s"
        + (
            f"\n     CROWN vs its float64 bounds: widths at most "
            f"{r['crown_width_over_float64_max']:.6f}×, moved outward by at most "
            f"{r['crown_outward_over_width_max']:.2e} of the width"
            if "crown_width_over_float64_max" in r
            else ""
        )
    )


def print_scaling(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Section 3."""
    print(f"== scaling ({args.env} shapes, random weights, 2 hidden layers, one thread) ==")
    rows = scaling(args.policy, args.env, args.eps, args.widths, args.scaling_envs)
    results["scaling"] = rows
    envs = args.scaling_envs
    head = "  ".join(f"eval@{n:<3d} MAD@{n:<3d}" for n in envs)
    print(f"{'hidden':>9s} {'params':>8s}  {head}  CROWN/1k states  distill/step")
    for r in rows:
        cells = "  ".join(
            f"{r[f'eval_s_per_kstep_{n}']:8.3f} {r[f'mad_s_per_kstep_{n}']:7.3f}" for n in envs
        )
        print(
            f"{r['width']:>4d}×{r['width']:<4d} {r['parameters']:>8d}  {cells}  "
            f"{r['crown_s_per_kstate']:12.3f} s  {r['distill_s_per_step']:10.4f} s"
        )
    print("  (evaluation and MAD: s per 1000 env steps at that env count)")
    for note in growth_notes(rows):
        print(f"  faster than linear: {note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=str(REPO / "profiles" / "hopper.pt"))
    ap.add_argument("--env", default="Hopper-v5")
    ap.add_argument("--eps", type=float, default=0.075)
    ap.add_argument("--num-envs", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--episodes-per-job", type=int, default=8)
    ap.add_argument("--run-source", default="hopper", help="policy or profile for compress run")
    ap.add_argument("--skip-runs", action="store_true", help="skip the compress run jobs")
    ap.add_argument(
        "--baseline", metavar="REV", help="also measure throughput and rates on commit REV's code"
    )
    ap.add_argument("--repeat", type=int, default=1, help="throughput measurements per env count")
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--scaling-envs", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--bound-states", type=int, default=2000)
    sections = ["throughput", "rates", "scaling", "executors", "runs"]
    ap.add_argument("--only", choices=sections, nargs="+", help="run these sections only")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {"throughput": []}

    def wanted(section: str) -> bool:
        return args.only is None or section in args.only

    if wanted("throughput"):
        print_throughput(args, results)
    if wanted("rates"):
        print_rates(args, results)
    if wanted("scaling"):
        print_scaling(args, results)
    if not wanted("executors"):
        e: dict[str, Any] = {}
    else:
        print(
            f"== executors ({args.jobs} MAD evaluation jobs of {args.episodes_per_job} episodes) =="
        )
        e = executor_speedups(
            args.policy, args.env, args.eps, args.num_envs[0], args.jobs, args.episodes_per_job
        )
        results["executors"] = e
    for kind in ("local", "ray"):
        if f"{kind}_1_s" in e:
            print(
                f"{kind:5s}: 1 worker {e[f'{kind}_1_s']:7.2f} s, 2 workers {e[f'{kind}_2_s']:7.2f}"
                f" s → speedup {e[f'{kind}_speedup_2_over_1']:.2f}× (start-up "
                f"{e[f'{kind}_1_startup_s']:.1f} / {e[f'{kind}_2_startup_s']:.1f} s, excluded)"
            )
        elif kind in e:
            print(f"{kind}: {e[kind]}")

    if wanted("runs") and not args.skip_runs:
        print(f"== compress run {args.run_source} (--workers 1 vs 2) ==")
        with tempfile.TemporaryDirectory() as tmp:
            c = compress_runs(args.run_source, Path(tmp))
        results["compress_run"] = c
        for w in (1, 2):
            r = c[f"workers_{w}"]
            mem = r["peak_memory_mib"]
            worker = mem["worker"] or 0
            print(
                f"workers {w}: {r['wall_s']:.1f} s, chosen {r['chosen_sparsity']}, peak memory "
                f"≤ {mem['bound']:.0f} MiB (main {mem['main']:.0f}, worker {worker:.0f};"
                f" largest process {r['largest_process_mib']:.0f} MiB; goal < 2048)"
            )
            shares = ", ".join(f"{k} {v:.1%}" for k, v in r["stages"].items() if v is not None)
            print(f"  stage shares: {shares}")
        print(
            f"end to end: {c['end_to_end_speedup_2_over_1']:.2f}× faster with 2 workers; same "
            f"chosen sparsity: {c['same_choice']}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
